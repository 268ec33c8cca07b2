"""Token classification (named entities) on AutoModelForTokenClassification: one tag per word.

Rows: {tokens, tags} (JSONL, or CoNLL through `read`) or {text, spans} (character offsets; split into words by
tagging.split_words). A word's first sub-word carries its tag, the others -100 (or the tag, B- as I-, with
data.label_all_subwords). A sentence longer than data.max_length sub-words becomes several windows of whole
words sharing data.stride sub-words; training sees every window, evaluation and prediction take each word from
the window where it is most central, so every word is scored exactly once (the alignment: tasks/subwords.py).

predict's spans are those of transformers' pipeline("token-classification") with aggregation_strategy
`aggregation` ("first"; "simple" under data.label_all_subwords), also named in the saved config.json.

Declares: prediction "spans" (schema tagging.TaggedSpans: a pre-tokenized input also gets its tags), ONNX outputs
(logits [B, T, C], batch and sequence axes), balance_unit "entities" (the doctor counts entity types); it does not
chat, explain or distil.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith import io, metrics
from tunesmith.data import DataError
from tunesmith.errors import TunesmithError
from tunesmith.tasks import conll, subwords, tagging
from tunesmith.tasks.base import Features, batches, model_device
from tunesmith.tasks.hf import load_hf, load_saved
from tunesmith.tasks.text import Tokenized

SAMPLES = 20                            # test sentences evaluate_final writes to samples.jsonl (the report's)


class TokenClassification(Tokenized):
    name = "token-classification"
    peft_task_type = "TOKEN_CLS"
    input_key = "text"
    prediction = "spans"            # predict: {"spans": [{text, start, end, label, score}]} (+ tags for tokens)
    balance_unit = "entities"       # the doctor's class balance counts entities per type
    names: list[str] = []           # tag names in id order, "O" first (set by prepare or load_trained)
    label2id: dict[str, int] = {}
    inside: list[int] = []          # label_all_subwords: tag id -> the id a word's later sub-words learn

    def __init__(self, recipe, pad_multiple: int = 1):
        super().__init__(recipe, pad_multiple)
        self.scheme = tagging.CANONICAL[recipe.data.tag_scheme]
        self.repairs: dict[str, list[int]] = {}     # split -> [sentences, tags] changed by data.tag_repair

    @property
    def labels(self) -> list[str]:
        return list(self.names)

    def set_labels(self, names: list[str]) -> None:
        self.names = list(names)
        self.label2id = {n: i for i, n in enumerate(self.names)}
        self.inside = [self.label2id.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]

    def types(self) -> set[str] | None:
        """Entity types learned from train (None before prepare: any type is accepted)."""
        return {tagging.parse(n)[1] for n in self.names if n != "O"} or None

    # --- data ---------------------------------------------------------------------------------------
    def read(self, source: str, split: str):
        """A CoNLL file's sentences as a data.Table (origins FILE:LINE), or None for another format."""
        if Path(source).suffix.lower() in conll.CONLL_SUFFIXES:
            if not Path(source).is_file():
                raise DataError(f"{source}: file not found")
            table = conll.read_conll(source, self.recipe.data)
            for r in table.rejects:
                r.split = split
            return table
        return None

    def check(self, row: dict, split: str) -> str | None:
        cfg = self.recipe.data
        types = self.types() if split != "train" else None
        if cfg.tokens_column in row:
            tokens, tags = row[cfg.tokens_column], row.get(cfg.tags_column)
            if tags is None:
                return f"missing tags (column '{cfg.tags_column}')"
            reason = tagging.check_tags(tokens, tags, self.scheme, cfg.tag_repair, types)
            if reason is None and cfg.tag_repair:
                fixed = tagging.repair(tags, self.scheme)
                changed = sum(a != b for a, b in zip(tags, fixed))
                if changed:
                    count = self.repairs.setdefault(split, [0, 0])
                    count[0], count[1] = count[0] + 1, count[1] + changed
            return reason
        if cfg.text_column in row:
            if row.get(cfg.spans_column) is None:
                return f"missing spans (column '{cfg.spans_column}')"
            return tagging.check_spans(row[cfg.text_column], row[cfg.spans_column], types)
        return f"no '{cfg.tokens_column}' or '{cfg.text_column}' column"

    def check_notes(self) -> list[str]:
        return [f"{split}: {n:,} sentence(s) with an invalid {self.scheme} tag sequence repaired by data.tag_repair "
                f"({k:,} tag(s) changed; seqeval's reading kept)" for split, (n, k) in self.repairs.items()]

    def check_input(self, item) -> str | None:
        cfg = self.recipe.data
        if isinstance(item, dict) and cfg.tokens_column in item:
            tokens = item[cfg.tokens_column]
            if not isinstance(tokens, list) or not tokens or not all(isinstance(w, str) and w.strip() for w in tokens):
                return f"'{cfg.tokens_column}' must be a non-empty list of non-blank strings"
            return None
        text = item.get(cfg.text_column) if isinstance(item, dict) else item
        if not isinstance(text, str):
            return f"expected a text, or a row with '{cfg.text_column}' or '{cfg.tokens_column}'"
        return None if tagging.split_words(text) else "empty text"

    def sentence(self, row: dict) -> tuple[list[str], list[str] | None, list[tuple[int, int]] | None]:
        """(words, tags or None, character offsets of the words for a text row or None) of a checked row."""
        cfg = self.recipe.data
        if cfg.tokens_column in row:
            tags = row.get(cfg.tags_column)
            if tags is not None and cfg.tag_repair:
                tags = tagging.repair(tags, self.scheme)
            return list(row[cfg.tokens_column]), tags, None
        text, spans = row[cfg.text_column], row.get(cfg.spans_column)
        offsets = tagging.split_words(text, [x for s in spans or () for x in (s["start"], s["end"])])
        tags = None
        if spans is not None:
            found = []
            for s in spans:
                a = next(i for i, (x, y) in enumerate(offsets) if y > s["start"] and x < s["end"])
                b = a + sum(1 for x, y in offsets[a:] if x < s["end"])
                found.append((s["label"], a, b))
            tags = tagging.emit(found, len(offsets), self.scheme)
        return [text[a:b] for a, b in offsets], tags, offsets

    def key(self, row: dict) -> str:
        return " ".join(self.sentence(row)[0])

    def balance_labels(self, row: dict) -> list[str]:
        return [kind for kind, _, _ in tagging.entities(self.sentence(row)[1] or [])]

    def prepare(self, rows: list[dict]) -> None:
        types = sorted({tagging.parse(t)[1] for r in rows for t in (self.sentence(r)[1] or ()) if t != "O"})
        if not types:
            raise DataError(f"{self.recipe.data.train}: no entity tags in the usable train rows (every tag is O)")
        self.set_labels(tagging.tag_names(types, self.scheme))

    def encode(self, rows: list[dict]) -> Features:
        """Windows of sub-word ids (see the module doc); each feature: input_ids, labels (when the row is
        tagged), row (its index in `rows`), n_words, words (the word indices it scores), first (their first
        sub-word's position, -1 for a word without sub-words), pieces (their sub-word counts), gold (their tag
        ids, when tagged)."""
        sents = []
        for r in rows:
            words, tags, _ = self.sentence(r)
            sents.append((words, None if tags is None else [self.label2id[t] for t in tags]))
        return self.windows(sents)

    def windows(self, sents: list[tuple[list[str], list[int] | None]]) -> Features:
        cfg = self.recipe.data
        return subwords.windows(self.tokenizer, sents, cfg.max_length, cfg.stride,
                                self.inside if cfg.label_all_subwords else None)

    def length_stats(self, rows: list[dict], features: list[dict]) -> dict:
        """lengths: sub-words per sentence (special tokens included); kept: the same less what is cut from words
        longer than a window (windows keep everything else); windowed: sentences longer than data.max_length."""
        return subwords.length_stats(self.tokenizer, [self.sentence(r)[0] for r in rows], self.recipe.data.max_length)

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # input_ids, attention_mask, labels: [B, T] padded to the longest (labels with -100)
        width = self.padded(max(len(f["input_ids"]) for f in features))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            mask[i, :n] = 1
            if "labels" in f:
                labels[i, :n] = torch.tensor(f["labels"])
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in features[0]:
            batch["labels"] = labels
        return batch

    # --- model --------------------------------------------------------------------------------------
    def load_processor(self, source, revision):
        from transformers import AutoTokenizer

        kw = {"revision": revision, "trust_remote_code": self.trust_remote_code}
        tok = AutoTokenizer.from_pretrained(source, **kw)
        if not tok.is_fast:
            raise TunesmithError(f"model '{source}': token classification needs a fast tokenizer (word ids per "
                                 f"sub-word); this one is {type(tok).__name__}")
        if not subwords.words_like_text(tok):        # byte-level BPE (RoBERTa, GPT-2): a word after a space is "Ġword"
            spaced = AutoTokenizer.from_pretrained(source, add_prefix_space=True, **kw)
            tok = spaced if subwords.words_like_text(spaced) else tok
        return tok

    def load_model(self):
        from transformers import AutoModelForTokenClassification

        config = {"id2label": dict(enumerate(self.names)), "label2id": dict(self.label2id)}
        return load_hf(AutoModelForTokenClassification, self.recipe.model, **config)[0]

    def load_trained(self, folder):
        from transformers import AutoModelForTokenClassification

        model = load_saved(self, AutoModelForTokenClassification, folder)
        self.set_labels([model.config.id2label[i] for i in range(model.config.num_labels)])
        return model

    def save(self, model, folder) -> None:
        tokenizer = copy.copy(self.tokenizer)       # a copy: the task's tokenizer is shared
        tokenizer.model_max_length = self.recipe.data.max_length
        model.config.tunesmith_aggregation = self.aggregation     # for transformers' pipeline users (see aggregation)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    # --- training and evaluation --------------------------------------------------------------------
    def loss(self, model, batch: dict) -> torch.Tensor:
        """Sum over labelled sub-words (labels != -100) of their cross-entropy."""
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits     # [B, T, C]
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               reduction="sum")

    def count(self, batch: dict) -> float:
        return float((batch["labels"] != -100).sum())

    def word_logprobs(self, model, features: list[dict], batch_size: int, pieces: bool = False) -> dict[int, tuple]:
        """row -> (log-probabilities [n_words, C], scored [n_words] bool): each word from the window that owns
        it, at its first sub-word; a word without sub-words is unscored and all its mass is on O (id 0). pieces:
        a third item, per word the log-probabilities of all its sub-words [n_pieces, C] (n_pieces may be 0)."""
        out = {}
        for idx, batch in batches(self, features, batch_size, model_device(model)):
            batch.pop("labels", None)
            logp = model(**batch).logits.float().log_softmax(-1).cpu()          # [B, T, C]
            for i, lp in zip(idx, logp):
                f = features[i]
                if f["row"] not in out:
                    blank = torch.full((f["n_words"], lp.shape[-1]), float("-inf"))
                    blank[:, 0] = 0.0
                    out[f["row"]] = (blank, torch.zeros(f["n_words"], dtype=torch.bool), [lp[:0]] * f["n_words"])
                scores, scored, subs = out[f["row"]]
                first, words = torch.tensor(f["first"], dtype=torch.long), torch.tensor(f["words"], dtype=torch.long)
                keep = first >= 0
                scores[words[keep]] = lp[first[keep]]
                scored[words[keep]] = True
                if pieces:
                    for w, a, n in zip(f["words"], f["first"], f["pieces"]):
                        subs[w] = lp[a:a + n] if a >= 0 else lp[:0]
        return {r: x if pieces else x[:2] for r, x in out.items()}

    def scores(self, model, features: list[dict], batch_size: int) -> tuple[dict, list, list, list]:
        """(metrics, gold tags, predicted tags, the predicted tags' probabilities [n_words]), one per sentence in
        row order."""
        logp = self.word_logprobs(model, features, batch_size)
        gold = {}
        for f in features:
            g = gold.setdefault(f["row"], [0] * f["n_words"])
            for w, t in zip(f["words"], f["gold"]):
                g[w] = t
        rows = sorted(gold)
        nll, n = 0.0, 0
        for r in rows:
            lp, scored = logp[r]
            target = torch.tensor(gold[r], dtype=torch.long)
            nll -= float(lp[scored].gather(1, target[scored, None]).sum())
            n += int(scored.sum())
        true = [[self.names[t] for t in gold[r]] for r in rows]
        best = [logp[r][0].exp().max(-1) for r in rows]
        pred = [[self.names[t] for t in b.indices.tolist()] for b in best]
        result = {"loss": nll / n if n else float("nan")}
        result |= metrics.entity_scores(true, pred, strict=self.scheme == "BIOES")
        result |= {"n_sentences": len(rows), "n_words": sum(len(t) for t in true)}
        return result, true, pred, [b.values for b in best]

    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        return self.scores(model, features, batch_size)[0]

    def evaluate_final(self, model, rows: list[dict], features: list[dict], batch_size: int,
                       out_dir=None) -> dict:
        """`evaluate`'s metrics and `misclassified` (sentences whose predicted entities differ from the gold ones,
        as the metrics read them: tagging.same_entities); with out_dir, those sentences in misclassified.jsonl and
        the first SAMPLES sentences in samples.jsonl, each as the report draws spans: {input (the text, or the
        tokens joined by single spaces), reference, output} (reference spans score 1); misclassified rows also
        carry row (the sentence's position in `rows`), tokens, tags and predicted (one tag per token)."""
        result, true, pred, prob = self.scores(model, features, batch_size)
        wrong = [i for i, (t, p) in enumerate(zip(true, pred)) if not tagging.same_entities(t, p, self.scheme)]
        result["misclassified"] = len(wrong)
        if out_dir is not None:
            def shown(i: int) -> dict:
                words, _, offsets = self.sentence(rows[i])
                text, offsets = (rows[i][self.recipe.data.text_column], offsets) if offsets else tagging.joined(words)
                gold = tagging.entity_spans(text, offsets, true[i], [1.0] * len(words))
                found = tagging.entity_spans(text, offsets, pred[i], prob[i].tolist())
                return {"input": text, "reference": {"spans": gold}, "output": {"spans": found}}

            io.write_jsonl(Path(out_dir) / "misclassified.jsonl",
                           ({"row": i, "tokens": self.sentence(rows[i])[0], "tags": true[i], "predicted": pred[i],
                             **shown(i)} for i in wrong))
            io.write_jsonl(Path(out_dir) / "samples.jsonl", [shown(i) for i in range(min(SAMPLES, len(rows)))])
        return result

    def summary(self, metrics: dict) -> str:
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in ("f1", "precision", "recall", "accuracy") if k in metrics)

    # --- use ----------------------------------------------------------------------------------------
    @classmethod
    def output_schema(cls):
        return tagging.TaggedSpans

    @property
    def aggregation(self) -> str | None:
        """The aggregation_strategy of transformers' pipeline("token-classification") that gives the spans `predict`
        gives (on a text within one window): "first" by default (a word's first sub-word carries its tag),
        "simple" under data.label_all_subwords (every sub-word is trained, so each is read and grouped as that
        pipeline does); None under BIOES (the pipeline groups by B-/I- prefixes only). Saved in the model's
        config.json as tunesmith_aggregation."""
        if self.scheme == "BIOES":
            return None
        return "simple" if self.recipe.data.label_all_subwords else "first"

    def predict(self, model, inputs: list) -> list[dict]:
        """A text (or {text_column: ...}) -> {"spans": [{text, start, end, label, score}]}: character offsets into
        the text (end exclusive; text == input[start:end]). Spans are whole words, score = the mean over the
        entity's words of the probability of their predicted tag; under `aggregation` "simple", spans group
        sub-words as that pipeline does (an entity may end inside a word) and score = the mean over its
        sub-words. {tokens_column: [...]} -> the same spans over the tokens joined by single spaces, and "tags",
        "scores": one per token (its first sub-word's)."""
        cfg = self.recipe.data
        sents, texts = [], []
        for x in inputs:
            if isinstance(x, dict) and cfg.tokens_column in x:
                words = list(x[cfg.tokens_column])
                texts.append((*tagging.joined(words), True))
            else:
                text = x[cfg.text_column] if isinstance(x, dict) else x
                offsets = tagging.split_words(text)
                words = [text[a:b] for a, b in offsets]
                texts.append((text, offsets, False))
            sents.append((words, None))
        simple = self.aggregation == "simple"
        with torch.no_grad():
            logp = self.word_logprobs(model, self.windows(sents), self.recipe.eval.batch_size, pieces=simple)
        out = []
        for i, (text, offsets, tokens) in enumerate(texts):
            best = logp[i][0].exp().max(-1)
            tags = [self.names[j] for j in best.indices.tolist()]
            if simple:
                out.append({"spans": tagging.grouped_spans(text, self.pieces(sents[i][0], offsets, logp[i][2]))})
            else:
                out.append({"spans": tagging.entity_spans(text, offsets, tags, best.values)})
            if tokens:
                out[-1] |= {"tags": tags, "scores": [round(float(p), 6) for p in best.values]}
        return out

    def pieces(self, words: list[str], offsets: list[tuple[int, int]], logp: list) -> list[tuple]:
        """(start, end, tag, probability) of each sub-word of `words` (at `offsets` in their text) that was scored,
        in order; logp: per word its sub-words' log-probabilities [n, C] (word_logprobs with pieces)."""
        out = []
        for w, spans in enumerate(subwords.offsets(self.tokenizer, words, [a for a, _ in offsets])):
            for (a, b), lp in zip(spans, logp[w]):
                p, j = lp.exp().max(-1)
                out.append((a, b, self.names[int(j)], float(p)))
        return out

    # --- ONNX export (tunesmith/deploy/export.py) ------------------------------------------------------
    def export_outputs(self) -> dict[str, dict[int, str]]:
        return {"logits": {0: "batch", 1: "sequence"}}                         # [B, T, C]

    def export_inputs(self) -> dict:
        """input_ids, attention_mask [B, T] of two sentences of different lengths."""
        batch = self.collate(self.windows([(["a", "short", "one"], None), (["and", "a", "longer", "one"] * 3, None)]))
        return {name: (x, {0: "batch", 1: "sequence"}) for name, x in batch.items()}

