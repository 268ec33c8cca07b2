"""CoNLL files for the token-classification task: one token a line with its tag, a blank line between sentences.
Apart from tagging.py (the recipe and tag rules), which must stay light enough to read a recipe without torch:
this module reads files into tunesmith.data Tables."""
from __future__ import annotations

from pathlib import Path

from tunesmith.data import DataError, Reject, Table
from tunesmith.tasks.tagging import CONLL_SUFFIXES, TokenClassificationData

__all__ = ["CONLL_SUFFIXES", "read_conll"]


def _column(spec: int | str, names: list[str] | None, width: int, key: str, path) -> int:
    if names is not None and len(names) != width:
        raise DataError(f"{path}: data.conll_columns names {len(names)} columns, the lines have {width}")
    index = names.index(spec) if isinstance(spec, str) else spec
    if not -width <= index < width:
        raise DataError(f"{path}: data.{key} is {spec}, the lines have {width} columns")
    return index % width


def read_conll(path: str | Path, cfg: TokenClassificationData) -> Table:
    """Sentences of a CoNLL file as {tokens_column, tags_column} rows, origin FILE:LINE of their first word.
    A line is split on tabs when it has one, else on blanks; a blank line ends a sentence; -DOCSTART- lines
    are skipped. A sentence with a line whose column count differs from the file's first word line (a word
    without its tag) or with bytes that are not UTF-8 is a Reject at that line."""
    path = Path(path)
    table = Table(source=str(path))
    width = word = tag = None
    tokens, tags, start, problem = [], [], 0, None

    def flush():
        nonlocal tokens, tags, problem
        if problem:
            table.rejects.append(Reject(f"{path}:{problem[0]}", problem[1]))
        elif tokens:
            table.rows.append({cfg.tokens_column: tokens, cfg.tags_column: tags})
            table.origins.append(f"{path}:{start}")
        tokens, tags, problem = [], [], None

    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            fields = line.split("\t") if "\t" in line else line.split()
            if not line.strip() or fields[0] == "-DOCSTART-":
                flush()
                continue
            if width is None:
                width = len(fields)
                word = _column(cfg.conll_token, cfg.conll_columns, width, "conll_token", path)
                tag = _column(cfg.conll_tag, cfg.conll_columns, width, "conll_tag", path)
            if not tokens and not problem:
                start = n
            if problem:
                continue
            if len(fields) != width:
                problem = (n, f"{len(fields)} column(s) where the file has {width}: a token without its tag, or "
                              f"a tag without its token")
            elif any("\udc80" <= c <= "\udcff" for c in line):
                problem = (n, "not valid UTF-8")
            else:
                tokens.append(fields[word].strip())
                tags.append(fields[tag].strip())
    flush()
    if width is None:
        raise DataError(f"{path}: no token lines (CoNLL: one token a line with its tag, a blank line between "
                        f"sentences)")
    return table
