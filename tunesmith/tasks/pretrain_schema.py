"""Continued pretraining on raw text, without torch: the recipes of `pretrain-causal` (next-token prediction on
packed documents) and `pretrain-masked` (BERT-style masked LM), and the doctor's token counts.

Data: a .txt file (documents split as data.document says), a folder of .txt files, or a table (CSV, JSONL,
Parquet) with a text column. A masked run's model/ is an AutoModelForMaskedLM folder that a text-classification
or token-classification recipe takes as `model:` (its encoder is kept, the MLM head dropped, a new head added).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tunesmith.recipe import DataConfig, Recipe, Section
from tunesmith.tasks.schema import GenerativeEval


class PretrainData(DataConfig):
    text_column: str = "text"                   # tables (CSV, JSONL, Parquet): the column holding a document
    # .txt files: "paragraph": documents end at a blank line; "line": one document a line (blank lines skipped and
    # counted); "file": one document a file
    document: Literal["paragraph", "line", "file"] = "paragraph"
    max_length: int = Field(128, gt=2)          # tokens: causal, a packed block; masked, one window ([CLS] .. [SEP])


class PretrainEval(GenerativeEval):
    before: bool = True                         # perplexity of the base model on the test text, in eval.json


class MaskingConfig(Section):
    """BERT's masking (Devlin et al. 2019): `probability` of the tokens are chosen; of those, mask_replace become
    [MASK], random_replace a random token, the rest stay (80/10/10 by default)."""
    probability: float = Field(0.15, gt=0, lt=1)
    mask_replace: float = Field(0.8, ge=0, le=1)
    random_replace: float = Field(0.1, ge=0, le=1)
    whole_word: bool = False                    # choose words, mask every token of a chosen word (always [MASK]:
                                                # transformers' collator does no random replacement then)

    @model_validator(mode="after")
    def _shares(self):
        if self.mask_replace + self.random_replace > 1:
            raise ValueError("masking.mask_replace + masking.random_replace must be at most 1")
        return self


class PretrainRecipe(Recipe):
    """What both objectives share: raw-text data, loss / perplexity / token accuracy, the base model scored first."""
    metrics: ClassVar[dict[str, Literal["max", "min"]]] = {"loss": "min", "perplexity": "min", "accuracy": "max"}
    default_metric: ClassVar[str] = "loss"

    data: PretrainData
    eval: PretrainEval = PretrainEval()


class CausalPretrainRecipe(PretrainRecipe):
    task_class: ClassVar[str] = "tunesmith.tasks.pretrain:CausalPretrain"
    starter_model: ClassVar[tuple[str, str]] = ("smollm2", "HuggingFaceTB/SmolLM2-135M")
    # full: 2e-5 (continued pretraining keeps the rate low, as causal-lm's SFT default); LoRA: 2e-4
    learning_rates: ClassVar[dict[str, float]] = {"full": 2e-5, "lora": 2e-4, "head": 1e-4}

    task: Literal["pretrain-causal"]


class MaskedPretrainRecipe(PretrainRecipe):
    task_class: ClassVar[str] = "tunesmith.tasks.pretrain:MaskedPretrain"
    starter_model: ClassVar[tuple[str, str]] = ("minilm", "sentence-transformers/all-MiniLM-L6-v2")

    task: Literal["pretrain-masked"]
    masking: MaskingConfig = MaskingConfig()


NOT_UTF8 = re.compile("[\udc80-\udcff]")         # bytes that surrogateescape could not decode


def read_text(path: Path, how: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
    """A .txt file's documents as data.document says (`how`): ([(origin FILE:LINE of its first line, text)],
    [(origin, why it is rejected)]: bytes that are not UTF-8, an empty file under "file"; empty lines skipped under
    "line")."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline=None) as fh:
        lines = fh.read().split("\n")
    docs: list[tuple[int, list[str]]] = []          # (first line number, lines)
    skipped = 0
    if how == "file":
        docs = [(1, lines)]
    else:
        start, current = 0, []
        for n, line in enumerate(lines, 1):
            if line.strip() and how == "line":
                docs.append((n, [line]))
            elif line.strip():
                start = start if current else n
                current.append(line)
            else:
                skipped += how == "line" and n < len(lines)        # the file's final newline ends a line
                if current:
                    docs.append((start, current))
                    current = []
        if current:
            docs.append((start, current))
    good, bad = [], []
    for n, doc in docs:
        text = "\n".join(doc).strip("\n")
        origin = f"{path}:{n or 1}"
        if NOT_UTF8.search(text):
            bad.append((origin, "not valid UTF-8"))
        elif text:
            good.append((origin, text))
        elif how == "file":
            bad.append((origin, "empty file"))
    return good, bad, skipped


def token_findings(splits: dict[str, dict], limit: int, listed: int = 20) -> tuple[dict, list[str]]:
    """(doctor.json's "task" section, warnings) from, per split, "tokens" (per document, no special tokens),
    "origins", "empty" (empty lines inside each document) and "whitespace" (lines of spaces or tabs alone, ditto).
    Section: tokens {split: {documents, tokens, p50, p90, max, longer_than_block}}, lines {split: {empty,
    whitespace_only, origins}} (origins: documents holding whitespace-only lines)."""
    section = {"tokens": {}, "lines": {}}
    warnings = []
    for split, s in splits.items():
        counts = sorted(s["tokens"])
        n = len(counts)
        section["tokens"][split] = {"documents": n, "tokens": sum(counts),
                                    "p50": counts[n // 2] if n else 0, "p90": counts[int(0.9 * (n - 1))] if n else 0,
                                    "max": counts[-1] if n else 0, "longer_than_block": sum(c > limit for c in counts)}
        odd = [o for o, w in zip(s["origins"], s["whitespace"]) if w]
        section["lines"][split] = {"empty": sum(s["empty"]), "whitespace_only": sum(s["whitespace"]),
                                   "origins": odd[:listed]}
        if odd:
            warnings.append(f"{split}: {len(odd):,} document(s) hold lines of spaces or tabs alone, e.g. {odd[0]}: "
                            f"they train as whitespace tokens; strip them unless the layout matters")
    total = section["tokens"].get("train", {}).get("tokens", 0)
    if splits and total < 10 * limit:
        warnings.append(f"train: {total:,} tokens in all, under 10 blocks of data.max_length={limit}: little text "
                        f"to adapt a model to")
    return section, warnings
