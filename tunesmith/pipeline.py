"""recipe -> task -> data -> model + adapt -> fit -> run folder: `tunesmith.train`, the API behind `tunesmith train`.

A new run folder is created only once the data and the model have loaded (a failed load leaves nothing behind),
only in a new or empty folder, and is locked while a process trains in it (tunesmith/safety.py)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from tunesmith import data as datalib
from tunesmith import safety
from tunesmith.recipe import Recipe
from tunesmith.run import Run
from tunesmith.splits import fingerprint, load_data, report
from tunesmith.tasks import get_task


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: str | Path | None = None,
          callbacks: list = ()) -> Run:
    """Fine-tune as the recipe says; return the finished run (`run.metrics`: eval.json). `resume`: continue
    that run folder from its newest complete checkpoint. callbacks: tunesmith.Callback objects or functions,
    each called with every metrics.jsonl record. The recipe is not changed. On a CPU, torch's thread count is
    set for the run (train.threads, or the free cores) and restored afterwards."""
    import torch

    from tunesmith.device import choose_device, choose_threads

    threads = torch.get_num_threads()
    if choose_device().type == "cpu":
        n, why = choose_threads(recipe.train.threads, int(os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(n)
        if os.environ.get("RANK", "0") == "0":
            print(f"threads: {why}")
    try:
        return _start(recipe, run_dir, resume, callbacks)
    finally:
        torch.set_num_threads(threads)


def _start(recipe: Recipe, run_dir, resume, callbacks) -> Run:
    """train() up to the run folder: data read and checked, the folder chosen (and locked when resuming)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from tunesmith.device import choose_device
    from tunesmith.diagnosis.report import rejects_report

    task = get_task(recipe)
    task.setup()                                        # the processor: no weights yet
    loaded = load_data(task, recipe)                    # the doctor's row checks: every reject has file:line
    tables, rejects = loaded.tables, loaded.rejects
    if rejects and recipe.data.bad_rows == "error":
        raise datalib.DataError(rejects_report(loaded, recipe.doctor.listed))
    empty = [f"{s} ({getattr(recipe.data, s)})" for s, t in tables.items() if not len(t)]
    if empty:
        raise datalib.DataError(f"no usable rows in {', '.join(empty)}; every row was rejected:\n" + report(rejects))
    device = choose_device()
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
        return _train(recipe, task, loaded, run, accelerator, resume, bool(run_dir))
    finally:
        run.unlock()


def _train(recipe, task, loaded, run: Run, accelerator, resume, named: bool) -> Run:
    """train() once the data is read and the run folder chosen (not yet created unless resuming)."""
    import torch
    from accelerate.utils import broadcast_object_list
    from transformers import set_seed

    from tunesmith import featcache
    from tunesmith.adapt import adapt
    from tunesmith.device import choose_precision
    from tunesmith.loop import fit

    tables, rejects = loaded.tables, loaded.rejects
    mixed, why = choose_precision(recipe.train.precision, accelerator.device)
    say = accelerator.print                                       # main process only
    main = accelerator.is_main_process
    stamp = {"rows": {s: len(t) for s, t in tables.items()}, "rejected": len(rejects),
             "labels": task.labels, "fingerprint": fingerprint(tables),
             "files": loaded.files, "unused_rows": loaded.unused}  # per file: read = usable + rejected
    if resume:
        old = json.loads((run.path / "data" / "splits.json").read_text())
        if old["fingerprint"] != stamp["fingerprint"]:
            raise datalib.DataError(f"{run.path}: the data changed since this run started; cannot resume exactly")
    say(f"data: {', '.join(f'{s} {n:,}' for s, n in stamp['rows'].items())} rows"
        + (f"; {len(rejects)} rejected, listed in {run.path / 'rejects.jsonl'}" if rejects else ""))

    say(f"precision: {why}; device: {accelerator.device}"
        + (f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""))
    set_seed(recipe.train.seed)
    t0 = time.perf_counter()
    model = task.load_model()
    say(f"model: {recipe.model.name} loaded in {time.perf_counter() - t0:.1f}s")
    if not resume:                              # the data and the model loaded: now the run folder exists
        if main:
            run.path = Run.create(recipe, run.path if named else None).path
            run.write_json("data/splits.json", stamp)
            for split in ("validation", "test"):
                run.write_rows(f"data/{split}.jsonl",
                               [{**r, "_origin": o} for r, o in zip(tables[split].rows, tables[split].origins)],
                               task.path_columns)
            if rejects:
                run.write_rows("rejects.jsonl", [r.as_dict() for r in rejects])
        run.path = Path(broadcast_object_list([str(run.path)])[0])
        accelerator.wait_for_everyone()
    if main and recipe.train.report_to:         # TensorBoard / MLflow mirror the run folder (now that it exists)
        from tunesmith.insight.tracking import callbacks_for

        run.callbacks += callbacks_for(recipe.train, run.path)
    features = {}
    for split, table in tables.items():
        features[split] = task.encode(table.rows)
        if features[split].truncated:
            say(f"{split}: {features[split].truncated:,} of {len(table):,} examples cut at data.max_length="
                f"{task.max_length}")
    model.to(accelerator.device)
    before = None
    if recipe.eval.before and not resume:
        model.eval()
        with torch.no_grad():             # as `tunesmith eval` and the API score it (a task sets its own autocast)
            before = safety.with_backoff(lambda bs: task.evaluate_final(model, tables["test"].rows, features["test"],
                                                                        bs), recipe.eval.batch_size, "evaluation", say)
        if main:
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
    with safety.StopFlag() as flag, cache.active(adapted.model):   # SIGTERM / Ctrl-C: a checkpoint, then
        fit(task, adapted, features["train"], features["validation"], recipe, run, accelerator, mixed,  # Interrupted
            bool(resume), stop_flag=flag)

    model = adapted.model
    if main:
        save_model(task, model, run.model_dir, recipe.adapt.method == "lora")
        final = task.load_trained(run.model_dir).to(accelerator.device).eval()
        with torch.no_grad():
            result = safety.with_backoff(lambda bs: task.evaluate_final(final, tables["test"].rows, features["test"],
                                                                        bs, run.path), recipe.eval.batch_size,
                                         "evaluation", say)
        if before is None and (run.path / "before.json").exists():     # resumed run
            before = json.loads((run.path / "before.json").read_text())
        run.write_json("eval.json", {**result, **({"before": before} if before else {})})
        say(f"after fine-tuning:  {task.summary(result)}")
        say(f"run folder: {run.path}")
        run.end()
    accelerator.wait_for_everyone()
    return run


def save_model(task, model, folder: Path, lora: bool) -> None:
    """HF folder loadable by plain transformers; LoRA runs also keep the adapter in folder/adapter. Written to
    folder.tmp and renamed: `folder` is complete or absent (a full disk leaves no half-written model/)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if lora:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        task.save(model, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        raise safety.disk_error(e, folder, size) from None
