"""A study's storage for `tunesmith search --storage URL`: the URL as SQLAlchemy takes it, and one line for a
storage that cannot be opened (a malformed URL, a missing driver, a server that does not answer, an SQLite file in a
missing folder). Error messages never show a password."""
from __future__ import annotations

import re
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.recipe import QUOTE, UsageError


def storage_url(storage: str | None, folder: Path) -> str:
    if storage is None:
        return f"sqlite:///{(folder / 'study.db').resolve()}"
    if storage.startswith(("postgresql://", "postgres://")):      # psycopg 3, the driver the extra installs
        return "postgresql+psycopg://" + storage.split("://", 1)[1]
    return storage


def shown(storage: str) -> str:
    """A storage URL as an error message quotes it: no password, at most ~200 characters."""
    text = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", storage)
    return text if len(text) <= QUOTE else text[:QUOTE] + "..."


def storage_error(storage: str | None, url: str, e: Exception) -> TunesmithError:
    """One line for a study storage that cannot be opened: a malformed URL (exit 2), a missing driver, a server
    that does not answer, an SQLite file in a folder that does not exist (exit 1)."""
    from sqlalchemy.exc import ArgumentError

    what = f"--storage {shown(storage)}" if storage else f"the study's storage {url}"
    orig = getattr(e, "orig", None) or e
    detail = (str(orig).strip().splitlines() or [type(orig).__name__])[0][:QUOTE]
    if isinstance(e, (ArgumentError, ValueError)):
        return UsageError(f"{what}: not a database URL ({detail}); give e.g. postgresql://user@host:5432/db or "
                          f"sqlite:///path/study.db, or drop --storage for study.db in the study folder")
    if isinstance(e, ImportError):
        return TunesmithError(f"{what}: no database driver for it is installed ({detail}); postgresql:// needs "
                              f"pip install 'tunesmith[search]'")
    if url.startswith("sqlite:///"):
        parent = Path(url.removeprefix("sqlite:///")).parent
        if not parent.is_dir():
            return TunesmithError(f"{what}: cannot open the database file: the folder {parent} does not exist; "
                                  f"create it or give another path")
    return TunesmithError(f"{what}: cannot open it ({detail}); check the host, port, database name and "
                          f"credentials, and that the server runs")
