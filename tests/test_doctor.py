"""The data doctor on generated fixtures: every bad row with its line and reason, counts that add up,
`skip` training on exactly the good rows, planted leakage / duplicates / conflicts found (and nothing
else), flipped labels ranked on top, hooks a task lacks reported as not available."""
import csv
import json
import random
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import recipe_dict, sentence, write_reviews

from tunesmith import data as datalib
from tunesmith.cli import main
from tunesmith.diagnosis.diagnose import diagnose
from tunesmith.pipeline import train
from tunesmith.recipe import load
from tunesmith.splits import fingerprint
from tunesmith.tasks.text_classification import TextClassification

QUICK = {"label_noise": False}          # the checks that need no embeddings


def recipe(model, train_path, data=None, **sections):
    """The tiny-model recipe of conftest with `data` keys added (validation, test, bad_rows, ...)."""
    out = recipe_dict(model, train_path, **sections)
    out["data"].update(data or {})
    return load(out)


def doctor(model, train_path, data=None, **doctor_cfg):
    return diagnose(recipe(model, train_path, data, doctor=doctor_cfg))


def pairs(report):
    return {(p["kind"], p["split_a"], p["origin_a"], p["split_b"], p["origin_b"]) for p in report["leakage"]["pairs"]}


# --- 1,000 malformed rows of mixed kinds -------------------------------------------------------------

JSONL_BAD = [(b'{"text": "broken", "label": ', "malformed JSON"),
             (b"[1, 2, 3]", "expected a JSON object"),
             (b'"just a string"', "expected a JSON object"),
             (b'{"text": "caf\xe9 latin-1", "label": "pos"}', "malformed JSON"),
             (b'{"label": "pos"}', "missing text"),
             (b'{"text": null, "label": "neg"}', "missing text"),
             (b'{"text": 42, "label": "neg"}', "text has the wrong type"),
             (b'{"text": "   ", "label": "pos"}', "empty text"),
             (b'{"text": "a good film"}', "missing label"),
             (b'{"text": "a good film", "label": ""}', "missing label"),
             (b'{"text": "a good film", "label": 2.5}', "has the wrong type"),
             (b'{"text": "a good film", "label": true}', "has the wrong type"),
             (b'{"text": "a good film", "label": ["pos"]}', "has the wrong type")]
CSV_BAD = [(b"a,b,c", "malformed CSV"), (b",pos", "empty text"), (b"   ,neg", "empty text"),
           (b"the movie was fine,", "missing label"), (b"a fine film,meh", "never appears in train"),
           (b"bad \xff byte,pos", "not valid UTF-8")]


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    """train.jsonl (800 good, 700 bad, blank lines), validation.csv (150 good, 240 bad), test.parquet
    (150 good, 60 bad): returns paths, expected {origin: reason}, and the good rows per split in order."""
    tmp, rng = tmp_path_factory.mktemp("malformed"), random.Random(5)
    expected, good = {}, {"train": [], "validation": [], "test": []}

    def good_row(i):
        return {"text": sentence(rng, i % 2 == 0), "label": "pos" if i % 2 == 0 else "neg"}

    train = tmp / "train.jsonl"
    kinds = [None] * 800 + [JSONL_BAD[i % len(JSONL_BAD)] for i in range(700)]
    rng.shuffle(kinds)
    lines = []
    for i, kind in enumerate(kinds):
        if rng.random() < 0.05:
            lines.append(b"")                                   # blank: not a row, still a line
        if kind is None:
            row = good_row(i)
            good["train"].append(row)
            lines.append(json.dumps(row).encode())
        else:
            lines.append(kind[0])
            expected[f"{train}:{len(lines)}"] = kind[1]
    train.write_bytes(b"\n".join(lines) + b"\n")

    validation = tmp / "validation.csv"
    kinds = [None] * 150 + [CSV_BAD[i % len(CSV_BAD)] for i in range(240)]
    rng.shuffle(kinds)
    lines = [b"text,label"]
    for i, kind in enumerate(kinds):
        if kind is None:
            row = good_row(i)
            good["validation"].append(row)
            lines.append(f"{row['text']},{row['label']}".encode())
        else:
            lines.append(kind[0])
            expected[f"{validation}:{len(lines)}"] = kind[1]
    validation.write_bytes(b"\n".join(lines) + b"\n")

    test = tmp / "test.parquet"
    bad = [({"text": None, "label": "pos"}, "missing text"), ({"text": "a film", "label": None}, "missing label"),
           ({"text": "a film", "label": "meh"}, "never appears in train")]
    kinds = [None] * 150 + [bad[i % len(bad)] for i in range(60)]
    rng.shuffle(kinds)
    rows = []
    for i, kind in enumerate(kinds):
        if kind is None:
            rows.append(good_row(i))
            good["test"].append(rows[-1])
        else:
            rows.append(kind[0])
            expected[f"{test}#{i}"] = kind[1]
    pq.write_table(pa.Table.from_pylist(rows), test)
    return {"train": train, "validation": validation, "test": test}, expected, good


def test_every_malformed_row_reported_with_line_and_reason_and_counts_add_up(tiny_bert, malformed):
    paths, expected, good = malformed
    assert len(expected) == 1000
    report = doctor(tiny_bert, paths["train"], {"validation": str(paths["validation"]), "test": str(paths["test"])},
                    **QUICK)
    got = {r["origin"]: r["reason"] for r in report["rejects"]}
    assert set(got) == set(expected) and len(report["rejects"]) == 1000
    wrong = {o: (got[o], why) for o, why in expected.items() if why not in got[o]}
    assert not wrong, list(wrong.items())[:5]
    for f in report["files"]:
        split = f["split"]
        bad = sum(1 for o in expected if o.startswith(str(paths[split])))
        assert (f["rejected"], f["usable"]) == (bad, len(good[split]))
        assert f["read"] == f["usable"] + f["rejected"]
    malformed_json = sum(1 for o, why in expected.items() if why == "malformed JSON")
    assert sum(report["reject_kinds"].values()) == 1000 and report["reject_kinds"]["malformed JSON"] == malformed_json
    assert report["status"] == "blocking" and "data.bad_rows=skip" in report["blocking"][0]
    assert report["splits"] == {s: len(rows) for s, rows in good.items()}


def test_skip_trains_on_exactly_the_good_rows_and_error_stops_with_the_report(tiny_bert, malformed, tmp_path):
    paths, expected, good = malformed
    data = {"validation": str(paths["validation"]), "test": str(paths["test"])}
    with pytest.raises(datalib.DataError) as error:
        train(recipe(tiny_bert, paths["train"], data), run_dir=tmp_path / "stopped")
    message = str(error.value)
    assert "1,000 unusable row(s)" in message and "data.bad_rows=skip" in message
    first = min((o for o in expected if o.startswith(str(paths["train"]))), key=datalib.position)
    assert f"  {first}: " in message and "malformed CSV" in message and "never appears in train" in message
    assert not (tmp_path / "stopped").exists()                 # nothing trained, no run folder

    run = train(recipe(tiny_bert, paths["train"], {**data, "bad_rows": "skip"}, train={"max_steps": 2}),
                run_dir=tmp_path / "run")
    rejects = [json.loads(x) for x in (run.path / "rejects.jsonl").read_text().splitlines()]
    assert {r["origin"]: r["reason"] for r in rejects}.keys() == expected.keys()
    assert all(expected[r["origin"]] in r["reason"] for r in rejects)
    splits = json.loads((run.path / "data" / "splits.json").read_text())
    tables = {s: datalib.Table(rows=rows) for s, rows in good.items()}
    assert splits["fingerprint"] == fingerprint(tables)        # the good rows, every one, in file order
    assert splits["rows"] == {s: len(rows) for s, rows in good.items()} and splits["rejected"] == 1000
    assert all(f["read"] == f["usable"] + f["rejected"] for f in splits["files"])


def test_a_split_with_no_usable_rows_blocks_doctor_and_train(tiny_bert, tmp_path):
    path = write_reviews(tmp_path / "r.csv", n=60)
    (tmp_path / "val.csv").write_text("text,label\n,pos\nno label,\n")
    report = doctor(tiny_bert, path, {"validation": str(tmp_path / "val.csv"), "bad_rows": "skip"}, **QUICK)
    assert report["blocking"] == ["validation: no usable rows; train cannot evaluate on it"]
    with pytest.raises(datalib.DataError, match="no usable rows in validation"):
        train(recipe(tiny_bert, path, {"validation": str(tmp_path / "val.csv"), "bad_rows": "skip"}),
              run_dir=tmp_path / "run")


def test_csv_reader_keeps_going_past_bad_bytes_bom_and_unclosed_quotes(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes("\ufefftext,label\n".encode() + b"ok,pos\nbad \xff,neg\n\"open,neg\nnever,pos\nread,neg\n")
    t = datalib.read(str(p))
    assert t.rows == [{"text": "ok", "label": "pos"}]          # the BOM is not part of the header
    assert [(r.origin, r.reason.split(" (")[0]) for r in t.rejects] == [
        (f"{p}:3", "not valid UTF-8"), (f"{p}:4", "malformed CSV: 1 fields, header has 2")]
    assert "spans lines 4-6" in t.rejects[1].reason            # the rows it swallowed are named


# --- planted duplicates, conflicts and leakage ------------------------------------------------------

def words(rng, n):
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(n))


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def test_planted_duplicates_and_conflicts_found_exactly(tiny_bert, tmp_path):
    rng = random.Random(1)
    rows = [[words(rng, 10), "pos" if i % 2 else "neg"] for i in range(150)]
    a, b, c, d, e = (words(rng, 10) for _ in range(5))
    planted = [[a, "pos"], [a, "pos"], [a, "pos"], [b, "neg"], [b, "neg"],          # exact, same label
               [c, "pos"], [c.upper() + "!!", "pos"], ["  " + c.replace(" ", "  ") + " .", "pos"],  # normalised
               [d, "pos"], [d, "neg"],                                              # exact, conflicting
               [e, "neg"], [e.title() + "?", "pos"]]                                # normalised, conflicting
    at = sorted(rng.sample(range(150), len(planted)))
    for k, (i, row) in enumerate(zip(at, planted)):
        rows.insert(i + k, row)
    line = {id(r): n + 2 for n, r in enumerate(rows)}
    where = [f"{tmp_path / 'train.csv'}:{line[id(r)]}" for r in planted]
    write_csv(tmp_path / "train.csv", rows)
    write_csv(tmp_path / "val.csv", [[words(rng, 10), y] for y in ("pos", "neg") * 10])
    write_csv(tmp_path / "test.csv", [[words(rng, 10), y] for y in ("pos", "neg") * 10])
    report = doctor(tiny_bert, tmp_path / "train.csv",
                    {"validation": str(tmp_path / "val.csv"), "test": str(tmp_path / "test.csv")}, **QUICK)
    train = report["duplicates"]["by_split"]["train"]
    groups = lambda gs: {frozenset(g["origins"]) for g in gs}                     # noqa: E731
    assert groups(train["exact"]) == {frozenset(where[0:3]), frozenset(where[3:5]), frozenset(where[8:10])}
    assert groups(train["normalised"]) == {frozenset(where[5:8]), frozenset(where[10:12])}
    assert groups(report["duplicates"]["conflicting"]) == {frozenset(where[8:10]), frozenset(where[10:12])}
    assert (train["exact_extra"], train["normalised_extra"]) == (4, 3)
    assert report["duplicates"]["by_split"]["test"]["exact_extra"] == 0 and not report["leakage"]["pairs"]
    assert report["status"] == "warnings" and any("different labels" in w for w in report["warnings"])


def test_planted_leakage_found_by_pair_and_nothing_else(tiny_bert, tmp_path):
    rng = random.Random(2)
    train = [[words(rng, 20), "pos" if i % 2 else "neg"] for i in range(200)]
    val = [[words(rng, 20), "pos" if i % 2 else "neg"] for i in range(60)]
    test = [[words(rng, 20), "pos" if i % 2 else "neg"] for i in range(100)]
    t, v, s = (str(tmp_path / n) for n in ("train.csv", "val.csv", "test.csv"))

    def plant(rows, path, split, source, source_path, source_split, kind, original, change):
        """Insert a changed copy of `original` (a row of `source`) at a random place in `rows`; the
        expected pair is computed once every row has its final line."""
        row = [change(original[0]), original[1]]
        rows.insert(rng.randrange(len(rows) + 1), row)
        return lambda: (kind, source_split, f"{source_path}:{index_of(source, original) + 2}", split,
                        f"{path}:{index_of(rows, row) + 2}")

    def index_of(rows, row):
        return next(i for i, r in enumerate(rows) if r is row)

    def swap_word(text):
        ws = text.split()
        ws[7] = "zzzz"
        return " ".join(ws)

    normalised = lambda x: "  " + x.upper().replace(" ", " , ") + "!"              # noqa: E731
    val_own = val[:]                                             # rows of validation not copied from train
    later = [plant(val, v, "validation", train, t, "train", "exact", train[i], str) for i in (3, 50, 120)]
    later += [plant(val, v, "validation", train, t, "train", "normalised", train[i], normalised) for i in (7, 99)]
    later += [plant(test, s, "test", train, t, "train", "exact", train[i], str) for i in (11, 12, 150, 199)]
    later += [plant(test, s, "test", train, t, "train", "normalised", train[i], normalised) for i in (20, 21, 22)]
    later += [plant(test, s, "test", train, t, "train", "near", train[i], swap_word) for i in (30, 60, 90)]
    later += [plant(test, s, "test", val, v, "validation", "exact", val_own[i], str) for i in (0, 40)]
    write_csv(t, train), write_csv(v, val), write_csv(s, test)
    expected = {f() for f in later}
    report = doctor(tiny_bert, t, {"validation": v, "test": s}, **QUICK)
    assert pairs(report) == expected
    near = [p for p in report["leakage"]["pairs"] if p["kind"] == "near"]
    assert all(0.8 <= p["similarity"] < 1 for p in near) and len(near) == 3
    summary = {tuple(x["splits"]): (x["exact"], x["normalised"], x["near"]) for x in report["leakage"]["by_splits"]}
    assert summary == {("train", "validation"): (3, 2, 0), ("train", "test"): (4, 3, 3),
                       ("validation", "test"): (2, 0, 0)}

    by_embedding = doctor(tiny_bert, t, {"validation": v, "test": s}, near_method="embedding", **QUICK)
    assert by_embedding["leakage"]["near_method"] == "embedding"
    assert {p for p in pairs(by_embedding) if p[0] != "near"} == {p for p in expected if p[0] != "near"}


# --- label noise -----------------------------------------------------------------------------------

def test_flipped_labels_ranked_among_the_top_candidates(tiny_bert, tmp_path):
    path = write_reviews(tmp_path / "r.csv", n=600, seed=3)
    with open(path) as f:
        rows = list(csv.reader(f))
    rng = random.Random(4)
    flipped = rng.sample(range(1, len(rows)), 30)                # 5% of 600
    for i in flipped:
        rows[i][1] = "neg" if rows[i][1] == "pos" else "pos"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    report = doctor(tiny_bert, path)
    noise = report["label_noise"]
    assert noise["available"] and noise["checked"] == 600 and noise["oof_accuracy"] > 0.85
    top = [c["origin"] for c in noise["candidates"][:len(flipped)]]
    hits = len(set(top) & {f"{path}:{i + 1}" for i in flipped})
    assert hits >= 0.6 * len(flipped), (hits, noise["candidates"][:5])


# --- balance, lengths, hooks a task lacks, the command ---------------------------------------------

def test_skewed_classes_and_mismatched_test_file_get_suggestions(tiny_bert, tmp_path):
    rng = random.Random(6)
    train = write_csv(tmp_path / "train.csv",
                      [[sentence(rng, i < 180), "pos" if i < 180 else "neg"] for i in range(200)])
    test = write_csv(tmp_path / "test.csv", [[sentence(rng, i < 20), "pos" if i < 20 else "neg"] for i in range(40)])
    report = doctor(tiny_bert, train, {"test": str(test), "validation_size": 50}, **QUICK)
    b = report["balance"]
    assert b["counts"]["test"] == {"pos": 20, "neg": 20} and b["counts"]["validation"] == {"pos": 45, "neg": 5}
    assert b["train_ratio"] == pytest.approx(135 / 15)
    assert any("class_weights: balanced" in x for x in b["suggestions"])
    assert any("leave data.test unset" in x for x in b["suggestions"])
    assert not any("data.validation" in x for x in b["suggestions"])          # split off, stratified
    lengths = report["lengths"]["by_split"]["train"]
    assert lengths["cut"] == 0 and lengths["examples"] == 150 and 3 <= lengths["p50"] <= 9


class ChatLike(TextClassification):
    """Stands in for a task whose length_stats reports masking (chat): 'dull' rows are all masked."""

    def length_stats(self, rows, features):
        stats = super().length_stats(rows, features)
        masked = [i for i, r in enumerate(rows) if "dull" in r["text"]]
        stats["trained"] = [0 if i in masked else 1 for i in range(len(rows))]
        return stats | {"all_masked": masked, "missing_end": masked[:1]}


class Bare(TextClassification):
    """A task with none of the doctor's optional hooks."""

    def key(self, row):
        raise NotImplementedError

    def stratify_key(self, row):
        return None

    def length_stats(self, rows, features):
        return {}

    def embed(self, model, features, batch_size):
        raise NotImplementedError


def test_hooks_decide_what_is_checked(tiny_bert, tmp_path, monkeypatch):
    path = write_reviews(tmp_path / "r.csv", n=120)
    monkeypatch.setattr("tunesmith.tasks.get_task", lambda recipe: ChatLike(recipe))
    report = doctor(tiny_bert, path, **QUICK)
    masked = report["lengths"]["by_split"]["train"]["all_masked"]
    assert masked and report["status"] == "blocking" and any("every label masked" in x for x in report["blocking"])
    assert all(datalib.position(o) > 1 for o in masked)
    assert 0 < report["lengths"]["by_split"]["train"]["trained_share"] < 1

    monkeypatch.setattr("tunesmith.tasks.get_task", lambda recipe: Bare(recipe))
    report = doctor(tiny_bert, path, label_noise=True)
    for section in ("duplicates", "balance", "lengths", "label_noise", "leakage"):
        assert not report[section]["available"] and "not available for this task" in report[section]["note"]
    assert report["status"] == "clean"


def test_command_exit_status_and_doctor_json(tiny_bert, tmp_path, capsys):
    path = write_reviews(tmp_path / "r.csv", n=120)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict(tiny_bert, path)))
    out = tmp_path / "out" / "doctor.json"
    assert main(["doctor", str(recipe_file), "doctor.label_noise=false", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"version", "status", "blocking", "warnings", "files", "splits", "rejects", "duplicates", "leakage",
            "balance", "lengths", "label_noise", "seconds"} <= set(report)
    printed = capsys.readouterr().out
    assert "Leakage across splits" in printed and "Verdict: " in printed and str(out) in printed

    with open(path, "a") as f:
        f.write("no label here,\n")
    assert main(["doctor", str(recipe_file), "doctor.label_noise=false", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["rejects"] == [{"origin": f"{path}:122", "split": "train",
                                                        "reason": "missing label (column 'label')"}]
    assert "BLOCKING" in capsys.readouterr().out
    assert main(["doctor", str(recipe_file), "doctor.folds=1"]) == 2                 # recipe errors stay 2


# --- the real bundled data ----------------------------------------------------------------------------

@pytest.mark.slow
def test_rotten_tomatoes_duplicates_all_reported(tmp_path):
    """The bundled Rotten Tomatoes snippets repeat some reviews: every row whose text occurs more than once
    in the file is in a within-split duplicate group or an exact leakage pair (label noise off: minutes)."""
    from collections import defaultdict
    from pathlib import Path

    from conftest import tunesmith

    recipe_file = Path(datalib.__file__).parent / "recipes" / "rotten_tomatoes.yaml"
    out = tunesmith("doctor", recipe_file, "doctor.label_noise=false", "--out", tmp_path / "doctor.json")
    assert out.returncode == 0, out.stderr
    assert "Verdict: warnings" in out.stdout and "Leakage across splits" in out.stdout
    report = json.loads((tmp_path / "doctor.json").read_text())
    table = datalib.read("rotten_tomatoes")
    by_text = defaultdict(list)
    for row, origin in zip(table.rows, table.origins):
        by_text[row["text"]].append(origin)
    repeated = {o for origins in by_text.values() if len(origins) > 1 for o in origins}
    found = {o for split in report["duplicates"]["by_split"].values() for g in split["exact"] for o in g["origins"]}
    found |= {p[k] for p in report["leakage"]["pairs"] if p["kind"] == "exact" for k in ("origin_a", "origin_b")}
    assert repeated and found == repeated
    assert report["files"][0]["read"] == len(table.rows) == sum(report["splits"].values())
    assert report["lengths"]["by_split"]["train"]["p99"] <= report["recipe"]["max_length"]
