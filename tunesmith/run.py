"""A run is a folder; everything after training (eval, predict, chat, export, serve) takes only that folder.

  run.json         {"schema": layout version, "tunesmith": version, "task": name, "made_by": {"command": "train"
                   or "distill", with that command's settings}, "training": what training saw (Run.training)};
                   absent in schema-1 runs, made_by in runs before it
  recipe.yaml      the resolved recipe (overrides applied, the task's defaults filled in)
  metrics.jsonl    one JSON object per log or evaluation step
  eval.json        final metrics of the best checkpoint on the test split (+ `before`)
  data/            the held-out splits as JSONL (validation.jsonl, test.jsonl), with row origins; files the rows
                   point to (images) are copied (hard-linked where possible) under data/files/ and named
                   relative to data/, so a run folder can be moved or copied as a whole
  rejects.jsonl    rows that could not be used, with origin and reason (data.bad_rows: skip)
  model/           HF format (safetensors, tokenizer, label names); LoRA runs add model/adapter/
  checkpoints/     step-NNNNNNNN/ for resume, best/ for the best evaluation so far
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import yaml

from tunesmith import io, safety
from tunesmith.errors import TunesmithError
from tunesmith.recipe import SCHEMA, Recipe, load


class StopTraining(Exception):
    """Raised by a callback's `on_log` to end training early and cleanly: the loop finishes the current step,
    checkpoints, restores the best weights and the run ends as after early stopping (eval.json written).
    The message is the reason, recorded in the summary record as `stopped`."""


class Callback:
    """Receives what a run records while it trains: `on_log` gets every metrics.jsonl record (training steps,
    validation, the summary), `on_end` the run once eval.json is written. A plain function is an `on_log`.
    `on_log` may raise StopTraining to end training early (pruning, a time budget)."""

    def on_log(self, record: dict) -> None:
        pass

    def on_end(self, run: Run) -> None:
        pass


class _FunctionCallback(Callback):
    def __init__(self, fn):
        self.on_log = fn


class Run:
    def __init__(self, path: str | Path, callbacks: list = (), writer: bool = True):
        self.path = Path(path)
        self.callbacks = [c if isinstance(c, Callback) else _FunctionCallback(c) for c in callbacks]
        self.writer = writer        # False on DDP's other processes: they read the folder, rank 0 writes it
        self.stop_reason: str | None = None   # set when a callback raised StopTraining; the loop then ends

    def __repr__(self) -> str:
        return f"Run('{self.path}')"

    @staticmethod
    def default_path(recipe: Recipe) -> Path:
        return Path("runs") / f"{recipe.name or recipe.task}-{time.strftime('%Y%m%d-%H%M%S')}"

    @staticmethod
    def check_new(path: str | Path, resumable: bool = True) -> None:
        """Raise unless `path` can become a new run: absent, or an empty folder. A folder with anything in it
        (a run, a project, a model) is never written into. resumable: whether the command can --resume a run
        (federate cannot: its message must not offer it)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise TunesmithError(f"{path} is a file, not a folder: give --run-dir a new or empty folder")
        if path.is_dir() and any(path.iterdir()):
            again = "use --resume {0} or another --run-dir" if resumable else "give another --run-dir"
            what = (f"holds a run: {again}" if (path / "recipe.yaml").exists()
                    else "is not empty: a run is created only in a new or empty folder (it never writes into "
                         "your files); give --run-dir a new folder")
            raise TunesmithError(f"{path} {what.format(path)}")

    @classmethod
    def create(cls, recipe: Recipe, run_dir: str | Path | None = None, callbacks: list = (),
               made_by: dict | None = None) -> Run:
        """A new run folder, claimed atomically: mkdir of a new folder (or the lock file of an empty one) fails
        in every process but one. The folder stays locked (tunesmith/safety.py) until `unlock`. made_by: how the
        run is made (the command and its settings), kept in run.json so `train --resume` continues it alike."""
        path = Path(run_dir or cls.default_path(recipe))
        for n in range(2, 100):                         # default names: a second run in the same second gets -2
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(path)
            except FileExistsError:
                if run_dir:
                    cls.check_new(path)                 # an empty folder may be used; anything else is refused
            except OSError as e:
                raise TunesmithError(f"cannot create the run folder {path}: {e.strerror or e}") from None
            if safety.claim(path):
                if [p.name for p in path.iterdir()] == [safety.LOCK]:
                    break
                safety.release(path)                    # someone wrote into it meanwhile: not ours
            if run_dir:
                raise TunesmithError(f"{path} is being used by another process: give another --run-dir")
            path = Path(f"{cls.default_path(recipe)}-{n}")
        run = cls(path, callbacks)

        run.write_json("run.json", {"schema": SCHEMA, "tunesmith": version("tunesmith"), "task": recipe.task,
                                    **({"made_by": made_by} if made_by else {})})
        io.atomic_write(run.path / "recipe.yaml", yaml.safe_dump(recipe.dump(), sort_keys=False))
        return run

    def lock(self) -> None:
        """Take this run's lock (resume): a second process on the same run stops with who holds it."""
        if self.writer:
            safety.acquire(self.path)

    def unlock(self) -> None:
        if self.writer:
            safety.release(self.path)

    # --- what a run holds ------------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def schema(self) -> int:
        """Layout version of this folder: 1 for runs written before run.json existed."""
        stamp = io.read_json(self.path / "run.json")
        return 1 if stamp is None else stamp["schema"]

    @property
    def made_by(self) -> dict | None:
        """How the run was made ({"command": "train" | "distill", ...}: run.json), or None for runs from before."""
        return io.read_json(self.path / "run.json", {}).get("made_by")

    @cached_property
    def recipe(self) -> Recipe:
        path = self.path / "recipe.yaml"
        if not path.exists():
            raise TunesmithError(f"{self.path} is not a run folder (no recipe.yaml)")
        return load(path, schema=self.schema)

    @property
    def metrics(self) -> dict:
        """The final metrics (eval.json: test split, best checkpoint; `before` when eval.before ran); {} while
        the run has not finished."""
        return io.read_json(self.path / "eval.json", {})

    @property
    def history(self) -> list[dict]:
        """Every metrics.jsonl record, in order (training steps, validations, summaries)."""
        return io.read_jsonl(self.path / "metrics.jsonl")

    def load(self, device: str = "auto") -> Predictor:
        """The fine-tuned model, ready to predict and evaluate."""
        return Predictor(self, device)

    # --- writing -----------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if not self.writer:
            return
        io.append_jsonl(self.path / "metrics.jsonl", record)
        for c in self.callbacks:
            try:
                c.on_log(record)
            except StopTraining as e:
                self.stop_reason = str(e) or type(c).__name__

    def note(self, key: str, value) -> None:
        """Set run.json's `key` (what the run saw: `training`, its stop and validation curve)."""
        stamp = io.read_json(self.path / "run.json")
        if self.writer and stamp is not None:              # runs from before run.json stay as they are
            self.write_json("run.json", {**stamp, key: value})

    @property
    def training(self) -> dict:
        """How training went (run.json's `training`): ended (why it stopped), steps, epochs, best_step, curve
        (None, or {"kind": "undertrained" | "overfitting", "line", "key", "step"}); {} for runs from before."""
        return io.read_json(self.path / "run.json", {}).get("training") or {}

    def end(self) -> None:
        for c in self.callbacks:
            c.on_end(self)

    def truncate_log(self, step: int) -> None:
        """Drop log lines after `step` (written by a run that died after its last checkpoint)."""
        path = self.path / "metrics.jsonl"
        if path.exists() and self.writer:
            lines = path.read_text().splitlines()
            keep = [ln for ln in lines if (r := io.parse_line(ln)) is not None and r.get("step", 0) <= step]
            broken = sum(io.parse_line(ln) is None for ln in lines if ln.strip())
            if broken:                                  # a crash or a full disk in the middle of an append
                print(f"resume: dropped {broken} unreadable line(s) of {path} (a write that did not finish)")
            io.atomic_write(path, "".join(ln + "\n" for ln in keep))     # the kept lines byte for byte

    def write_json(self, name: str, obj) -> None:
        """Write atomically; NaN/inf become null, with a warning naming them (JSON has no NaN)."""
        io.write_json(self.path / name, obj, print)

    def write_rows(self, name: str, rows: list[dict], path_columns: tuple[str, ...] = ()) -> None:
        """JSONL rows; values in path_columns that are local files are copied under data/files/ (hard links
        where the file system allows) and written relative to the JSONL file, so the folder moves as a whole."""
        path = self.path / name
        files = path.parent / "files"
        kept = []
        for i, row in enumerate(rows):
            for col in path_columns:
                if isinstance(row.get(col), str) and row[col]:
                    row = {**row, col: _keep_file(row[col], files, f"{path.stem}-{i:07d}", path.parent)}
            kept.append(row)
        io.write_jsonl(path, kept, print)


def _keep_file(value: str, folder: Path, stem: str, base: Path) -> str:
    """`value` (a file path, "FILE#i" in an IDX file, or a data: URI) as a file under `folder`, named relative to
    `base`; data: URIs stay as they are (they hold their bytes)."""
    if value.startswith("data:") or "://" in value:
        return value
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(value)
    if src.is_file():
        dest = folder / f"{stem}{src.suffix.lower()}"
        try:
            os.link(src, dest)
        except OSError:                                  # another file system, or links not allowed
            shutil.copyfile(src, dest)
    else:                                                # a record inside a container file (IDX): decode it once
        from tunesmith.vision import load_image

        dest = folder / f"{stem}.png"
        load_image(value).save(dest)
    return os.path.relpath(dest, base)


class Predictor:
    """A run's fine-tuned model on a device: `predict(inputs)` and `evaluate(data)`. One lock serialises use
    of the model and processor (fast tokenizers are not safe under concurrent calls), so any number of threads
    may share one Predictor."""

    def __init__(self, run: Run, device: str = "auto"):
        from tunesmith.device import choose_device
        from tunesmith.tasks import get_task

        recipe = run.recipe                                  # first: "not a run folder" before "not finished"
        if not run.model_dir.is_dir():
            raise TunesmithError(f"{run.path}: no model/ folder (the run has not finished; resume it with "
                                 f"tunesmith train --resume {run.path})")
        self.run, self.task = run, get_task(recipe)
        self.device = choose_device(device)
        self.model = self.task.load_trained(run.model_dir).to(self.device).eval()
        self._lock = threading.Lock()

    @property
    def labels(self) -> list[str] | None:
        return self.task.labels

    def predict(self, inputs):
        """One JSON-ready dict per input, in order. An input is a string (text, image path, user message) or a
        row (dict with the recipe's columns); a single input gives a single dict. An input that cannot be used
        (empty, a column missing) gets {"error": reason} in its place."""
        import torch

        one = not isinstance(inputs, (list, tuple))
        items = [inputs] if one else list(inputs)
        problems = [self.task.check_input(x) for x in items]     # an unusable input gets {"error"} in its place
        good = [x for x, p in zip(items, problems) if p is None]
        with self._lock, torch.no_grad():
            done = iter(self.task.predict(self.model, good) if good else [])
        out = [{"error": p} if p else next(done) for p in problems]
        return out[0] if one else out

    def stream(self, item, on_text, stop=None) -> dict:
        """One input's prediction (as `predict` gives it), its generated text passed to on_text(piece) as it is
        written; for a task that writes text (Task.generative). stop: a threading.Event that ends generation at the
        next token. An input that cannot be used gets {"error": reason}."""
        import torch

        if not self.task.generative:
            raise TunesmithError(f"task '{self.task.name}' does not generate text: there is nothing to stream")
        problem = self.task.check_input(item)
        if problem:
            return {"error": problem}
        with self._lock, torch.no_grad():
            return self.task.stream(self.model, item, on_text, stop)

    def predict_file(self, path: str | Path) -> list[dict]:
        """One result per input of a file, in file order: .txt holds one input per line (blank lines skipped);
        .jsonl .csv .parquet hold rows, read as `data.train` reads them. A row that cannot be read or used keeps
        its place as {"error": reason, "input": "file:line"}."""
        from tunesmith import data as datalib

        path = str(path)
        if path.endswith(".txt"):
            if not Path(path).is_file():
                raise TunesmithError(f"{path}: no such file")
            lines = [(n, ln) for n, ln in enumerate(Path(path).read_text().splitlines(), 1) if ln.strip()]
            items, where = [ln for _, ln in lines], [f"{path}:{n}" for n, _ in lines]
        else:
            table = datalib.read_for(self.task, path, "predict")
            order = sorted([(datalib.position(o), o, r) for o, r in zip(table.origins, table.rows)]
                           + [(datalib.position(r.origin), r.origin, r) for r in table.rejects], key=lambda x: x[0])
            items, where = [item for _, _, item in order], [origin for _, origin, _ in order]
        done = iter(self.predict([x for x in items if not isinstance(x, datalib.Reject)]))
        out = [{"error": x.reason} if isinstance(x, datalib.Reject) else next(done) for x in items]
        return [{**o, "input": origin} if "error" in o else o for o, origin in zip(out, where)]

    def evaluate(self, data: str | Path | list[dict] | None = None, out_dir: str | Path | None = None) -> dict:
        """Metrics on labelled rows: a file (as `data.train` reads them), a list of rows, or None for the run's
        own test split. out_dir: where per-example files go (samples.jsonl, misclassified.jsonl)."""
        import torch

        from tunesmith.splits import load_rows, usable_rows

        if data is None:
            data = self.run.path / "data" / "test.jsonl"
        rows = usable_rows(self.task, data) if isinstance(data, list) else load_rows(self.task, str(data))
        with self._lock, torch.no_grad():
            return self.task.evaluate_final(self.model, rows, self.task.encode(rows),
                                            self.run.recipe.eval.batch_size, out_dir)
