"""recipe -> task -> data -> model + adapt -> fit -> run folder: `tunesmith.train`, the API behind `tunesmith train`."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tunesmith import data as datalib
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
    import os

    import torch

    from tunesmith.device import choose_device, choose_threads

    threads = torch.get_num_threads()
    if choose_device().type == "cpu":
        n, why = choose_threads(recipe.train.threads, int(os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(n)
        if os.environ.get("RANK", "0") == "0":
            print(f"threads: {why}")
    try:
        return _train(recipe, run_dir, resume, callbacks)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, run_dir, resume, callbacks) -> Run:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from transformers import set_seed

    from tunesmith.adapt import adapt
    from tunesmith.device import choose_device, choose_precision
    from tunesmith.doctor_report import rejects_report
    from tunesmith.loop import fit

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
    mixed, why = choose_precision(recipe.train.precision, accelerator.device)
    say = accelerator.print                                       # main process only
    main = accelerator.is_main_process
    if resume:
        run = Run(resume, callbacks, writer=main)
    else:                                                         # every process writes into one folder
        path = broadcast_object_list([str(run_dir or Run.default_path(recipe))])[0]
        run = Run.create(recipe, path, callbacks) if main else Run(path, writer=False)
        accelerator.wait_for_everyone()
    if main and recipe.train.report_to:                           # TensorBoard / MLflow mirror the run folder
        from tunesmith.tracking import callbacks_for

        run.callbacks += callbacks_for(recipe.train, run.path)
    stamp = {"rows": {s: len(t) for s, t in tables.items()}, "rejected": len(rejects),
             "labels": task.labels, "fingerprint": fingerprint(tables),
             "files": loaded.files, "unused_rows": loaded.unused}  # per file: read = usable + rejected
    if resume:
        old = json.loads((run.path / "data" / "splits.json").read_text())
        if old["fingerprint"] != stamp["fingerprint"]:
            raise datalib.DataError(f"{run.path}: the data changed since this run started; cannot resume exactly")
    elif main:
        run.write_json("data/splits.json", stamp)
        for split in ("validation", "test"):
            run.write_rows(f"data/{split}.jsonl",
                           [{**r, "_origin": o} for r, o in zip(tables[split].rows, tables[split].origins)],
                           task.path_columns)
        if rejects:
            run.write_rows("rejects.jsonl", [r.as_dict() for r in rejects])
    say(f"data: {', '.join(f'{s} {n:,}' for s, n in stamp['rows'].items())} rows"
        + (f"; {len(rejects)} rejected, listed in {run.path / 'rejects.jsonl'}" if rejects else ""))

    say(f"precision: {why}; device: {accelerator.device}"
        + (f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""))
    set_seed(recipe.train.seed)
    t0 = time.perf_counter()
    model = task.load_model()
    say(f"model: {recipe.model.name} loaded in {time.perf_counter() - t0:.1f}s")
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
            before = task.evaluate_final(model, tables["test"].rows, features["test"], recipe.eval.batch_size)
        if main:
            run.write_json("before.json", before)
        say(f"before fine-tuning: {task.summary(before)}")

    adapted = adapt(model, recipe.adapt, task.peft_task_type)
    say(f"adapt: {recipe.adapt.method}; {adapted.summary()}")
    set_seed(recipe.train.seed)
    fit(task, adapted, features["train"], features["validation"], recipe, run, accelerator, mixed, bool(resume))

    model = adapted.model
    if main:
        save_model(task, model, run.model_dir, recipe.adapt.method == "lora")
        final = task.load_trained(run.model_dir).to(accelerator.device).eval()
        with torch.no_grad():
            result = task.evaluate_final(final, tables["test"].rows, features["test"], recipe.eval.batch_size,
                                         run.path)
        if before is None and (run.path / "before.json").exists():     # resumed run
            before = json.loads((run.path / "before.json").read_text())
        run.write_json("eval.json", {**result, **({"before": before} if before else {})})
        say(f"after fine-tuning:  {task.summary(result)}")
        say(f"run folder: {run.path}")
        run.end()
    accelerator.wait_for_everyone()
    return run


def save_model(task, model, folder: Path, lora: bool) -> None:
    """HF folder loadable by plain transformers; LoRA runs also keep the adapter in folder/adapter."""
    if lora:
        model.save_pretrained(folder / "adapter")
        model = model.merge_and_unload()
    task.save(model, folder)
