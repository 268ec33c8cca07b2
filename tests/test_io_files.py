"""Files written through tunesmith.io by the run folder, checkpoints and caches: strict JSON (no NaN), one
warning per file, and folders that are complete or absent."""
from __future__ import annotations

import json

import torch

import tunesmith as ts
from tunesmith import checkpoint, io


def strict(text: str):
    """json.loads that refuses NaN/Infinity, as every other JSON reader does."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_data_rows_with_nan_are_valid_jsonl_and_named_once(tmp_path, capsys):
    run = ts.Run(tmp_path)
    run.write_rows("data/test.jsonl", [{"text": "a", "score": float("nan")}, {"text": "b", "score": 1.0},
                                       {"text": "c", "score": float("inf")}])
    lines = (tmp_path / "data" / "test.jsonl").read_text().splitlines()
    assert [strict(x) for x in lines] == [{"text": "a", "score": None}, {"text": "b", "score": 1.0},
                                         {"text": "c", "score": None}]
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "test.jsonl: [0].score, [2].score not a finite number" in out
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["test.jsonl"]        # no temporary file left


def test_checkpoint_state_and_marker_are_strict_json(tmp_path):
    folder = checkpoint.save(tmp_path / "step-00000001", {"w": torch.zeros(2)}, None, None,
                             {"step": 1, "best": float("nan")})
    assert strict((folder / "state.json").read_text())["best"] is None
    assert strict((folder / checkpoint.MARKER).read_text())["step"] == 1
    assert checkpoint.damage(folder) is None
    assert sorted(p.name for p in folder.iterdir()) == [checkpoint.MARKER, "model.safetensors", "rng.safetensors",
                                                        "state.json"]


def test_truncate_log_keeps_lines_byte_for_byte_and_drops_a_torn_one(tmp_path, capsys):
    run = ts.Run(tmp_path)
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.30000000000000004}\n{"step": 2}\n{"step": 3, "lo')
    run.truncate_log(2)
    assert log.read_text() == '{"step": 1, "loss": 0.30000000000000004}\n{"step": 2}\n'
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_atomic_folder_keep_existing_keeps_a_finished_copy(tmp_path):
    done = tmp_path / "cache"
    done.mkdir()
    (done / "config.json").write_text("theirs")
    with io.atomic_folder(done, keep_existing=True) as tmp:       # another process finished first
        (tmp / "config.json").write_text("ours")
    assert (done / "config.json").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["cache"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with io.atomic_folder(empty, keep_existing=True) as tmp:      # an empty folder holds nothing to keep
        (tmp / "config.json").write_text("ours")
    assert (empty / "config.json").read_text() == "ours"
    with io.atomic_folder(done) as tmp:                            # the default replaces
        (tmp / "config.json").write_text("new")
    assert (done / "config.json").read_text() == "new"
