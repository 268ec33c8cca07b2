"""The proof that a task plugs in through its declarations alone: a task defined in this file only (its Task, its
recipe class and one register_task call) trains with ts.train, predicts, serves through /v1/predict and the page,
appears in the report and exports to ONNX because it declares its outputs; no module of the package names it.

The task, "keyword-spans": mark the sentiment words of a review as spans (POS, NEG) with a token-classification
head on conftest's tiny BERT. Its predictions are of the kind "spans", which no built-in task has; its ONNX output
has a sequence axis, which no built-in task's has."""
import json
import random
import re
import shutil
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F
from conftest import NEGATIVE, POSITIVE, sentence
from pydantic import Field

import tunesmith as ts
from tunesmith.recipe import DataConfig
from tunesmith.tasks.base import Features, batches, model_device
from tunesmith.tasks.hf import load_hf

NAME = "keyword-spans"
TEXTS = ["the cast was superb", "a dull plot and the acting is quite weak", "the film was a movie"]


# ---------------------------------------------------------------- the task: everything it is, in this file

class KeywordSpans(ts.Task):
    """Each word gets a tag ("O" or a span label) on its first token; each tagged word is a span."""
    name = NAME
    prediction = "spans"                                # {"spans": [{"text", "start", "end", "label", "score"}]}
    names = ["O"]

    @property
    def labels(self):
        return list(self.names)

    def load_processor(self, source, revision):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, revision=revision)

    def check_input(self, item):
        text = item.get(self.recipe.data.text_column) if isinstance(item, dict) else item
        return None if isinstance(text, str) and text.strip() else "the text must be a non-empty string"

    def check(self, row, split):
        spans = row.get(self.recipe.data.spans_column)
        if not isinstance(spans, list) or not all(isinstance(s, dict) and {"start", "end", "label"} <= set(s)
                                                  for s in spans):
            return "spans must be a list of {start, end, label}"
        return self.check_input(row)

    def key(self, row):
        return row[self.recipe.data.text_column]

    def prepare(self, rows):
        self.names = ["O", *sorted({s["label"] for r in rows for s in r[self.recipe.data.spans_column]})]

    def encode(self, rows):
        """input_ids [T]; words: (start, end, index of its first token or None when cut); labels [T] when the row
        has spans: the word's tag id on its first token, -100 elsewhere."""
        tok, limit, col = self.processor, self.recipe.data.max_length, self.recipe.data.spans_column
        out = Features()
        for row in rows:
            text = row[self.recipe.data.text_column]
            ids, words, tags = [tok.cls_token_id], [], [-100]
            for m in re.finditer(r"\S+", text):
                pieces = tok.convert_tokens_to_ids(tok.tokenize(m.group()))
                first = len(ids) if len(ids) + len(pieces) < limit else None
                words.append((m.start(), m.end(), first))
                if first is not None:
                    covering = [s["label"] for s in row.get(col) or () if s["start"] <= m.start() < s["end"]]
                    ids += pieces
                    tags += [self.names.index(covering[0]) if covering else 0] + [-100] * (len(pieces) - 1)
            feature = {"input_ids": ids + [tok.sep_token_id], "text": text, "words": words}
            if col in row:
                feature["labels"] = tags + [-100]
                feature["gold"] = {(s["start"], s["end"], s["label"]) for s in row[col]}
            out.append(feature)
        return out

    def collate(self, features):
        # input_ids, attention_mask: [B, T]; labels: [B, T], -100 on padding and on the words' other tokens
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros((len(features), width), dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
            if "labels" in f:
                labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, **({"labels": labels} if "labels" in features[0] else {})}

    def count(self, batch):
        return float((batch["labels"] != -100).sum())

    def load_model(self):
        from transformers import AutoModelForTokenClassification

        return load_hf(AutoModelForTokenClassification, self.recipe.model, id2label=dict(enumerate(self.names)),
                       label2id={n: i for i, n in enumerate(self.names)})[0]

    def load_trained(self, folder):
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_pretrained(folder)
        self.setup(str(folder))
        self.names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return model

    def scan(self, model, features, batch_size):
        """(summed loss, tagged tokens, predicted spans per feature)."""
        total, count, found = 0.0, 0, [None] * len(features)
        for idx, batch in batches(self, features, batch_size, model_device(model)):
            labels = batch.pop("labels", None)
            logits = model(**batch).logits.float()                                  # [B, T, C]
            if labels is not None:
                keep = labels != -100
                total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
                count += int(keep.sum())
            for row, i in zip(logits.softmax(-1).cpu(), idx):
                f = features[i]
                found[i] = [{"text": f["text"][s:e], "start": s, "end": e, "label": self.names[int(row[t].argmax())],
                             "score": round(float(row[t].max()), 6)}
                            for s, e, t in f["words"] if t is not None and int(row[t].argmax()) != 0]
        return total, count, found

    def evaluate(self, model, features, batch_size):
        total, count, found = self.scan(model, features, batch_size)
        predicted = sum(len(s) for s in found)
        gold = sum(len(f["gold"]) for f in features)
        hits = sum(len({(s["start"], s["end"], s["label"]) for s in spans} & f["gold"])
                   for spans, f in zip(found, features))
        return {"loss": total / max(count, 1), "f1": 2 * hits / (predicted + gold) if predicted + gold else 1.0}

    def evaluate_final(self, model, rows, features, batch_size, out_dir=None):
        result = self.evaluate(model, features, batch_size)
        if out_dir is not None:                         # samples.jsonl: what the report draws for "spans"
            found = self.scan(model, features[:20], batch_size)[2]
            with open(Path(out_dir) / "samples.jsonl", "w") as out:
                for f, spans in zip(features, found):
                    gold = [{"text": f["text"][s:e], "start": s, "end": e, "label": label, "score": 1.0}
                            for s, e, label in sorted(f["gold"])]
                    out.write(json.dumps({"input": f["text"], "reference": {"spans": gold},
                                          "output": {"spans": spans}}) + "\n")
        return result

    def predict(self, model, inputs):
        col = self.recipe.data.text_column
        rows = [{col: x[col] if isinstance(x, dict) else x} for x in inputs]
        return [{"spans": s} for s in self.scan(model, self.encode(rows), self.recipe.eval.batch_size)[2]]

    def export_outputs(self):
        return {"logits": {0: "batch", 1: "sequence"}}                              # [B, T, C]

    def export_inputs(self):
        col = self.recipe.data.text_column
        batch = self.collate(self.encode([{col: "a short text"}, {col: "and a somewhat longer text than that"}]))
        return {name: (x, {0: "batch", 1: "sequence"}) for name, x in batch.items()}


class SpansData(DataConfig):
    text_column: str = "text"
    spans_column: str = "spans"                         # [{start, end, label}]: character offsets, end exclusive
    max_length: int = Field(32, gt=0)


class KeywordSpansRecipe(ts.Recipe):
    task_class: ClassVar = KeywordSpans
    metrics: ClassVar = {"f1": "max", "loss": "min"}
    default_metric: ClassVar = "f1"

    task: Literal["keyword-spans"]
    data: SpansData


ts.register_task(KeywordSpansRecipe)


# ---------------------------------------------------------------- data, a trained run

def spans_of(text: str) -> list[dict]:
    tags = {w: "POS" for w in POSITIVE} | {w: "NEG" for w in NEGATIVE}
    return [{"start": m.start(), "end": m.end(), "label": tags[m.group()]} for m in re.finditer(r"\S+", text)
            if m.group() in tags]


def gold(text: str) -> list[tuple]:
    return [(text[s["start"]:s["end"]], s["label"]) for s in spans_of(text)]


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("custom-task")
    rng = random.Random(0)
    with open(tmp / "reviews.jsonl", "w") as f:
        for i in range(240):
            text = sentence(rng, i % 2 == 0) if i % 6 else "the film was a movie"           # some rows: no span
            f.write(json.dumps({"text": text, "spans": spans_of(text)}) + "\n")
    recipe = ts.load_recipe({"task": NAME, "model": str(tiny_bert), "data": {"train": str(tmp / "reviews.jsonl"),
                             "validation_size": 0.2, "test_size": 0.2},
                             "train": {"epochs": 10, "learning_rate": 3e-3, "batch_size": 16, "seed": 0,
                                       "precision": "fp32", "log_every": 1, "warmup": 0},
                             "eval": {"batch_size": 32}})
    assert type(recipe) is KeywordSpansRecipe
    trained = ts.train(recipe, run_dir=tmp / "run")
    assert trained.metrics["f1"] > 0.95                 # it learned which words are sentiment words
    return trained.path


def test_nothing_in_the_package_names_the_task():
    package = Path(ts.__file__).parent
    assert not [p for p in package.rglob("*") if p.is_file() and NAME.encode() in p.read_bytes()]


def test_it_trains_and_predicts_spans(run):
    predicted = ts.Run(run).load("cpu").predict(TEXTS)
    from tunesmith.tasks.outputs import SpansPrediction

    for text, p in zip(TEXTS, predicted):
        SpansPrediction.model_validate(p)               # the declared schema, exactly
        assert [(s["text"], s["label"]) for s in p["spans"]] == gold(text)
        assert all(text[s["start"]:s["end"]] == s["text"] and 0.5 < s["score"] <= 1 for s in p["spans"])
    assert gold(TEXTS[1]) == [("dull", "NEG"), ("weak", "NEG")] and predicted[2] == {"spans": []}


def test_it_serves_predict_and_the_page(run):
    from fastapi.testclient import TestClient

    predictor = ts.Run(run).load("cpu")
    client = TestClient(ts.create_app(predictor))
    answer = client.post("/v1/predict", json={"inputs": TEXTS})
    assert answer.status_code == 200 and answer.json()["predictions"] == predictor.predict(TEXTS)
    health = client.get("/health").json()
    assert (health["task"], health["prediction"], health["chats"]) == (NAME, "spans", False)
    api = client.get("/openapi.json").json()
    assert set(api["components"]["schemas"]["SpansPrediction"]["properties"]) == {"spans"}
    assert "/v1/chat/completions" not in api["paths"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="spans"' in page.text and "spans(p, input)" in page.text
    from tunesmith.serving.repl import chat

    with pytest.raises(ts.TunesmithError, match=f"task '{NAME}' does not chat"):     # it does not declare chats
        chat(str(run))


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_highlights_the_predicted_spans(run):
    from deploy_fixtures import Server
    from playwright.sync_api import sync_playwright

    with Server(ts.create_app(ts.Run(run).load("cpu"))) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"], timeout=60_000)
        try:
            page = browser.new_page()
            page.goto(srv.url, timeout=30_000)
            page.fill("#text", TEXTS[1], timeout=10_000)
            page.click("#send", timeout=10_000)
            page.wait_for_function("document.querySelectorAll('#spans mark').length > 0", timeout=20_000)
            marks = page.eval_on_selector_all("#spans mark", "ms => ms.map(m => [m.firstChild.textContent, "
                                                             "m.dataset.label])")
            assert [tuple(m) for m in marks] == gold(TEXTS[1])
            assert page.text_content("#spans").replace("NEG", "") == TEXTS[1]       # the whole text, in order
        finally:
            browser.close()


def test_it_appears_in_the_report(run, tmp_path):
    from html import unescape

    page = ts.report([run], tmp_path / "report.html").read_text()
    samples = re.search(r'<section id="samples">(.*?)</section>', page, re.DOTALL).group(1)
    marks = re.findall(r'<mark title="(POS|NEG) [0-9.]+">([a-z]+)<sub>', samples)
    assert marks and all({"POS": POSITIVE, "NEG": NEGATIVE}[label].count(word) for label, word in marks)
    overview = re.search(r'<section id="overview">(.*?)</section>', page, re.DOTALL).group(1)
    assert f'<td class="l">{NAME}</td><td class="l">spans</td>' in overview and "<td>f1</td>" in overview
    confusion = unescape(re.search(r'<section id="confusion">(.*?)</section>', page, re.DOTALL).group(1))
    assert f"does not apply: task '{NAME}' predicts spans" in confusion
    assert "declares no explanations" in re.search(r'<section id="explanations">(.*?)</section>', page,
                                                   re.DOTALL).group(1)


def test_it_exports_the_outputs_it_declares(run):
    import onnx

    from tunesmith.deploy.export import load_onnx

    report = ts.export(run, repeats=3)
    fp32 = report["results"]["fp32"]
    assert report["passed"] and report["files"] == {"fp32": "model.onnx"}
    assert fp32["max_abs_logit_diff"] < 1e-4 and fp32["f1"] == pytest.approx(ts.Run(run).metrics["f1"], abs=1e-9)
    graph = onnx.load(str(run / "export" / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["logits"]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", "sequence", 3]
    exported = load_onnx(run, "fp32").predict(TEXTS)                 # the task's own predict, through onnxruntime
    assert [[(s["text"], s["label"]) for s in p["spans"]] for p in exported] == [gold(t) for t in TEXTS]
