"""The one training pipeline: recipe -> task -> data -> model + adapt -> fit -> run folder. `tunesmith.train` runs
it for plain fine-tuning; every other trainer (distill) runs the same steps through `train_with` and supplies only
what differs (a Trainer: the model, the objective, its own checks and files):

  prepare    the task (with its pad multiple), the data read and checked (trainer.check), the run folder chosen
             (a new one must be new or empty; a resumed one is locked)
  load       the model (trainer.load_model); the features encoded; the training keys the recipe leaves unset
             made concrete from them (tunesmith/defaults.py: rate, batch size, epochs: auto's cadence); then a new
             run folder is created: run.json (with made_by: how the run is made), recipe.yaml (those numbers),
             data/ (the held-out splits), rejects.jsonl. A failed load leaves nothing behind.
  features   the trainer's objective (it may add to the train features); eval.before; adapt; feature cache
  fit        tunesmith/loop.py, under safety.StopFlag (SIGTERM / Ctrl-C: a checkpoint, then safety.Interrupted)
  save       model/, written whole or not at all
  evaluate   eval.json on the test split, the trainer's own files, callbacks' on_end
The run folder's lock (tunesmith/safety.py) is held from the folder's creation (or the resume) to the end, and
released whatever happens; trackers (train.report_to) and callbacks see every trainer's records.
"""
from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

from tunesmith import data as datalib
from tunesmith import defaults, io, safety
from tunesmith.errors import TunesmithError
from tunesmith.recipe import Recipe
from tunesmith.run import Run
from tunesmith.splits import fingerprint, load_data, part_totals, report
from tunesmith.tasks import get_task

# run.json's made_by.command -> the Trainer that continues such a run on `train --resume` (import paths: the
# trainers import this module)
TRAINERS = {"train": "tunesmith.pipeline:Trainer", "distill": "tunesmith.deploy.distill:Distiller"}
# made_by.command of runs that `train --resume` cannot continue -> why, and what to do instead
NOT_RESUMABLE = {"federate": "a federation keeps no checkpoints to continue from; run `tunesmith federate` again "
                             "with the same recipe and options (run.json's made_by lists them) into a new --run-dir"}


class Trainer:
    """What the pipeline asks of a trainer, answered as plain fine-tuning (`tunesmith train`). A trainer that
    differs subclasses it and is named in TRAINERS, so `train --resume` continues its runs as it made them."""
    command = "train"

    @classmethod
    def resuming(cls, run: Run) -> Trainer:
        """The trainer that continues `run`, from its run.json's made_by."""
        return cls()

    def made_by(self) -> dict:
        """How the run is made: recorded in run.json."""
        return {"command": self.command}

    def describe(self, recipe: Recipe) -> str:
        """The model, in the line that says it loaded."""
        return recipe.model.name

    def check(self, task, loaded) -> None:
        """Refuse data this trainer cannot use; before any model loads."""

    def load_model(self, task):
        """The model to train (the task's pretrained model and a new head)."""
        return task.load_model()

    def objective(self, task, features: dict, batch_size: int):
        """What fit minimises (collate, loss, count, validates, finish: tunesmith/steps.py); it may add to or replace
        features["train"]. Plain fine-tuning: the task's own, under the recipe's adapt.method."""
        return task.objective(features)

    def finish(self, run: Run, task, model, features: dict, result: dict, say) -> None:
        """The trainer's own files, once eval.json is written (main process; `model`: the saved one, reloaded)."""


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: str | Path | None = None,
          callbacks: list = ()) -> Run:
    """Fine-tune as the recipe says; return the finished run (`run.metrics`: eval.json). `resume`: continue
    that run folder from its newest complete checkpoint, as the command that made it (a distilled run continues as
    a distillation). callbacks: tunesmith.Callback objects or functions, each called with every metrics.jsonl
    record. The recipe is not changed. On a CPU, torch's thread count is set for the run (train.threads, or the
    free cores) and restored afterwards."""
    trainer = trainer_for(Run(resume)) if resume else Trainer()
    return train_with(trainer, recipe, run_dir, resume, callbacks)


def trainer_for(run: Run) -> Trainer:
    """The trainer that made `run` (run.json's made_by), ready to continue it."""
    command = (run.made_by or {}).get("command", Trainer.command)        # runs from before made_by: trained
    if command in NOT_RESUMABLE:
        raise TunesmithError(f"{run.path} was made by `tunesmith {command}` and cannot be resumed with "
                             f"`train --resume`: {NOT_RESUMABLE[command]}")
    if command not in TRAINERS:
        raise TunesmithError(f"{run.path} was made by `tunesmith {command}`, which this version cannot resume; "
                             "upgrade tunesmith")
    module, _, name = TRAINERS[command].partition(":")
    return getattr(importlib.import_module(module), name).resuming(run)


def train_with(trainer: Trainer, recipe: Recipe, run_dir=None, resume=None, callbacks: list = (),
               device: str = "auto") -> Run:
    """Run the pipeline for `trainer` (see the module docstring); `train`'s arguments, and the device to train on."""
    import torch

    from tunesmith.device import choose_device, choose_threads

    threads = torch.get_num_threads()
    if choose_device(device).type == "cpu":
        n, why = choose_threads(recipe.train.threads, int(os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(n)
        if os.environ.get("RANK", "0") == "0":
            print(f"threads: {why}")
    try:
        return _start(trainer, recipe, run_dir, resume, callbacks, device)
    finally:
        torch.set_num_threads(threads)


def pad_multiple(cfg, device) -> int:
    """train.pad_multiple, or 16 on GPUs (each new batch width costs kernel selection there), 1 elsewhere."""
    return cfg.pad_multiple or (16 if device.type == "cuda" else 1)


def prepare(trainer: Trainer, recipe: Recipe, device):
    """(the task, its data read and checked): the doctor's row checks (every reject has file:line), then the
    trainer's."""
    from tunesmith.diagnosis.report import rejects_report

    task = get_task(recipe, pad_multiple(recipe.train, device))
    task.setup()                                        # the processor: no weights yet
    loaded = load_data(task, recipe)
    if loaded.rejects and recipe.data.bad_rows == "error":
        raise datalib.DataError(rejects_report(loaded, recipe.doctor.listed))
    empty = [f"{s} ({getattr(recipe.data, s)})" for s, t in loaded.tables.items() if not len(t)]
    if empty:
        raise datalib.DataError(f"no usable rows in {', '.join(empty)}; every row was rejected:\n"
                                + report(loaded.rejects))
    trainer.check(task, loaded)
    return task, loaded


def _start(trainer: Trainer, recipe: Recipe, run_dir, resume, callbacks, device) -> Run:
    """The pipeline up to the run folder: data read and checked, the folder chosen (and locked when resuming)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from tunesmith.device import check_sharding, choose_device

    device = choose_device(device)
    check_sharding(device)                                        # before the data is read: a launch mistake
    task, loaded = prepare(trainer, recipe, device)
    accelerator = Accelerator(cpu=device.type == "cpu")           # cpu=True lets torchrun give MULTI_CPU (gloo)
    main = accelerator.is_main_process
    if resume:
        run = Run(resume, callbacks, writer=main)
        run.lock()                                                # a second process on this run stops here
    else:                                                         # every process writes into one folder
        path = broadcast_object_list([str(run_dir or Run.default_path(recipe))])[0]
        if main and run_dir:
            Run.check_new(path)                                   # before minutes of loading, not after
        run = Run(path, callbacks, writer=main)
    try:
        return _train(trainer, recipe, task, loaded, run, accelerator, resume, bool(run_dir))
    finally:
        run.unlock()


def _train(trainer: Trainer, recipe: Recipe, task, loaded, run: Run, accelerator, resume, named: bool) -> Run:
    """The pipeline once the data is read and the run folder chosen (not yet created unless resuming)."""
    import torch
    from transformers import set_seed

    from tunesmith import featcache
    from tunesmith.adapt import adapt
    from tunesmith.device import choose_precision
    from tunesmith.loop import fit

    tables, rejects = loaded.tables, loaded.rejects
    mixed, why = choose_precision(recipe.train.precision, accelerator.device)
    say = accelerator.print                                       # main process only
    stamp = {"rows": {s: len(t) for s, t in tables.items()}, "rejected": len(rejects),
             "labels": task.labels, "fingerprint": fingerprint(tables),
             "files": loaded.files, "unused_rows": loaded.unused,  # per file: read = usable + rejected
             **({"shots": loaded.sampled} if loaded.sampled else {})}
    stamp |= part_totals(task, loaded.files)      # boxes counted apart from images (Task.part_unit)
    if resume and io.read_json(run.path / "data" / "splits.json")["fingerprint"] != stamp["fingerprint"]:
        raise datalib.DataError(f"{run.path}: the data changed since this run started; cannot resume exactly")
    unit, part = stamp.get("unit", "rows"), stamp.get("parts")
    rejected = f"{stamp['rejected']:,} {unit} and {part['rejected']:,} {stamp['part']}" if part else len(rejects)
    say(f"data: {', '.join(f'{s} {n:,}' for s, n in stamp['rows'].items())} {unit}"
        + (f"; {rejected} rejected, listed in {run.path / 'rejects.jsonl'}" if rejects else ""))
    for line in loaded.shot_lines():
        say(line)
    say(f"precision: {why}; device: {accelerator.device}"
        + (f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""))

    set_seed(recipe.train.seed)
    t0 = time.perf_counter()
    model = trainer.load_model(task)
    say(f"model: {trainer.describe(recipe)} loaded in {time.perf_counter() - t0:.1f}s")
    features = {}
    for split, table in tables.items():
        features[split] = task.encode(table.rows)
        if features[split].truncated:
            say(f"{split}: {features[split].truncated:,} of {len(table):,} examples cut at data.max_length="
                f"{task.max_length}")
    recipe, chosen = defaults.resolve(recipe, len(features["train"]))   # unset training keys made concrete
    for line in chosen:
        say(line)
    if not resume:                              # the data and the model loaded: now the run folder exists
        _create(trainer, recipe, task, loaded, stamp, run, accelerator, named)
    if accelerator.is_main_process and recipe.train.report_to:   # TensorBoard / MLflow mirror the run folder
        from tunesmith.insight.tracking import callbacks_for

        run.callbacks += callbacks_for(recipe.train, run.path)

    objective = trainer.objective(task, features, recipe.eval.batch_size)
    model.to(accelerator.device)
    task.precompute(model, features, recipe.eval.batch_size)       # from the model as loaded (DPO's reference)
    before = None
    if recipe.eval.before and not resume:
        model.eval()
        with torch.no_grad():             # as `tunesmith eval` and the API score it (a task sets its own autocast)
            before = safety.with_backoff(lambda bs: task.evaluate_final(model, tables["test"].rows, features["test"],
                                                                        bs), recipe.eval.batch_size, "evaluation", say)
        if accelerator.is_main_process:
            run.write_json("before.json", before)
        say(f"before fine-tuning: {task.summary(before)}")

    adapted = adapt(model, recipe.adapt, task.peft_task_type)
    say(f"adapt: {recipe.adapt.method}; {adapted.summary()}")
    cache = featcache.plan(task, adapted, recipe)
    if cache.k:
        for split in ("train", "validation"):
            features[split] = cache.attach(model, features[split], recipe.eval.batch_size, task.collate,
                                           accelerator.device)
    if cache.k or recipe.adapt.method == "freeze" or recipe.adapt.freeze_layers:
        say(f"feature cache: {'on' if cache.k else 'off'}: {cache.reason}")
    set_seed(recipe.train.seed)
    evalset = features["validation"] if objective.validates else None
    with safety.StopFlag() as flag, cache.active(adapted.model):   # SIGTERM / Ctrl-C: a checkpoint, then
        state = fit(task, adapted, features["train"], evalset, recipe, run, accelerator, mixed,  # Interrupted
                    bool(resume), stop_flag=flag, objective=objective)
    objective.finish(adapted.model, recipe.eval.batch_size, say)
    if evalset is None:                         # validated once, now that the model is whole (contrastive: the head)
        _validate_once(task, adapted.model, features["validation"], recipe, run, state.step, say)

    if accelerator.is_main_process:
        _finish(trainer, recipe, task, adapted.model, run, tables, features, before, accelerator.device, say)
    accelerator.wait_for_everyone()
    return run


def _validate_once(task, model, evalset, recipe, run: Run, step: int, say) -> None:
    """The validation record of a run whose objective did not validate during fit."""
    import torch

    model.eval()
    with torch.no_grad():
        result = safety.with_backoff(lambda bs: task.evaluate(model, evalset, bs), recipe.eval.batch_size,
                                     "evaluation", say)
    model.train()
    run.log({"step": step, "split": "validation", **task.loggable(result)})
    say(f"validation after training: {task.summary(result)}")


def _create(trainer: Trainer, recipe: Recipe, task, loaded, stamp: dict, run: Run, accelerator, named: bool) -> None:
    """The new run folder (every process then points `run` at it): run.json, recipe.yaml, data/, rejects.jsonl."""
    from accelerate.utils import broadcast_object_list

    if accelerator.is_main_process:
        run.path = Run.create(recipe, run.path if named else None, made_by=trainer.made_by()).path
        run.write_json("data/splits.json", stamp)
        for split in ("validation", "test"):
            table = loaded.tables[split]
            run.write_rows(f"data/{split}.jsonl", [{**r, "_origin": o} for r, o in zip(table.rows, table.origins)],
                           task.path_columns)
        if loaded.rejects:
            run.write_rows("rejects.jsonl", [r.as_dict() for r in loaded.rejects])
    run.path = Path(broadcast_object_list([str(run.path)])[0])
    accelerator.wait_for_everyone()


def _finish(trainer: Trainer, recipe: Recipe, task, model, run: Run, tables, features, before, device, say) -> None:
    """model/, eval.json (the saved model on the test split), the trainer's files, callbacks' on_end."""
    import torch

    save_model(task, model, run.model_dir, recipe.adapt.method == "lora")
    final = task.load_trained(run.model_dir).to(device).eval()
    with torch.no_grad():
        result = safety.with_backoff(lambda bs: task.evaluate_final(final, tables["test"].rows, features["test"],
                                                                    bs, run.path), recipe.eval.batch_size,
                                     "evaluation", say)
    before = before or io.read_json(run.path / "before.json")      # a resumed run scored it when it started
    run.write_json("eval.json", {**result, **({"before": before} if before else {})})
    say(f"after fine-tuning:  {task.summary(result)}")
    trainer.finish(run, task, final, features, result, say)
    say(f"run folder: {run.path}")
    run.end()


def save_model(task, model, folder: Path, lora: bool) -> None:
    """HF folder loadable by plain transformers; LoRA runs also keep the adapter in folder/adapter. Written beside
    and renamed (io.atomic_folder): `folder` is complete or absent (a full disk leaves no half-written model/)."""
    try:
        with io.atomic_folder(folder) as tmp:
            if lora:
                model.save_pretrained(tmp / "adapter")
                model = model.merge_and_unload()
            task.save(model, tmp)
    except OSError as e:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        raise safety.disk_error(e, Path(folder), size) from None
