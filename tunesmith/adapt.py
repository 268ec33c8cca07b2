"""Which parameters train, and at what learning rate: full, freeze and LoRA differ only here.

`adapt(model, cfg)` runs once before the loop. It finds the model's parts by structure, not by
architecture name:
  head    parameters outside `model.base_model_prefix` (the new task head); a model that is its own body (T5:
          no parameter under its prefix): its output embedding (lm_head) unless tied to the input's
  blocks  the children of the backbone's stacks of repeated blocks (transformer layers, CNN stages): the largest
          nn.ModuleList, and every other one not inside it holding at least a quarter of its parameters (an
          encoder-decoder's encoder and decoder blocks), numbered across stacks in registration order (encoder first)
  stem    backbone parameters registered before the first block (embeddings, conv stem)
  neck    backbone parameters after the last block (pooler, final norm); parameters between two stacks go with
          the next stack's first block when inside its module (a decoder's embeddings), else with the block before
          them (an encoder's final norm)
Depth from the head (0 for head and neck, L - i for block i of L, L + 1 for the stem) drives layer-wise LR
decay, freeze_layers (the first N blocks: an encoder-decoder's encoder first) and gradual unfreezing.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

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
    stacks = _lists(model)
    return max(stacks, key=stacks.get) if stacks else None


def find_stacks(model: nn.Module) -> list[str]:
    """Dotted names of the backbone's stacks of blocks, in registration order: the largest nn.ModuleList and every
    other one, not nested in another stack, with at least a quarter of its parameters (T5, BART: encoder and
    decoder blocks; a decoder's blocks hold more, for cross-attention, so the largest alone misses the encoder)."""
    stacks = _lists(model)
    if not stacks:
        return []
    big = max(stacks.values())
    kept = [n for n, size in stacks.items() if size >= big / 4]
    return [n for n in kept if not any(n.startswith(o + ".") for o in kept if o != n)]


def _lists(model: nn.Module) -> dict[str, int]:
    """nn.ModuleLists of more than one module -> their parameter count, in registration order."""
    return {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) > 1}


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
    if head and len(head) == len(names):          # the model is its own body (T5): the head is the output embedding
        out = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
        ids = {id(p) for p in out.parameters()} if out is not None else set()
        ids -= {id(p) for p in model.get_input_embeddings().parameters()} if ids else set()   # tied: the stem
        head = {n for n, p in model.named_parameters() if id(p) in ids}
    index, count, starts = {}, 0, {}              # name -> block number across stacks; stack parent -> first block
    for stack in find_stacks(model):
        pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
        found = {n: int(m.group(1)) for n in names if (m := pattern.match(n))}
        index.update({n: count + i for n, i in found.items()})
        starts[stack.rpartition(".")[0]] = count
        count += max(found.values(), default=-1) + 1
    first = next((i for i, n in enumerate(names) if n in index), len(names))
    last = max((i for i, n in enumerate(names) if n in index), default=-1)
    out, previous = {}, 0
    for i, n in enumerate(names):
        if n in index:
            out[n] = previous = count - index[n]
        elif n in head or i > last:
            out[n] = 0                              # head and neck
        elif i < first:
            out[n] = count + 1                      # stem: embeddings, conv stem
        else:                                       # between stacks: with the next stack's first block if
            upcoming = [b for parent, b in starts.items() if n.startswith(parent + ".") and count - b < previous]
            out[n] = count - upcoming[0] if upcoming else previous     # inside its module, else the block before
    return out, count, head


def lora_targets(model_type: str | None, target_modules: list[str] | None) -> bool:
    """Whether LoRA has modules to wrap: the recipe names them (adapt.lora.target_modules), or PEFT has defaults
    for the architecture (its table by config.model_type: transformers' attention blocks; conv nets such as
    MobileNetV2, and ViT, have none and fail with "Please specify `target_modules`")."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    return bool(target_modules) or model_type in DEFAULTS


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
