"""Where and in what precision a model runs: one place for the choice and its reason (train, eval, predict, serve)."""
from __future__ import annotations

import torch


def choose_device(asked: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU; otherwise as asked ("cpu", "cuda", "cuda:1", "mps")."""
    if asked == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(asked)


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
