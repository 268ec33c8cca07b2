"""Text classification (BERT-like encoders): one text column, one label column."""
from __future__ import annotations

import copy

import torch

from tunesmith.tasks.base import Features, model_device
from tunesmith.tasks.classification import EXPLAIN_STEPS, Classification, captum_attr
from tunesmith.tasks.hf import load_hf, load_saved
from tunesmith.tasks.text import Tokenized, text_problem

CHARS_PER_TOKEN = 100       # no tokenizer makes a token of more characters (WordPiece: 100 -> [UNK])


class TextClassification(Tokenized, Classification):
    name = "text-classification"
    peft_task_type = "SEQ_CLS"
    input_key = "text"
    feature_cache = True
    explainable = True

    def check(self, row: dict, split: str) -> str | None:
        return self.check_input(row) or self.check_label(row, split)

    def check_input(self, item) -> str | None:
        col = self.recipe.data.text_column
        return text_problem(item.get(col) if isinstance(item, dict) else item, col)

    def key(self, row: dict) -> str:
        return row[self.recipe.data.text_column]

    def load_model(self):
        from transformers import AutoModelForSequenceClassification

        return load_hf(AutoModelForSequenceClassification, self.recipe.model, **self.label_config)[0]

    def save(self, model, folder) -> None:
        # pipeline(..., truncation=True) then cuts where training did; a copy: the task's tokenizer is shared

        tokenizer = copy.copy(self.tokenizer)
        tokenizer.model_max_length = self.recipe.data.max_length
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def load_trained(self, folder):
        from transformers import AutoModelForSequenceClassification

        model = load_saved(self, AutoModelForSequenceClassification, folder)
        self.set_labels([model.config.id2label[i] for i in range(model.config.num_labels)])
        return model

    def encode(self, rows: list[dict]) -> list[dict]:
        """Token ids per row (truncated to data.max_length) and the label id when the row has one."""
        limit = self.recipe.data.max_length
        texts = self.texts(rows)
        ids = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        long = [i for i, x in enumerate(ids) if len(x) > limit]
        if long:                                    # re-tokenize only what must be cut
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=limit)["input_ids"]
            for i, x in zip(long, cut):
                ids[i] = x
        label_col = self.recipe.data.label_column
        labelled = lambda r: r.get(label_col) not in (None, "")
        return Features(({"input_ids": x, **({"labels": self.label_id(r)} if labelled(r) else {})}
                         for x, r in zip(ids, rows)), truncated=len(long))

    def texts(self, rows: list[dict]) -> list[str]:
        """Each row's text, cut at CHARS_PER_TOKEN x data.max_length characters before tokenising: what is cut
        lies past the token limit anyway, and a 10 MB row would otherwise cost gigabytes of token ids."""
        cap = CHARS_PER_TOKEN * self.recipe.data.max_length
        return [r[self.recipe.data.text_column][:cap] for r in rows]

    def length_stats(self, rows: list[dict], features: list[dict]) -> dict:
        texts = self.texts(rows)
        lengths = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        return {"lengths": [len(x) for x in lengths], "kept": [len(f["input_ids"]) for f in features]}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # input_ids, attention_mask: [B, T] padded to the longest in the batch; labels: [B]
        width = self.padded(max(len(f["input_ids"]) for f in features))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "hidden" in features[0]:                 # cached input of block k: [B, T, H] instead of token ids
            hidden = torch.zeros((len(features), width, features[0]["hidden"].shape[-1]))
            for i, f in enumerate(features):
                hidden[i, :len(f["hidden"])] = f["hidden"]
            batch = {"inputs_embeds": hidden, "attention_mask": mask}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch

    def objective(self, features: dict):
        """adapt.method contrastive: pairs of rows, then a fitted head (tunesmith/tasks/contrastive.py)."""
        if self.recipe.adapt.method == "contrastive":
            from tunesmith.tasks.contrastive import Contrastive

            return Contrastive(self, features, self.recipe.train.seed)
        return self

    def export_outputs(self) -> dict[str, dict[int, str]]:
        return {"logits": {0: "batch"}}                                                # [B, C]

    def export_inputs(self) -> dict[str, tuple[torch.Tensor, dict[int, str]]]:
        col = self.recipe.data.text_column
        batch = self.collate(self.encode([{col: "a short text"}, {col: "and a somewhat longer text than that"}]))
        return {name: (x, {0: "batch", 1: "sequence"}) for name, x in batch.items()}      # [B, T] each

    def predict(self, model, inputs: list) -> list[dict]:
        col = self.recipe.data.text_column
        rows = [{col: x[col] if isinstance(x, dict) else x} for x in inputs]
        features = [{"input_ids": f["input_ids"]} for f in self.encode(rows)]
        with torch.no_grad():
            return self.predictions(self.logits(model, features, self.recipe.eval.batch_size))

    def explain(self, model, inputs: list) -> list[dict]:
        """Integrated Gradients (captum) on the word embeddings toward the predicted label, one input at a time.
        Baseline: the same tokens with every non-special token replaced by padding; an attribution is the sum
        over the embedding of (input - baseline) x the path-averaged gradient of the label's logit, so the
        attributions add up to logit(input) - logit(baseline) up to `convergence_delta`."""
        attr = captum_attr()
        col = self.recipe.data.text_column
        rows = [{col: x[col] if isinstance(x, dict) else x} for x in inputs]
        device = model_device(model)
        forward = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits.float()   # [B, C]
        ig = attr.LayerIntegratedGradients(forward, model.get_input_embeddings())
        special = set(self.tokenizer.all_special_ids)
        pad = self.tokenizer.pad_token_id or 0
        out = []
        for row, f in zip(rows, self.encode(rows)):
            ids = torch.tensor([f["input_ids"]], device=device)                 # [1, T]
            mask = torch.ones_like(ids)
            base = torch.tensor([[t if t in special else pad for t in f["input_ids"]]], device=device)
            with torch.no_grad():
                probs = forward(ids, mask).softmax(-1)[0]
            target = int(probs.argmax())
            with torch.enable_grad():
                scores, delta = ig.attribute(ids, baselines=base, additional_forward_args=(mask,), target=target,
                                             n_steps=EXPLAIN_STEPS, return_convergence_delta=True)
            out.append({"input": row[col], "predicted": self.names[target],
                        "probability": round(float(probs[target]), 6),
                        "tokens": self.tokenizer.convert_ids_to_tokens(f["input_ids"]),
                        "attributions": [round(float(a), 6) for a in scores.sum(-1)[0]],   # [T]
                        "convergence_delta": round(float(delta), 6)})
        return out
