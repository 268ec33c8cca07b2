"""Reading rows from files, keeping where each came from, and splitting them.

Every row carries its origin (`file:line` for text formats, `file#row` for binary ones), and a row that
cannot be read becomes a Reject with that origin and a reason: nothing is dropped without a record.
"""
from __future__ import annotations

import csv
import json
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import TunesmithError


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

    def subset(self, index) -> Table:
        return Table([self.rows[i] for i in index], [self.origins[i] for i in index], [], self.source)


class DataError(TunesmithError):
    """Data that cannot be trained on; the message lists each problem with its origin."""


def position(origin: str) -> int:
    """The line (text formats) or row index (binary ones) in an origin: "a.csv:17" -> 17, "a.parquet#3" -> 3."""
    tail = re.split(r"[:#]", origin)[-1]
    return int(tail) if tail.isdigit() else 0


_NOT_UTF8 = re.compile("[\udc80-\udcff]")        # bytes that surrogateescape could not decode


def _read_csv(path: Path, table: Table, delimiter: str = ",") -> None:
    csv.field_size_limit(sys.maxsize)
    # utf-8-sig: a BOM (Excel export) is not part of the header; surrogateescape: a bad byte rejects its row only
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header row") from None
        _unique_columns(path, header)
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
                end = reader.line_num
                spans = f" (spans lines {start}-{end}: an unclosed quote?)" if end > start else ""
                table.rejects.append(Reject(
                    f"{path}:{start}", f"malformed CSV: {len(values)} fields, header has {len(header)}{spans}"))
                continue
            bad = next((m for v in values for m in _NOT_UTF8.findall(v)), None)
            if bad:
                table.rejects.append(Reject(f"{path}:{start}", f"not valid UTF-8 (byte 0x{ord(bad) - 0xDC00:02x})"))
                continue
            table.rows.append(dict(zip(header, values)))
            table.origins.append(f"{path}:{start}")


def _unique_columns(path, columns: list[str]) -> None:
    """A column name given twice: which value is meant is unknown (readers keep the last); refuse the file."""
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise DataError(f"{path}: column(s) {twice} appear more than once in the header {columns}; rename or "
                        f"remove the duplicates")


def _object(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"key(s) {twice} appear more than once in the object")
    return dict(pairs)


def _read_jsonl(path: Path, table: Table) -> None:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw, object_pairs_hook=_object)
            except (ValueError, UnicodeDecodeError) as e:           # JSONDecodeError is a ValueError
                table.rejects.append(Reject(f"{path}:{n}", f"malformed JSON: {e}"))
                continue
            if not isinstance(row, dict):
                table.rejects.append(Reject(f"{path}:{n}", f"expected a JSON object, got {type(row).__name__}"))
                continue
            table.rows.append(row)
            table.origins.append(f"{path}:{n}")


def _read_parquet(path: Path, table: Table) -> None:
    import pyarrow.parquet as pq

    data = pq.read_table(path)
    _unique_columns(path, data.column_names)
    for i, row in enumerate(data.to_pylist()):
        table.rows.append(row)
        table.origins.append(f"{path}#{i}")


def _read_hf(name: str, split: str, table: Table) -> None:
    try:
        import datasets
    except ImportError:
        raise DataError(f"'{name}' is not a file; reading HF datasets needs: "
                        "pip install 'tunesmith[datasets]'") from None
    try:
        ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name)
    except (OSError, ValueError, ConnectionError) as e:     # not found, offline (DatasetNotFoundError: OSError)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") and not Path(name).exists()
        raise DataError(f"{name}: not a data file or folder, " + (
            "and the hub is offline (HF_HUB_OFFLINE=1): save the dataset where there is a network "
            "(datasets.load_dataset(...).save_to_disk(DIR)) and give that folder, or a .csv/.jsonl/.parquet file"
            if offline else f"and not a dataset that loads ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    images = [c for c, f in ds.features.items() if type(f).__name__ == "Image"]
    for c in images:        # undecoded, kept as a local path or a data: URI, so rows stay JSON (run folder)
        ds = ds.cast_column(c, datasets.Image(decode=False))
    if images:
        from tunesmith.vision import hf_value
    for i, row in enumerate(ds):
        table.rows.append({k: hf_value(v) if k in images and v else v for k, v in row.items()})
        table.origins.append(f"{name}[{split}]#{i}")


def _read_idx(path: Path, table: Table) -> None:
    """IDX files (MNIST format): one row per image {"image": "FILE#i", "label": int}, labels from the
    `*-labels-idx1-*` file beside the images file when present; pixels are read from the file on use."""
    from tunesmith.vision import labels_file, read_idx

    path = path.absolute()
    try:
        images = read_idx(str(path))
        labels_path = labels_file(str(path))
        labels = read_idx(labels_path) if labels_path else None
    except ValueError as e:
        raise DataError(str(e)) from None
    if images.ndim < 3:
        raise DataError(f"{path}: {images.ndim}-D data, not images; give the images file (*-images-idx3-*)")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels):,} labels for the {len(images):,} images of {path}")
    for i in range(len(images)):
        table.rows.append({"image": f"{path}#{i}", **({"label": int(labels[i])} if labels is not None else {})})
        table.origins.append(f"{path}#{i}")


def _read_image_folder(path: Path, table: Table) -> None:
    """One row per image file under a class subfolder: {"image": absolute path, "label": subfolder name}."""
    from tunesmith.vision import IMAGE_SUFFIXES

    root = path.absolute()
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if f.is_dir() or any(part.startswith(".") for part in rel.parts):
            continue                                # hidden files (.DS_Store) are not examples
        if len(rel.parts) == 1:                     # top level: README, LICENSE; an image here has no class
            if f.suffix.lower() in IMAGE_SUFFIXES:
                table.rejects.append(Reject(str(f), "image outside a class subfolder: no label"))
            continue
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            table.rejects.append(Reject(str(f), f"not an image file (suffix '{f.suffix}')"))
            continue
        table.rows.append({"image": str(f), "label": rel.parts[0]})
        table.origins.append(str(f))
    if not table.rows and not table.rejects:
        raise DataError(f"{path}: no images found; an image folder holds one subfolder of images per class")


def _resolve_paths(table: Table, folder: Path, columns) -> None:
    """Relative paths in `columns` become absolute, read relative to `folder` (the data file's own)."""
    for row in table.rows:
        for c in columns:
            v = row.get(c)
            if isinstance(v, str) and v and not v.startswith("data:") and "://" not in v \
                    and not Path(v).is_absolute():
                row[c] = os.path.normpath(folder.absolute() / v)


def _read_tsv(path: Path, table: Table) -> None:
    _read_csv(path, table, delimiter="\t")


READERS = {".csv": _read_csv, ".tsv": _read_tsv, ".jsonl": _read_jsonl, ".json": _read_jsonl,
           ".parquet": _read_parquet}
HF_SAVED = ("dataset_dict.json", "state.json", "dataset_info.json")     # marks a folder from save_to_disk


def read(source: str, split: str = "train", path_columns: tuple[str, ...] = ()) -> Table:
    """Rows of a file, IDX files, an image folder (one subfolder per class), a bundled dataset alias, or a HF
    dataset (name or saved folder; `name:split`). path_columns: relative paths there are read relative to
    the data file (CSV/JSONL/Parquet) and made absolute."""
    from tunesmith.assets.bundled import DATASETS

    if source in DATASETS:
        source = str(DATASETS[source]())
    table = Table(source=source)
    path = Path(source)
    _not_special(source)
    reader = READERS.get(path.suffix.lower())
    if reader and path.is_file():
        reader(path, table)
        _resolve_paths(table, path.parent, path_columns)
    elif reader:
        raise DataError(f"{source}: " + ("a folder, not a file" if path.is_dir() else "file not found"))
    elif re.search(r"idx\d", path.name) and "ubyte" in path.name:
        if not path.is_file():
            raise DataError(f"{source}: file not found")
        _read_idx(path, table)
    elif path.is_dir() and not any((path / f).exists() for f in HF_SAVED):
        _read_image_folder(path, table)
    else:
        name, _, hf_split = source.partition(":")
        _read_hf(name, hf_split or split, table)
    for r in table.rejects:
        r.split = split
    return table


def _not_special(source: str) -> None:
    """A FIFO, socket or device is refused from its stat alone: opening a FIFO would block until a writer came."""
    try:
        mode = os.stat(source).st_mode
    except (OSError, ValueError):                   # missing (or not a path): the readers say what it is
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(f"{source}: not a regular file (a FIFO, socket or device); give a .csv, .jsonl or "
                        f".parquet file, an image folder or a dataset")


def read_for(task, source: str, split: str) -> Table:
    """`source` read as `task` reads it: its own format first (Task.read), else the shared readers above."""
    _not_special(source)
    table = task.read(source, split)
    return table if table is not None else read(source, split, task.path_columns)


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
