"""Frozen-feature cache: when the stem and the bottom k blocks never train and nothing random acts there, the
input of block k is the same in every epoch, trial and fold, so it is computed once and training runs the
model from block k.

Covered: tasks that declare `Task.feature_cache` (text classification) on BERT-like encoders, whose backbone
has an `embeddings` module taking `inputs_embeds` and whose blocks are one nn.ModuleList iterated in order
(BERT, RoBERTa, MiniLM, ELECTRA). Safe only when: method is not lora, no gradual unfreezing, no torch.compile,
the stem and blocks 0..k-1 are frozen, and every dropout there has p = 0 (`model.dropout: 0`).
Cached states are kept per process, keyed by the frozen weights (a hash of their bytes) and k, and per example
by its token ids (so the data and data.max_length are part of the key); in memory up to MEMORY_LIMIT bytes, past
it in memory-mapped files in a temporary folder (removed at exit).
"""
from __future__ import annotations

import atexit
import hashlib
import inspect
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from tunesmith.adapt import find_blocks
from tunesmith.tasks.base import Features

_STORE: dict[str, dict[tuple, torch.Tensor]] = {}   # weights key -> token ids -> [T, H] float32 input of block k
KEEP = 2                                            # frozen parts (models, k) whose states are kept
MEMORY_LIMIT = 1 << 30                              # bytes of states held in RAM; more go to memory-mapped files
_IN_RAM: set[int] = set()                           # id() of stored tensors that are not memory-mapped
SPILLED: list[str] = []                             # the memory-mapped files written so far
STATS = {"computed": 0, "reused": 0}               # examples, this process (for tests and the run's message)


class _FromBlock(nn.ModuleList):
    """A ModuleList that iterates from block `_skip_from` on; its parameters (and names) are unchanged."""

    def __iter__(self):
        return iter(list(self._modules.values())[self._skip_from:])


def _passthrough(*args, inputs_embeds=None, input_embeds=None, **kwargs):
    """The embeddings module's stand-in: the cached block-k input is passed as inputs_embeds."""
    return inputs_embeds if inputs_embeds is not None else input_embeds if input_embeds is not None else args[1]


@dataclass
class Cache:
    k: int = 0                      # blocks skipped; 0: off
    reason: str = ""                # why it is off, or what it does
    blocks: str | None = None

    def attach(self, model, features: Features, batch_size: int, collate, device) -> Features:
        """`features` with `hidden`: the input of block k per example ([T, H] float32, CPU)."""
        key = weights_key(model, self.blocks, self.k)
        if key not in _STORE and len(_STORE) >= KEEP:
            old = _STORE.pop(next(iter(_STORE)))    # the oldest frozen part's states: memory stays bounded
            _IN_RAM.difference_update(id(t) for t in old.values())
        store = _STORE.setdefault(key, {})
        todo = [f for f in features if tuple(f["input_ids"]) not in store]
        STATS["reused"] += len(features) - len(todo)
        STATS["computed"] += len(todo)
        was = model.training
        model.eval()
        with torch.no_grad():
            for s in range(0, len(todo), batch_size):
                chunk = todo[s:s + batch_size]
                batch = collate([{"input_ids": f["input_ids"]} for f in chunk])
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = model.base_model(**batch, output_hidden_states=True).hidden_states[self.k]
                for f, h in zip(chunk, hidden.float().cpu()):
                    t = store[tuple(f["input_ids"])] = h[:len(f["input_ids"])].clone()
                    _IN_RAM.add(id(t))
        model.train(was)
        if sum(t.numel() * 4 for st in _STORE.values() for t in st.values() if id(t) in _IN_RAM) > MEMORY_LIMIT:
            spill(store)
        return Features([{**f, "hidden": store[tuple(f["input_ids"])]} for f in features], features.truncated)

    def active(self, model):
        return skipping(model, self.blocks, self.k) if self.k else nullcontext()


def spill(store: dict) -> None:
    """Move the in-RAM states of `store` into one memory-mapped float32 file; the entries become views of it."""

    import numpy as np

    keys = [k for k, t in store.items() if id(t) in _IN_RAM]
    if not keys:
        return
    folder = tempfile.mkdtemp(prefix="tunesmith-features-")
    atexit.register(shutil.rmtree, folder, True)
    width = store[keys[0]].shape[-1]
    rows = sum(store[k].shape[0] for k in keys)
    mm = np.lib.format.open_memmap(f"{folder}/states.npy", mode="w+", dtype=np.float32, shape=(rows, width))
    at = 0
    for k in keys:
        t = store[k]
        mm[at:at + len(t)] = t.numpy()
        _IN_RAM.discard(id(t))
        store[k] = torch.from_numpy(mm[at:at + len(t)])     # a view: pages are read back on demand
        at += len(t)
    mm.flush()
    SPILLED.append(f"{folder}/states.npy")


def weights_key(model, blocks: str, k: int) -> str:
    """A hash of the frozen part's weights and shapes (stem and blocks 0..k-1), k and the model class."""
    h = hashlib.sha256(f"{type(model).__name__}:{k}".encode())
    prefix = getattr(model, "base_model_prefix", "")
    for name, t in list(model.base_model.embeddings.state_dict().items()) + \
            [(f"{i}.{n}", t) for i in range(k) for n, t in model.get_submodule(blocks)[i].state_dict().items()]:
        h.update(f"{prefix}.{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plan(task, adapted, recipe) -> Cache:
    """How many bottom blocks can be cached for this run, or why none."""
    model, cfg = adapted.model, recipe.adapt
    if not recipe.train.feature_cache:
        return Cache(reason="train.feature_cache is false")
    if not task.feature_cache:
        return Cache(reason=f"task '{task.name}' does not declare a feature cache")
    if cfg.method == "lora":
        return Cache(reason="adapt.method lora puts trainable adapters in every block")
    if cfg.method == "contrastive":
        return Cache(reason="adapt.method contrastive trains on pairs of rows, not the rows' cached states")
    if cfg.gradual_unfreeze or recipe.train.compile:
        return Cache(reason="gradual unfreezing / torch.compile change the frozen part")
    backbone = getattr(model, "base_model", None)
    embeddings = getattr(backbone, "embeddings", None)
    blocks = find_blocks(model)
    if embeddings is None or blocks is None or "inputs_embeds" not in inspect.signature(backbone.forward).parameters:
        return Cache(reason=f"{type(model).__name__} is not a BERT-like encoder (embeddings + blocks)")
    trains = {n for n in adapted.trainable}
    names = dict(model.named_parameters())
    emb_names = {n for n in names if any(p is names[n] for p in embeddings.parameters())}
    if emb_names & trains:
        return Cache(reason="the embeddings train (set adapt.freeze_embeddings, freeze_layers or freeze_backbone)")
    layers = model.get_submodule(blocks)
    k = 0
    for block in layers:
        ids = {id(p) for p in block.parameters()}
        if any(id(names[n]) in ids for n in trains):
            break
        k += 1
    if k == 0:
        return Cache(reason="no block is frozen")
    random = [f"{n} (p={m.p})" for part in (embeddings, *list(layers)[:k]) for n, m in part.named_modules()
              if isinstance(m, nn.Dropout) and m.p > 0]
    if random:
        return Cache(reason=f"dropout acts below block {k} ({random[0]}); set model.dropout: 0 to cache")
    return Cache(k=k, reason=f"block-{k} outputs computed once, blocks {k}+ train", blocks=blocks)


@contextmanager
def skipping(model, blocks: str, k: int):
    """While active, the model takes the input of block k as `inputs_embeds` and runs blocks k.. only."""
    layers = model.get_submodule(blocks)
    embeddings = model.base_model.embeddings
    cls = layers.__class__
    layers.__class__, layers._skip_from = _FromBlock, k
    embeddings.forward = _passthrough
    try:
        yield
    finally:
        layers.__class__ = cls
        del layers._skip_from
        del embeddings.forward
