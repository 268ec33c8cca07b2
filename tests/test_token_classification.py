"""Token classification: the readers (CoNLL, JSONL tokens+tags, JSONL text+spans), tag-scheme checks and repair,
sub-word alignment and windows (every word scored once), seqeval parity, training, span prediction in the "spans"
schema, serving through /v1/predict, the report and the ONNX export."""
import json
import random
import re

import pytest

from tunesmith.data import DataError
from tunesmith.recipe import RecipeError, load
from tunesmith.splits import load_data
from tunesmith.tasks import conll, get_task, tagging

PER = [["John"], ["Mary"], ["Ahmed"], ["John", "Smith"], ["Mary", "Garcia"]]
LOC = [["Paris"], ["Berlin"], ["Lagos"], ["New", "York"]]
ORG = [["Acme"], ["Initech"], ["Globex", "Corp"]]
TEMPLATES = [["PER", "lives", "in", "LOC", "."], ["PER", "works", "for", "ORG", "in", "LOC", "."],
             ["yesterday", "PER", "met", "PER", "at", "ORG", "."], ["the", "team", "visited", "LOC", "today", "."]]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "john", "mary", "ahmed", "smith", "garcia", "paris", "berlin",
         "la", "##gos", "new", "york", "acme", "init", "##ech", "globex", "corp", "lives", "in", "works", "for",
         "yesterday", "met", "at", "the", "team", "visited", "today", ".", "word"]


def sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """n generated (tokens, BIO tags) sentences over three entity types."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        tokens, tags = [], []
        for slot in rng.choice(TEMPLATES):
            if slot in ("PER", "LOC", "ORG"):
                words = rng.choice({"PER": PER, "LOC": LOC, "ORG": ORG}[slot])
                tokens += words
                tags += [f"B-{slot}"] + [f"I-{slot}"] * (len(words) - 1)
            else:
                tokens.append(slot)
                tags.append("O")
        out.append((tokens, tags))
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_tagger(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with a word-piece vocabulary ("Lagos" -> la ##gos), saved as an HF folder."""
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-tagger")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForTokenClassification(config).save_pretrained(folder)
    return folder


def recipe(model, train, **data):
    return load({"task": "token-classification", "model": str(model),
                 "data": {"train": str(train), "validation_size": 0.2, "test_size": 0.2, "max_length": 32,
                          "stride": 8, **data},
                 "adapt": {"method": "full"},
                 "train": {"epochs": 4, "learning_rate": 5e-3, "batch_size": 16, "seed": 0, "precision": "fp32",
                           "log_every": 1, "warmup": 0},
                 "eval": {"batch_size": 32}})


# --- recipe, readers, checks ------------------------------------------------------------------------

def test_recipe_keys_are_checked(tmp_path):
    r = recipe("m", tmp_path / "t.conll", tag_scheme="IOBES", conll_columns=["word", "pos", "ner"], conll_tag="ner")
    assert r.train.metric == "f1" and r.data.conll_tag == "ner"
    with pytest.raises(RecipeError, match="conll_columns must list it"):
        recipe("m", tmp_path / "t.conll", conll_tag="ner")
    with pytest.raises(RecipeError, match="stride"):
        recipe("m", tmp_path / "t.conll", stride=16)


def test_conll_reader_columns_docstart_and_origins(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- O\n\nJohn NNP B-PER\nSmith NNP I-PER\nlives VBZ O\n\n\n"
                    "Paris\tNNP\tB-LOC\n\n")
    cfg = recipe("m", path).data
    table = conll.read_conll(path, cfg)
    assert table.rows == [{"tokens": ["John", "Smith", "lives"], "tags": ["B-PER", "I-PER", "O"]},
                          {"tokens": ["Paris"], "tags": ["B-LOC"]}]
    assert table.origins == [f"{path}:3", f"{path}:8"] and table.rejects == []
    by_name = recipe("m", path, conll_columns=["word", "pos", "ner"], conll_token="word", conll_tag="pos").data
    assert conll.read_conll(path, by_name).rows[1] == {"tokens": ["Paris"], "tags": ["NNP"]}
    with pytest.raises(DataError, match="conll_tag is 5"):
        conll.read_conll(path, recipe("m", path, conll_tag=5).data)
    with pytest.raises(DataError, match="names 2 columns"):
        conll.read_conll(path, recipe("m", path, conll_columns=["word", "ner"], conll_tag="ner").data)


def test_text_spans_rows_become_words_and_tags(tiny_tagger, tmp_path):
    task = get_task(recipe(tiny_tagger, tmp_path / "x.jsonl"))
    text = "Dr. Mary Garcia-Lopez moved to New York."
    spans = [{"start": 4, "end": 21, "label": "PER"}, {"start": 31, "end": 39, "label": "LOC"}]
    assert task.check({"text": text, "spans": spans}, "train") is None
    words, tags, offsets = task.sentence({"text": text, "spans": spans})
    assert words == ["Dr", ".", "Mary", "Garcia", "-", "Lopez", "moved", "to", "New", "York", "."]
    assert tags == ["O", "O", "B-PER", "I-PER", "I-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]
    assert all(text[a:b] == w for w, (a, b) in zip(words, offsets))
    inside = task.sentence({"text": "Obamacare passed", "spans": [{"start": 0, "end": 5, "label": "PER"}]})
    assert inside[0][:2] == ["Obama", "care"] and inside[1][:2] == ["B-PER", "O"]    # split at the span's edge
    for bad, why in [({"start": 5, "end": 3, "label": "X"}, "0 <= start < end"),
                     ({"start": 0, "end": 99, "label": "X"}, "0 <= start < end"),
                     ({"start": 0, "end": 2, "label": ""}, "needs a label"),
                     ({"start": 2, "end": 4, "label": "X"}, "only blanks")]:
        assert why in task.check({"text": "Dr  Mary", "spans": [bad]}, "train")
    assert "overlap" in task.check({"text": text, "spans": spans + [{"start": 10, "end": 15, "label": "X"}]}, "train")
    assert task.check({"text": "  ", "spans": []}, "train") == "empty text"
    assert "missing spans" in task.check({"text": "hi"}, "train")


@pytest.mark.parametrize("scheme,tags,why", [
    ("BIO", ["O", "I-PER"], "I-PER after O"),
    ("BIO", ["I-PER", "O"], "I-PER at the start of the sentence"),
    ("BIO", ["B-LOC", "I-PER"], "I-PER after B-LOC"),
    ("BIO", ["B-PER", "E-PER"], "not a tag of the BIO scheme"),
    ("BIO", ["B-PER", "PER"], "not a tag of the BIO scheme"),
    ("IO", ["O", "I-PER"], None),
    ("IO", ["B-PER", "O"], "not a tag of the IO scheme"),
    ("BIOES", ["B-PER", "O"], "B-PER is not closed"),
    ("BIOES", ["S-PER", "E-PER"], "E-PER after S-PER"),
    ("BIOES", ["B-PER", "I-PER"], "I-PER ends the sentence unclosed"),
    ("BIOES", ["B-PER", "I-PER", "E-PER", "S-LOC", "O"], None),
    ("IOB2", ["B-PER", "I-PER", "B-PER"], None),
])
def test_tag_schemes(tmp_path, scheme, tags, why):
    task = get_task(recipe("m", tmp_path / "x.jsonl", tag_scheme=scheme))
    reason = task.check({"tokens": ["w"] * len(tags), "tags": tags}, "train")
    assert reason is None if why is None else why in reason


def test_row_faults_and_repair(tmp_path):
    task = get_task(recipe("m", tmp_path / "x.jsonl"))
    assert task.check({"tokens": ["a", "b"], "tags": ["O"]}, "train") == "2 tokens but 1 tags: one tag per token"
    assert task.check({"tokens": [], "tags": []}, "train") == "empty sentence: no tokens"
    assert task.check({"tokens": ["a"]}, "train") == "missing tags (column 'tags')"
    assert task.check({"words": ["a"]}, "train") == "no 'tokens' or 'text' column"
    task.prepare([{"tokens": ["a", "b"], "tags": ["B-PER", "I-PER"]}])
    assert task.labels == ["O", "B-PER", "I-PER"]
    assert "entity type 'LOC' (token 0, 'x') never appears in train" in task.check(
        {"tokens": ["x"], "tags": ["B-LOC"]}, "test")
    fixing = get_task(recipe("m", tmp_path / "x.jsonl", tag_repair=True, tag_scheme="BIOES"))
    row = {"tokens": list("abcde"), "tags": ["I-PER", "I-PER", "O", "B-LOC", "I-ORG"]}
    assert fixing.check(row, "train") is None
    assert fixing.sentence(row)[1] == ["B-PER", "E-PER", "O", "S-LOC", "S-ORG"]
    assert fixing.repairs == {"train": [1, 4]}
    assert row["tags"][0] == "I-PER"                        # the row itself is left as read


def test_five_planted_faults(tiny_tagger, tmp_path):
    """4 rejects with file:line (bad transition, count mismatch, empty sentence, unknown tag in test); the
    1,000-token sentence is kept whole, in windows; nothing else is dropped."""
    good = sentences(30)
    lines = []
    for tokens, tags in good[:10]:
        lines += [f"{w}\t{t}" for w, t in zip(tokens, tags)] + [""]
    starts = {}
    starts["transition"] = len(lines) + 1
    lines += ["Mary\tB-PER", "visited\tO", "Paris\tI-LOC", ""]
    starts["count"] = len(lines) + 2
    lines += ["John\tB-PER", "lives", "in\tO", ""]
    starts["empty"] = len(lines) + 1
    lines += ["\tO", "\tO", ""]
    starts["long"] = len(lines) + 1
    lines += ["word\tO"] * 500 + ["Lagos\tB-LOC"] + ["word\tO"] * 499 + [""]
    for tokens, tags in good[10:20]:
        lines += [f"{w}\t{t}" for w, t in zip(tokens, tags)] + [""]
    train = tmp_path / "train.conll"
    train.write_text("\n".join(lines))
    test_lines = []
    for tokens, tags in good[20:30]:
        test_lines += [f"{w}\t{t}" for w, t in zip(tokens, tags)] + [""]
    unknown = len(test_lines) + 1
    test_lines += ["Ahmed\tB-MISC", ""]
    test = tmp_path / "test.conll"
    test.write_text("\n".join(test_lines))
    r = recipe(tiny_tagger, train, test=str(test), validation_size=3)
    task = get_task(r)
    loaded = load_data(task, r)                             # the shared reader asks the task first (Task.read)
    got = {(x.origin, x.split) for x in loaded.rejects}
    assert got == {(f"{train}:{starts['transition']}", "train"), (f"{train}:{starts['count']}", "train"),
                   (f"{train}:{starts['empty']}", "train"), (f"{test}:{unknown}", "test")}
    reasons = " | ".join(x.reason for x in loaded.rejects)
    assert "I-LOC after O" in reasons and "1 column(s) where the file has 2" in reasons
    assert "empty sentence" in reasons and "entity type 'MISC'" in reasons
    tables = loaded.tables
    assert len(tables["train"]) + len(tables["validation"]) == 21 and len(tables["test"]) == 10
    kept = {o: r for t in (tables["train"], tables["validation"]) for o, r in zip(t.origins, t.rows)}
    row = kept[f"{train}:{starts['long']}"]
    assert len(row["tokens"]) == 1000
    features = task.encode([row])
    assert features.truncated == 0 and len(features) > 30
    assert all(len(f["input_ids"]) <= 32 for f in features)
    scored = sorted(w for f in features for w in f["words"])
    assert scored == list(range(1000))                     # every word scored by exactly one window
    assert "Lagos" in row["tokens"] and task.labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    from tunesmith.diagnosis.diagnose import diagnose

    report = diagnose(r)                                    # the doctor: the same 4 rejects, 1 windowed sentence
    assert {(x["origin"], x["split"]) for x in report["rejects"]} == got
    assert [o for x in report["lengths"]["by_split"].values() for o in x["windowed"]] == [f"{train}:{starts['long']}"]


# --- alignment and windows --------------------------------------------------------------------------

def test_first_subword_carries_the_tag(tiny_tagger, tmp_path):
    for all_subwords, after in ((False, -100), (True, "I-LOC")):
        task = get_task(recipe(tiny_tagger, tmp_path / "x.jsonl", label_all_subwords=all_subwords))
        task.prepare([{"tokens": ["Lagos", "Initech", "x"], "tags": ["B-LOC", "B-ORG", "I-ORG"]}])
        (f,) = task.encode([{"tokens": ["met", "Lagos", "Initech"], "tags": ["O", "B-LOC", "B-ORG"]}])
        tokens = task.tokenizer.convert_ids_to_tokens(f["input_ids"])
        assert tokens == ["[CLS]", "met", "la", "##gos", "init", "##ech", "[SEP]"]
        ids = task.label2id
        cont = -100 if after == -100 else ids[after]
        cont_org = -100 if after == -100 else ids["I-ORG"]
        assert f["labels"] == [-100, ids["O"], ids["B-LOC"], cont, ids["B-ORG"], cont_org, -100]
        assert f["first"] == [1, 2, 4] and f["gold"] == [ids["O"], ids["B-LOC"], ids["B-ORG"]]


def test_collate_pads_to_the_training_multiple(tiny_tagger, tmp_path):
    task = get_task(recipe(tiny_tagger, tmp_path / "x.jsonl"), 8)          # training on a GPU passes 16
    task.prepare([{"tokens": ["Lagos"], "tags": ["B-LOC"]}])
    batch = task.collate(task.encode([{"tokens": ["met", "Lagos"], "tags": ["O", "B-LOC"]}]))
    assert batch["input_ids"].shape == batch["labels"].shape == (1, 8)      # 5 sub-words, padded to 8
    assert batch["labels"][0, 5:].tolist() == [-100] * 3 and batch["attention_mask"][0].sum() == 5


def test_byte_level_tokenizers_get_a_prefix_space(tmp_path):
    """RoBERTa-style BPE: a word alone must be tokenized as after a space ("Ġb"), as in running text."""
    from transformers import RobertaTokenizer

    from tunesmith.tasks.subwords import words_like_text

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "a": 5, "b": 6, "Ġ": 7, "Ġa": 8, "Ġb": 9}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ a\nĠ b\n")
    RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path / "tok")
    task = get_task(recipe(tmp_path / "tok", tmp_path / "x.jsonl"))
    task.setup(str(tmp_path / "tok"))
    assert words_like_text(task.tokenizer)
    assert task.tokenizer(["a", "b"], is_split_into_words=True, add_special_tokens=False)["input_ids"] == [8, 9]


@pytest.mark.parametrize("seed", range(5))
def test_windows_cover_every_word_once(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 1, 2, 3, 7]) for _ in range(rng.randint(1, 400))]
    budget, stride = 30, 8
    plan = tagging.plan_windows(lengths, budget, stride)
    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    for (a0, b0), (a1, b1) in zip(plan, plan[1:]):
        assert a0 < a1 <= b0 < b1 and sum(lengths[a1:b0]) <= stride           # overlap, always advancing
    assert all(sum(lengths[a:b]) <= budget for a, b in plan)
    owner = tagging.owners(lengths, plan)
    assert all(plan[k][0] <= w < plan[k][1] for w, k in enumerate(owner))
    assert owner == sorted(owner)                                             # contiguous ownership


def test_a_word_longer_than_a_window_is_cut_and_counted():
    assert tagging.plan_windows([2, 50, 2], 30, 4) == [(0, 1), (1, 2), (2, 3)]


# --- metrics ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["BIO", "BIOES"])
def test_metrics_equal_a_direct_seqeval_call(tiny_tagger, tmp_path, scheme):
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.scheme import IOBES, Entities

    path = write_jsonl(tmp_path / "x.jsonl", [{"tokens": t, "tags": tagging.repair(g, scheme)}
                                              for t, g in sentences(40, seed=3)])
    task = get_task(recipe(tiny_tagger, path, max_length=12, stride=2, tag_scheme=scheme))   # windows too
    kw = {"mode": "strict", "scheme": IOBES} if scheme == "BIOES" else {}
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    task.prepare(rows)
    model = task.load_model().eval()
    import torch

    with torch.no_grad():
        result, true, pred, prob = task.scores(model, task.encode(rows), 7)
        final = task.evaluate_final(model, rows, task.encode(rows), 7, tmp_path)
    assert true == [r["tags"] for r in rows] and len(pred) == 40
    assert [len(p) for p in prob] == [len(t) for t in pred] and all(0 < float(x) <= 1 for p in prob for x in p)
    assert {k: final[k] for k in result} == result
    assert result["f1"] == pytest.approx(f1_score(true, pred, zero_division=0, **kw))
    assert result["precision"] == pytest.approx(precision_score(true, pred, zero_division=0, **kw))
    assert result["recall"] == pytest.approx(recall_score(true, pred, zero_division=0, **kw))
    assert result["f1_macro"] == pytest.approx(f1_score(true, pred, average="macro", zero_division=0, **kw))
    assert result["accuracy"] == pytest.approx(accuracy_score(true, pred))
    table = classification_report(true, pred, output_dict=True, zero_division=0, **kw)
    assert result["per_type"]["PER"]["f1"] == pytest.approx(table["PER"]["f1-score"])
    assert result["per_type"]["LOC"]["support"] == table["LOC"]["support"]
    assert result["n_words"] == sum(len(r["tokens"]) for r in rows)
    listed = [json.loads(x) for x in (tmp_path / "misclassified.jsonl").read_text().splitlines()]
    chunks = (lambda tags: {e.to_tuple() for e in Entities([tags], IOBES).entities[0]}) \
        if scheme == "BIOES" else (lambda tags: set(get_entities(tags)))
    differ = [i for i, (t, p) in enumerate(zip(true, pred)) if chunks(t) != chunks(p)]
    assert [x["row"] for x in listed] == differ and final["misclassified"] == len(differ)
    assert all(x["predicted"] == pred[x["row"]] and x["tokens"] == rows[x["row"]]["tokens"] for x in listed)
    for x in listed:
        assert [(s["label"], s["text"]) for s in x["reference"]["spans"]] == \
            [(k, " ".join(x["tokens"][a:b])) for k, a, b in tagging.entities(x["tags"])]


def test_a_sentence_is_misclassified_when_its_entities_differ():
    assert tagging.same_entities(["B-PER", "I-PER", "O"], ["I-PER", "I-PER", "O"], "BIO")      # conlleval reading
    assert not tagging.same_entities(["B-PER", "I-PER", "O"], ["B-PER", "B-PER", "O"], "BIO")
    assert not tagging.same_entities(["B-PER", "I-PER", "O"], ["B-PER", "I-PER", "B-LOC"], "BIO")
    assert not tagging.same_entities(["B-PER", "E-PER"], ["I-PER", "E-PER"], "BIOES")           # strict mode
    assert tagging.same_entities(["S-PER", "O"], ["S-PER", "O"], "BIOES")


def test_strict_mode_for_bioes():
    from tunesmith.metrics import entity_scores

    true, pred = [["B-PER", "E-PER", "O"]], [["I-PER", "E-PER", "O"]]
    assert entity_scores(true, pred)["f1"] == 1.0                  # conlleval reading: I- starts an entity
    assert entity_scores(true, pred, strict=True)["f1"] == 0.0     # BIOES: an entity starts with B- or S-


# --- training and prediction ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_tagger, tmp_path_factory):
    from tunesmith.pipeline import train

    tmp = tmp_path_factory.mktemp("ner-run")
    path = write_jsonl(tmp / "train.jsonl", [{"tokens": t, "tags": g} for t, g in sentences(200)])
    return train(recipe(tiny_tagger, path), run_dir=tmp / "run")


def test_training_lowers_the_loss_and_writes_entity_scores(trained):
    losses = [r["loss"] for r in trained.history if "loss" in r and "split" not in r]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    result = json.loads((trained.path / "eval.json").read_text())
    assert result["f1"] > 0.5 and set(result["per_type"]) <= {"PER", "LOC", "ORG"}
    assert result["n_sentences"] == 40


def test_predict_gives_spans_and_tags(trained):
    from tunesmith.tasks.outputs import SpansPrediction
    from tunesmith.tasks.tagging import TaggedSpans

    predictor = trained.load(device="cpu")
    assert predictor.task.output_schema() is TaggedSpans and issubclass(TaggedSpans, SpansPrediction)
    text = "Yesterday Mary Garcia met John at Initech, then visited New York."
    (out,) = predictor.predict([text])
    SpansPrediction.model_validate(out)                     # a text's prediction: exactly the kind's schema
    assert list(out) == ["spans"] and out["spans"], out
    for e in out["spans"]:
        assert list(e) == ["text", "start", "end", "label", "score"]
        assert text[e["start"]:e["end"]] == e["text"] and e["label"] in {"PER", "LOC", "ORG"}
        assert 0 < e["score"] <= 1
    assert {e["text"] for e in out["spans"]} & {"Mary Garcia", "John", "Initech", "New York"}
    tokens = ["word"] * 120 + ["John", "lives", "in", "Paris"]              # windows: every token gets a tag
    tagged = predictor.predict({"tokens": tokens})
    TaggedSpans.model_validate(tagged)
    assert len(tagged["tags"]) == len(tagged["scores"]) == 124
    joined = " ".join(tokens)
    assert tagged["spans"] and all(joined[e["start"]:e["end"]] == e["text"] for e in tagged["spans"])
    assert [(e["text"], e["label"]) for e in tagged["spans"]] == [(" ".join(tokens[a:b]), kind)
                                                                 for kind, a, b in tagging.entities(tagged["tags"])]
    assert predictor.predict("   ") == {"error": "empty text"}


def test_spans_equal_the_hf_pipeline_with_first_subword_aggregation(trained):
    """A word's first sub-word carries its tag in training, so HF's matching aggregation is "first" ("simple"
    also reads the untrained later sub-words)."""
    from transformers import pipeline

    texts = ["Yesterday Mary Garcia met John at Initech, then visited New York.", "Ahmed works for Acme in Lagos."]
    pipe = pipeline("token-classification", model=str(trained.path / "model"), aggregation_strategy="first")
    ours = trained.load(device="cpu").predict(texts)
    for text, got in zip(texts, ours):
        expected = [(e["entity_group"], e["start"], e["end"], float(e["score"])) for e in pipe(text)]
        assert [(e["label"], e["start"], e["end"]) for e in got["spans"]] == [x[:3] for x in expected]
        assert [e["score"] for e in got["spans"]] == pytest.approx([x[3] for x in expected], abs=1e-5)
    assert json.loads((trained.path / "model" / "config.json").read_text())["tunesmith_aggregation"] == "first"


def hf_simple_groups(pieces):
    """transformers' own grouping code (TokenClassificationPipeline.group_entities and the "O" filter of its
    postprocess) on (start, end, tag, probability) pieces."""
    from types import SimpleNamespace

    from transformers.pipelines.token_classification import TokenClassificationPipeline as P

    class Grouper:
        group_entities, group_sub_entities, get_tag = P.group_entities, P.group_sub_entities, P.get_tag
        tokenizer = SimpleNamespace(convert_tokens_to_string=" ".join)

    found = Grouper().group_entities([{"entity": t, "score": p, "word": "w", "start": a, "end": b}
                                      for a, b, t, p in pieces])
    return [(g["entity_group"], g["start"], g["end"], float(g["score"])) for g in found if g["entity_group"] != "O"]


@pytest.mark.parametrize("seed", range(3))
def test_grouping_equals_the_pipelines_simple_aggregation(seed):
    rng = random.Random(seed)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-PER"]
    pieces, at = [], 0
    for _ in range(200):
        n = rng.randint(1, 4)
        pieces.append((at, at + n, rng.choice(tags), rng.random()))
        at += n + rng.choice([0, 1])                    # a sub-word of the same word, or the next word
    got = tagging.grouped_spans("x" * at, pieces)
    expected = hf_simple_groups(pieces)
    assert [(s["label"], s["start"], s["end"]) for s in got] == [x[:3] for x in expected]
    assert [s["score"] for s in got] == pytest.approx([x[3] for x in expected], abs=1e-6)


@pytest.fixture(scope="module")
def trained_all_subwords(tiny_tagger, tmp_path_factory):
    from tunesmith.pipeline import train

    tmp = tmp_path_factory.mktemp("ner-run-all")
    path = write_jsonl(tmp / "train.jsonl", [{"tokens": t, "tags": g} for t, g in sentences(200)])
    return train(recipe(tiny_tagger, path, label_all_subwords=True), run_dir=tmp / "run")


PARITY_TEXTS = ["Yesterday Mary Garcia met John at Initech, then visited New York.", "Ahmed works for Acme in Lagos.",
                "Initech Lagos Globex Corp lagos INITECH.", "the team visited Lagos today."]


def test_spans_equal_the_hf_pipeline_with_simple_aggregation_under_label_all_subwords(trained_all_subwords, tmp_path):
    """Every sub-word trained (data.label_all_subwords): predict groups sub-words as aggregation_strategy="simple"
    does, scores included; checked on the trained run and on an untrained head, whose sub-words disagree."""
    from transformers import pipeline

    folder = trained_all_subwords.path / "model"
    assert json.loads((folder / "config.json").read_text())["tunesmith_aggregation"] == "simple"
    predictor = trained_all_subwords.load(device="cpu")
    task = predictor.task
    random_head = task.load_model().eval()                 # the backbone, a new random head: tags flip mid-word
    task.save(random_head, tmp_path / "random")
    inside = 0
    for model, path in ((predictor.model, folder), (random_head, tmp_path / "random")):
        pipe = pipeline("token-classification", model=str(path), aggregation_strategy="simple", device="cpu")
        ours = task.predict(model, PARITY_TEXTS + [{"tokens": ["Lagos", "Initech", "met", "Mary"]}])
        theirs = [pipe(t) for t in PARITY_TEXTS] + pipe([["Lagos", "Initech", "met", "Mary"]], is_split_into_words=True)
        for got, expected in zip(ours, theirs):
            assert [(e["label"], e["start"], e["end"]) for e in got["spans"]] == \
                [(x["entity_group"], x["start"], x["end"]) for x in expected]
            assert [e["score"] for e in got["spans"]] == pytest.approx([float(x["score"]) for x in expected], abs=1e-5)
        inside += sum(text[e["end"]:e["end"] + 1].isalnum() for text, p in zip(PARITY_TEXTS, ours) for e in p["spans"])
    assert inside                                            # some span ends inside a word: "simple", not "first"
    words = task.predict(predictor.model, ["Ahmed works for Acme in Lagos."])[0]["spans"]
    assert {(e["text"], e["label"]) for e in words} >= {("Lagos", "LOC"), ("Ahmed", "PER")}


# --- serving, report, export --------------------------------------------------------------------------

def test_it_serves_spans_through_v1_predict(trained):
    from fastapi.testclient import TestClient

    from tunesmith.serving.app import create_app

    predictor = trained.load(device="cpu")
    client = TestClient(create_app(predictor))
    texts = ["Ahmed works for Acme in Lagos.", "the team visited Berlin today."]
    inputs = [*texts, {"tokens": ["Mary", "lives", "in", "Paris", "."]}]
    answer = client.post("/v1/predict", json={"inputs": inputs})
    assert answer.status_code == 200, answer.text
    got = answer.json()["predictions"]
    assert got == predictor.predict(inputs)                 # the response model adds nothing (no null tags)
    for text, p in zip(texts, got):
        assert set(p) == {"spans"} and p["spans"]
        assert all(text[s["start"]:s["end"]] == s["text"] for s in p["spans"])
    assert got[2]["tags"] == ["B-PER", "O", "O", "B-LOC", "O"] and len(got[2]["scores"]) == 5
    assert client.get("/health").json()["prediction"] == "spans"
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TaggedSpans"]
    assert set(schema["properties"]) == {"spans", "tags", "scores"} and schema["required"] == ["spans"]
    bad = client.post("/v1/predict", json={"inputs": [{"tokens": []}]})
    assert bad.status_code == 422 and "non-empty list" in bad.text


def test_the_report_draws_its_samples(trained, tmp_path):
    import tunesmith as ts

    samples = [json.loads(x) for x in (trained.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20
    for s in samples:
        for side in ("reference", "output"):
            assert all(s["input"][x["start"]:x["end"]] == x["text"] for x in s[side]["spans"])
    assert sum(s["reference"] == {"spans": [{**x, "score": 1.0} for x in s["output"]["spans"]]}
               for s in samples) > 10                      # mostly right after training
    page = ts.report([trained.path], tmp_path / "report.html").read_text()
    section = re.search(r'<section id="samples">(.*?)</section>', page, re.DOTALL).group(1)
    marks = set(re.findall(r'<mark title="(PER|LOC|ORG) [0-9.]+">([^<]+)<sub>', section))
    assert {(x["label"], x["text"]) for s in samples for side in ("reference", "output") for x in s[side]["spans"]} \
        == marks
    overview = re.search(r'<section id="overview">(.*?)</section>', page, re.DOTALL).group(1)
    assert '<td class="l">token-classification</td><td class="l">spans</td>' in overview


def test_the_report_has_a_per_type_table_and_lists_misclassified_sentences(trained, tmp_path):
    import shutil

    import tunesmith as ts
    from tunesmith.insight.page import fmt

    run = shutil.copytree(trained.path, tmp_path / "run", ignore=shutil.ignore_patterns("model", "checkpoints"))
    result = json.loads((run / "eval.json").read_text())
    for x in [json.loads(line) for line in (run / "misclassified.jsonl").read_text().splitlines()]:
        assert x["input"] == " ".join(x["tokens"]) and x["reference"] != x["output"]
    page = ts.report([run], tmp_path / "report.html", explain=False).read_text()
    table = re.search(r'<section id="per-class">(.*?)</section>', page, re.DOTALL).group(1)
    for kind, v in [*result["per_type"].items(), ("<b>macro</b>", {k: result[f"{k}_macro"] for k in ("precision",
                                                                     "recall", "f1")} | {"support": None})]:
        cells = "".join(f"<td>{fmt(v[k])}</td>" for k in ("precision", "recall", "f1"))
        assert f'<td class="l">{kind}</td>{cells}' in table
    wrong = [{"row": k, "input": f"sentence{k} Paris", "reference": {"spans": []},
              "output": {"spans": [{"text": "Paris", "start": len(f"sentence{k} "), "end": len(f"sentence{k} Paris"),
                                    "label": "LOC", "score": 0.5}]}} for k in range(25)]
    (run / "misclassified.jsonl").write_text("".join(json.dumps(x) + "\n" for x in wrong))
    (run / "eval.json").write_text(json.dumps(result | {"misclassified": 25}))
    page = ts.report([run], tmp_path / "report.html", explain=False).read_text()
    samples = re.search(r'<section id="samples">(.*?)</section>', page, re.DOTALL).group(1)
    listed = samples[samples.index('id="misclassified"'):]
    assert "differ from the reference (25)" in listed and "the first 20 of 25" in listed
    pairs = [k for k in range(20) for _ in ("output", "reference")]
    assert [int(k) for k in re.findall(r"sentence(\d+) ", listed)] == pairs
    assert listed.count('<mark title="LOC 0.500">Paris<sub>LOC</sub></mark>') == 20


def test_it_exports_logits_with_batch_and_sequence_axes(trained):
    import onnx

    import tunesmith as ts
    from tunesmith.deploy.export import load_onnx

    report = ts.export(trained.path, repeats=3)
    fp32 = report["results"]["fp32"]
    assert report["passed"] and fp32["max_abs_logit_diff"] < 1e-4
    assert fp32["f1"] == pytest.approx(trained.metrics["f1"], abs=1e-9)
    graph = onnx.load(str(trained.path / "export" / "model.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert [o.name for o in graph.output] == ["logits"] and dims == ["batch", "sequence", 7]
    text = "Yesterday Mary Garcia met John at Initech, then visited New York."
    tokens = ["word"] * 120 + ["John", "lives", "in", "Paris"]             # windows through the ONNX model too
    exported = load_onnx(trained.path, "fp32").predict([text, {"tokens": tokens}])
    expected = trained.load(device="cpu").predict([text, {"tokens": tokens}])
    assert [[(s["text"], s["label"]) for s in p["spans"]] for p in exported] == \
        [[(s["text"], s["label"]) for s in p["spans"]] for p in expected]
    assert exported[1]["tags"] == expected[1]["tags"]


def test_a_llama_style_backbone_tags_too(tmp_path):
    """Item 1: a decoder (Llama) with transformers' token-classification head trains through the same task: a
    word-level fast tokenizer without a pad token of its own; spans predicted after."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForTokenClassification, PreTrainedTokenizerFast

    from tunesmith.pipeline import train

    words = [w for w in VOCAB if not w.startswith(("[", "##"))] + ["lagos", "initech", "<unk>", "</s>"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "tiny-llama-tagger"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=len(words) - 1, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForTokenClassification(config).save_pretrained(folder)
    path = write_jsonl(tmp_path / "train.jsonl", [{"tokens": t, "tags": g} for t, g in sentences(200)])
    run = train(recipe(folder, path), run_dir=tmp_path / "run")
    assert run.metrics["f1"] > 0.5, run.metrics
    spans = run.load(device="cpu").predict(["Mary Smith lives in Paris ."])[0]["spans"]
    assert {(s["text"], s["label"]) for s in spans} >= {("Paris", "LOC")}, spans
