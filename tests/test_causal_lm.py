"""causal-lm on a tiny Llama built from a config, with a word-level tokenizer built offline: masking exactly over
the assistant turns, EOS trained and never confused with padding, packing equal to unpacked, LoRA by default,
generation metrics before/after, pipeline("text-generation"), predict, exact resume, rows reported by line."""
import json
import random
import shutil

import pytest
import torch
import yaml
from conftest import FILLER, NEGATIVE, POSITIVE, sentence, tunesmith
from safetensors.torch import load_file

from tunesmith.errors import TunesmithError
from tunesmith.pipeline import train
from tunesmith.recipe import load
from tunesmith.splits import load_splits
from tunesmith.tasks import get_task

TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "review", "verdict", "pos", "neg"] + POSITIVE + NEGATIVE + FILLER


def build_tiny_llama(folder, pad=True, template=TEMPLATE):
    """A 2-layer, hidden-32 Llama and a word-level tokenizer with a chat template, saved as an HF folder.
    pad=False: no pad token of its own (the task then pads with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", chat_template=template,
                                  **({"pad_token": "<pad>"} if pad else {}))
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0 if pad else None, bos_token_id=2, eos_token_id=3,
                         initializer_range=0.1)       # 0.02 leaves logits too flat for LoRA alone to sharpen
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_chats(path, n=240, seed=0):
    """Conversations: a review -> the assistant answers `pos` or `neg`; every third row as prompt/response."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            positive = i % 2 == 0
            question, answer = f"review {sentence(rng, positive)} verdict", "pos" if positive else "neg"
            if i % 3 == 2:
                f.write(json.dumps({"prompt": question, "response": answer}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return path


def lm_recipe(model_dir, data_file, **sections) -> dict:
    recipe = {"task": "causal-lm", "model": {"name": str(model_dir)},
              "data": {"train": str(data_file), "validation_size": 0.1, "test_size": 0.15, "max_length": 32},
              "adapt": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}},
              "train": {"epochs": 10, "learning_rate": 1e-2, "batch_size": 8, "seed": 0, "precision": "fp32",
                        "log_every": 1, "warmup": 0},
              "eval": {"batch_size": 32, "generate": {"max_new_tokens": 3}}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def tokens(task, ids):
    return task.tokenizer.convert_ids_to_tokens(ids)


MULTI = [{"role": "system", "content": "verdict"}, {"role": "user", "content": "review good film"},
         {"role": "assistant", "content": "pos good"}, {"role": "user", "content": "review dull plot"},
         {"role": "assistant", "content": "neg"}]


@pytest.mark.parametrize("pad", [True, False])
def test_labels_cover_exactly_the_assistant_turns_and_their_eos(tmp_path, pad):
    """Every token from an assistant turn's content through its <|im_end|> is a label, nothing else is; the
    EOS stays a label after collate even when the pad token IS the EOS token (pad=False)."""
    model = build_tiny_llama(tmp_path / "m", pad=pad)
    task = get_task(load(lm_recipe(model, tmp_path / "x.jsonl")))
    ids, labels, cut = task.encode_one(MULTI)
    toks = tokens(task, ids)
    expected, inside = [], False
    for i, t in enumerate(toks):
        inside = inside or toks[max(i - 2, 0):i] == ["<|im_start|>", "assistant"]
        expected.append(ids[i] if inside else -100)
        inside = inside and t != "<|im_end|>"
    assert labels == expected and not cut
    assert [t for t, y in zip(toks, labels) if y != -100] == ["pos", "good", "<|im_end|>", "neg", "<|im_end|>"]

    short = task.encode_one(MULTI[:3])
    batch = task.collate([{"input_ids": i, "labels": y} for i, y, _ in (short, (ids, labels, cut))])
    assert (task.tokenizer.pad_token_id == task.tokenizer.eos_token_id) == (not pad)
    n = len(short[0])
    assert batch["labels"][0, n - 1] == task.tokenizer.eos_token_id          # EOS trained
    assert (batch["labels"][0, n:] == -100).all() and (batch["attention_mask"][0, n:] == 0).all()


def test_packing_loss_equals_token_weighted_mean_of_unpacked(tiny_llama, tmp_path):
    """A packed batch's loss = the token-weighted mean (sum of per-token losses / label tokens) of the same
    examples run one by one, within 1e-5; the same rows without example boundaries give another loss."""
    from transformers import AutoModelForCausalLM

    data = write_chats(tmp_path / "c.jsonl", n=30)
    recipe = load(lm_recipe(tiny_llama, data, train={"packing": True, "pack_length": 64}))
    task = get_task(recipe)
    rows = [json.loads(x) for x in data.read_text().splitlines()] + [{"messages": MULTI}]
    packed = task.encode(rows)
    assert len(packed) < len(rows) and all(len(f["input_ids"]) <= 64 for f in packed)
    recipe.train.packing = False
    single = task.encode(rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        per = [(float(task.loss(model, task.collate([f]))), sum(y != -100 for y in f["labels"][1:])) for f in single]
        mean = sum(total for total, _ in per) / sum(n for _, n in per)         # loss() sums over label tokens

        def mean_loss(batch):
            return float(task.loss(model, batch)) / task.count(batch)

        assert mean_loss(task.collate(packed)) == pytest.approx(mean, abs=1e-5)
        assert mean_loss(task.collate(single)) == pytest.approx(mean, abs=1e-5)
        batch = task.collate(single)
        assert float(model(**batch).loss) == pytest.approx(mean, abs=1e-5)     # HF's own loss agrees
        task.pad_multiple = 24                                                  # wider padding changes nothing
        assert task.collate(single)["input_ids"].shape[1] > max(len(f["input_ids"]) for f in single)
        assert mean_loss(task.collate(single)) == pytest.approx(mean, abs=1e-5)
        assert mean_loss(task.collate(packed)) == pytest.approx(mean, abs=1e-5)
        task.pad_multiple = 1
        leaky = task.collate(packed)
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
        assert abs(mean_loss(leaky) - mean) > 1e-3                  # boundaries matter


def test_segment_attention_equals_the_block_diagonal_mask(tiny_llama, tmp_path, monkeypatch):
    """On CPU a packed row attends per example (tasks/causal_lm.segment_attention): the same loss and gradients as
    SDPA under transformers' block-diagonal mask, and the training load switches the model to it."""
    from transformers import AutoModelForCausalLM

    from tunesmith.tasks import causal_lm

    data = write_chats(tmp_path / "c.jsonl", n=30)
    recipe = load(lm_recipe(tiny_llama, data, train={"packing": True, "pack_length": 64}))
    task = get_task(recipe)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    batch = task.collate(task.encode(rows)[:3])
    assert len(causal_lm.segments(batch["position_ids"])[0]) > 2            # several examples in a row

    def loss_and_grads(model):
        model.train()
        torch.manual_seed(0)
        loss = task.loss(model, batch)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    masked = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    seg = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    assert causal_lm.use_segment_attention(seg) and seg.config._attn_implementation == causal_lm.SEGMENT_ATTENTION
    from transformers.integrations import sdpa_attention

    widths, sdpa = [], sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda m, q, *a, **k: widths.append(q.shape[2]) or sdpa(m, q, *a, **k))
    (l1, g1), (l2, g2) = loss_and_grads(masked), loss_and_grads(seg)
    assert widths and max(widths) < batch["input_ids"].shape[1]             # attention ran per example
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(g1, g2))     # gradients up to ~17
    assert causal_lm.SEGMENTS.get() is None                                  # reset after the forward
    assert task.load_model().config._attn_implementation == causal_lm.SEGMENT_ATTENTION
    recipe.train.packing = False
    assert task.load_model().config._attn_implementation == "sdpa"


def test_unusable_rows_are_reported_by_line_and_truncation_counted(tiny_llama, tmp_path, capsys):
    data = write_chats(tmp_path / "c.jsonl", n=60)
    long_prompt = "review " + " ".join(["the"] * 40)
    with open(data, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "review good"}]}) + "\n")          # 61
        f.write(json.dumps({"prompt": long_prompt, "response": "pos"}) + "\n")                          # 62
        f.write(json.dumps({"messages": [{"role": "user"}]}) + "\n")                                    # 63
        f.write(json.dumps({"prompt": " ".join(["the"] * 25), "response": "pos good film"}) + "\n")     # 64: cut
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(lm_recipe(tiny_llama, data)))
    out = tunesmith("train", path, "--run-dir", tmp_path / "run")
    assert out.returncode == 1
    assert f"{data}:61: no assistant turn" in out.stderr
    assert f"{data}:62: every assistant token lies beyond data.max_length=32" in out.stderr
    assert f"{data}:63: message 0 must be an object with string 'role' and 'content'" in out.stderr
    assert f"{data}:64" not in out.stderr

    recipe = load(lm_recipe(tiny_llama, data, data={"bad_rows": "skip", "validation_size": 1, "test_size": 1}))
    task = get_task(recipe)
    tables, rejects = load_splits(task, recipe)
    assert sorted(r.origin for r in rejects) == [f"{data}:{n}" for n in (61, 62, 63)]
    rows = [r for t in tables.values() for r in t.rows]
    assert task.encode(rows).truncated == 1                     # row 64 trains, cut, and is counted (train prints it)
    stats = task.length_stats(rows, [])             # what the data doctor reports
    cut = next(i for i, r in enumerate(rows) if r.get("response") == "pos good film")
    assert stats["missing_end"] == [cut] and stats["lengths"][cut] == 34 and stats["kept"][cut] == 32
    assert stats["all_masked"] == [] and min(stats["trained"]) >= 2


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    data = write_chats(tmp / "chats.jsonl", n=300)
    recipe = load(lm_recipe(tiny_llama, data, train={"packing": True, "pack_length": 64}, eval={"before": True}))
    assert recipe.adapt.method == "lora"            # the task's default, filled in by the recipe
    return train(recipe, run_dir=tmp / "run")


def test_lora_by_default_learns_the_format(trained):
    p = trained.path
    assert yaml.safe_load((p / "recipe.yaml").read_text())["adapt"]["method"] == "lora"
    assert (p / "model" / "adapter" / "adapter_config.json").exists() and (p / "model" / "model.safetensors").exists()
    losses = [r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
              if "loss" in r and "split" not in r]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    result = json.loads((p / "eval.json").read_text())
    assert result["before"]["exact_match"] < 0.2 and result["exact_match"] > 0.9, result
    assert result["rouge_l"] >= result["exact_match"] and result["perplexity"] < result["before"]["perplexity"]
    samples = [json.loads(x) for x in (p / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "reference", "output"} <= set(samples[0])
    assert sum(s["output"] == s["reference"] for s in samples) >= 0.9 * len(samples)


def test_merged_model_equals_base_plus_adapter(trained, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 5, 7, 12, 20, 3, 2, 6]])
    merged = AutoModelForCausalLM.from_pretrained(trained.path / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapted = PeftModel.from_pretrained(base, trained.path / "model" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-4)
        with adapted.disable_adapter():                                       # the adapter changed something
            assert not torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-3)


def test_pipeline_loads_run_model_and_predict_agrees(trained, tmp_path):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(trained.path / "model"))
    questions = ["review the film was superb verdict", "review a dull and clumsy plot verdict"]
    expected = [pipe([{"role": "user", "content": q}], max_new_tokens=3, do_sample=False)[0]["generated_text"][-1]
                ["content"].strip() for q in questions]
    assert expected == ["pos", "neg"]
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": questions[1]}) + "\n")
    out = tunesmith("predict", trained.path, questions[0], "--input", f)
    assert out.returncode == 0, out.stderr
    assert [json.loads(x)["output"] for x in out.stdout.splitlines()] == expected


def test_eval_command_matches_eval_json(trained):
    out = tunesmith("eval", trained.path)
    assert out.returncode == 0, out.stderr
    saved = json.loads((trained.path / "eval.json").read_text())
    got = json.loads(out.stdout)
    assert got["exact_match"] == saved["exact_match"] and got["loss"] == pytest.approx(saved["loss"], rel=1e-5)


def test_rouge_l_is_rouge_scores_and_exact_match_is_squads(trained):
    """eval.json's rouge_l is rouge-score's ROUGE-L F1 averaged over the test rows (samples.jsonl holds them
    all here); exact_match compares SQuAD-normalised answers."""
    from rouge_score import rouge_scorer

    from tunesmith.metrics import normalize_answer

    saved = trained.metrics
    rows = [json.loads(x) for x in (trained.path / "data" / "test.jsonl").read_text().splitlines()]
    outputs = [p["output"] for p in trained.load(device="cpu").predict(rows)]
    references = [r.get("response") or r["messages"][-1]["content"] for r in rows]
    samples = [{"reference": r, "output": o} for r, o in zip(references, outputs)]
    assert len(samples) == saved["n_examples"] and len(set(outputs)) > 1
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(s["reference"], s["output"])["rougeL"].fmeasure for s in samples) / len(samples)
    em = sum(normalize_answer(s["reference"]) == normalize_answer(s["output"]) for s in samples) / len(samples)
    assert saved["rouge_l"] == pytest.approx(rouge, abs=1e-12) and saved["exact_match"] == pytest.approx(em)


def test_grad_accumulation_equals_one_big_batch_on_tokens(tiny_llama, tmp_path):
    """Answers of different lengths: 4 micro-batches of 4 give the loss and gradient of one batch of 16 (each
    label token weighs the same), within 1e-6; the mean of micro-batch means would not."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from tunesmith.loop import accumulate

    data = tmp_path / "c.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            answer = " ".join(["pos", "good", "fine", "great", "nice"][: 1 + i % 5])
            f.write(json.dumps({"prompt": f"review {'the ' * (i % 3)}film verdict", "response": answer}) + "\n")
    task = get_task(load(lm_recipe(tiny_llama, data)))
    features = task.encode([json.loads(x) for x in data.read_text().splitlines()])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    acc = Accelerator(cpu=True)

    def step(groups):
        model.zero_grad()
        loss = accumulate(task, model, [task.collate([features[i] for i in g]) for g in groups], acc)
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    big, big_grads = step([list(range(16))])
    small, small_grads = step([list(range(k, k + 4)) for k in range(0, 16, 4)])
    assert small == pytest.approx(big, abs=1e-6)
    for name, g in big_grads.items():
        assert torch.allclose(small_grads[name], g, rtol=1e-4, atol=1e-7), name
    with torch.no_grad():
        means = [float(task.loss(model, b)) / task.count(b) for b in
                 (task.collate([features[i] for i in range(k, k + 4)]) for k in range(0, 16, 4))]
    assert abs(sum(means) / 4 - big) > 1e-3                          # what equal weights per micro-batch gave


def test_moved_chat_run_still_evaluates_predicts_and_chats(trained, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(trained.path, moved)
    saved = trained.metrics
    hidden = trained.path.with_name("hidden-run")
    trained.path.rename(hidden)
    try:
        out = tunesmith("eval", moved)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["loss"] == pytest.approx(saved["loss"], rel=1e-5)
        out = tunesmith("predict", moved, "review the film was superb verdict")
        assert out.returncode == 0 and json.loads(out.stdout)["output"] == "pos", out.stderr
        out = tunesmith("chat", moved, "--max-new-tokens", "3", input="review awful acting verdict\n", timeout=120)
        assert out.returncode == 0 and "bot> neg" in out.stdout, out.stderr
    finally:
        hidden.rename(trained.path)


def test_chat_streams_multi_turn_and_trims_history(trained):
    script = "review the film was superb verdict\nreview a dull and clumsy plot verdict\n" \
             "review lovely cast verdict\n/reset\nreview awful acting verdict\n"
    out = tunesmith("chat", trained.path, "--context", "32", "--max-new-tokens", "3", input=script, timeout=120)
    assert out.returncode == 0, out.stderr
    replies = [ln.split("bot> ", 1)[1].strip() for ln in out.stdout.splitlines() if "bot> " in ln]
    assert replies[0] == "pos" and replies[1] == "neg" and replies[-1] == "neg" and len(replies) == 4, out.stdout
    assert "(history trimmed: dropped the 2 oldest message(s)" in out.stdout       # third turn: 36 tokens > 32 - 3
    assert "(history cleared)" in out.stdout


def test_chat_streamer_writes_text_as_it_is_generated(tiny_llama, tmp_path):
    """The shared generation streams a reply piece by piece (what `tunesmith chat` prints as it comes)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.tasks.schema import GenerateConfig

    task = get_task(load(lm_recipe(tiny_llama, tmp_path / "x.jsonl")))
    ids = task.prompt_ids([{"role": "user", "content": "review good film verdict"}])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()     # untrained: several words
    pieces = []
    done = task.complete(model, [ids], GenerateConfig(max_new_tokens=6, min_new_tokens=6), on_text=pieces.append)[0]
    gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    text = task.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)
    assert len([w for w in pieces if w.strip()]) >= 3 and "".join(pieces).split() == text.split() == done.text.split()
    assert (done.tokens, done.finish) == (6, "length")


def tiny_t5(folder):
    """A 2-layer, d_model-32 T5 (encoder-decoder) built from a config, with the word-level tokenizer above."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    build_tiny_llama(folder)                                        # for its tokenizer: pad 0, EOS <|im_end|> = 3
    tok = AutoTokenizer.from_pretrained(folder)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0,
                      eos_token_id=3, decoder_start_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[:len(SPECIAL)] = 0             # logit 0 for the special tokens: it writes words
    return model, tok


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_shared_generation_equals_model_generate(family, tiny_llama, tmp_path):
    """tasks/generation.complete (used by evaluation, chat and the OpenAI routes) gives model.generate's own reply,
    one prompt at a time or batched (prompts of different lengths), for both model families: an encoder-decoder's
    output holds no prompt (cutting len(prompt) tokens off it, as a decoder-only model needs, loses reply tokens);
    streaming gives the same text; a set stop event ends generation after one token."""
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.tasks.generation import complete
    from tunesmith.tasks.schema import GenerateConfig

    if family == "encoder-decoder":
        model, tok = tiny_t5(tmp_path / "t5")
    else:
        model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)
    assert model.config.is_encoder_decoder == (family == "encoder-decoder")
    prompts = [tok("review good film verdict")["input_ids"], tok("review a dull and clumsy plot verdict")["input_ids"]]
    settings = GenerateConfig(max_new_tokens=6, min_new_tokens=6)
    expected = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=3)[0]
        reply = out[1:] if family == "encoder-decoder" else out[len(ids):]       # T5: the decoder start token
        expected.append(tok.decode(reply, skip_special_tokens=True).strip())
        assert len(reply) == 6 and expected[-1]
    alone = [complete(model, tok, [ids], settings)[0] for ids in prompts]
    assert [c.text for c in alone] == expected
    assert [(c.tokens, c.finish) for c in alone] == [(6, "length")] * 2
    assert [c.text for c in complete(model, tok, prompts, settings)] == expected       # batched, padded
    pieces = []
    assert complete(model, tok, prompts[:1], settings, on_text=pieces.append)[0].text == expected[0]
    assert "".join(pieces).split() == expected[0].split()
    stop = threading.Event()
    stop.set()
    stopped = complete(model, tok, prompts[:1], settings, stop=stop)[0]
    assert (stopped.tokens, stopped.finish) == (1, "stop")


def test_full_and_freeze_methods_and_resume_bitwise(tiny_llama, tmp_path):
    """Full fine-tuning runs through the same loop; a run resumed from a middle checkpoint ends bitwise equal
    to the uninterrupted one (dropout on, packing, grad accumulation); freeze trains only the chosen part."""
    data = write_chats(tmp_path / "c.jsonl", n=120)
    recipe = lm_recipe(tiny_llama, data, adapt={"method": "full"}, model={"dropout": 0.1},
                       train={"max_steps": 8, "batch_size": 4, "grad_accum": 2, "save_every": 2, "eval_every": 3,
                              "keep_checkpoints": 10, "packing": True, "pack_length": 48, "learning_rate": 3e-3},
                       eval={"generate": None})
    whole = train(load(recipe), run_dir=tmp_path / "whole").path
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("step-00000006", "step-00000008"):
        shutil.rmtree(cut / "checkpoints" / name)
    shutil.rmtree(cut / "model")
    (cut / "eval.json").unlink()
    train(load(recipe), resume=cut)
    for f in ("checkpoints/step-00000008/model.safetensors", "checkpoints/step-00000008/optimizer.safetensors",
              "model/model.safetensors"):
        a, b = load_file(str(whole / f)), load_file(str(cut / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert json.loads((whole / "eval.json").read_text()) == json.loads((cut / "eval.json").read_text())

    frozen = lm_recipe(tiny_llama, data, adapt={"method": "freeze", "freeze_patterns": ["model.layers.0.*"]},
                       train={"max_steps": 2}, eval={"generate": None})
    run = train(load(frozen), run_dir=tmp_path / "freeze").path
    before = load_file(str(tiny_llama / "model.safetensors"))
    after = load_file(str(run / "model" / "model.safetensors"))
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])


def test_template_without_eos_is_an_error_and_a_recipe_template_fixes_it(tmp_path):
    no_eos = build_tiny_llama(tmp_path / "a", template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(TunesmithError, match="does not end an assistant turn with the EOS token"):
        get_task(load(lm_recipe(no_eos, tmp_path / "x.jsonl"))).setup()
    fixed = lm_recipe(no_eos, tmp_path / "x.jsonl", data={"chat_template": TEMPLATE})
    assert get_task(load(fixed)).tokenizer.chat_template == TEMPLATE


@pytest.mark.slow
def test_smollm2_learns_the_one_word_format_and_chats_in_it(tmp_path):
    """The bundled SmolLM2-135M-Instruct (GGUF converted once, then cached safetensors): labels are exactly the
    one-word answer and <|im_end|>; a short LoRA run on 300 conversations moves exact match from ~0 to well
    above the majority answer, and `tunesmith chat` and pipeline("text-generation") answer in the format."""
    from pathlib import Path

    from transformers import pipeline

    recipe = load(Path(__file__).parent.parent / "tunesmith" / "recipes" / "reviews_chat.yaml",
                  ["data.max_rows=300", "data.test_size=60", "data.validation_size=20"])
    task = get_task(recipe)
    row = {"messages": [{"role": "system", "content": "You judge film reviews."},
                        {"role": "user", "content": "Review: A triumph.\nVerdict?"},
                        {"role": "assistant", "content": "fresh"}]}
    ids, labels, _ = task.encode_one(task.messages(row))
    assert task.tokenizer.decode([y for y in labels if y != -100]) == "fresh<|im_end|>"

    run = train(recipe, run_dir=tmp_path / "run").path
    result = json.loads((run / "eval.json").read_text())
    assert result["before"]["exact_match"] < 0.1 and result["exact_match"] >= 0.65, result
    samples = [json.loads(x)["output"] for x in (run / "samples.jsonl").read_text().splitlines()]
    assert set(samples) <= {"fresh", "rotten"}, samples

    script = "Review: A warm, funny and moving film. Verdict?\nReview: Dull, lifeless and far too long. Verdict?\n"
    out = tunesmith("chat", run, "--max-new-tokens", "4", "--system", "You judge film reviews.", input=script)
    replies = [ln.split("bot> ", 1)[1].strip() for ln in out.stdout.splitlines() if "bot> " in ln]
    assert out.returncode == 0 and len(replies) == 2 and set(replies) <= {"fresh", "rotten"}, out.stdout
    pipe = pipeline("text-generation", model=str(run / "model"))
    answer = pipe([row["messages"][0], {"role": "user", "content": "Review: A triumph.\nVerdict?"}],
                  max_new_tokens=4, do_sample=False)[0]["generated_text"][-1]["content"]
    assert answer.strip() in ("fresh", "rotten")
