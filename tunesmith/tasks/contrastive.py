"""adapt.method contrastive: few-shot classification as SetFit does it (Tunstall et al. 2022), on the one loop.

Two stages, one run folder:
  1. the encoder trains on pairs of train rows (fit(), tunesmith/loop.py, with this objective): for every row,
     `adapt.contrastive.pairs` times, one row of its class (similarity 1) and one of another class (similarity 0);
     the loss is SetFit's CosineSimilarityLoss, (cos(u, v) - similarity)^2 summed over pairs.
  2. a logistic regression (scikit-learn, C = adapt.contrastive.head_c; SetFit's default head) is fitted on the
     trained encoder's embeddings of the train rows, and written into the model's own classification layer.
The embedding u of a text is what the model's final linear layer reads (BERT: the pooled [CLS] vector; RoBERTa,
DistilBERT: their head's hidden layer), caught by a forward hook. So the saved model/ is the plain
AutoModelForSequenceClassification folder of any text-classification run: predict, eval, serve, export and reload
need nothing new. (SetFit embeds by mean pooling: its head then cannot live inside that class.)

Why not the setfit / sentence-transformers libraries: their trainers are HF Trainer loops of their own, and their
model (a SentenceTransformer with a separate scikit-learn head) is not an HF classification folder; here the pairs
go through tunesmith's loop (checkpoints, resume, budget, SIGTERM, out-of-memory back-off) and the run folder is
like any other. During stage 1 the classification layer is untrained, so the loop does not validate (the objective
declares `validates = False`); the pipeline scores validation once the head is fitted.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.tasks.base import Features, model_device


def pairs(rows: list[dict], per_row: int, seed: int) -> Features:
    """Pair features {input_ids, pair_ids, similarity}: per row and round, one partner of its class (another row
    where the class has one) and one of another class; `per_row` rounds. A pure function of (rows, per_row, seed)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, f in enumerate(rows):
        by_class.setdefault(f["labels"], []).append(i)
    out = []
    for _ in range(per_row):
        for i, f in enumerate(rows):
            same = [j for j in by_class[f["labels"]] if j != i] or [i]
            other = [j for y, js in by_class.items() if y != f["labels"] for j in js]
            out.append({"input_ids": f["input_ids"], "pair_ids": rows[rng.choice(same)]["input_ids"],
                        "similarity": 1.0})
            if other:
                out.append({"input_ids": f["input_ids"], "pair_ids": rows[rng.choice(other)]["input_ids"],
                            "similarity": 0.0})
    return Features(out)


def head_layer(model: nn.Module, classes: int) -> nn.Linear:
    """The model's final classification layer: the last nn.Linear with one output per class."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    if not found:
        raise TunesmithError(f"adapt.method contrastive: {type(model).__name__} has no linear layer with {classes} "
                             "outputs (one per class) to fit the head into; use adapt.method full")
    return found[-1]


def embeddings(model: nn.Module, layer: nn.Linear, batch: dict) -> torch.Tensor:
    """[B, D]: what `layer` reads when the model runs on `batch` (its input, caught by a forward hook)."""
    seen = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen[-1]


class Contrastive:
    """The objective of stage 1 (fit's collate, loss, count) and stage 2 (finish). Built by the task from the
    encoded splits: it keeps the train rows' features and puts the pairs in their place."""
    validates = False           # the classification layer is fitted after fit(): nothing to validate during it

    def __init__(self, task, features: dict, seed: int):
        self.task, self.cfg = task, task.recipe.adapt.contrastive
        self.rows = features["train"]
        features["train"] = pairs(self.rows, self.cfg.pairs, seed)

    def collate(self, features: list[dict]) -> dict:
        # input_ids, attention_mask: [2B, T], each row's text then its partner's; similarity: [B]
        batch = self.task.collate([{"input_ids": f["input_ids"]} for f in features]
                                  + [{"input_ids": f["pair_ids"]} for f in features])
        batch["similarity"] = torch.tensor([f["similarity"] for f in features], dtype=torch.float32)
        return batch

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Sum over pairs of (cos(u, v) - similarity)^2 (sentence-transformers' CosineSimilarityLoss, summed)."""
        layer = head_layer(model, len(self.task.labels))
        u, v = embeddings(model, layer, {k: x for k, x in batch.items() if k != "similarity"}).float().chunk(2)
        return F.mse_loss(F.cosine_similarity(u, v, dim=-1), batch["similarity"], reduction="sum")

    def count(self, batch: dict) -> float:
        return float(len(batch["similarity"]))

    def finish(self, model, batch_size: int, say) -> None:
        """Stage 2: a logistic regression on the train rows' embeddings, written into the classification layer
        (two classes: weights -w/2, +w/2, so that softmax gives scikit-learn's sigmoid)."""
        from sklearn.linear_model import LogisticRegression

        layer = head_layer(model, len(self.task.labels))
        was_training = model.training
        model.eval()
        x, y = [], []
        with torch.no_grad():
            for s in range(0, len(self.rows), batch_size):
                chunk = self.rows[s:s + batch_size]
                batch = self.task.collate([{"input_ids": f["input_ids"]} for f in chunk])
                batch = {k: t.to(model_device(model)) for k, t in batch.items()}
                x.append(embeddings(model, layer, batch).float().cpu().numpy())
                y += [f["labels"] for f in chunk]
        x, y = np.concatenate(x), np.array(y)
        head = LogisticRegression(C=self.cfg.head_c, max_iter=1000).fit(x, y)
        coef, bias = head.coef_, head.intercept_
        if len(head.classes_) == 2:
            coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
        weight = np.zeros((layer.out_features, x.shape[1]))
        offset = np.full(layer.out_features, bias.min() - 20.0)     # a class absent from train is never chosen
        weight[head.classes_], offset[head.classes_] = coef, bias
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.copy_(torch.as_tensor(offset, dtype=layer.bias.dtype))
        model.train(was_training)
        say(f"contrastive: logistic regression head (C={self.cfg.head_c:g}) fitted on {len(y):,} train rows' "
            f"{x.shape[1]}-dimensional embeddings; train accuracy {head.score(x, y):.4f}")
