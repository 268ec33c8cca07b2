"""Continued pretraining (pretrain-causal, pretrain-masked) on a tiny Llama and a tiny BERT built from configs: the
loss falls and eval.json holds perplexity before and after; packed documents do not attend to each other; BERT's
masking rule in its proportions; the masked-LM run's model is the encoder a classifier then loads; raw-text reading
and the doctor's findings; a moved run folder still loads; exact resume."""
import json
import random
import shutil

import pytest
import torch
from conftest import recipe_dict, sentence, write_reviews
from safetensors.torch import load_file
from test_causal_lm import build_tiny_llama

import tunesmith as ts
from tunesmith.recipe import load
from tunesmith.tasks import get_task


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_text(path, n=120, seed=0, per_doc=3):
    """A .txt file of `n` documents (paragraphs of `per_doc` review sentences) separated by blank lines."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(sentence(rng, i % 2 == 0) for _ in range(per_doc)) for i in range(n)) + "\n")
    return path


def pretrain_recipe(model, text, objective="causal", **sections) -> dict:
    recipe = {"task": f"pretrain-{objective}", "model": str(model),
              "data": {"train": str(text), "max_length": 32, "validation_size": 0.1, "test_size": 0.1},
              "adapt": {"method": "full"},
              "train": {"epochs": 3, "learning_rate": 3e-3, "batch_size": 8, "seed": 0, "precision": "fp32",
                        "log_every": 1, "warmup": 0},
              "eval": {"batch_size": 16}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def train_losses(run_path):
    records = [json.loads(x) for x in (run_path / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "split" not in r and not r.get("summary")]


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_loss_falls_and_perplexity_before_after_in_eval_json(objective, tiny_llama, tiny_bert, tmp_path):
    model = tiny_llama if objective == "causal" else tiny_bert
    epochs = 3 if objective == "causal" else 6
    run = ts.train(ts.load_recipe(pretrain_recipe(model, write_text(tmp_path / "t.txt"), objective,
                                                  train={"epochs": epochs})), run_dir=tmp_path / "run")
    m = run.metrics
    assert {"loss", "perplexity", "accuracy", "label_tokens"} <= set(m) and "before" in m
    assert m["before"]["label_tokens"] == m["label_tokens"] > 0            # the same test tokens scored both times
    assert m["perplexity"] < 0.8 * m["before"]["perplexity"]
    losses = train_losses(run.path)
    k = max(3, len(losses) // 5)
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k


def test_packed_documents_do_not_attend_to_each_other(tiny_llama, tmp_path):
    """The logits of document B in a packed block equal those of B alone, on CPU's per-document attention and on
    transformers' block-diagonal mask from position_ids; with positions not restarting (one document) they differ."""
    from transformers import AutoModelForCausalLM

    recipe = load(pretrain_recipe(tiny_llama, write_text(tmp_path / "t.txt"), train={"pad_multiple": 1},
                                  data={"max_length": 64}))
    task = get_task(recipe)
    a, b = "the movie was good and the plot nice", "a film quite dull"
    block = task.encode([{"text": a}, {"text": b}])
    assert len(block) == 1
    n_a = len(task.document(a))
    alone = task.collate(task.encode([{"text": b}]))
    packed = task.collate(block)
    assert packed["labels"][0, n_a] == -100 and packed["position_ids"][0, n_a] == 0    # B's first token: no label
    for segmented in (True, False):
        model = task.load_model().eval() if segmented else AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
        with torch.no_grad():
            whole = task.forward(model, {k: v for k, v in packed.items() if k != "labels"}).logits[0, n_a:]
            own = task.forward(model, {k: v for k, v in alone.items() if k != "labels"}).logits[0]
            torch.testing.assert_close(whole, own, atol=1e-5, rtol=1e-5)
            leaky = {"input_ids": packed["input_ids"], "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
            assert not torch.allclose(model(**leaky).logits[0, n_a:], own, atol=1e-3)


def test_masking_follows_bert_rule_in_proportion(tiny_bert, tmp_path):
    """15% of the non-special tokens chosen; of those 80% [MASK], 10% a random token, 10% kept (random draws may
    hit the original token: 1/vocab of them). Special tokens and padding are never chosen. Evaluation masks are
    the same every time and whatever the batch size."""
    recipe = load(pretrain_recipe(tiny_bert, write_text(tmp_path / "t.txt"), "masked", data={"max_length": 64}))
    task = get_task(recipe)
    features = task.encode([{"text": " ".join(sentence(random.Random(i), True) for _ in range(6))}
                            for i in range(800)])
    torch.manual_seed(0)
    batch = task.collate(features)
    plain = task.pad(features)
    special = torch.isin(plain["input_ids"], torch.tensor(task.tokenizer.all_special_ids))
    real = plain["attention_mask"].bool() & ~special
    chosen = batch["labels"] != -100
    assert not (chosen & ~real).any()
    assert torch.equal(batch["labels"][chosen], plain["input_ids"][chosen])
    n = int(real.sum())
    assert n > 20_000
    assert abs(chosen.sum() / n - 0.15) < 0.01
    got = batch["input_ids"][chosen]
    masked = float((got == task.tokenizer.mask_token_id).float().mean())
    kept = float((got == plain["input_ids"][chosen]).float().mean())
    vocab = len(task.tokenizer)
    assert abs(masked - 0.8) < 0.02
    assert abs(kept - (0.1 + 0.1 / vocab)) < 0.02
    assert abs(1 - masked - kept - 0.1 * (1 - 1 / vocab)) < 0.02
    once = task.scored_batch(features, [5, 7, 9])
    again = task.scored_batch(features, [9, 7, 5])
    assert torch.equal(once["input_ids"][0], again["input_ids"][2])
    model = task.load_model().eval()
    assert task.evaluate(model, features[:40], 7) == pytest.approx(task.evaluate(model, features[:40], 40))


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "play", "walk", "##ing", "##ed", "##s", "the", "go"]
    folder = tmp_path / "wordpiece"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    text = write_text(tmp_path / "t.txt", n=10)
    task = get_task(load(pretrain_recipe(folder, text, "masked", masking={"whole_word": True},
                                         data={"max_length": 64})))
    rng = random.Random(0)
    words = [rng.choice(["play", "walk"]) + rng.choice(["", "ing", "ed", "s"]) for _ in range(3000)]
    features = task.encode([{"text": " ".join(words[i:i + 30])} for i in range(0, len(words), 30)])
    torch.manual_seed(0)
    batch = task.collate(features)
    ids, chosen = task.pad(features)["input_ids"], batch["labels"] != -100
    pieces = (ids == 7) | (ids == 8) | (ids == 9)                  # ##ing ##ed ##s continue the word before them
    stems = torch.roll(pieces, -1, dims=1)                         # a stem followed by a piece
    assert torch.equal(chosen[stems], chosen[torch.roll(stems, 1, dims=1)])
    assert int(stems.sum()) > 1000 and (chosen & stems).any()
    assert abs(float(chosen[ids > 4].float().mean()) - 0.15) < 0.03
    assert (batch["input_ids"][chosen] == task.tokenizer.mask_token_id).all()      # [MASK] only


def test_masked_lm_model_is_the_encoder_a_classifier_loads(tiny_bert, tmp_path):
    """pretrain-masked -> model/ (AutoModelForMaskedLM) -> text-classification with `model:` that folder: the
    classifier starts from the ADAPTED encoder (a weight equal to the adapted one, not the original), and trains."""
    adapted = ts.train(ts.load_recipe(pretrain_recipe(tiny_bert, write_text(tmp_path / "t.txt"), "masked")),
                       run_dir=tmp_path / "mlm").path / "model"
    name = "bert.encoder.layer.0.attention.self.query.weight"
    after = load_file(str(adapted / "model.safetensors"))[name]
    before = load_file(str(tiny_bert / "model.safetensors"))[name]
    assert not torch.allclose(after, before)
    classify = ts.load_recipe(recipe_dict(adapted, write_reviews(tmp_path / "r.csv", n=200), train={"epochs": 8}))
    task = get_task(classify)
    task.prepare([{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    model = task.load_model()
    loaded = model.state_dict()[name]
    assert torch.equal(loaded, after) and not torch.equal(loaded, before)
    run = ts.train(classify, run_dir=tmp_path / "cls")
    assert run.metrics["accuracy"] > 0.75


def test_text_files_folders_and_the_doctor(tiny_llama, tmp_path):
    """A folder of .txt files read by line: empty lines skipped and said, duplicate documents and whitespace-only
    lines found, token counts per split."""
    folder = tmp_path / "texts"
    folder.mkdir()
    rng = random.Random(1)
    lines = [sentence(rng, True) for _ in range(60)]
    (folder / "a.txt").write_text("\n".join(lines[:30]) + "\n\n\n" + lines[0] + "\n")
    (folder / "b.txt").write_text("\n".join(lines[30:]) + "\n")
    (folder / ".hidden.txt").write_text("never read\n")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                                   ["the film\n \nwas good", "the plot", "the cast"] * 2) + "\n")
    recipe = load(pretrain_recipe(tiny_llama, folder, data={"document": "line", "test": str(tmp_path / "docs.jsonl")}))
    report = ts.doctor(recipe, out=None)
    assert report["splits"]["train"] + report["splits"]["validation"] == 61
    assert any("a.txt: 2 empty line(s) skipped" in w for w in report["warnings"])
    assert any("exact duplicate" in w for w in report["warnings"])           # lines[0] twice; test rows twice
    tokens = report["task"]["tokens"]
    assert tokens["test"]["documents"] == 6 and tokens["test"]["tokens"] == 2 * (4 + 2 + 2)
    assert report["task"]["lines"]["test"]["whitespace_only"] == 2
    assert any("lines of spaces or tabs alone" in w for w in report["warnings"])


def test_paragraph_and_file_documents(tiny_llama, tmp_path):
    (tmp_path / "p.txt").write_text("one two\nthree\n\n\nfour\n  \nfive six\n")
    for how, texts in [("paragraph", ["one two\nthree", "four", "five six"]),
                       ("file", ["one two\nthree\n\n\nfour\n  \nfive six"])]:
        task = get_task(load(pretrain_recipe(tiny_llama, tmp_path / "p.txt", data={"document": how})))
        table = task.read(str(tmp_path / "p.txt"), "train")
        assert [r["text"] for r in table.rows] == texts
        assert table.origins[0].endswith("p.txt:1")
    assert get_task(load(pretrain_recipe(tiny_llama, tmp_path / "p.txt"))).read(str(tmp_path / "p.txt"),
                                                                               "train").origins == [
        f"{tmp_path / 'p.txt'}:1", f"{tmp_path / 'p.txt'}:5", f"{tmp_path / 'p.txt'}:7"]


def test_moved_run_folder_loads_and_predicts(tiny_llama, tiny_bert, tmp_path):
    for objective, model in (("causal", tiny_llama), ("masked", tiny_bert)):
        run = ts.train(ts.load_recipe(pretrain_recipe(model, write_text(tmp_path / "t.txt", n=40), objective,
                                                      train={"max_steps": 2})), run_dir=tmp_path / objective)
        moved = tmp_path / "elsewhere" / objective
        shutil.move(str(run.path), str(moved))
        predictor = ts.Run(moved).load(device="cpu")
        out = predictor.predict(["the movie was [MASK]" if objective == "masked" else "the movie"])
        assert isinstance(out[0]["output"], str) and out[0]["prompt"]
        assert predictor.predict([" "])[0] == {"error": "empty text"}
        assert predictor.evaluate(str(tmp_path / "t.txt"))["label_tokens"] > 0


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_resume_is_bitwise_equal(objective, tiny_llama, tiny_bert, tmp_path, capsys):
    """A run resumed from a middle checkpoint ends bitwise equal to the uninterrupted one (masked: the masks are
    drawn again from the checkpoint's RNG)."""
    model = tiny_llama if objective == "causal" else tiny_bert
    recipe = ts.load_recipe(pretrain_recipe(model, write_text(tmp_path / "t.txt", n=80), objective,
                                            train={"epochs": 2, "save_every": 3, "keep_checkpoints": 10}))
    whole = ts.train(recipe, run_dir=tmp_path / "whole").path
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    steps = sorted(p for p in (cut / "checkpoints").glob("step-*"))
    assert len(steps) >= 3
    for p in steps[len(steps) // 2:]:
        shutil.rmtree(p)
    shutil.rmtree(cut / "model")
    (cut / "eval.json").unlink()
    capsys.readouterr()
    ts.train(recipe, resume=cut)
    assert f"resume: continuing from {steps[len(steps) // 2 - 1].name}" in capsys.readouterr().out
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
