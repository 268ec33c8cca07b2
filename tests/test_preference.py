"""Preference tuning on causal-lm (train.objective dpo | orpo), on a tiny Llama built from a config: the losses equal
a direct computation, the LoRA reference is the adapter-disabled model (no second copy), resume stays bitwise,
reward accuracy rises on the training pairs, and the doctor's pair checks."""
import gc
import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import NEGATIVE, POSITIVE, sentence
from safetensors.torch import load_file
from test_causal_lm import build_tiny_llama, lm_recipe

from tunesmith.diagnosis.diagnose import doctor
from tunesmith.pipeline import train
from tunesmith.recipe import RecipeError, load
from tunesmith.tasks import get_task


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def one_thread():
    """A hidden-32 model gains nothing from threads; on a loaded machine their spinning costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_pairs(path, n=120, seed=0):
    """A review -> chosen: the right verdict word; rejected: the wrong one, in three row forms (prompt string and
    answer strings; prompt messages and answer messages; whole conversations, the prompt implicit)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            positive = i % 2 == 0
            prompt = f"review {sentence(rng, positive)} verdict"
            good, bad = ("pos", "neg") if positive else ("neg", "pos")
            user = [{"role": "user", "content": prompt}]
            if i % 3 == 0:
                row = {"prompt": prompt, "chosen": good, "rejected": bad}
            elif i % 3 == 1:
                row = {"prompt": user, "chosen": [{"role": "assistant", "content": good}],
                       "rejected": [{"role": "assistant", "content": bad}]}
            else:
                row = {"chosen": user + [{"role": "assistant", "content": good}],
                       "rejected": user + [{"role": "assistant", "content": bad}]}
            f.write(json.dumps(row) + "\n")
    return path


def pair_recipe(model_dir, data_file, objective="dpo", **sections):
    train_cfg = {"objective": objective, "epochs": 8, "learning_rate": 1e-2, "dpo": {"beta": 0.5},
                 **sections.pop("train", {})}
    return lm_recipe(model_dir, data_file, train=train_cfg, eval={"generate": None, **sections.pop("eval", {})},
                     **sections)


def direct_logps(model, feature, side):
    """Summed log-prob of one answer, from the model's full logits over the unpadded sequence."""
    ids = torch.tensor([feature["input_ids" if side == "chosen" else "rejected_ids"]])
    labels = torch.tensor(feature["labels" if side == "chosen" else "rejected_labels"])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    lp = logp.gather(-1, ids[0, 1:, None])[:, 0]
    keep = labels[1:] != -100
    return lp[keep].sum(), int(keep.sum())


def perturbed(model_dir, seed=1):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_losses_equal_a_direct_computation(tiny_llama, tmp_path):
    """DPO sigmoid and IPO (reference: the base model) and ORPO on a perturbed policy, against log-probs taken
    from each unpadded sequence's full logits and the papers' formulas."""
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "p.jsonl", n=12)
    rows = [json.loads(line) for line in open(data)]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    policy = perturbed(tiny_llama)
    for objective, options in (("dpo", {"dpo": {"beta": 0.3}}), ("dpo", {"dpo": {"beta": 0.5, "loss": "ipo"}}),
                               ("orpo", {"orpo": {"lambda": 0.2}})):
        task = get_task(load(pair_recipe(tiny_llama, data, objective, train=options)))
        features = task.encode(rows)
        task.precompute(base, {"train": features}, 5)
        batch = task.collate(features)
        with torch.no_grad():
            got = task.loss(policy, batch)
            want = torch.zeros((), dtype=torch.float64)
            for f in features:
                (pc, nc), (pr, nr) = direct_logps(policy, f, "chosen"), direct_logps(policy, f, "rejected")
                if objective == "orpo":
                    lam, mc, mr = 0.2, pc / nc, pr / nr
                    odds = (mc - torch.log1p(-torch.exp(mc))) - (mr - torch.log1p(-torch.exp(mr)))
                    want += -mc - lam * F.logsigmoid(odds)
                    continue
                (rc, _), (rr, _) = direct_logps(base, f, "chosen"), direct_logps(base, f, "rejected")
                if options["dpo"].get("loss") == "ipo":
                    want += ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * 0.5)) ** 2
                else:
                    want += -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr)))
        assert task.count(batch) == len(features) == 12
        assert abs(float(got) - float(want)) < 1e-5 * max(1.0, abs(float(want))), (objective, options, got, want)
        assert ("reference" in features[0]) == (objective == "dpo")       # ORPO has no reference


def test_lora_reference_is_the_adapter_disabled_model(tiny_llama, tmp_path):
    """With LoRA the reference log-probs are the base model's, computed inside the same module with the adapter
    disabled: no parameter is added, no second module is made."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from tunesmith.adapt import adapt

    recipe = load(pair_recipe(tiny_llama, write_pairs(tmp_path / "p.jsonl", n=8)))
    task = get_task(recipe)
    features = task.encode([json.loads(line) for line in open(tmp_path / "p.jsonl")])
    adapted = adapt(AutoModelForCausalLM.from_pretrained(tiny_llama), recipe.adapt, task.peft_task_type).model
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                   # the adapter changes the outputs
    params = sum(p.numel() for p in adapted.parameters())
    gc.collect()
    llamas = sum(type(o) is LlamaForCausalLM for o in gc.get_objects())
    task.reference_logps(adapted, features, 4)
    gc.collect()
    assert sum(type(o) is LlamaForCausalLM for o in gc.get_objects()) == llamas   # no copy was made
    assert sum(p.numel() for p in adapted.parameters()) == params
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for f in features:
        ref = [float(direct_logps(base, f, s)[0]) for s in ("chosen", "rejected")]
        assert f["reference"] == pytest.approx(ref, abs=1e-5)
        policy = float(direct_logps(adapted, f, "chosen")[0])
        assert abs(policy - ref[0]) > 1e-3           # the adapter is on outside the reference context


@pytest.fixture(scope="module")
def dpo_run(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    data = write_pairs(tmp / "pairs.jsonl", n=120)
    seen = []

    def live_models(record):                        # once, mid-training: how many Llama modules exist
        if not seen:
            from transformers import LlamaForCausalLM
            gc.collect()
            seen.append(sum(type(o) is LlamaForCausalLM for o in gc.get_objects()))

    recipe = load(pair_recipe(tiny_llama, data, eval={"before": True}))
    return train(recipe, run_dir=tmp / "run", callbacks=[live_models]), data, seen


def test_dpo_with_lora_trains_and_reward_accuracy_rises(dpo_run):
    run, data, seen = dpo_run
    assert seen == [1]                              # the reference is no second model
    before, after = run.metrics["before"], run.metrics
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == 0.0   # policy == reference
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0
    assert after["logp_accuracy"] > before["logp_accuracy"] + 0.2
    history = [json.loads(line) for line in open(run.path / "metrics.jsonl")]
    validation = [r for r in history if r.get("split") == "validation"]
    assert {"reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "loss"} <= set(validation[0])
    assert run.recipe.train.metric == "reward_accuracy"
    train_loss = [r["loss"] for r in history if "loss" in r and "split" not in r and not r.get("summary")]
    assert train_loss[-1] < train_loss[0] < 0.7      # starts at log 2 = 0.693 (policy == reference)

    # the training pairs: reward accuracy rises from 0 (ties) to nearly all
    from tunesmith.tasks.preference import Preference
    task = get_task(run.recipe)
    assert isinstance(task, Preference)
    rows = [json.loads(line) for line in open(data)]
    features = task.encode(rows)
    model = task.load_trained(run.model_dir).eval()   # merged: the reference comes from the base model
    with torch.no_grad():
        scored = task.evaluate(model, features, 32)
    assert scored["reward_accuracy"] >= 0.9

    # the finished run evaluates (the reference from the base model again) and predicts like any chat run
    predictor = run.load()
    again = predictor.evaluate()
    assert again["reward_accuracy"] == after["reward_accuracy"]
    assert again["reward_margin"] == pytest.approx(after["reward_margin"], abs=1e-5)
    assert predictor.predict("review good film verdict")["output"] in ("pos", "neg")


def test_orpo_trains_without_a_reference(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=90)
    run = train(load(pair_recipe(tiny_llama, data, "orpo", eval={"before": True})), run_dir=tmp_path / "run")
    assert run.metrics["reward_accuracy"] > run.metrics["before"]["reward_accuracy"]
    assert run.metrics["reward_accuracy"] >= 0.75


def test_resume_is_bitwise_under_dpo(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=60)
    recipe = pair_recipe(tiny_llama, data, model={"dropout": 0.1},
                         train={"max_steps": 6, "batch_size": 4, "grad_accum": 2, "save_every": 2, "eval_every": 3,
                                "keep_checkpoints": 10})
    whole = train(load(recipe), run_dir=tmp_path / "whole").path
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("step-00000004", "step-00000006"):
        shutil.rmtree(cut / "checkpoints" / name)
    shutil.rmtree(cut / "model")
    (cut / "eval.json").unlink()
    train(load(recipe), resume=cut)
    for f in ("checkpoints/step-00000006/model.safetensors", "checkpoints/step-00000006/optimizer.safetensors",
              "model/model.safetensors"):
        a, b = load_file(str(whole / f)), load_file(str(cut / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert json.loads((whole / "eval.json").read_text()) == json.loads((cut / "eval.json").read_text())


def test_recipe_keys(tiny_llama, tmp_path):
    data = tmp_path / "p.jsonl"
    assert load(pair_recipe(tiny_llama, data, "orpo")).train.metric == "reward_accuracy"
    with_generate = load(pair_recipe(tiny_llama, data, eval={"generate": {"max_new_tokens": 2}}))
    assert with_generate.train.metric == "exact_match"
    assert load(pair_recipe(tiny_llama, data, "orpo", train={"orpo": {"lambda": 0.5}})).train.orpo.lambda_ == 0.5
    sft = load(lm_recipe(tiny_llama, data))
    assert sft.train.objective == "sft" and sft.train.metric == "loss"
    assert type(get_task(sft)).__name__ == "CausalLM"
    with pytest.raises(RecipeError, match="not reported under train.objective=sft"):
        load(lm_recipe(tiny_llama, data, train={"metric": "reward_accuracy"}))
    with pytest.raises(RecipeError, match="not reported under train.objective=dpo"):
        load(pair_recipe(tiny_llama, data, train={"metric": "perplexity"}))
    with pytest.raises(RecipeError, match="packing works with train.objective sft only"):
        load(pair_recipe(tiny_llama, data, train={"packing": True}))


# --- doctor ----------------------------------------------------------------------------------------------

def test_doctor_rejects_and_flags_bad_pairs(tiny_llama, tmp_path):
    rng = random.Random(0)
    rows, held = [], []
    for i in range(40):                             # chosen always the longer answer: a length skew
        prompt = f"review {sentence(rng, True)} verdict {i}"
        rows.append({"prompt": prompt, "chosen": "pos " + " ".join(rng.sample(POSITIVE, 5)), "rejected": "neg"})
    rows.append({"prompt": "review good", "chosen": "pos", "rejected": "pos"})               # same answers
    rows.append({"prompt": "review bad", "chosen": " ", "rejected": "neg"})                  # empty side
    rows.append({"chosen": [{"role": "user", "content": "review good"}, {"role": "assistant", "content": "pos"}],
                 "rejected": [{"role": "user", "content": "review bad"},
                              {"role": "assistant", "content": "neg"}]})                     # prompts differ
    rows.append({"prompt": "review swap", "chosen": "pos", "rejected": "neg"})
    rows.append({"prompt": "review swap", "chosen": "neg", "rejected": "pos"})               # contradicts it
    rows.append(dict(rows[0]))                                                               # a duplicate pair
    rows.append({"prompt": "review " + "the " * 40, "chosen": "pos", "rejected": "neg"})     # answers cut away
    held = [{"prompt": rows[1]["prompt"], "chosen": "pos good", "rejected": "neg " + " ".join(NEGATIVE[:3])},
            {"prompt": "review fine unseen", "chosen": "pos", "rejected": "neg"}]
    for name, part in (("train.jsonl", rows), ("test.jsonl", held), ("val.jsonl", held[1:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    recipe = pair_recipe(tiny_llama, tmp_path / "train.jsonl", data={"test": str(tmp_path / "test.jsonl"),
                                                                     "validation": str(tmp_path / "val.jsonl"),
                                                                     "bad_rows": "skip"})
    report = doctor(recipe, out=None)
    reasons = " | ".join(r["reason"] for r in report["rejects"])
    assert "chosen equals rejected" in reasons and "empty chosen answer" in reasons
    assert "prompt differs between chosen and rejected" in reasons and "lies beyond data.max_length=32" in reasons
    assert len(report["rejects"]) == 4
    warnings = "\n".join(report["warnings"])
    assert "the chosen answer is the longer one" in warnings
    assert "also appear swapped" in warnings and report["task"]["pairs"]["train"]["swapped_pairs"] == 1
    assert "test: 1 prompt(s) also in train" in warnings
    assert report["task"]["pairs"]["test"]["prompts_in_train"] == 1
    assert report["duplicates"]["by_split"]["train"]["exact_extra"] == 1
    assert report["task"]["pairs"]["train"]["extreme_length_ratio"]          # 6 tokens against 1


def test_doctor_is_quiet_on_clean_pairs(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=60)
    report = doctor(pair_recipe(tiny_llama, data, data={"validation": str(data), "test": str(data)}), out=None)
    pairs = report["task"]["pairs"]["train"]
    assert pairs["swapped_pairs"] == 0 and not pairs["extreme_length_ratio"] and pairs["median_length_ratio"] == 1
    assert not [w for w in report["warnings"] if "longer one" in w or "swapped" in w]
    assert any("without a prompt column" in n for n in report["check_notes"])   # the implicit-prompt rows


@pytest.mark.slow                   # two torchrun processes start in ~30 s; test_train covers the mechanism by default
def test_two_process_ddp_under_dpo_equals_one_process(tiny_llama, tmp_path):
    """torchrun, 2 CPU processes (gloo), DPO + LoRA: each process precomputes the references of every pair and
    trains on its share of each batch; the step's loss is divided by the pairs of both processes, so the run
    ends where one process with the same batches ends (up to float summation order)."""
    import os
    import subprocess
    import sys

    import yaml

    data = write_pairs(tmp_path / "pairs.jsonl", n=80)
    recipe = pair_recipe(tiny_llama, data, train={"max_steps": 6, "batch_size": 8, "eval_every": 3})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "tunesmith", "train", str(path), "--run-dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x 2 processes" in out.stdout and out.stdout.count("after fine-tuning") == 1
    one = train(load(recipe), run_dir=tmp_path / "one").path
    a, b = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors")), load_file(str(one / "model" /
                                                                                         "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    changed = load_file(str(tiny_llama / "model.safetensors"))
    assert any(not torch.allclose(changed[k], a[k], atol=1e-4) for k in changed if k in a)   # it trained
    ddp, single = (json.loads((p / "eval.json").read_text()) for p in (tmp_path / "ddp", one))
    assert ddp["reward_accuracy"] == single["reward_accuracy"]
    assert ddp["loss"] == pytest.approx(single["loss"], abs=1e-4)


def test_fsdp_on_a_cpu_stops_before_anything_is_read_or_written(tiny_llama, tmp_path, monkeypatch):
    """`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP; on a CPU accelerate would not shard (plain DDP or its
    plugin's error), so the run stops at once, without a run folder."""
    from tunesmith.errors import TunesmithError
    from tunesmith.pipeline import Trainer, train_with

    recipe = load(pair_recipe(tiny_llama, tmp_path / "absent.jsonl"))         # not read: the launch check is first
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TunesmithError, match="FSDP needs GPUs"):
        train_with(Trainer(), recipe, run_dir=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow                   # two processes through accelerate's launcher, ~10 s
def test_accelerate_fsdp_launch_on_cpu_is_refused_in_one_line(tiny_llama, tmp_path):
    """The real launcher, both FSDP versions: accelerate 1.16 shards only on GPU-type process groups (FSDP1: its plugin
    raises "sync_module_states=True is not supported on cpu"; FSDP2: the run is silently DDP); tunesmith stops both
    processes with its one-line error instead, before any run folder."""
    import os
    import subprocess
    import sys

    import yaml

    data = write_pairs(tmp_path / "pairs.jsonl", n=40)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(pair_recipe(tiny_llama, data, train={"max_steps": 2})))
    for version in ("1", "2"):
        out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version",
                              version, "--num_processes", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                              "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                              "-m", "tunesmith", "train", str(path), "--run-dir", str(tmp_path / version)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
        assert out.returncode != 0 and out.stderr.count("error: FSDP needs GPUs") == 2, out.stderr[-3000:]
        assert not (tmp_path / version).exists()
