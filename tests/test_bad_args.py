"""Every command, every user mistake (issue 20, "Done when"): a table of bad arguments for each command of the
CLI's command table. Each row must end with exit 1 or 2, a short error on stderr (one line; argparse's usage and
error line; a recipe error's heading and its "  - " lines), no traceback, and nothing left behind: no new file in
the working folder, no change to the run it names. A command added to tunesmith/cli.py without a row here fails
test_every_command_has_rows.

Rows run in-process (tunesmith.cli.main); a few run as a real process. Placeholders: {run} a finished text
classification run (tests/deploy_fixtures.py), {recipe} a valid recipe on the tiny BERT, {nomodel} one whose model
does not exist, {bad} one with a recipe error, {notarun} an empty folder, {file} a plain text file."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict, write_reviews
from deploy_fixtures import text_run  # noqa: F401  (fixture)

from tunesmith.cli import COMMANDS, main

ROWS = [
    # train
    ("train", ["{missing}.yaml"]),
    ("train", ["{bad}"]),
    ("train", []),
    ("train", ["{nomodel}"]),
    ("train", ["--resume", "{notarun}"]),
    ("train", ["--resume", "{missing}"]),
    ("train", ["{recipe}", "--resume", "{run}"]),
    ("train", ["{recipe}", "train.epochs=-1"]),
    ("train", ["{recipe}", "train.learning_rate=0"]),
    ("train", ["{recipe}", "train.batch_size=0"]),
    ("train", ["{recipe}", "no.such.key=1"]),
    ("train", ["{recipe}", "train.epochs"]),
    ("train", ["{recipe}", "--bogus"]),
    ("train", ["{recipe}", "--run-dir", "{file}"]),
    ("train", ["{file}"]),
    # eval, predict
    ("eval", ["{missing}"]),
    ("eval", ["{notarun}"]),
    ("eval", ["{run}", "--data", "{missing}.csv"]),
    ("eval", ["{run}", "--device", "tpu"]),
    ("predict", ["{notarun}", "a text"]),
    ("predict", ["{run}"]),
    ("predict", ["{run}", "--input", "{missing}.txt"]),
    ("predict", ["{file}", "a text"]),
    ("predict", ["{run}", "a text", "--stream"]),     # a classifier writes no text
    ("predict", ["{run}", "a text", "--out", "drawn.png"]),
    # demo: every row must fail before MiniLM loads
    ("demo", ["train.epochs=-1"]),
    ("demo", ["no_such_key=1"]),
    ("demo", ["--bogus"]),
    # doctor
    ("doctor", ["{missing}.yaml"]),
    ("doctor", ["{bad}"]),
    ("doctor", ["{recipe}", "doctor.listed=-1"]),
    # compare
    ("compare", []),
    ("compare", ["{notarun}"]),
    ("compare", ["{run}", "{missing}"]),
    # chat
    ("chat", ["{notarun}"]),
    ("chat", ["{run}"]),                             # a classifier does not chat
    ("chat", ["{run}", "--max-new-tokens", "-5"]),
    # search
    ("search", ["{missing}.yaml"]),
    ("search", ["{bad}"]),
    ("search", ["{recipe}", "--trials", "0"]),
    ("search", ["{recipe}", "--trials", "-1"]),
    ("search", ["{recipe}", "--trials", "two"]),
    ("search", ["{recipe}", "--budget", "0s"]),
    ("search", ["{recipe}", "--budget", "-5m"]),
    ("search", ["{recipe}", "--storage", "notaurl"]),
    ("search", ["{recipe}", "--dir", "{file}"]),
    # cv
    ("cv", ["{missing}.yaml"]),
    ("cv", ["{bad}"]),
    ("cv", ["{recipe}", "--folds", "1"]),
    ("cv", ["{recipe}", "--folds", "0"]),
    ("cv", ["{recipe}", "--folds", "-3"]),
    ("cv", ["{recipe}", "--repeats", "0"]),
    ("cv", ["{nomodel}", "--folds", "2"]),
    ("cv", ["{recipe}", "--dir", "{file}"]),
    # tune
    ("tune", ["{recipe}"]),
    ("tune", ["{recipe}", "--budget", "0"]),
    ("tune", ["{recipe}", "--budget", "1s"]),
    ("tune", ["{recipe}", "--budget", "soon"]),
    ("tune", ["{bad}", "--budget", "1m"]),
    ("tune", ["{nomodel}", "--budget", "1m"]),
    ("tune", ["{recipe}", "--budget", "1m", "--dir", "{file}"]),
    # federate: every row must fail before a run folder exists
    ("federate", ["{missing}.yaml"]),
    ("federate", ["{bad}"]),
    ("federate", ["{nomodel}"]),
    ("federate", ["{recipe}", "--clients", "0"]),
    ("federate", ["{recipe}", "--rounds", "0"]),
    ("federate", ["{recipe}", "--fraction", "0"]),
    ("federate", ["{recipe}", "--fraction", "1.5"]),
    ("federate", ["{recipe}", "--mu", "-1"]),
    ("federate", ["{recipe}", "--strategy", "fedsgd"]),
    ("federate", ["{recipe}", "--partition", "dirichlet:0"]),
    ("federate", ["{recipe}", "--partition", "shards"]),
    ("federate", ["{recipe}", "--partition", "by:nosuch"]),
    ("federate", ["{recipe}", "--min-clients", "3"]),
    ("federate", ["{recipe}", "--client", "127.0.0.1:1"]),                 # no --shard
    ("federate", ["{recipe}", "--server", "127.0.0.1:1", "--client", "127.0.0.1:1", "--shard", "reviews.csv"]),
    ("federate", ["{recipe}", "--run-dir", "{file}"]),
    # report
    ("report", ["{notarun}"]),
    ("report", ["{missing}"]),
    ("report", ["{run}", "--out", "{folder}"]),
    # explain
    ("explain", ["{notarun}", "a text"]),
    ("explain", ["{run}", "--mistakes", "-1"]),
    ("explain", ["{run}", "a text", "--out", "{folder}"]),
    # export
    ("export", ["{notarun}"]),
    ("export", ["{missing}"]),
    ("export", ["{run}", "--format", "tflite"]),
    ("export", ["{run}", "--quantize", "int4"]),
    ("export", ["{run}", "--max-drop", "nan"]),
    ("export", ["{run}", "--max-drop", "-1"]),
    ("export", ["{run}", "--out", "{file}"]),
    # distill: every row must fail before a student trains
    ("distill", ["{notarun}"]),
    ("distill", ["{run}", "--temperature", "0"]),
    ("distill", ["{run}", "--alpha", "2"]),
    ("distill", ["{run}", "--student", "layers=0"]),
    ("distill", ["{run}", "--student", "layers=x"]),
    ("distill", ["{run}", "--student", "{missing}"]),
    ("distill", ["{run}", "train.epochs=-1"]),
    # serve: every row must fail before the server starts (uvicorn.run is replaced by a failure)
    ("serve", ["{notarun}"]),
    ("serve", ["{run}", "--port", "-1"]),
    ("serve", ["{run}", "--port", "70000"]),
    ("serve", ["{run}", "--max-batch", "0"]),
    ("serve", ["{run}", "--max-queue", "-1"]),
    ("serve", ["{run}", "--timeout", "0"]),
    ("serve", ["{run}", "--timeout", "nan"]),
    ("serve", ["{run}", "--max-body", "0"]),
    ("serve", ["{run}", "--max-pixels", "0"]),
    ("serve", ["{run}", "--onnx"]),                  # no checked export in the run
    # init: nothing written
    ("init", ["{missing}.csv"]),
    ("init", ["{notarun}"]),                         # an empty folder: no data
    ("init", ["{file}"]),                            # plain text, not a table or tagged file
    ("init", ["reviews.csv", "--task", "no-such-task"]),
    ("init", ["reviews.csv", "--text-column", "nosuch"]),
    ("init", ["reviews.csv", "--out", "{file}"]),    # exists: kept without --force
    ("init", ["reviews.csv", "--bogus"]),
]

SUBPROCESS_ROWS = [                                  # the real process: exit code and stderr as a shell sees them
    ["nosuchcommand"],
    ["train", "{missing}.yaml"],
    ["export", "{run}", "--max-drop", "nan"],
]


def test_every_command_has_rows():
    assert set(COMMANDS) <= {command for command, _ in ROWS}, set(COMMANDS) - {command for command, _ in ROWS}


@pytest.fixture
def place(tmp_path, tiny_bert, text_run, monkeypatch) -> dict:
    """A working folder with the files the rows name; the current folder while the row runs."""
    work = tmp_path / "work"
    work.mkdir()
    data = write_reviews(work / "reviews.csv", n=40)
    files = {"recipe": recipe_dict(tiny_bert, data), "nomodel": recipe_dict(work / "no-model", data),
             "bad": {**recipe_dict(tiny_bert, data), "train": {"epochs": "many", "lerning_rate": 1}}}
    for name, recipe in files.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    (work / "notarun").mkdir()
    (work / "folder").mkdir()
    (work / "notes.txt").write_text("not a recipe, not a run\n")
    monkeypatch.chdir(work)
    return {"work": work, "run": str(text_run), "recipe": "recipe.yaml", "nomodel": "nomodel.yaml", "bad": "bad.yaml",
            "notarun": "notarun", "file": "notes.txt", "folder": "folder", "missing": "missing"}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if "__pycache__" not in p.parts)


USAGE = re.compile(r"^tunesmith( [a-z]+)?: error: ")


def check_stderr(err: str) -> None:
    """One line; or argparse's usage (however many lines it wraps to) and its one error line; or a recipe error's
    heading and its "  - " lines. Never a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    if len(lines) == 1:
        return
    if lines[0].startswith("usage: "):
        assert USAGE.match(lines[-1]) and all(line.startswith(" ") for line in lines[1:-1]), err
        return
    assert re.search(r"\d+ error\(s\) in recipe$", lines[0]) and all(line.startswith("  - ") for line in lines[1:]), \
        err


def fill(args: list[str], place: dict) -> list[str]:
    return [a.format(**place) for a in args]


@pytest.mark.parametrize("command, args", ROWS, ids=[" ".join([c, *a]) for c, a in ROWS])
def test_bad_arguments_are_a_short_error_and_leave_nothing(place, capsys, monkeypatch, command, args):
    import uvicorn

    def no_server(*a, **kw):
        raise AssertionError("the server started: this row's arguments were accepted")

    monkeypatch.setattr(uvicorn, "run", no_server)
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))   # chat reads nothing: it would stop at end of input
    work, run = place["work"], Path(place["run"])
    before, run_before = listing(work), listing(run)
    try:
        code = main([command, *fill(args, place)])
    except SystemExit as e:                         # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2), (code, err)
    check_stderr(err)
    assert listing(work) == before, "left behind: " + ", ".join(sorted(set(listing(work)) - set(before)))
    assert listing(run) == run_before


@pytest.mark.parametrize("args", SUBPROCESS_ROWS, ids=" ".join)
def test_bad_arguments_in_a_real_process(place, args):
    work = place["work"]
    before = listing(work)
    r = subprocess.run([sys.executable, "-m", "tunesmith", *fill(args, place)], capture_output=True, text=True,
                       timeout=120, cwd=work)
    assert r.returncode in (1, 2), r.stderr
    check_stderr(r.stderr)
    assert listing(work) == before
