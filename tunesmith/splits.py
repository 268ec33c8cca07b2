"""The rows a run uses: every split read, unusable rows rejected with origin and reason, missing splits cut from
train. `train`, `doctor`, `eval` and the Python API all read through here, so they see the same rows."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from tunesmith import data as datalib

SPLITS = ("train", "validation", "test")


@dataclass
class Loaded:
    """The data as train uses it: usable rows per split, every rejected row, and counts per file."""
    tables: dict[str, datalib.Table]
    rejects: list[datalib.Reject]
    files: list[dict]           # per split file: file, split, read, usable, rejected, columns (`counts`)
    unused: int = 0             # usable train rows left out by data.max_rows
    # data.shots: {"shots": K, "from": train rows before sampling, "kept": rows after, "short": {class: rows} for
    # classes with fewer than K}; {} when not sampled
    sampled: dict = field(default_factory=dict)

    def shot_lines(self) -> list[str]:
        return shot_lines(self.sampled, {k: len(t) for k, t in self.tables.items()})


def counts(task, table: datalib.Table, split: str, keep: list[int], rejected: int) -> dict:
    """One split file's counts: {file, split, read, usable, rejected, columns}, read = usable + rejected rows.
    A task whose reader rejects parts of rows (Task.part_unit, e.g. boxes) counts rows without those rejects and
    adds unit (Task.row_unit), part (Task.part_unit) and parts {read, usable, rejected, dropped}: rejected are the
    parts its reader refused (each one line of rejects.jsonl), dropped the parts of rejected rows;
    read = usable + rejected + dropped."""
    columns = sorted({k for row in table.rows[:1000] for k in row})
    if not task.part_unit:
        return {"file": table.source, "split": split, "read": len(table.rows) + len(table.rejects),
                "usable": len(keep), "rejected": rejected, "columns": columns}
    kept = set(keep)
    usable = sum(task.parts(r) for i, r in enumerate(table.rows) if i in kept)
    dropped = sum(task.parts(r) for i, r in enumerate(table.rows) if i not in kept)
    parts = {"read": usable + dropped + len(table.rejects), "usable": usable, "rejected": len(table.rejects),
             "dropped": dropped}
    return {"file": table.source, "split": split, "unit": task.row_unit, "read": len(table.rows),
            "usable": len(keep), "rejected": len(table.rows) - len(keep), "part": task.part_unit, "parts": parts,
            "columns": columns}


def part_totals(task, files: list[dict]) -> dict:
    """data/splits.json's counts for a task with a part_unit (else {}): unit, rejected rows, part, and parts
    {read, usable, rejected, dropped} summed over the files (`counts`)."""
    if not task.part_unit:
        return {}
    parts = {k: sum(f["parts"][k] for f in files) for k in ("read", "usable", "rejected", "dropped")}
    return {"unit": task.row_unit, "rejected": sum(f["rejected"] for f in files), "part": task.part_unit,
            "parts": parts}


def load_splits(task, recipe) -> tuple[dict[str, datalib.Table], list[datalib.Reject]]:
    """(usable rows per split, rejected rows); see `load_data`."""
    loaded = load_data(task, recipe)
    return loaded.tables, loaded.rejects


def load_data(task, recipe) -> Loaded:
    """Read every split, reject unusable rows (with origin and reason), split off what is missing.
    `train` and `tunesmith doctor` both read through here, so they see the same rows."""
    cfg = recipe.data
    tables = {s: datalib.read_for(task, getattr(cfg, s), s) for s in SPLITS if getattr(cfg, s)}
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
        files.append(counts(task, table, split, keep, len(bad)))
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
    sampled = {}
    if task.shots:
        out["train"], sampled = shots(out["train"], [task.stratify_key(r) for r in out["train"].rows], task.shots,
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
    return Loaded(out, rejects, files, unused, sampled)


def shots(table: datalib.Table, labels: list, k: int, seed: int) -> tuple[datalib.Table, dict]:
    """(K rows per label, in file order; what was done: Loaded.sampled). Each class's rows are shuffled by a
    generator seeded with (seed, class), and the first K kept: the same K and seed give the same rows, a larger K
    keeps a smaller K's rows and adds to them, and a class's sample does not depend on the other classes."""
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keep, short = [], {}
    for y in sorted(by_class, key=str):
        rows = by_class[y]
        random.Random(f"{seed}:{y}").shuffle(rows)
        keep += rows[:k]
        if len(rows) < k:
            short[str(y)] = len(rows)
    return table.subset(sorted(keep)), {"shots": k, "seed": seed, "from": len(table), "kept": len(keep),
                                        "short": short}


def shot_lines(sampled: dict, rows: dict[str, int]) -> list[str]:
    """What data.shots did (Loaded.sampled), for the run's output and the doctor: the sample, each short class,
    and that the held-out splits (rows: split -> row count) are untouched; [] when not sampled."""
    if not sampled:
        return []
    s, held = sampled, ", ".join(f"{k} {rows[k]:,}" for k in ("validation", "test") if k in rows)
    return ([f"data.shots: sampled {s['shots']} per class from {s['from']:,} train rows ({s['kept']:,} kept, seed "
             f"{s['seed']}); validation and test rows are not sampled ({held})"]
            + [f"warning: data.shots={s['shots']}: class '{c}' has only {n} train row(s); all of them are used"
               for c, n in s["short"].items()])


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


def load_rows(task, path: str) -> list[dict]:
    """Usable rows of a file (eval); unusable ones are a DataError listing each with its origin."""
    table = datalib.read_for(task, path, "test")
    return _usable(task, table.rows, table.origins, list(table.rejects))


def usable_rows(task, rows: list[dict]) -> list[dict]:
    """The same check for rows given in memory (origin: their position, from 1)."""
    return _usable(task, rows, [f"row {i}" for i in range(1, len(rows) + 1)], [])


def _usable(task, rows, origins, rejects) -> list[dict]:
    out = []
    for row, origin in zip(rows, origins):
        reason = task.check(row, "test")
        if reason:
            rejects.append(datalib.Reject(origin, reason, "test"))
        else:
            out.append(row)
    if rejects:
        raise datalib.DataError(f"{len(rejects)} unusable row(s):\n" + report(rejects))
    return out
