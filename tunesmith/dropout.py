"""Dropout on CPU with masks from a cheaper random source: the same dropout, a fifth of its cost.

Why hand-written: torch's CPU dropout draws one float Bernoulli per element (`bernoulli_`): 2.6 ms for a
[32, 48, 384] activation on 2 cores, 6.4% of the op time of a MiniLM training step (benchmarks/profile_text_step.py).
Here a mask element is one 16-bit word of numpy's SFC64 generator compared to a threshold (about 0.5 ms with the
multiply): each element is kept with probability thr/65536, thr = round((1-p) * 65536), so p is rounded to
1/65536 (0.1 -> 0.100006), and kept values are scaled by 65536/thr, so E[output] = input exactly.

Each mask's generator is seeded from torch's default generator, so a run stays a pure function of torch's RNG
state (exact resume holds) while the bits themselves differ from torch's. Used by the loop around the training
forward on CPU (train.fast_dropout); on GPUs torch's fused dropout is already cheap and nothing changes.

Two entry points are replaced while the mode is active: `F.dropout` (nn.Dropout, peft's lora_dropout) and
`F.scaled_dot_product_attention` with dropout_p > 0, which on CPU takes torch's math path anyway (the flash kernel
has no dropout there): the same math, softmax(q k^T * scale + mask) then dropout then @ v, with this mask.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """(mask, scale): mask uint8 [shape], 1 where an element is kept (probability thr/65536); scale = 65536/thr."""
    n = math.prod(shape)
    thr = round((1.0 - p) * 65536)
    if thr in (0, 65536):                                          # p rounds to 1 or to 0: no random bits needed
        return torch.full(shape, thr // 65536, dtype=torch.uint8), 1.0
    seed = int(torch.randint(0, 2**62, ()).item())               # from torch's generator: resume stays exact
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)      # 4 x 16 random bits per 64-bit word
    u = torch.from_numpy(words).view(torch.int16)[:n].view(shape)   # uniform on [-32768, 32767]
    return (u < thr - 32768).view(torch.uint8), 65536 / thr     # thr - 32768 fits int16: 1 <= thr <= 65535


class _Dropout(torch.autograd.Function):
    """x where the mask keeps it, else 0, times the scale. torch.where on the mask read as bool (a view, no copy):
    x * mask would first cast the uint8 mask (and x) to a common dtype, copies that cost ~3x the op itself."""

    @staticmethod
    def forward(ctx, x, p):
        mask, scale = keep_mask(x.shape, p)
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.where(mask.view(torch.bool), x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.where(mask.view(torch.bool), grad, 0.0).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x with probability p (0 < p < 1), masks from keep_mask."""
    return _Dropout.apply(x, p)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention's math path with this module's dropout. query: [..., Hq, L, E]; key, value:
    [..., Hkv, S, E]; attn_mask: bool (True = attend) or additive, broadcastable to [..., Hq, L, S].
    A query that may attend to nothing gets zeros, as in torch."""
    q, k, v = query, key, value
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    scores = (q * scale) @ k.transpose(-2, -1)                  # [..., Hq, L, S]
    if is_causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    safe = getattr(torch, "_safe_softmax", None)                 # torch >= 2.5 (pyproject allows 2.4)
    # a row of -inf gives 0, not NaN, as in torch's math path
    probs = safe(scores, -1) if safe else torch.softmax(scores, -1).nan_to_num(0.0)
    return dropout(probs, dropout_p) @ v


def _arg(args, kwargs, i, name, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


class CheapDropout(TorchFunctionMode):
    """While active, CPU dropout (F.dropout, and attention dropout inside F.scaled_dot_product_attention) draws
    its masks with keep_mask; everything else runs as it would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p = args[0], _arg(args, kwargs, 1, "p", 0.5)
            if _arg(args, kwargs, 2, "training", True) and 0 < p < 1 and x.device.type == "cpu" \
                    and not _arg(args, kwargs, 3, "inplace", False):
                return dropout(x, p)
        elif func is F.scaled_dot_product_attention:
            query = _arg(args, kwargs, 0, "query", None)
            if _arg(args, kwargs, 4, "dropout_p", 0.0) > 0 and query.device.type == "cpu":
                return attention(*args, **kwargs)
        return func(*args, **kwargs)
