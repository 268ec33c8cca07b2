"""Continued pretraining on raw text (recipes: tunesmith/tasks/pretrain_schema.py): a model adapted to a domain's text
before the task it is then tuned for.

Rows: one document each: a .txt file split by data.document, a folder of .txt files, or a table's text column.
  pretrain-causal  documents (with the tokenizer's BOS, if it adds one, and EOS) concatenated into blocks of
                   data.max_length tokens; a document that does not fit continues in the next block. No token
                   attends across documents: position_ids restart at 0 at each document (and at a block's start) and
                   the batch carries no attention mask, from which transformers 5 builds a block-diagonal causal mask
                   (masking_utils.find_packed_sequence_indices: every model whose mask comes from create_causal_mask,
                   Llama, Qwen, Mistral, GPT-2 ...); on CPU attention runs per document instead (causal_lm's
                   segment_attention, same result). A document's first token is never a label: nothing before it in
                   the block may predict it. input_ids, labels, position_ids: [B, T]. Loss: HF's own `.loss`.
  pretrain-masked  each document [CLS] tokens [SEP] (the tokenizer's own special tokens), longer ones as several
                   windows; BERT's masking (transformers' DataCollatorForLanguageModeling.torch_mask_tokens: 15%
                   chosen, 80% [MASK] / 10% random / 10% kept; whole words optional) drawn in collate with a generator
                   seeded from one draw of the global torch RNG per batch: checkpoints restore that RNG, so a resumed
                   run replays the same masks. Evaluation masks each feature with a generator seeded by its index and
                   train.seed, so every evaluation (and the base model's, eval.before) scores the same masked tokens.
eval.json: loss, perplexity (exp of the loss per label token; masked: per masked token), accuracy (the label token
is the most probable one) and, under "before", the base model's on the same test text.
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import send_to_device

from tunesmith import data as datalib
from tunesmith.errors import TunesmithError
from tunesmith.tasks.base import Features, model_device
from tunesmith.tasks.causal_lm import SEGMENTS, segments, use_segment_attention
from tunesmith.tasks.generation import Generative
from tunesmith.tasks.hf import load_hf, load_saved
from tunesmith.tasks.pretrain_schema import read_text, token_findings
from tunesmith.tasks.text import Tokenized, text_problem

LOGITS_PER_CHUNK = 2 ** 25      # evaluation: logits [rows, T, vocab] computed at most this many at a time (128 MiB)


class Pretrain(Tokenized):
    """Raw text: reading, row checks, the doctor's counts, evaluation; the objectives below."""
    input_key = "text"
    prediction = "text"

    def __init__(self, recipe, pad_multiple: int = 1):
        super().__init__(recipe, pad_multiple)
        self._notes: list[str] = []

    @property
    def column(self) -> str:
        return self.recipe.data.text_column

    # --- reading ------------------------------------------------------------------------------------
    def read(self, source: str, split: str):
        """A .txt file or a folder of them (hidden files skipped) as documents; anything else: the shared readers."""
        path = Path(source)
        if path.is_file() and path.suffix.lower() == ".txt":
            files = [path]
        elif path.is_dir() and not any((path / f).exists() for f in datalib.HF_SAVED):
            files = sorted(f for f in path.rglob("*.txt") if f.is_file()
                           and not any(p.startswith(".") for p in f.relative_to(path).parts))
            if not files:
                raise datalib.DataError(f"{source}: a folder without .txt files; give .txt files, or a .csv/.jsonl "
                                        f"with a '{self.column}' column")
        else:
            return None
        table = datalib.Table(source=source)
        for f in files:
            good, bad, skipped = read_text(f, self.recipe.data.document)
            table.rows += [{self.column: text} for _, text in good]
            table.origins += [origin for origin, _ in good]
            table.rejects += [datalib.Reject(origin, why, split) for origin, why in bad]
            if skipped:
                self._notes.append(f"{f}: {skipped:,} empty line(s) skipped (data.document: line)")
        return table

    def check_notes(self) -> list[str]:
        return list(self._notes)

    def check(self, row: dict, split: str) -> str | None:
        return text_problem(row.get(self.column), self.column)

    def check_input(self, item) -> str | None:
        return self.check(item if isinstance(item, dict) else {self.column: item}, "predict")

    def key(self, row: dict) -> str:
        return row[self.column]

    def text(self, item) -> str:
        return item[self.column] if isinstance(item, dict) else item

    # --- the doctor ---------------------------------------------------------------------------------
    def tokens(self, text: str) -> list[int]:
        """The document's tokens, without special tokens."""
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def length_stats(self, rows: list[dict], features: list[dict]) -> dict:
        """Per document: its tokens (nothing is cut); `windowed`: documents longer than data.max_length, which span
        several blocks (causal) or windows (masked)."""
        kept = [len(self.tokens(self.text(r))) for r in rows]
        return {"kept": kept, "lengths": kept, "windowed": [i for i, n in enumerate(kept) if n > self.max_length]}

    def data_findings(self, tables: dict) -> tuple[dict, list[str], list[str]]:
        """Token counts per split, and empty / whitespace-only lines inside documents (pretrain_schema)."""
        splits = {}
        for split, table in tables.items():
            texts = [self.text(r) for r in table.rows]
            lines = [t.split("\n") for t in texts]
            splits[split] = {"tokens": [len(self.tokens(t)) for t in texts], "origins": table.origins,
                             "empty": [sum(not x for x in ls) for ls in lines],
                             "whitespace": [sum(bool(x) and not x.strip() for x in ls) for ls in lines]}
        section, warnings = token_findings(splits, self.max_length, self.recipe.doctor.listed)
        return section, warnings, []

    # --- model --------------------------------------------------------------------------------------
    def save(self, model, folder) -> None:
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def count(self, batch: dict) -> float:
        return float((self.targets(batch["labels"]) != -100).sum())

    def loss(self, model, batch: dict) -> torch.Tensor:
        """HF's `.loss` (the mean over label tokens) times their count: the sum the loop divides."""
        out = self.forward(model, batch)
        n = self.count(batch)
        return out.loss * n if n else out.logits.sum() * 0.0      # no label token (a short masked batch): zero

    # --- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        """Loss and accuracy per label token, perplexity = exp(loss), label_tokens, over `features`."""
        import math

        total, correct, count = 0.0, 0, 0
        device = model_device(model)
        order = sorted(range(len(features)), key=lambda i: self.length(features[i]))
        vocab = len(self.tokenizer)                                   # the logits' width, near enough
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(self.length(features[i]) for i in idx)
            step = max(1, LOGITS_PER_CHUNK // (width * vocab))        # rows whose logits fit one chunk
            for c in range(0, len(idx), step):
                batch = send_to_device(self.scored_batch(features, idx[c:c + step]), device)
                labels = self.targets(batch.pop("labels"))
                logits = self.targets(self.forward(model, batch).logits.float(), logits=True)
                keep = labels != -100
                total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
                correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
                count += int(keep.sum())
        loss = total / count if count else float("nan")
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / count if count else 0.0,
                "label_tokens": count}

    def forward(self, model, batch: dict):
        return model(**batch)

    def targets(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        """Labels [B, T] (or logits [B, T, V]) at the positions that predict a label."""
        return x

    def scored_batch(self, features: list[dict], idx: list[int]) -> dict:
        """The batch evaluation scores for features[idx] (labels included)."""
        return self.collate([features[i] for i in idx])


class CausalPretrain(Pretrain, Generative):
    """Next-token prediction on packed documents (see the module docstring)."""
    name = "pretrain-causal"
    peft_task_type = "CAUSAL_LM"

    def load_processor(self, source, revision):
        tok = super().load_processor(source, revision)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token     # safe: padding goes by length, never by id
        return tok

    def document(self, text: str) -> list[int]:
        """The document's tokens as the model reads one: BOS where the tokenizer adds it, EOS at the end."""
        ids = self.tokenizer(text, verbose=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def encode(self, rows: list[dict]) -> Features:
        """Blocks of data.max_length tokens, documents in row order (the loop shuffles blocks); nothing is cut."""
        size, blocks, ids, pos = self.max_length, [], [], []
        for row in rows:
            doc = self.document(self.text(row))
            while doc:
                if size - len(ids) < 2:                # a 1-token piece predicts nothing: the block ends
                    blocks.append((ids, pos))
                    ids, pos = [], []
                piece, doc = doc[:size - len(ids)], doc[size - len(ids):]
                ids, pos = ids + piece, pos + list(range(len(piece)))
        if ids:
            blocks.append((ids, pos))
        return Features([{"input_ids": i, "position_ids": p, "labels": [-100 if q == 0 else t for t, q in zip(i, p)]}
                         for i, p in blocks])

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # input_ids, labels, position_ids: [B, T] right-padded; the padding is a segment of its own, never a label
        width = self.padded(max(len(f["input_ids"]) for f in features))
        ids = torch.full((len(features), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        pos = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
            pos[i, :n], pos[i, n:] = torch.tensor(f["position_ids"]), torch.arange(width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    def targets(self, x, logits=False):
        return x[:, :-1] if logits else x[:, 1:]                # position t predicts token t + 1

    def forward(self, model, batch: dict):
        token = SEGMENTS.set(segments(batch["position_ids"]))    # per-document attention on CPU (causal_lm)
        try:
            return model(**batch, use_cache=False)
        finally:
            SEGMENTS.reset(token)

    def load_model(self):
        from transformers import AutoModelForCausalLM

        model = load_hf(AutoModelForCausalLM, self.recipe.model)[0]
        use_segment_attention(model)
        return model

    def load_trained(self, folder):
        from transformers import AutoModelForCausalLM

        model = load_saved(self, AutoModelForCausalLM, folder)
        use_segment_attention(model)
        return model

    def evaluate_final(self, model, rows, features, batch_size, out_dir=None) -> dict:
        with self.autocast(model):
            return self.evaluate(model, features, batch_size)

    def prompt_ids(self, text) -> list[int]:
        return self.tokenizer(text if isinstance(text, str) else self.text(text), verbose=False)["input_ids"]

    def predict(self, model, inputs: list) -> list[dict]:
        """The text's continuation (eval.generate's settings; greedy, 32 new tokens by default)."""
        texts = [self.text(x) for x in inputs]
        outputs = self.generate(model, texts, self.recipe.eval.batch_size)
        return [{"prompt": t, "output": o} for t, o in zip(texts, outputs)]


class MaskedPretrain(Pretrain):
    """BERT-style masked LM (see the module docstring)."""
    name = "pretrain-masked"

    def __init__(self, recipe, pad_multiple: int = 1):
        super().__init__(recipe, pad_multiple)
        self._masker = None

    def load_processor(self, source, revision):
        tok = super().load_processor(source, revision)
        if tok.mask_token is None or tok.pad_token is None:
            raise TunesmithError(f"{source}: the tokenizer has no {'mask' if tok.mask_token is None else 'pad'} "
                                 f"token; pretrain-masked needs a BERT-style model (pretrain-causal trains causal LMs)")
        return tok

    @property
    def masker(self):
        """transformers' BERT masking (its torch_mask_tokens), given a generator per call."""
        if self._masker is None:
            from transformers import DataCollatorForLanguageModeling

            m = self.recipe.masking
            whole = m.whole_word                            # whole words: [MASK] only (the collator's own rule)
            self._masker = DataCollatorForLanguageModeling(
                self.tokenizer, mlm_probability=m.probability, whole_word_mask=whole,
                mask_replace_prob=1.0 if whole else m.mask_replace,
                random_replace_prob=0.0 if whole else m.random_replace)
        return self._masker

    def encode(self, rows: list[dict]) -> Features:
        """One feature per window of data.max_length tokens (special tokens included) of each document."""
        tok = self.tokenizer
        head, tail = self.specials()
        room = self.max_length - len(head) - len(tail)
        out = []
        for row in rows:
            enc = tok(self.text(row), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
            for s in range(0, max(len(ids), 1), room):
                feature = {"input_ids": head + ids[s:s + room] + tail}
                if self.recipe.masking.whole_word:          # (0, 0) on special tokens, as tokenizers give them
                    feature["offsets"] = [(0, 0)] * len(head) + offsets[s:s + room] + [(0, 0)] * len(tail)
                out.append(feature)
        return Features(out)

    def specials(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text ([CLS], [SEP]; <s>, </s>)."""
        bare = self.tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
        full = self.tokenizer("a", verbose=False)["input_ids"]
        k = next(i for i in range(len(full)) if full[i:i + len(bare)] == bare)
        return full[:k], full[k + len(bare):]

    def pad(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask: [B, T] right-padded; offset_mapping [B, T, 2] for whole-word masking."""
        width = self.padded(max(len(f["input_ids"]) for f in features))
        ids = torch.full((len(features), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        offsets = torch.zeros((len(features), width, 2), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), 1
            if "offsets" in f:
                offsets[i, :n] = torch.tensor(f["offsets"])
        return {"input_ids": ids, "attention_mask": mask, **({"offset_mapping": offsets} if "offsets" in features[0]
                                                              else {})}

    def masked(self, batch: dict, generator: torch.Generator) -> dict:
        """The batch with BERT's masking applied: input_ids changed, labels -100 except at the chosen tokens."""
        ids = batch["input_ids"]
        special = torch.isin(ids, torch.tensor(self.tokenizer.all_special_ids)) | (batch["attention_mask"] == 0)
        self.masker.generator = generator
        offsets = batch.pop("offset_mapping", None)
        inputs, labels = self.masker.torch_mask_tokens(ids.clone(), special_tokens_mask=special.long(),
                                                       offset_mapping=offsets)
        return {**batch, "input_ids": torch.as_tensor(inputs), "labels": torch.as_tensor(labels)}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """A training batch, masked with a generator seeded from one draw of the global RNG."""
        g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        return self.masked(self.pad(features), g)

    def scored_batch(self, features: list[dict], idx: list[int]) -> dict:
        """Each feature masked by a generator of its own index and train.seed: the same tokens every evaluation."""
        rows = []
        for i in idx:
            g = torch.Generator().manual_seed(self.recipe.train.seed * 1_000_003 + i)
            rows.append(self.masked(self.pad([features[i]]), g))
        width = max(r["input_ids"].shape[1] for r in rows)
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        return {k: torch.cat([torch.nn.functional.pad(r[k], (0, width - r[k].shape[1]), value=v) for r in rows])
                for k, v in fill.items()}

    def load_model(self):
        from transformers import AutoModelForMaskedLM

        return load_hf(AutoModelForMaskedLM, self.recipe.model)[0]

    def load_trained(self, folder):
        from transformers import AutoModelForMaskedLM

        return load_saved(self, AutoModelForMaskedLM, folder)

    def predict(self, model, inputs: list) -> list[dict]:
        """The text with each mask token (e.g. [MASK]) replaced by the model's most probable token."""
        out = []
        for x in inputs:
            text = self.text(x)
            ids = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=ids.to(model_device(model))).logits[0]
            filled = ids[0].clone()
            where = filled == self.tokenizer.mask_token_id
            filled[where] = logits[where.to(logits.device)].argmax(-1).cpu()
            out.append({"prompt": text, "output": self.tokenizer.decode(filled, skip_special_tokens=True)})
        return out
