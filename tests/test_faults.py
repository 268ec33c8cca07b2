"""Faults a new user meets (docs/faults.md): the user's files are never written, NaN never passes silently,
signals commit a checkpoint, damaged checkpoints are skipped, bad data and model errors are one line each."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe_dict, write_reviews
from safetensors.torch import load_file

import tunesmith as ts
from tunesmith import checkpoint, safety
from tunesmith.cli import main
from tunesmith.errors import TunesmithError

SMALL = {"epochs": 1, "batch_size": 8, "max_steps": 4, "save_every": 1, "eval_every": 2, "keep_checkpoints": 4}


def small(tiny_bert, data, overrides=(), **train):
    return ts.load_recipe(recipe_dict(tiny_bert, data, train={**SMALL, **train}), overrides)


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_reviews(tmp_path_factory.mktemp("faults") / "r.csv", n=60)


@pytest.fixture(scope="module")
def finished(tiny_bert, data, tmp_path_factory):
    return ts.train(small(tiny_bert, data), run_dir=tmp_path_factory.mktemp("done") / "run")


# --- 1, 2: the run folder ---------------------------------------------------------------------------

def test_run_dir_into_a_project_folder_is_refused_and_nothing_is_written(tiny_bert, tmp_path, monkeypatch, capsys):
    proj = tmp_path / "proj"
    shutil.copytree(tiny_bert, proj / "model")
    (proj / "data").mkdir()
    write_reviews(proj / "data" / "train.csv", n=40)
    (proj / "data" / "test.jsonl").write_text('{"text": "good film", "label": "pos"}\n')
    (proj / "eval.json").write_text('{"mine": 1}')
    (proj / "metrics.jsonl").write_text('{"mine": 1}\n')
    recipe = recipe_dict(Path("model"), Path("data/train.csv"), train=SMALL)
    recipe["data"]["test"] = "data/test.jsonl"
    (proj / "my.yaml").write_text(yaml.safe_dump(recipe))
    before = digest(proj)
    monkeypatch.chdir(proj)
    assert main(["train", "my.yaml", "--run-dir", "."]) == 1
    assert "is not empty: a run is created only in a new or empty folder" in capsys.readouterr().err
    with pytest.raises(TunesmithError, match="not empty"):
        ts.train(ts.load_recipe("my.yaml"), run_dir=proj / "data")
    assert digest(proj) == before                      # not one byte of the user's files changed


def test_run_is_created_atomically_once(tiny_bert, data, tmp_path):
    recipe = small(tiny_bert, data)
    empty = tmp_path / "empty"
    empty.mkdir()
    run = ts.Run.create(recipe, empty)                  # an empty folder may become a run
    assert (run.path / "recipe.yaml").exists() and (run.path / safety.LOCK).exists()
    with pytest.raises(TunesmithError, match="holds a run"):
        ts.Run.create(recipe, empty)
    fresh = tmp_path / "fresh"
    (fresh).mkdir()
    assert safety.claim(fresh)                          # another process claimed it first
    with pytest.raises(TunesmithError):
        ts.Run.create(recipe, fresh)
    assert [p.name for p in fresh.iterdir()] == [safety.LOCK]


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", "..", "a\\b"])
def test_name_with_a_path_is_rejected(name):
    with pytest.raises(ts.RecipeError, match="name: must be a plain folder name"):
        ts.load_recipe({"task": "text-classification", "model": "m", "data": {"train": "t.csv"}, "name": name})


# --- 3: NaN and inf -----------------------------------------------------------------------------------

def nan_on_calls(monkeypatch, calls):
    from tunesmith.tasks.classification import Classification

    real, seen = Classification.loss, {"n": 0}

    def loss(self, model, batch):
        seen["n"] += 1
        out = real(self, model, batch)
        return out * float("nan") if seen["n"] in calls else out

    monkeypatch.setattr(Classification, "loss", loss)


def test_non_finite_steps_are_skipped_counted_and_weights_stay_finite(tiny_bert, data, tmp_path, monkeypatch,
                                                                      capsys):
    nan_on_calls(monkeypatch, {2, 3})                   # micro-batch = optimizer step here (grad_accum 1)
    run = ts.train(small(tiny_bert, data, max_steps=6), run_dir=tmp_path / "run")
    skipped = [r for r in run.history if "skipped_step" in r]
    assert [r["step"] for r in skipped] == [2, 3]
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient" in out and "2 of 6 optimizer steps were skipped" in out
    assert [r for r in run.history if r.get("summary")][-1]["skipped_steps"] == 2
    weights = load_file(str(run.model_dir / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    json.loads((run.path / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in eval.json"))


def test_diverging_run_stops_after_max_bad_steps_with_exit_1(tiny_bert, data, tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, set(range(3, 100)))
    recipe = recipe_dict(tiny_bert, data, train={**SMALL, "max_steps": 20, "max_bad_steps": 3})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "training diverged: 3 optimizer steps in a row had a non-finite loss" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()


def test_lr_1e6_without_clipping_stops_and_never_saves_nan(tiny_bert, data, tmp_path):
    recipe = small(tiny_bert, data, learning_rate=1e6, max_grad_norm=None, max_steps=12, max_bad_steps=5)
    with pytest.raises(TunesmithError, match="training diverged: 5 optimizer steps in a row"):
        ts.train(recipe, run_dir=tmp_path / "run")
    for f in (tmp_path / "run" / "checkpoints").rglob("model.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(f)).values()), f
    assert "NaN" not in (tmp_path / "run" / "metrics.jsonl").read_text()
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "eval.json").exists()


def test_json_never_holds_nan(tmp_path, capsys):
    run = ts.Run(tmp_path)
    run.write_json("eval.json", {"accuracy": float("nan"), "per": {"a": float("inf")}, "n": 3})
    assert json.loads((tmp_path / "eval.json").read_text()) == {"accuracy": None, "per": {"a": None}, "n": 3}
    assert "eval.json: accuracy, per.a not a finite number; written as null" in capsys.readouterr().out
    run.log({"step": 1, "loss": float("nan")})
    assert run.history == [{"step": 1, "loss": None}]


def test_non_finite_validation_is_never_the_best(tiny_bert, data, tmp_path, monkeypatch):
    from tunesmith.tasks.classification import Classification

    real = Classification.evaluate
    monkeypatch.setattr(Classification, "evaluate", lambda self, *a: {**real(self, *a), "loss": float("nan")})
    monkeypatch.setattr(Classification, "final_metrics", lambda self, *a: {"loss": float("nan")})   # eval.json too
    run = ts.train(small(tiny_bert, data), run_dir=tmp_path / "run")
    assert not (run.path / "checkpoints" / "best").exists()
    assert json.loads((run.path / "eval.json").read_text())["loss"] is None


# --- 4, 5: data -----------------------------------------------------------------------------------------

def test_single_class_blocks_train_and_doctor(tiny_bert, tmp_path, capsys):
    data = write_reviews(tmp_path / "one.csv", n=40, labels=("pos", "pos"))
    with pytest.raises(ts.DataError, match="single class \\['pos'\\].*at least two classes"):
        ts.train(small(tiny_bert, data), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_bert, data)))
    assert main(["doctor", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "d.json")]) == 1
    assert "single class" in capsys.readouterr().err


def test_duplicate_column_names_are_rejected_with_file_and_columns(tmp_path):
    from tunesmith import data as datalib

    f = tmp_path / "dup.csv"
    f.write_text("text,label,text\ngood,pos,bad\n")
    with pytest.raises(ts.DataError, match=r"dup.csv: column\(s\) \['text'\] appear more than once.*label"):
        datalib.read(str(f))
    j = tmp_path / "dup.jsonl"
    j.write_text('{"text": "a", "label": "pos", "text": "b"}\n{"text": "c", "label": "neg"}\n')
    table = datalib.read(str(j))
    assert len(table.rows) == 1 and "['text'] appear more than once" in table.rejects[0].reason


# --- 6: predict -----------------------------------------------------------------------------------------

def test_predict_answers_every_input_line_in_order(finished, tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "great film"}\n{"text": "broken\n{"title": "no text key"}\n{"text": ""}\n'
                 '{"text": "awful plot"}\n')
    assert main(["predict", str(finished.path), "--input", str(f)]) == 1
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == 5 and "label" in lines[0] and "label" in lines[4]
    assert lines[1]["input"].endswith("in.jsonl:2") and "malformed JSON" in lines[1]["error"]
    assert lines[2] == {"error": "missing text (column 'text')", "input": f"{f}:3"}
    assert lines[3]["error"] == "empty text"
    assert "3 of 5 input(s) could not be predicted" in err
    assert finished.load().predict("") == {"error": "empty text"}


# --- 7: signals --------------------------------------------------------------------------------------------

def steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [r["step"] for r in recs if "loss" in r and "split" not in r]


def test_sigterm_and_ctrl_c_commit_a_checkpoint_and_resume_logs_each_step_once(tiny_bert, data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_bert, data, train={
        **SMALL, "max_steps": 100, "save_every": 1000, "eval_every": 1000})))
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):                 # both at once: the start-up is most of the time
        run = tmp_path / sig.name
        procs[sig] = run, subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(recipe), "--run-dir",
                                            str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for sig, (run, proc) in procs.items():
        deadline = time.time() + 120
        while len(steps_logged(run)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(sig)
    for sig, (run, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err
        step = int(err.split("interrupted at step ")[1].split(";")[0])
        assert f"resume with: tunesmith train --resume {run}" in err and "Traceback" not in err
        assert checkpoint.newest(run / "checkpoints") == run / "checkpoints" / f"step-{step:08d}"
        assert not (run / safety.LOCK).exists() and step < 100
    run = procs[signal.SIGTERM][0]
    with open(run / "metrics.jsonl", "a") as f:          # 9: a crash in the middle of an append
        f.write('{"step": 99999, "lo')
    done = ts.train(ts.Run(run).recipe, resume=run)
    assert steps_logged(done.path) == list(range(1, 101))
    assert done.metrics["n_examples"] == 12


def test_sigterm_stops_a_distillation_at_a_checkpoint_and_train_resume_finishes_it(finished, tmp_path):
    """distill runs through the same pipeline as train: a signal commits a checkpoint and releases the lock, and
    `train --resume` continues the student (its own architecture), not a fine-tune of the teacher's."""
    student = tmp_path / "student"
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "distill", str(finished.path), "--run-dir",
                             str(student), "train.max_steps=60", "train.save_every=1000", "train.eval_every=1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(steps_logged(student)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert f"resume with: tunesmith train --resume {student}" in err and step < 60
    assert checkpoint.newest(student / "checkpoints") == student / "checkpoints" / f"step-{step:08d}"
    assert not (student / safety.LOCK).exists() and not (student / "model").exists()
    assert main(["train", "--resume", str(student)]) == 0
    assert steps_logged(student) == list(range(1, 61)) and not (student / safety.LOCK).exists()
    assert json.loads((student / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((student / "distill.json").read_text())["student"]["run"] == str(student)


# --- 8, 9: damaged checkpoints ----------------------------------------------------------------------

def damaged_copy(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished.path, run)
    shutil.rmtree(run / "model")
    (run / "eval.json").unlink()
    return run


@pytest.mark.parametrize("how", ["truncate", "state", "rng", "flip"])
def test_each_kind_of_damage_is_found(finished, tmp_path, how):
    step = tmp_path / "step"
    shutil.copytree(finished.path / "checkpoints" / "step-00000004", step)
    assert checkpoint.damage(step) is None
    if how == "truncate":
        f = step / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif how == "state":
        (step / "state.json").write_text("{not json")
    elif how == "rng":
        (step / "rng.safetensors").unlink()
    else:
        f = step / "optimizer.safetensors"
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 1
        f.write_bytes(bytes(b))
    assert "missing" in checkpoint.damage(step) if how == "rng" else "checksum" in checkpoint.damage(step)


def test_damaged_newest_checkpoint_is_skipped_on_resume(finished, tmp_path, capsys):
    run = damaged_copy(finished, tmp_path)
    newest = run / "checkpoints" / "step-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])
    done = ts.train(ts.Run(run).recipe, resume=run)
    out = capsys.readouterr().out
    assert "skipping step-00000004: model.safetensors does not match its checksum" in out
    assert "continuing from step-00000003" in out
    assert (done.model_dir / "model.safetensors").exists() and done.metrics["n_examples"] == 12
    assert not (run / "checkpoints" / "step-00000004.tmp").exists()


def test_damaged_best_keeps_the_final_weights_and_the_run_finishes(finished, tmp_path, capsys):
    run = damaged_copy(finished, tmp_path)
    (run / "checkpoints" / "best" / "state.json").write_text("garbage")
    done = ts.train(ts.Run(run).recipe, resume=run)
    out = capsys.readouterr().out
    assert "best is damaged (state.json does not match its checksum" in out
    assert "keeping the final weights (step 4) instead of the best (step 2)" in out
    final = load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors"))
    saved = load_file(str(done.model_dir / "model.safetensors"))
    assert torch.equal(final["classifier.weight"], saved["classifier.weight"])
    assert done.metrics["n_examples"] == 12


# --- 10: disk full --------------------------------------------------------------------------------------

def test_disk_full_is_one_line_and_leaves_previous_checkpoints_and_no_half_model(finished, tmp_path, monkeypatch):
    import shutil as sh

    from tunesmith.pipeline import save_model

    ckpts = tmp_path / "ckpts"
    shutil.copytree(finished.path / "checkpoints", ckpts)
    before = digest(ckpts)
    state = {"w": torch.zeros(1000, 1000)}
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10 << 20, 10 << 20, 1 << 20))
    with pytest.raises(TunesmithError, match=r"disk full writing .*step-00000005: it needs about 5 MiB, 1 MiB free"):
        checkpoint.save(ckpts / "step-00000005", state, None, None, {"step": 5})
    assert digest(ckpts) == before and not (ckpts / "step-00000005.tmp").exists()

    model = finished.load().model
    task = finished.load().task

    def full(m, folder):                                 # as save_pretrained: into a folder that may exist
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(task, "save", full)
    with pytest.raises(TunesmithError, match="disk full writing .*model"):
        save_model(task, model, tmp_path / "model", lora=False)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob("model.tmp*"))   # io.atomic_folder's tmp


# --- 11: two processes on one run ----------------------------------------------------------------------

def test_second_process_on_a_run_stops_and_stale_locks_are_taken_over(finished, tmp_path, capsys):
    run = damaged_copy(finished, tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / safety.LOCK).write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        assert main(["train", "--resume", str(run)]) == 1
        assert f"is in use by process {live.pid}" in capsys.readouterr().err
    finally:
        live.kill()
        live.wait()
    safety.acquire(run)                                  # the process is gone: its lock is taken over
    assert f"taking over the lock of process {live.pid}" in capsys.readouterr().out
    assert json.loads((run / safety.LOCK).read_text())["pid"] == os.getpid()
    safety.release(run)
    assert not (run / safety.LOCK).exists()


# --- 12: memory ---------------------------------------------------------------------------------------

def test_a_10mb_row_is_cut_before_tokenising(finished, monkeypatch):
    task = finished.load().task
    seen = []
    real = type(task.tokenizer).__call__

    def spy(self, texts, *a, **kw):
        seen.extend(len(t) for t in texts)
        return real(self, texts, *a, **kw)

    monkeypatch.setattr(type(task.tokenizer), "__call__", spy)
    features = task.encode([{"text": "good " * 2_000_000, "label": "pos"}])    # 10 MB on one line
    assert max(seen) <= 100 * task.max_length < 10_000_000
    assert len(features[0]["input_ids"]) == task.max_length and features.truncated == 1


# --- 13, 14: model loading -----------------------------------------------------------------------------

@pytest.mark.parametrize("model, says", [
    ("/no/such/model", "model '/no/such/model': does not exist; give a folder with config.json"),
    ("someone/some-model", "model 'someone/some-model' is not a local folder and the hub is offline"),
])
def test_model_that_cannot_load_is_one_line_and_leaves_no_run_folder(data, tmp_path, capsys, model, says):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(Path(model), data)))
    assert main(["train", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_user_errors_around_runs_and_data_are_one_line(finished, tiny_bert, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished.path, run)
    shutil.rmtree(run / "model")
    assert main(["eval", str(run)]) == 1
    assert "no model/ folder" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_bert, Path("someone/some-dataset"))))
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err
    assert "someone/some-dataset" in err and "offline" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()
    assert main(["train", str(recipe), "train.epochs=[1"]) == 2
    assert "the value is not valid YAML" in capsys.readouterr().err


def test_model_folder_code_never_runs_without_trust_remote_code(tiny_bert, data, tmp_path, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_bert, evil)
    marker = tmp_path / "ran"
    config = json.loads((evil / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
    (evil / "config.json").write_text(json.dumps(config))
    for f in ("configuration_evil.py", "modeling_evil.py"):
        (evil / f).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(evil, data)))
    assert main(["train", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "ships its own Python code" in err and "model.trust_remote_code: true" in err
    assert not marker.exists() and not (tmp_path / "run").exists()
    trusting = ts.load_recipe(recipe_dict(evil, data), ["model.trust_remote_code=true"])
    # the folder's (useless) code ran, so whatever it raises shows the flag reached transformers
    with pytest.raises(Exception):  # noqa: B017
        ts.train(trusting, run_dir=tmp_path / "run")
    assert marker.exists()


def test_pickle_weights_load_as_tensors_only(tiny_bert, data, tmp_path, capsys):
    from transformers import BertForSequenceClassification

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert, pickled)
    model = BertForSequenceClassification.from_pretrained(tiny_bert)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    run = ts.train(small(tiny_bert, data, max_steps=1).model_copy(
        update={"model": ts.load_recipe(recipe_dict(pickled, data)).model}), run_dir=tmp_path / "run")
    assert "pickle weights only (pytorch_model.bin): loaded as plain tensors" in capsys.readouterr().out
    assert run.metrics["n_examples"] == 12

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, pickled / "pytorch_model.bin")
    with pytest.raises(TunesmithError, match="refused by torch.load\\(weights_only=True\\)"):
        ts.train(ts.load_recipe(recipe_dict(pickled, data, train=SMALL)), run_dir=tmp_path / "run2")
    assert not marker.exists() and not (tmp_path / "run2").exists()


# --- 15: out of memory -------------------------------------------------------------------------------

def test_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_bert, data, tmp_path, monkeypatch, capsys):
    from tunesmith.tasks.classification import Classification

    no_dropout = ["model.dropout=0"]                    # dropout masks depend on how batches are cut
    plain = ts.train(small(tiny_bert, data, no_dropout, max_steps=3), run_dir=tmp_path / "plain")
    real, sizes = Classification.loss, []

    def loss(self, model, batch):
        sizes.append(len(batch["labels"]))
        if len(batch["labels"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, model, batch)

    monkeypatch.setattr(Classification, "loss", loss)
    run = ts.train(small(tiny_bert, data, no_dropout, max_steps=3), run_dir=tmp_path / "oom")
    out = capsys.readouterr().out
    assert "out of memory at micro-batch 8: continuing with micro-batches of 4 and grad_accum 2" in out
    assert "micro-batches of 2 and grad_accum 4 (the same 8 examples per optimizer step)" in out
    assert max(sizes[-3:]) == 2 and min(sizes) >= 2
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (plain, run))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)        # the same gradients, summed in pieces


def test_oom_in_evaluation_lowers_only_the_evaluation_batch(tiny_bert, data, tmp_path, monkeypatch, capsys):
    from tunesmith.tasks.classification import Classification

    real_logits, real_loss, train_sizes = Classification.logits, Classification.loss, []

    def logits(self, model, features, batch_size):
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_logits(self, model, features, batch_size)

    def loss(self, model, batch):
        train_sizes.append(len(batch["labels"]))
        return real_loss(self, model, batch)

    monkeypatch.setattr(Classification, "logits", logits)
    monkeypatch.setattr(Classification, "loss", loss)
    run = ts.train(small(tiny_bert, data), run_dir=tmp_path / "run")
    out = capsys.readouterr().out
    assert "out of memory in evaluation at batch size 32: retrying at 16" in out
    assert "retrying at 8" in out and max(train_sizes) == 8
    assert run.metrics["n_examples"] == 12
    with pytest.raises(RuntimeError) as real:           # what a CPU allocation that fails raises
        torch.empty(2**45, dtype=torch.uint8)
    assert safety.is_oom(real.value)
