"""recipe -> task -> data -> model + adapt -> fit -> run folder. The Python API behind `tunesmith train`."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith import data as datalib
from tunesmith.recipe import Recipe
from tunesmith.run import Run
from tunesmith.tasks import get_task

SPLITS = ("train", "validation", "test")


@dataclass
class Loaded:
    """The data as train uses it: usable rows per split, every rejected row, and counts per file."""
    tables: dict[str, datalib.Table]
    rejects: list[datalib.Reject]
    files: list[dict]           # per split file: file, split, read, usable, rejected, columns; read = usable + rejected
    unused: int = 0             # usable train rows left out by data.max_rows


def load_splits(task, recipe: Recipe) -> tuple[dict[str, datalib.Table], list[datalib.Reject]]:
    """(usable rows per split, rejected rows); see `load_data`."""
    loaded = load_data(task, recipe)
    return loaded.tables, loaded.rejects


def load_data(task, recipe: Recipe) -> Loaded:
    """Read every split, reject unusable rows (with origin and reason), split off what is missing.
    `train` and `tunesmith doctor` both read through here, so they see the same rows."""
    cfg = recipe.data
    tables = {s: datalib.read(getattr(cfg, s), s, task.path_columns) for s in SPLITS if getattr(cfg, s)}
    rejects, files = [], []

    def usable(table: datalib.Table, split: str) -> datalib.Table:
        keep, bad = [], list(table.rejects)
        for i, row in enumerate(table.rows):
            reason = task.check(row, split)
            if reason:
                bad.append(datalib.Reject(table.origins[i], reason, split))
            else:
                keep.append(i)
        bad.sort(key=lambda r: datalib.position(r.origin))        # file order: reader and task rejects merged
        rejects.extend(bad)
        files.append({"file": table.source, "split": split, "read": len(table.rows) + len(table.rejects),
                      "usable": len(keep), "rejected": len(bad),
                      "columns": sorted({k for row in table.rows[:1000] for k in row})})
        return table.subset(keep)

    train = usable(tables["train"], "train")
    if not train.rows:
        raise datalib.DataError(f"{cfg.train}: no usable training rows\n" + report(rejects))
    task.prepare(train.rows)
    out, total = {"train": train}, len(train)
    for split in ("validation", "test"):
        if split in tables:
            out[split] = usable(tables[split], split)
        else:
            keys = [task.stratify_key(r) for r in out["train"].rows]
            size = cfg.validation_size if split == "validation" else cfg.test_size
            size = size if size >= 1 else round(size * total)         # fractions of the whole file
            out["train"], out[split] = datalib.split_off(out["train"], size, keys if keys[0] is not None else None,
                                                         recipe.train.seed)
    unused = 0
    if cfg.max_rows and len(out["train"]) > cfg.max_rows:
        keys = [task.stratify_key(r) for r in out["train"].rows]
        unused = len(out["train"]) - cfg.max_rows
        out["train"] = datalib.split_off(out["train"], cfg.max_rows, keys if keys[0] is not None else None,
                                         recipe.train.seed)[1]
    for split in ("validation", "test"):
        if cfg.max_eval_rows and len(out[split]) > cfg.max_eval_rows:
            keys = [task.stratify_key(r) for r in out[split].rows]
            out[split] = datalib.split_off(out[split], cfg.max_eval_rows, keys if keys[0] is not None else None,
                                           recipe.train.seed)[1]
    return Loaded(out, rejects, files, unused)


def report(rejects: list[datalib.Reject], limit: int = 20) -> str:
    lines = [f"  {r.origin}: {r.reason}" for r in rejects[:limit]]
    if len(rejects) > limit:
        lines.append(f"  ... and {len(rejects) - limit} more")
    return "\n".join(lines)


def fingerprint(tables: dict[str, datalib.Table]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        if split in tables:
            h.update(json.dumps([split, tables[split].rows], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: str | Path | None = None) -> Run:
    """Fine-tune as the recipe says; return the run folder. `resume`: continue that run."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list
    from transformers import set_seed

    from tunesmith.adapt import adapt
    from tunesmith.loop import choose_precision, fit

    task = get_task(recipe)
    if recipe.adapt.method is None:
        recipe.adapt.method = task.default_method       # written to the run's recipe.yaml resolved
    loaded = load_data(task, recipe)                    # the doctor's row checks: every reject has file:line
    tables, rejects = loaded.tables, loaded.rejects
    if rejects and recipe.data.bad_rows == "error":
        from tunesmith.doctor import rejects_report
        raise datalib.DataError(rejects_report(loaded, recipe.doctor.listed))
    empty = [f"{s} ({getattr(recipe.data, s)})" for s, t in tables.items() if not len(t)]
    if empty:
        raise datalib.DataError(f"no usable rows in {', '.join(empty)}; every row was rejected:\n" + report(rejects))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    AcceleratorState._reset_state()       # accelerate keeps one precision per process; each train() sets its own
    accelerator = Accelerator(mixed_precision=choose_precision(recipe.train.precision, device)[0],
                              cpu=device.type == "cpu")           # cpu=True lets torchrun give MULTI_CPU (gloo)
    say = accelerator.print                                       # main process only
    if resume:
        run = Run(resume)
    else:                                                         # every process writes into one folder
        path = broadcast_object_list([str(run_dir or Run.default_path(recipe))])[0]
        run = Run.create(recipe, path) if accelerator.is_main_process else Run(path)
        accelerator.wait_for_everyone()
    stamp = {"rows": {s: len(t) for s, t in tables.items()}, "rejected": len(rejects),
             "labels": getattr(task, "names", None), "fingerprint": fingerprint(tables),
             "files": loaded.files, "unused_rows": loaded.unused}  # per file: read = usable + rejected
    if resume:
        old = json.loads((run.path / "data" / "splits.json").read_text())
        if old["fingerprint"] != stamp["fingerprint"]:
            raise datalib.DataError(f"{run.path}: the data changed since this run started; cannot resume exactly")
    elif accelerator.is_main_process:
        run.write_json("data/splits.json", stamp)
        for split in ("validation", "test"):
            run.write_rows(f"data/{split}.jsonl",
                           [{**r, "_origin": o} for r, o in zip(tables[split].rows, tables[split].origins)])
        if rejects:
            run.write_rows("rejects.jsonl", [r.as_dict() for r in rejects])
    say(f"data: {', '.join(f'{s} {n:,}' for s, n in stamp['rows'].items())} rows"
        + (f"; {len(rejects)} rejected, listed in {run.path / 'rejects.jsonl'}" if rejects else ""))

    say(f"precision: {choose_precision(recipe.train.precision, accelerator.device)[1]}; device: {accelerator.device}"
        + (f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""))
    set_seed(recipe.train.seed)
    t0 = time.perf_counter()
    model, processor = task.load_model()
    say(f"model: {recipe.model.name} loaded in {time.perf_counter() - t0:.1f}s")
    features = {}
    for split, table in tables.items():
        features[split] = task.encode(table.rows)
        if getattr(task, "truncated", 0):
            say(f"{split}: {task.truncated:,} of {len(table):,} examples cut at data.max_length="
                f"{recipe.data.max_length}")
    model.to(accelerator.device)
    before = None
    if recipe.eval.before and not resume:
        model.eval()
        with torch.no_grad():
            before = task.evaluate_final(model, tables["test"].rows, features["test"], recipe.eval.batch_size)
        if accelerator.is_main_process:
            run.write_json("before.json", before)
        say(f"before fine-tuning: {summary(before)}")

    adapted = adapt(model, recipe.adapt, task.peft_task_type)
    say(f"adapt: {recipe.adapt.method}; {adapted.summary()}")
    set_seed(recipe.train.seed)
    fit(task, adapted, features["train"], features["validation"], recipe, run, accelerator, resume=bool(resume))

    model = adapted.model
    if accelerator.is_main_process:
        save_model(task, model, processor, run.model_dir, recipe.adapt.method == "lora")
        final = task.load_trained(run.model_dir)[0].to(accelerator.device).eval()
        with torch.no_grad():
            result = task.evaluate_final(final, tables["test"].rows, features["test"], recipe.eval.batch_size,
                                         run.path)
        if before is None and (run.path / "before.json").exists():     # resumed run
            before = json.loads((run.path / "before.json").read_text())
        run.write_json("eval.json", {**result, **({"before": before} if before else {})})
        say(f"after fine-tuning:  {summary(result)}")
        say(f"run folder: {run.path}")
    return run


def save_model(task, model, processor, folder: Path, lora: bool) -> None:
    """HF folder loadable by plain transformers; LoRA runs also keep the adapter in folder/adapter."""
    if lora:
        model.save_pretrained(folder / "adapter")
        model = model.merge_and_unload()
    task.save(model, processor, folder)


def summary(metrics: dict) -> str:
    keys = [k for k in ("accuracy", "f1_macro", "loss", "perplexity", "exact_match") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def load_rows_for_eval(task, run: Run, path: str | None) -> list[dict]:
    """Usable rows of `path` (default: the run's own test split); unusable ones are an error."""
    table = datalib.read(path or str(run.path / "data" / "test.jsonl"), "test", task.path_columns)
    rejects = list(table.rejects)
    rows = []
    for row, origin in zip(table.rows, table.origins):
        reason = task.check(row, "test")
        if reason:
            rejects.append(datalib.Reject(origin, reason, "test"))
        else:
            rows.append(row)
    if rejects:
        raise datalib.DataError(f"{len(rejects)} unusable row(s):\n" + report(rejects))
    return rows
