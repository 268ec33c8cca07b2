"""A throwaway PostgreSQL server for the shared-study test (stdlib only; .ci/run starts one with it too).

    python3 tests/pgserver.py start DIR   -> prints postgresql://postgres@127.0.0.1:PORT/tunesmith
    python3 tests/pgserver.py stop DIR
As root the server runs as the `postgres` user (initdb refuses root). Needs Debian's `postgresql` package.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin): apt-get install postgresql")
    return Path(found[-1]).parent


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("runuser"):
        raise RuntimeError("running as root without runuser: cannot start PostgreSQL as the postgres user")
    return ["runuser", "-u", "postgres", "--", *cmd]


def start(root: str | Path) -> str:
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    bindir, data = _bindir(), root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd):
        out = subprocess.run(_as_owner([str(c) for c in cmd]), capture_output=True, text=True, cwd=root)
        if out.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed: {out.stderr.strip() or out.stdout.strip()}")

    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "tunesmith")
    return f"postgresql://postgres@127.0.0.1:{port}/tunesmith"


def stop(root: str | Path) -> None:
    data = Path(root).resolve() / "data"
    if data.exists():
        subprocess.run(_as_owner([str(_bindir() / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, cwd=Path(root).resolve())


if __name__ == "__main__":
    action, folder = sys.argv[1], sys.argv[2]
    if action == "start":
        print(start(folder))
    else:
        stop(folder)
