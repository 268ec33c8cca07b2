"""Reading rows from files, keeping where each came from, and splitting them.

Every row carries its origin (`file:line` for text formats, `file#row` for binary ones), and a row that
cannot be read becomes a Reject with that origin and a reason: nothing is dropped without a record.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Reject:
    origin: str          # "reviews.csv:17" (line) or "data.parquet#16" (row index)
    reason: str
    split: str = ""

    def as_dict(self) -> dict:
        return {"origin": self.origin, "split": self.split, "reason": self.reason}


@dataclass
class Table:
    """Rows of one split; origins[i] says where rows[i] came from."""
    rows: list[dict] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, index) -> "Table":
        return Table([self.rows[i] for i in index], [self.origins[i] for i in index], [], self.source)


class DataError(Exception):
    """Data that cannot be trained on; the message lists each problem with its origin."""


def _read_csv(path: Path, table: Table) -> None:
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header row") from None
        while True:
            start = reader.line_num + 1             # a quoted field may span lines: report the first
            try:
                values = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as e:
                table.rejects.append(Reject(f"{path}:{start}", f"malformed CSV: {e}"))
                continue
            if not values:
                continue                            # blank line, not a row
            if len(values) != len(header):
                table.rejects.append(Reject(
                    f"{path}:{start}", f"malformed CSV: {len(values)} fields, header has {len(header)}"))
                continue
            table.rows.append(dict(zip(header, values)))
            table.origins.append(f"{path}:{start}")


def _read_jsonl(path: Path, table: Table) -> None:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                table.rejects.append(Reject(f"{path}:{n}", f"malformed JSON: {e}"))
                continue
            if not isinstance(row, dict):
                table.rejects.append(Reject(f"{path}:{n}", f"expected a JSON object, got {type(row).__name__}"))
                continue
            table.rows.append(row)
            table.origins.append(f"{path}:{n}")


def _read_parquet(path: Path, table: Table) -> None:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist()):
        table.rows.append(row)
        table.origins.append(f"{path}#{i}")


def _read_hf(name: str, split: str, table: Table) -> None:
    try:
        import datasets
    except ImportError:
        raise DataError(f"'{name}' is not a file; reading HF datasets needs: pip install 'tunesmith[datasets]'") from None
    ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    for i, row in enumerate(ds):
        table.rows.append(dict(row))
        table.origins.append(f"{name}[{split}]#{i}")


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_parquet}


def read(source: str, split: str = "train") -> Table:
    """Rows of a file, a bundled dataset alias, or a HF dataset (name or saved folder; `name:split`)."""
    from tunesmith.assets import DATASETS

    if source in DATASETS:
        source = str(DATASETS[source]())
    table = Table(source=source)
    path = Path(source)
    reader = READERS.get(path.suffix.lower())
    if reader and path.is_file():
        reader(path, table)
    elif reader:
        raise DataError(f"{source}: file not found")
    else:
        name, _, hf_split = source.partition(":")
        _read_hf(name, hf_split or split, table)
    for r in table.rejects:
        r.split = split
    return table


def split_off(table: Table, size: float, labels: list | None, seed: int) -> tuple[Table, Table]:
    """Split `size` (fraction <1 or count >=1) rows off `table`, stratified by `labels` when given."""
    from sklearn.model_selection import train_test_split

    n = len(table)
    count = int(size) if size >= 1 else round(size * n)
    if count <= 0 or count >= n:
        raise DataError(f"{table.source}: cannot split {count} of {n} rows off for evaluation")
    stratify = labels
    if labels is not None:
        counts = {}
        for y in labels:
            counts[y] = counts.get(y, 0) + 1
        if min(counts.values()) < 2 or count < len(counts):
            stratify = None                         # too few rows per class to stratify
    keep, held = train_test_split(list(range(n)), test_size=count, random_state=seed, stratify=stratify)
    return table.subset(sorted(keep)), table.subset(sorted(held))
