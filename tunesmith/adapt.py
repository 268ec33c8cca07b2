"""Which parameters train, and at what learning rate: full, freeze and LoRA differ only here.

`adapt(model, cfg)` runs once before the loop. It finds the model's parts by structure, not by
architecture name:
  head    parameters outside `model.base_model_prefix` (the new task head)
  blocks  the children of the largest nn.ModuleList in the backbone (transformer layers, CNN stages)
  stem    backbone parameters registered before the first block (embeddings, conv stem)
  neck    backbone parameters after the last block (pooler, final norm)
Depth from the head (0 for head and neck, L - i for block i, L + 1 for the stem) drives layer-wise LR
decay and gradual unfreezing.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from tunesmith.errors import TunesmithError


@dataclass
class Adapted:
    model: nn.Module
    depth: dict[str, int]                  # parameter name -> depth from the head
    trainable: set[str]                    # names that may ever train (freeze specs applied)
    num_blocks: int
    unfreeze_every: int = 0                # epochs per gradual-unfreezing stage; 0 = off
    groups: list[dict] = field(default_factory=list)

    def set_epoch(self, epoch: int) -> None:
        """Gradual unfreezing: at epoch e, parts with depth <= e // every train (head first)."""
        limit = epoch // self.unfreeze_every if self.unfreeze_every else None
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in self.trainable and (limit is None or self.depth[name] <= limit))

    def param_groups(self, lr: float, weight_decay: float, decay: float) -> list[dict]:
        """AdamW groups: one per (depth, decayed?) so LR decay and no-decay on norms/biases both hold."""
        buckets: dict[tuple[int, bool], list] = {}
        for name, p in self.model.named_parameters():
            if name in self.trainable:
                wd = p.ndim >= 2                   # no weight decay on biases and norm weights
                buckets.setdefault((self.depth[name], wd), []).append(p)
        return [{"params": ps, "lr": lr * decay ** d, "weight_decay": weight_decay if wd else 0.0}
                for (d, wd), ps in sorted(buckets.items())]

    def summary(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        n = sum(p.numel() for name, p in self.model.named_parameters() if name in self.trainable)
        return f"trainable parameters: {n:,} of {total:,} ({100 * n / max(total, 1):.2f}%)"


def find_blocks(model: nn.Module) -> str | None:
    """Dotted name of the nn.ModuleList holding the backbone's repeated blocks (most parameters)."""
    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = name, n
    return best


def _base_name(name: str) -> str:
    """A parameter's name in the unwrapped model: peft adds prefixes and adapter modules."""
    name = re.sub(r"^base_model\.model\.", "", name)
    name = re.sub(r"\.lora_(embedding_)?[AB]\.[^.]+\.", ".", name)
    return re.sub(r"\.(base_layer|modules_to_save\.[^.]+|original_module)\.", ".", name)


def depths(model: nn.Module) -> tuple[dict[str, int], int, set[str]]:
    """Depth from the head of each parameter, the number of blocks, and the head's parameter names."""
    names = [n for n, _ in model.named_parameters()]
    prefix = getattr(model, "base_model_prefix", "") or ""
    head = {n for n in names if prefix and prefix not in n.split(".")}
    blocks = find_blocks(model)
    pattern = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.") if blocks else None
    index = {n: int(m.group(1)) for n in names if pattern and (m := pattern.match(n))}
    count = max(index.values(), default=-1) + 1
    first = next((i for i, n in enumerate(names) if n in index), len(names))
    out = {}
    for i, n in enumerate(names):
        if n in index:
            out[n] = count - index[n]
        elif n not in head and i < first:
            out[n] = count + 1                      # stem: embeddings, conv stem
        else:
            out[n] = 0                              # head and neck
    return out, count, head


def _lora(model: nn.Module, cfg, task_type: str | None, head: set[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # SEQ_CLS / CAUSAL_LM: peft knows the head; otherwise keep the head's modules trainable ourselves
    modules = None if task_type else sorted({n.split(".")[0] for n in head})
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type=task_type, modules_to_save=modules)
    return get_peft_model(model, lora)


def adapt(model: nn.Module, cfg, peft_task_type: str | None = None) -> Adapted:
    """Apply the recipe's `adapt` section: wrap with LoRA if asked, then decide what trains."""
    base_depth, count, head = depths(model)
    if cfg.method == "lora":
        model = _lora(model, cfg, peft_task_type, head)
        allowed = {n for n, p in model.named_parameters() if p.requires_grad}   # adapters + head
    else:
        allowed = {n for n, _ in model.named_parameters()}
    depth, frozen = {}, set()
    for name, _ in model.named_parameters():
        base = _base_name(name)
        d = depth[name] = base_depth.get(base, 0)
        block = count - d if 0 < d <= count else None
        if (cfg.freeze_embeddings and d == count + 1) \
                or (block is not None and block < cfg.freeze_layers) \
                or any(fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(base, pat) for pat in cfg.freeze_patterns) \
                or (cfg.freeze_backbone and base not in head):
            frozen.add(name)
    trainable = allowed - frozen
    if not trainable:
        raise TunesmithError("adapt: the freeze settings leave no parameter to train")
    adapted = Adapted(model, depth, trainable, count, cfg.gradual_unfreeze)
    adapted.set_epoch(0)
    return adapted


def trainable_state(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: parameters that can change, and every buffer (BatchNorm stats)."""
    state = {n: p.detach() for n, p in model.named_parameters() if n in names}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    return state
