"""Where and in what precision a model runs: one place for the choice and its reason (train, eval, predict, serve)."""
from __future__ import annotations

import math
import os
import statistics
import time

import torch

from tunesmith.errors import TunesmithError


def choose_device(asked: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU; otherwise as asked ("cpu", "cuda", "cuda:1", "mps")."""
    if asked == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(asked)
    except RuntimeError:
        raise TunesmithError(f"--device {asked[:40]}: not a device; give auto, cpu, cuda, cuda:N or mps") from None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return set()


def choose_precision(asked: str, device: torch.device) -> tuple[str, str]:
    """("no" | "bf16" | "fp16", why). bf16 only where the hardware computes it natively: on AVX2-only CPUs bf16
    autocast trains ~20x slower than fp32."""
    if asked == "fp32":
        return "no", "fp32 (recipe)"
    if asked in ("bf16", "fp16"):
        return asked, f"{asked} (recipe)"
    if device.type == "cuda":
        return ("bf16", "bf16 (GPU supports it)") if torch.cuda.is_bf16_supported() else ("no", "fp32")
    if {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return "bf16", "bf16 (CPU has native bf16: avx512_bf16/amx_bf16)"
    return "no", "fp32 (CPU lacks native bf16)"


def autocast(device: torch.device, mixed: str):
    """torch.autocast for a choose_precision() value ("no": a disabled context)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _cgroup_cores() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max or v1 cfs quota), or None when unlimited."""
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", lambda t: [t.strip(), open(
                            "/sys/fs/cgroup/cpu/cpu.cfs_period_us").read().strip()])):
        try:
            with open(path) as f:
                quota, period = parse(f.read())
        except (OSError, ValueError):
            continue
        if quota not in ("max", "-1") and float(period) > 0:
            return float(quota) / float(period)
    return None


def busy_elsewhere(samples: int = 5, interval: float = 0.02) -> float:
    """How many other threads are runnable right now: /proc/loadavg's running count less this one, the median
    of a few samples (instantaneous, unlike the load averages, which also count this process's own past work)."""

    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        time.sleep(interval)
    return float(statistics.median(counts))


def choose_threads(asked: int | None, processes: int = 1) -> tuple[int, str]:
    """(torch threads for one training process, why). Threads beyond the cores this process may use, or onto
    cores another process keeps busy, stall each other (measured 40x slower per step with two threads on two
    cores shared with a busy process): so the cores this process may run on (affinity, cgroup quota), less the
    ones other processes keep busy right now, shared among this run's processes."""
    if asked:
        return asked, f"{asked} (train.threads)"

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cores()
    cores = min(usable, max(1, math.floor(quota))) if quota else usable
    others = busy_elsewhere()
    n = max(1, (cores - round(others)) // max(processes, 1))
    why = (f"{n} of {cores} core(s) (affinity {usable}" + (f", cgroup quota {quota:g}" if quota else "")
           + f", {others:g} busy elsewhere" + (f", {processes} processes" if processes > 1 else "")
           + "; train.threads overrides)")
    return n, why


def check_sharding(device: torch.device) -> None:
    """Refuse FSDP (`accelerate launch --use_fsdp`, which sets ACCELERATE_USE_FSDP) on a CPU: accelerate enters FSDP
    only for GPU-type process groups, so there a CPU launch is silently plain DDP (fsdp_version 2) or fails in its
    plugin (fsdp_version 1: sync_module_states "not supported on cpu"), though torch itself shards on gloo."""
    if device.type == "cpu" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        import accelerate

        raise TunesmithError(f"FSDP needs GPUs: accelerate {accelerate.__version__} shards only on GPU-type devices "
                             "(on CPU it would run plain DDP or fail); on CPU run "
                             "`torchrun --nproc_per_node N -m tunesmith train ...` (DDP, gloo)")
