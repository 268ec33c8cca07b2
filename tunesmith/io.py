"""Files the way every part of tunesmith writes and reads them: atomically, as valid JSON, and readable after a crash.

- atomic_write / atomic_folder: a file or folder is complete or absent (written beside, fsynced, renamed), so a
  full disk or a kill never leaves something that looks finished. Hand-written because neither the standard
  library nor our dependencies offer a folder-level rename with cleanup.
- dumps / write_json: JSON has no NaN or Infinity; they become null, and `say` is told which keys.
- read_jsonl / append_jsonl: one JSON object a line; a line cut short by a crash (the last, or any) is skipped.
- table: plain-text columns (full names, no truncation) for the terminal and for pipes alike.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it (fsynced, then renamed over `path`). On an
    OSError (full disk, read-only folder) the temporary file is removed and the error raised; `path` is untouched."""
    path = Path(path)
    if path.is_dir():                                   # os.replace would say so of the temporary file's name
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file: give a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_folder(path: str | Path, keep_existing: bool = False):
    """`with atomic_folder(folder) as tmp:` write into `tmp`; on success `tmp` replaces `folder` (an old one is
    removed first), on any error `tmp` is removed and `folder` stays as it was.
    keep_existing: a non-empty `folder` present when the writing is done (another process finished first) is
    kept and `tmp` discarded, so a reader of that folder never sees it removed (shared caches)."""
    path = Path(path)
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if keep_existing:
            try:
                os.replace(tmp, path)                   # refused when `path` is a folder with files in it
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def first_missing(path: str | Path) -> Path | None:
    """The topmost folder of `path` (itself included) that does not exist: what `mkdir(parents=True)` makes, so
    that a command which fails can remove exactly what it made (None: `path` exists)."""
    path = Path(path)
    return next((p for p in reversed([path, *path.parents]) if not p.exists()), None)


def finite(obj, where: str = "") -> tuple[object, list[str]]:
    """(obj with every NaN/inf float replaced by None, the dotted keys where that happened)."""
    bad: list[str] = []

    def walk(x, path):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(path or "value")
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        return x

    return walk(obj, where), bad


def _say_bad(bad: list[str], say, name: str) -> None:
    if bad and say:
        say(f"warning: {name + ': ' if name else ''}{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
            f"not a finite number; written as null")


def dumps(obj, say=None, name: str = "", **kw) -> str:
    """json.dumps that writes null for NaN/inf (and says which keys through `say`); never invalid JSON."""
    clean, bad = finite(obj)
    _say_bad(bad, say, name)
    return json.dumps(clean, allow_nan=False, **kw)


def write_json(path: str | Path, obj, say=None, indent: int | None = 2) -> Path:
    """`obj` as JSON in `path`, atomically; NaN/inf become null (named through `say`)."""
    return atomic_write(path, dumps(obj, say, Path(path).name, indent=indent, default=str) + "\n")


def read_json(path: str | Path, default=None):
    """The JSON in `path`, or `default` when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def parse_line(line: str) -> dict | None:
    """One JSONL line as a dict, or None for a blank or partly written one."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every readable record of a JSONL file, in order ([] when absent); blank and torn lines are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    return [r for r in map(parse_line, path.read_text().splitlines()) if r is not None]


def append_jsonl(path: str | Path, record: dict, say=None) -> None:
    """Append one record (NaN-safe) as a line of its own."""
    with open(path, "a") as f:
        f.write(dumps(record, say, Path(path).name, default=str) + "\n")


def write_jsonl(path: str | Path, records, say=None) -> Path:
    """Records as a JSONL file, atomically; NaN/inf become null, named once for the file through `say`
    ("[row].key")."""
    clean, bad = finite(list(records))
    _say_bad(bad, say, Path(path).name)
    return atomic_write(path, "".join(json.dumps(r, allow_nan=False, default=str) + "\n" for r in clean))


def cell(value, digits: int = 4) -> str:
    """How a table shows one value: floats to `digits` places (3 significant digits when smaller), ints with
    thousands separators, None as "-"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):                 # small values (learning rates) keep 3 significant digits
        return f"{value:.3g}" if 0 < abs(value) < 10 ** (1 - digits) else f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list], digits: int = 4, indent: str = "") -> str:
    """Plain-text columns: full header names, every value whole (no "..."), numbers right-aligned, text left.
    The same text on a terminal and in a pipe; a wide table is wide rather than squeezed."""
    cells = [[cell(v, digits) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)]) for i, h in enumerate(header)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows if i < len(row)) and rows
               for i in range(len(header))]

    def line(values):
        return indent + "  ".join((v.rjust(w) if num else v.ljust(w))
                                  for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(header)] + [line(r) for r in cells])
