"""Running a model over a task's encoded features in batches, outside training: the default Task.embed and
teacher_outputs (tunesmith/tasks/base.py, which re-exports these), and tasks' own evaluation and prediction."""
from __future__ import annotations

import torch


def batches(task, features: list[dict], batch_size: int, device):
    """(indices, batch) over `features` sorted by length (less padding); indices map back to order."""
    from accelerate.utils import send_to_device

    order = sorted(range(len(features)), key=lambda i: task.length(features[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, send_to_device(task.collate([features[i] for i in idx]), device)


def batch_logits(model, task, features: list[dict], batch_size: int) -> list[list[float]]:
    """The model's `.logits` for each feature (labels left out), as float lists in the order of `features`."""
    out = [None] * len(features)
    with torch.no_grad():
        for idx, batch in batches(task, features, batch_size, model_device(model)):
            batch.pop("labels", None)
            for i, row in zip(idx, model(**batch).logits.float().cpu().tolist()):
                out[i] = row
    return out


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def embeddings(task, model, features: list[dict], batch_size: int):
    """Task.embed's default, [N, D] float32 (its docstring says how the vectors are made)."""
    import numpy as np
    from tqdm import tqdm

    out = [None] * len(features)
    steps = (len(features) + batch_size - 1) // batch_size
    for idx, batch in tqdm(batches(task, features, batch_size, model_device(model)), total=steps,
                           desc="embed", unit="batch", mininterval=1.0, leave=False):
        batch.pop("labels", None)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        if hidden.dim() == 3:                                   # [B, T, H]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(hidden[..., 0]) if mask is None else mask.to(hidden.dtype)
            vectors = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        elif hidden.dim() == 4:                                 # [B, C, H, W]
            vectors = hidden.mean((2, 3))
        else:
            vectors = hidden.flatten(1)
        for i, v in zip(idx, vectors.cpu().numpy()):
            out[i] = v
    return np.stack(out).astype(np.float32)
