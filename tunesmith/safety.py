"""What keeps a run from losing work or reporting something wrong: the run folder's lock,
SIGTERM/Ctrl-C turned into a checkpoint and a clean exit, out-of-memory back-off, disk-full messages.
docs/faults.md lists every fault scenario, what happens, and the test that shows it."""
from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from pathlib import Path

from tunesmith import io
from tunesmith.errors import TunesmithError


class Interrupted(TunesmithError):
    """SIGTERM or Ctrl-C: a checkpoint was committed; the CLI prints the message and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# --- the run folder's lock ----------------------------------------------------------------------------

LOCK = ".tunesmith.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                 # exists, owned by someone else
        return True
    return True


def claim(folder: Path) -> bool:
    """Create `folder`'s lock file for this process; False when it exists (atomic: O_EXCL)."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:                       # O_EXCL is the claim: written in place, not renamed
        f.write(io.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return True


def acquire(folder: Path) -> Path:
    """Take `folder`'s lock (a file holding {pid, host}); a lock left by a dead process on this host is taken
    over. Raise when a live process holds it."""
    path = Path(folder) / LOCK
    for _ in range(2):
        if not claim(folder):
            try:                                # empty or torn: being written by its claimer
                owner = io.parse_line(path.read_text()) or {}
            except OSError:
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if pid == os.getpid() and host == socket.gethostname():
                return path                 # this process already holds it
            if isinstance(pid, int) and host == socket.gethostname() and not _alive(pid):
                print(f"{folder}: taking over the lock of process {pid}, which is no longer running")
                path.unlink(missing_ok=True)
                continue
            who = f"process {pid} on {host}" if pid else "another process"
            raise TunesmithError(f"{folder} is in use by {who} (lock file {path}); wait for it to finish, or "
                                 f"delete the lock file if that process is gone")
        return path
    raise TunesmithError(f"{folder}: could not take the lock {path}")


def release(folder: Path) -> None:
    path = Path(folder) / LOCK
    try:
        if (io.parse_line(path.read_text()) or {}).get("pid") == os.getpid():
            path.unlink()
    except (OSError, AttributeError):
        pass


# --- signals --------------------------------------------------------------------------------------------

class StopFlag:
    """SIGTERM and SIGINT set `signal` (the first one's number) instead of killing the process; the loop checks
    it after each optimizer step, commits a checkpoint and stops. A second signal stops at once (no checkpoint).
    Outside the main thread (signal handlers cannot be set there) it does nothing."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signal is not None:                      # second signal: the user insists
            self.restore()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (a checkpoint is written first; "
              f"send it again to stop at once)", flush=True)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self.restore()


def interrupted(signum: int, step: int, run_path) -> Interrupted:
    return Interrupted(f"interrupted at step {step}; resume with: tunesmith train --resume {run_path}",
                       128 + signum)


# --- out of memory ---------------------------------------------------------------------------------------

def is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), and a CPU allocation that fails (a RuntimeError from the allocator)."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_backoff(fn, batch_size: int, what: str, say=print):
    """fn(batch_size), halving batch_size after each out-of-memory error, down to 1; returns fn's result."""
    while True:
        try:
            return fn(batch_size)
        except Exception as e:
            if not is_oom(e) or batch_size <= 1:
                if is_oom(e):
                    raise TunesmithError(f"out of memory in {what} even at batch size 1: {e}") from None
                raise
        free_memory()
        say(f"out of memory in {what} at batch size {batch_size}: retrying at {batch_size // 2} "
            f"(only {what} uses the smaller batch)")
        batch_size //= 2


# --- disk ---------------------------------------------------------------------------------------------

def disk_error(e: OSError, path: Path, needed: int) -> TunesmithError:
    """One line for a failed write: disk full (with the space needed and free) or another OS error."""
    import shutil

    try:
        free = shutil.disk_usage(next(p for p in [Path(path), *Path(path).parents] if p.exists())).free
    except (OSError, StopIteration):
        free = -1
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TunesmithError(f"disk full writing {path}: it needs about {needed / 2**20:,.0f} MiB, "
                              f"{max(free, 0) / 2**20:,.0f} MiB free; free some space and resume "
                              f"(the previous checkpoints are intact)")
    return TunesmithError(f"cannot write {path}: {e.strerror or e}")


def check_space(path: Path, needed: int) -> None:
    """OSError(ENOSPC) before writing `needed` bytes into the folder `path` when its file system has less free."""
    import shutil

    if shutil.disk_usage(path).free < needed:
        raise OSError(errno.ENOSPC, "No space left on device")
