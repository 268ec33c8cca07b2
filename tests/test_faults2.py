"""Issue 20, part 2 (export, cv, tune, recipe, data): each user mistake is one line on stderr, exit 1 or 2, no
traceback, nothing half-written."""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict, write_reviews
from deploy_fixtures import text_run  # noqa: F401  (fixture)

import tunesmith as ts
from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.recipe import UsageError


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def recipe_file(tmp_path: Path, data: Path | None = None, **sections) -> Path:
    """A recipe on a model folder that is never loaded: every check below comes before any model."""
    data = data or write_reviews(tmp_path / "r.csv", n=40)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path / "no-model", data, **sections)))
    return path


# --- 6: export --max-drop -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "-0.5", "inf", "-inf"])
def test_export_max_drop_must_be_a_finite_non_negative_number(tmp_path, capsys, value):
    assert main(["export", str(tmp_path / "run"), "--max-drop", value]) == 2
    assert "--max-drop" in one_line(capsys)
    with pytest.raises(TunesmithError, match="max_drop"):      # the API refuses it too, before reading the run
        ts.export(tmp_path / "run", max_drop=float(value))


# --- 5: export on a full disk, to a folder that cannot be written -----------------------------------------

def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["fp32", "int8"])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(text_run, tmp_path, capsys, monkeypatch, where):
    """The disk fills while model.onnx is written (OSError ENOSPC, half a file), or while onnxruntime quantizes
    (its shape-inferred copy is cut short and read back: protobuf's "Wire format was corrupt", the issue's
    traceback). One line, exit 1; a folder that did not exist is gone again; an earlier export is left as it was."""
    import onnxruntime.quantization
    import torch
    from google.protobuf.message import DecodeError

    real_export = torch.onnx.export

    def export_then_fill(model, args, path, **kw):
        real_export(model, args, path, **kw)
        with open(path, "r+b") as f:
            f.truncate(Path(path).stat().st_size // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    def quantize_then_fill(model_input, model_output, **kw):
        Path(model_output).with_name("model-inferred.onnx").write_bytes(b"\x08\x07" * 100)
        full = shutil.disk_usage(tmp_path)._replace(free=0)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: full)       # the disk is full now
        raise DecodeError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")

    if where == "fp32":
        monkeypatch.setattr(torch.onnx, "export", export_then_fill)
    else:
        monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", quantize_then_fill)
    new = tmp_path / "new" / "export"
    assert main(["export", str(text_run), "--out", str(new), "--quantize", "int8"]) == 1
    err = one_line(capsys)
    assert err.startswith(f"error: no space left on device writing {new}") and "choose --out" in err
    assert not (tmp_path / "new").exists()                      # made by the export: removed with nothing in it
    if where == "int8":
        return
    monkeypatch.undo()
    earlier = tmp_path / "earlier"
    ts.export(text_run, out=earlier, repeats=1)
    before = listing(earlier)
    monkeypatch.setattr(torch.onnx, "export", export_then_fill)
    assert main(["export", str(text_run), "--out", str(earlier), "--quantize", "int8"]) == 1
    assert "no space left on device" in one_line(capsys)
    assert listing(earlier) == before and "model.onnx" in before   # the checked earlier export, untouched


@pytest.mark.parametrize("how", ["read-only folder", "permission"])
def test_export_to_a_folder_that_cannot_be_written_is_one_line(text_run, tmp_path, capsys, monkeypatch, how):
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    if how == "permission":                                     # a real mode: root ignores it
        if os.geteuid() == 0:
            pytest.skip("root writes into a folder of mode 0o500")
        locked.chmod(0o500)
    else:                                                       # a read-only file system, as the kernel says it
        def read_only(*a, **kw):
            raise OSError(errno.EROFS, "Read-only file system", str(kw.get("dir")))

        monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    try:
        assert main(["export", str(text_run), "--out", str(locked / "export")]) == 1
        err = one_line(capsys)
        assert err.startswith("error: cannot write") and "choose another --out" in err
        assert not (locked / "export").exists()
        assert main(["export", str(text_run), "--out", str(locked), "--format", "hf"]) == 1
        assert "choose another --out" in one_line(capsys) and not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


# --- 8: search --storage ----------------------------------------------------------------------------------

@pytest.mark.parametrize("storage, code, says", [
    ("notaurl", 2, "not a database URL"),
    ("postgresql://u@[::1:5432/db", 2, "not a database URL"),
    ("postgresql://u:secret@127.0.0.1:1/db", 1, "cannot open it"),           # nothing listens on port 1
    ("sqlite:///{tmp}/missing/folder/study.db", 1, "does not exist; create it"),
])
def test_search_storage_that_cannot_be_opened_is_one_line(tmp_path, capsys, storage, code, says):
    if storage.startswith("postgresql://u:"):
        pytest.importorskip("psycopg")
    storage = storage.format(tmp=tmp_path)
    start = time.monotonic()
    assert main(["search", str(recipe_file(tmp_path)), "--storage", storage, "--dir", str(tmp_path / "st")]) == code
    err = one_line(capsys)
    assert says in err and "--storage" in err and "secret" not in err and time.monotonic() - start < 15
    assert not (tmp_path / "st").exists()                      # no empty study folder left behind


def test_search_whose_trials_all_fail_says_why_in_one_line(tmp_path, capsys):
    """A model that cannot load: each trial says so in one line (optuna logged a traceback per trial); after
    three, one error line names the reason, and the study folder this call made (only failures in it) goes."""
    path = recipe_file(tmp_path)
    assert main(["search", str(path), "--dir", str(tmp_path / "st"), "--trials", "1"]) == 1
    out, err = capsys.readouterr()
    assert "trial 0 failed: model" in out and "Traceback" not in err + out
    assert err.strip().count("\n") == 0 and "3 trials in a row failed (the last: model" in err
    assert not (tmp_path / "st").exists()


def test_search_budget_from_the_api_is_a_one_line_usage_error(tmp_path):
    from tunesmith.recipe import UsageError

    for budget in ("0s", "soon"):
        with pytest.raises(UsageError, match="budget") as e:
            ts.search(recipe_file(tmp_path), tmp_path / "st", budget=budget)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "st").exists()


# --- 9: cv --folds, tune --budget ------------------------------------------------------------------------

def test_cv_folds_above_the_smallest_class_is_one_line(tmp_path, tiny_bert, capsys):
    data = tmp_path / "skewed.csv"
    data.write_text("text,label\n" + "".join(f"good film {i},pos\n" for i in range(20))
                    + "".join(f"bad film {i},neg\n" for i in range(3)))
    path = tmp_path / "r.yaml"
    recipe = recipe_dict(tiny_bert, data)
    recipe["data"].update(validation_size=2, test_size=2)
    path.write_text(yaml.safe_dump(recipe))
    assert main(["cv", str(path), "--folds", "5", "--dir", str(tmp_path / "cv")]) == 1
    err = one_line(capsys)
    assert "--folds 5" in err and "smallest class" in err and "3 row(s)" in err
    assert not (tmp_path / "cv").exists()                       # nothing written before the refusal


@pytest.mark.parametrize("budget", ["0", "0s", "-5m", "1s", "15x"])
def test_tune_budget_that_cannot_run_is_refused_before_any_work(tmp_path, capsys, budget):
    path = recipe_file(tmp_path)
    start = time.monotonic()
    code = main(["tune", str(path), "--budget", budget, "--dir", str(tmp_path / "tune")])
    assert code == 2 and time.monotonic() - start < 5          # a usage error, as the command line's own checks
    err = one_line(capsys)
    assert "budget" in err
    if budget == "1s":
        assert "at least 5s" in err                             # says the minimum
    assert not (tmp_path / "tune").exists()                     # no probe run left behind
    with pytest.raises(UsageError, match="budget") as e:       # the API: the same one-line error
        ts.tune(path, tmp_path / "tune", budget=budget)
    assert "\n" not in str(e.value)


def test_tune_whose_probe_spends_the_budget_leaves_no_probe_run(tmp_path, tiny_bert, capsys, monkeypatch):
    import tunesmith.selection.tune as tune_mod

    monkeypatch.setattr(tune_mod, "MIN_BUDGET_S", 0.1)          # a budget the probe run (seconds) cannot fit in
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=40))))
    assert main(["tune", str(path), "--budget", "0.2s", "--dir", str(tmp_path / "tune")]) == 1
    err = capsys.readouterr().err
    assert "left no time for the plain recipe; give at least --budget" in err and "Traceback" not in err
    assert not (tmp_path / "tune").exists()                     # the probe run was not a finished tune: gone


# --- 10: overlong names, a FIFO as data ----------------------------------------------------------------

def test_overlong_name_is_a_recipe_error(tmp_path, capsys):
    path = recipe_file(tmp_path, name="x" * 5_000_000)          # 5 MB: the 50 MB, quicker
    assert main(["doctor", str(path), "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err
    assert "name" in err and "at most 100" in err and "Traceback" not in err and len(err) < 1000
    assert not (tmp_path / "d.json").exists()
    ts.load_recipe(recipe_dict(tmp_path / "no-model", tmp_path / "r.csv", name="x" * 100))    # 100 is fine


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ""])
def test_fifo_as_data_is_not_a_regular_file_and_never_blocks(tmp_path, capsys, suffix):
    from tunesmith.data import read

    fifo = tmp_path / f"pipe{suffix}"
    os.mkfifo(fifo)                                             # no writer: opening it would block forever
    with pytest.raises(TunesmithError, match="not a regular file"):
        read(str(fifo))
    path = recipe_file(tmp_path, data=fifo)
    start = time.monotonic()
    assert main(["doctor", str(path), "--out", str(tmp_path / "d.json")]) == 1
    assert "not a regular file" in one_line(capsys) and time.monotonic() - start < 30


# --- 4: a YAML alias nest in a real key -------------------------------------------------------------------

def bomb(levels: int = 9, width: int = 9, anchor: str = "n") -> str:
    """A "billion laughs" nest written inline: width**levels strings once expanded, a few KB as YAML."""
    text = f"&{anchor}0 [" + ", ".join(["lol"] * width) + "]"
    for k in range(1, levels):
        text = f"&{anchor}{k} [{text}" + f", *{anchor}{k - 1}" * (width - 1) + "]"
    return text


@pytest.mark.parametrize("command", ["doctor", "train"])
def test_recipe_errors_quote_at_most_200_characters_of_an_alias_nest(tmp_path, capsys, command):
    path = recipe_file(tmp_path)
    text = path.read_text() + f"doctor: {{listed: {bomb()}}}\nname: {bomb(4, anchor='m')}\n"   # 9**9 and 9**4 strings
    path.write_text(text)
    start = time.monotonic()
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 5 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert any(line.startswith("  - doctor.listed:") for line in lines) and any("name" in line for line in lines)
    assert max(len(line) for line in lines) < 400                  # the value quoted in at most ~200 characters
