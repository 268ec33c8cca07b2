"""The CLI as a thin, quiet layer: --version and help texts, the API it calls (ts.compare, Predictor.predict_file,
default folders), weights reported in one line instead of transformers' load report, and tables that read the
same in a pipe."""
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict, tunesmith, write_reviews

import tunesmith as ts
from tunesmith.cli import COMMANDS, main
from tunesmith.cli_args import ABOUT, parser

PKG = Path(ts.__file__).parent


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):
    """Two short runs on the same data: one pretrained, one from scratch."""
    tmp = tmp_path_factory.mktemp("cli")
    data = write_reviews(tmp / "r.csv", n=120)
    given = recipe_dict(tiny_bert, data, train={"max_steps": 3})
    a = ts.train(ts.load_recipe(given), run_dir=tmp / "a")
    b = ts.train(ts.load_recipe(given, ["model.pretrained=false"]), run_dir=tmp / "b")
    return a, b


def test_version_and_every_command_says_what_it_does():
    out = tunesmith("--version")
    assert out.returncode == 0 and out.stdout.startswith(f"tunesmith {ts.__version__} (torch ")
    assert "transformers " in out.stdout
    top = tunesmith("--help").stdout
    p = parser()
    assert set(p.commands) == set(COMMANDS) == set(ABOUT)
    for name, sub in p.commands.items():
        summary = ABOUT[name][0]
        assert f"{name:<10}{summary}" in top                        # listed with its one-line summary
        assert sub.description.startswith(summary[0].upper() + summary[1:]), name
        assert sub.format_help().split("\n\n")[1].startswith(summary[0].upper()), name   # after usage


def test_api_names_are_functions_and_never_a_subpackage_or_module_name():
    """Importing tunesmith.X sets ts.X to the module: an API name equal to a module's would be shadowed."""
    for name in ts.__all__:
        assert not (PKG / name).is_dir() and not (PKG / f"{name}.py").exists(), name
    for name, module in (("doctor", "tunesmith.diagnosis.diagnose"), ("cross_validate", "tunesmith.selection.cv"),
                         ("search", "tunesmith.selection.search"), ("tune", "tunesmith.selection.tune"),
                         ("compare", "tunesmith.selection.compare")):
        fn = getattr(ts, name)
        assert callable(fn) and fn.__module__ == module and getattr(ts, name) is fn


def drop_weights(src: Path, dest: Path, drop) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(dest / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not drop(k)}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_a_missing_body_weight_is_one_line_and_a_new_head_is_silent(tiny_bert, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.tasks.hf import load_hf

    headless = drop_weights(tiny_bert, tmp_path / "headless", lambda k: k.startswith("classifier."))
    holed = drop_weights(tiny_bert, tmp_path / "holed", lambda k: k.startswith("classifier.")
                         or k.startswith("bert.encoder.layer.0.attention.self.query."))
    data = tmp_path / "r.csv"
    load_hf(AutoModelForSequenceClassification, ts.load_recipe(recipe_dict(headless, data)).model, num_labels=2)
    out = capsys.readouterr().out
    assert "weight" not in out and "LOAD REPORT" not in out                  # only the head is new
    load_hf(AutoModelForSequenceClassification, ts.load_recipe(recipe_dict(holed, data)).model, num_labels=2)
    lines = [x for x in capsys.readouterr().out.splitlines() if "weight" in x]
    assert lines == ["model: 2 weight(s) not in the checkpoint were initialised at random: "
                     "bert.encoder.layer.0.attention.self.query.bias, bert.encoder.layer.0.attention.self.query.weight"]


def test_cli_train_hides_the_load_report_and_weight_bars_unless_verbose(tiny_bert, tmp_path):
    headless = drop_weights(tiny_bert, tmp_path / "headless", lambda k: k.startswith("classifier."))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(headless, write_reviews(tmp_path / "r.csv", n=60),
                                               train={"max_steps": 1})))
    out = tunesmith("train", path, "--run-dir", tmp_path / "quiet")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    for noise in ("LOAD REPORT", "Loading weights", "Writing model shards", "initialised at random"):
        assert noise not in text, text
    assert "run folder:" in out.stdout and "model:" in out.stdout
    out = tunesmith("train", path, "--run-dir", tmp_path / "loud", "--verbose")
    assert out.returncode == 0 and "LOAD REPORT" in out.stdout + out.stderr    # the check above can fail


def test_predict_file_keeps_file_order_and_places_errors(runs, tmp_path):
    model = runs[0].load(device="cpu")
    txt = tmp_path / "in.txt"
    txt.write_text("good film\n\n   \nawful plot\n")
    out = model.predict_file(txt)
    assert out == model.predict(["good film", "awful plot"])                 # blank lines skipped
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"text": "great"}\n{"text": "cut\n{"title": "x"}\n{"text": "dull"}\n')
    out = model.predict_file(rows)
    assert [("error" in o) for o in out] == [False, True, True, False]
    assert out[1]["input"] == f"{rows}:2" and out[2] == {"error": "missing text (column 'text')", "input": f"{rows}:3"}
    assert out[3] == model.predict("dull")
    with pytest.raises(ts.TunesmithError, match="no such file"):
        model.predict_file(tmp_path / "missing.txt")


def test_compare_returns_a_structure_the_cli_renders(runs, capsys):
    a, b = runs
    result = ts.compare([a.path, b.path])
    assert result["kind"] == "runs" and [c["name"] for c in result["columns"]] == ["a", "b"]
    assert result["columns"][1]["model"].endswith("(scratch)")
    assert result["metrics"]["accuracy"] == [a.metrics["accuracy"], b.metrics["accuracy"]]
    assert "train_seconds" in result["metrics"]
    assert main(["compare", str(a.path), str(b.path)]) == 0
    out = capsys.readouterr().out
    assert "(scratch)" in out and any(x.split()[:1] == ["accuracy"] for x in out.splitlines())
    cv = b.path.parent / "cv-like"
    cv.mkdir(exist_ok=True)
    (cv / "cv.json").write_text("{}")
    with pytest.raises(ts.TunesmithError, match="not both"):
        ts.compare([a.path, cv])


def test_search_table_in_a_pipe_has_full_column_names(capsys):
    from tunesmith.selection.search import show_table

    keys = ["train.learning_rate", "train.epochs", "train.warmup", "train.scheduler", "train.weight_decay",
            "train.batch_size", "model.dropout", "train.label_smoothing", "adapt.freeze_layers"]
    params = dict(zip(keys, [3e-5, 4, 0.1, "cosine", 0.01, 16, 0.1, 0.05, 2]))
    summary = {"study": "s", "metric": "accuracy", "trials": [
        {"number": i, "state": "COMPLETE", "score": 0.8125, "test": 0.79, "seconds": 12.5, "params": params}
        for i in range(3)]}
    stream = io.StringIO()                                   # not a terminal: plain text, as wide as it needs
    show_table(summary, file=stream)
    text = stream.getvalue()
    assert "…" not in text and "..." not in text
    header = text.splitlines()[1].split()
    assert header == ["trial", "state", "accuracy", "(val)", "test", "seconds", *keys]
    assert "cosine" in text and "0.8125" in text

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()                                      # a terminal too narrow for rich: the plain text
    show_table(summary, file=stream)
    assert "…" not in stream.getvalue() and all(k in stream.getvalue() for k in keys)


def test_demo_ends_with_commands_for_the_run_folder_it_trained(monkeypatch, tmp_path, capsys):
    """The last line names the run folder ts.train returned (quoted for the shell), not a placeholder."""
    folder = tmp_path / "my runs" / "demo"

    def train(recipe, run_dir=None, **kw):                   # what ts.train prints at its end
        print(f"run folder: {folder}")
        return ts.Run(folder)

    monkeypatch.setattr("tunesmith.pipeline.train", train)
    assert main(["demo"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    quoted = f"'{folder}'"
    assert last == f'next: tunesmith predict {quoted} "a gripping, funny film" · tunesmith report {quoted}'


def test_cv_folder_defaults_to_the_apis_name(tiny_bert, tmp_path, monkeypatch):
    """ts.cross_validate decides runs/cv-<name>; the CLI prints the folder the API returns."""
    monkeypatch.chdir(tmp_path)
    given = recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=40), name="mini", train={"max_steps": 1})
    out = ts.cross_validate(given, folds=2)
    assert out["folder"] == str(Path("runs") / "cv-mini") and json.loads(Path("runs/cv-mini/cv.json").read_text())
