"""Checkpoints that resume bit for bit, stored without pickle, written atomically.

A checkpoint folder holds:
  model.safetensors      parameters that can train, and every buffer
  optimizer.safetensors  optimizer tensors (exp_avg, exp_avg_sq, step), keys "state.<param>.<name>"
  rng.safetensors        torch CPU / CUDA generator states, numpy's key
  state.json             step, epoch, position, scheduler, python/numpy RNG scalars, optimizer groups
  COMMITTED              written last: {"step", "sha256": {file: hex digest}}; a folder without it is incomplete
                         and never loaded, one whose files do not match it is damaged and skipped
Writing goes to "<name>.tmp", every file is fsynced, the folder is renamed, then COMMITTED is written (itself
atomically, tunesmith.io). The folder protocol stays here: io.atomic_folder neither fsyncs each file nor names
its temporary folder "<name>.tmp", which `damage` recognises and the next save clears.
A full disk is one line naming the folder and the space needed; the previous checkpoints stay as they were.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith import io, safety

MARKER = "COMMITTED"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (incomplete, a file missing, changed or unreadable), or None.
    Checkpoints written before checksums existed (COMMITTED holds only the step) are checked for presence."""
    folder = Path(folder)
    if folder.name.endswith(".tmp"):
        return "interrupted while being written (temporary folder)"
    if not (folder / MARKER).exists():
        return f"no {MARKER} marker, the write did not finish"
    try:
        sums = io.read_json(folder / MARKER).get("sha256", {})
    except (ValueError, AttributeError, OSError):
        sums = {}                                    # an older checkpoint: its marker holds the step alone
    for name in sums or ["model.safetensors", "state.json"]:
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if sums and sha256(f) != sums[name]:
            return f"{name} does not match its checksum (damaged or changed after it was written)"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _write_json(obj, path: Path) -> None:
    path.write_text(io.dumps(obj, print, path.name, indent=1))    # inside the temporary folder: atomic with it


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) capturing python, numpy, torch and CUDA generators."""
    version, mt, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(key.astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return tensors, {"python": [version, list(mt), gauss], "numpy": [kind, pos, has_gauss, cached]}


def set_rng_state(tensors: dict, scalars: dict) -> None:
    version, mt, gauss = scalars["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save(folder: Path, model_state: dict, optimizer, scheduler, state: dict) -> Path:
    """Write a complete checkpoint to `folder` atomically; return the folder.
    optimizer=None writes weights and state only (the best-so-far copy)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    opt = optimizer.state_dict() if optimizer else {"state": {}, "param_groups": []}
    needed = sum(v.numel() * v.element_size() for v in model_state.values()) + sum(
        v.numel() * v.element_size() for s in opt["state"].values() for v in s.values() if torch.is_tensor(v))
    needed += 1 << 20                                # state.json, RNG states
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        safety.check_space(tmp.parent, needed)
        return _write(folder, tmp, model_state, opt, optimizer, scheduler, state)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise safety.disk_error(e, folder, needed) from None


def _write(folder: Path, tmp: Path, model_state: dict, opt: dict, optimizer, scheduler, state: dict) -> Path:
    tmp.mkdir(parents=True)
    _save_tensors(model_state, tmp / "model.safetensors")
    if optimizer:
        _save_tensors({f"state.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()
                       if torch.is_tensor(v)}, tmp / "optimizer.safetensors")
    rng_tensors, rng_scalars = rng_state()
    _save_tensors(rng_tensors, tmp / "rng.safetensors")
    _write_json({**state, "rng": rng_scalars, "scheduler": scheduler.state_dict() if scheduler else None,
                 "optimizer": {"param_groups": opt["param_groups"],
                               "scalars": {f"{i}.{k}": v for i, s in opt["state"].items()
                                           for k, v in s.items() if not torch.is_tensor(v)}}},
                tmp / "state.json")
    sums = {}
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        sums[f.name] = sha256(f)
    _fsync_dir(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    io.atomic_write(folder / MARKER, io.dumps({"step": state.get("step"), "sha256": sums}))   # fsynced
    _fsync_dir(folder)
    return folder


def candidates(checkpoints: Path, log=print):
    """The intact `step-*` checkpoints, newest first; say why each damaged or incomplete one is skipped."""
    if not checkpoints.is_dir():
        return
    found = sorted((p for p in checkpoints.iterdir() if p.name.startswith("step-")),
                   key=lambda p: p.name, reverse=True)
    for p in found:
        why = damage(p)
        if why:
            log(f"resume: skipping {p.name}: {why}")
        else:
            yield p


def newest(checkpoints: Path, log=print) -> Path | None:
    """The newest intact `step-*` checkpoint; say why each newer one is skipped."""
    return next(candidates(checkpoints, log), None)


def load(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and every RNG from `folder`; return its state dict."""
    folder = Path(folder)
    load_model_state(model, folder / "model.safetensors")
    state = io.read_json(folder / "state.json")
    if state is None:
        raise FileNotFoundError(f"{folder / 'state.json'} is missing")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, v in tensors.items():
        _, i, name = key.split(".", 2)
        per_param.setdefault(int(i), {})[name] = v
    for key, v in state["optimizer"]["scalars"].items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(str(folder / "rng.safetensors")), state["rng"])
    return state


def load_model_state(model: torch.nn.Module, path: Path) -> None:
    """Copy tensors from a safetensors file into the model; every key must exist in the model."""
    tensors = load_file(str(path))
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = [k for k in tensors if k not in own]
    if missing:
        raise KeyError(f"{path}: tensors not in the model: {missing[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete step checkpoints."""
    done = sorted(p for p in checkpoints.iterdir() if p.name.startswith("step-") and (p / MARKER).exists())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
