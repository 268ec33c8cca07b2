"""Text-to-text (translation, summarisation, rewriting) without torch: the recipe, the prompt a source becomes, and
the scores of generated text (sacrebleu's BLEU and chrF, rouge-score's ROUGE, exact match, lengths).

Scales, as each scorer reports them: bleu and chrf 0-100 (sacrebleu); rouge1/rouge2/rougeL/rougeLsum 0-1 (mean F1 of
rouge-score; rougeLsum splits summaries into sentences at newlines, as rouge-score does); exact_match 0-1 (SQuAD's
normalisation: case, punctuation, articles, whitespace).
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tunesmith.recipe import AdaptConfig, DataConfig, Guess, Recipe
from tunesmith.tasks.schema import GenerateConfig, GenerativeEval, column

# what adapt.freeze_encoder freezes: the encoder of T5 (encoder.*) and of BART/Marian/NLLB (model.encoder.*)
ENCODER_PATTERNS = ["encoder.*", "*.encoder.*"]
GENERATION_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match")
ROUGE_KEYS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
# `tunesmith init`: column names of a source and of its target (summarisation and translation sets)
SOURCES = ("source", "src", "document", "article", "source_text")
TARGETS = ("target", "tgt", "summary", "highlights", "target_text")


class Text2TextData(DataConfig):
    source_column: str = "source"
    target_column: str = "target"
    prefix: str | None = None                   # written before every source ("summarize: ", T5's task prefixes)
    template: str | None = None                 # the prompt with "{source}" where the source goes (instead of prefix)
    chat_template: str | None = None            # decoder-only: Jinja chat template; None: the tokenizer's own, or a
                                                # plain "prompt\ntarget<eos>" when it has none (not a chat model)
    max_length: int = Field(256, gt=0)          # tokens of the prompt (prefix/template included); longer sources
                                                # are cut at the end and counted
    max_target_length: int = Field(64, gt=1)    # tokens of the target (its end token included); longer ones are cut

    @model_validator(mode="after")
    def _prompt(self):
        if self.template is not None and "{source}" not in self.template:
            raise ValueError("data.template must contain {source} where the source text goes")
        if self.template is not None and self.prefix is not None:
            raise ValueError("set data.prefix or data.template, not both (a template holds its own prefix)")
        return self

    def prompt(self, source: str) -> str:
        """The model's input for `source`: template with {source} replaced, or prefix + source."""
        if self.template is not None:
            return self.template.replace("{source}", source)
        return (self.prefix or "") + source


class Text2TextAdapt(AdaptConfig):
    freeze_encoder: bool = False                # encoder-decoder: the encoder does not train (ENCODER_PATTERNS)

    @model_validator(mode="after")
    def _encoder(self):
        if self.freeze_encoder:                 # idempotent: a run's saved recipe already holds them
            missing = [p for p in ENCODER_PATTERNS if p not in self.freeze_patterns]
            if missing:
                self.freeze_patterns = [*self.freeze_patterns, *missing]
        return self


class Text2TextEval(GenerativeEval):
    # final evaluation generates (BLEU, chrF, ROUGE, exact match) unless set to null; greedy by default
    generate: GenerateConfig | None = GenerateConfig(max_new_tokens=64)
    rouge_stemmer: bool = True                  # rouge-score's Porter stemmer (what summarisation papers report)


class Text2TextRecipe(Recipe):
    task_class: ClassVar[str] = "tunesmith.tasks.text2text:Text2Text"
    metrics: ClassVar[dict[str, Literal["max", "min"]]] = {
        "loss": "min", "perplexity": "min", **{k: "max" for k in GENERATION_METRICS}}
    default_metric: ClassVar[str] = "loss"

    # no seq2seq weights ship offline: the bundled decoder-only SmolLM2 (prompt -> target), else a T5 by hub id
    starter_model: ClassVar[tuple[str, str]] = ("smollm2", "google-t5/t5-small")

    task: Literal["text2text"]
    data: Text2TextData
    adapt: Text2TextAdapt = Text2TextAdapt()
    eval: Text2TextEval = Text2TextEval()

    @classmethod
    def sniff(cls, profile) -> Guess | None:
        """A table with a source and a target column, named like SOURCES and TARGETS (or as
        data.source_column/target_column say)."""
        if profile.rows is None:
            return None
        shapes = ("text", "category", "other")                     # names decide; values must be strings
        source, why = column(profile, "source_column", shapes, "source-like", "data.source_column=NAME", SOURCES)
        target, why_t = column(profile, "target_column", shapes, "target-like", "data.target_column=NAME", TARGETS)
        if why or why_t:
            names = {c.lower() for c in profile.columns}    # both sides named: text2text data, else not ours
            named = {"source_column", "target_column"} & set(profile.hints) or (names & set(SOURCES)
                                                                                 and names & set(TARGETS))
            return Guess(0.6, ambiguous="\n".join(w for w in (why, why_t) if w)) if named else None
        pairs = [r for r in profile.rows if isinstance(r.get(source), str) and isinstance(r.get(target), str)]
        about = [f"{len(pairs):,} pairs; source column '{source}': {profile.words([r[source] for r in pairs])}",
                 f"target column '{target}': {profile.words([r[target] for r in pairs])}"]
        if len(pairs) < len(profile.rows):
            about.append(f"rows without a text source and target: {len(profile.rows) - len(pairs):,}")
        about += [f"not used: {profile.describe(c)}" for c in profile.columns if c not in (source, target)]
        notes = ["generation metrics (BLEU, chrF, ROUGE) on validation: eval: {generate: {max_new_tokens: 64}}"]
        return Guess(0.9, {"source_column": source, "target_column": target}, about, notes)

    @model_validator(mode="after")
    def _generating_metric(self):
        if self.train.metric in GENERATION_METRICS and self.eval.generate is None:
            raise ValueError(f"train.metric {self.train.metric} is scored on generated text: set eval.generate")
        return self


# --- scores ---------------------------------------------------------------------------------------------

def percentiles(values: list[int]) -> dict:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values)
    return {"mean": round(float(a.mean()), 3), "p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
            "max": int(a.max())}


def scores(references: list[str], outputs: list[str], stemmer: bool = True) -> dict:
    """BLEU and chrF (corpus level, sacrebleu's defaults; their signature strings say how they were computed),
    ROUGE-1/2/L/Lsum (mean F1, rouge-score), exact match; see the module docstring for the scales."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    from tunesmith.metrics import normalize_answer

    n = len(references)
    if not n:
        return {"n_examples": 0}
    bleu, chrf = BLEU(), CHRF()
    out = {"bleu": bleu.corpus_score(outputs, [references]).score,
           "chrf": chrf.corpus_score(outputs, [references]).score}
    scorer = rouge_scorer.RougeScorer(ROUGE_KEYS, use_stemmer=stemmer)
    sums = dict.fromkeys(ROUGE_KEYS, 0.0)
    for r, o in zip(references, outputs):
        for k, s in scorer.score(r, o).items():
            sums[k] += s.fmeasure
    out |= {k: v / n for k, v in sums.items()}
    out["exact_match"] = sum(normalize_answer(r) == normalize_answer(o) for r, o in zip(references, outputs)) / n
    return out | {"n_examples": n, "bleu_signature": str(bleu.get_signature()),
                  "chrf_signature": str(chrf.get_signature()), "rouge_stemmer": stemmer}


# --- the doctor's checks (Text2Text.data_findings) ------------------------------------------------------------

def _lengths(tokens: list[int], limit: int) -> dict:
    import numpy as np

    out = {"examples": len(tokens), "limit": limit}
    if tokens:
        a = np.asarray(tokens)
        out |= {f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 99)} | {"max": int(a.max())}
        out |= {"cut": int((a > limit).sum()), "cut_share": round(float((a > limit).mean()), 6)}
    return out


def pair_findings(splits: dict[str, dict], limits: dict[str, int], listed: int = 20) -> tuple[dict, list[str]]:
    """(doctor.json's "task" section, warning lines) from, per split, the rows' "sources", "targets", "origins" and
    their token counts "source_tokens", "target_tokens" (text only, no special tokens); limits: {"source", "target"}
    tokens each may keep. Sections: sources/targets {split: {examples, limit, p50, p90, p99, max, cut, cut_share}},
    identical {split: {count, origins}} (target equal to source after trimming), conflicting {count, examples:
    [{source, targets, origins}]} (one normalised source, several normalised targets, over all splits)."""
    section = {"sources": {}, "targets": {}, "identical": {}}
    warnings = []
    groups: dict[str, dict] = {}
    norm = lambda text: " ".join(text.lower().split())
    for split, s in splits.items():
        for side in ("source", "target"):
            d = section[side + "s"][split] = _lengths(s[side + "_tokens"], limits[side])
            if d.get("cut_share", 0) >= 0.01:
                key = "data.max_length" if side == "source" else "data.max_target_length"
                warnings.append(f"{split}: {d['cut']:,} of {d['examples']:,} {side}s ({d['cut_share']:.1%}) are cut at "
                                f"{key} ({limits[side]} tokens of text; p99 = {d['p99']})")
        same = [o for a, b, o in zip(s["sources"], s["targets"], s["origins"]) if a.strip() == b.strip()]
        section["identical"][split] = {"count": len(same), "origins": same[:listed]}
        if same:
            warnings.append(f"{split}: {len(same):,} pair(s) whose target equals the source, e.g. {same[0]}: the model "
                            f"learns to copy; drop them unless copying is right")
        for a, b, o in zip(s["sources"], s["targets"], s["origins"]):
            g = groups.setdefault(norm(a), {"source": a, "targets": {}, "origins": []})
            g["targets"].setdefault(norm(b), b)
            g["origins"].append(o)
    conflicting = [{"source": g["source"], "targets": list(g["targets"].values()), "origins": g["origins"]}
                   for g in groups.values() if len(g["targets"]) > 1]
    section["conflicting"] = {"count": len(conflicting), "examples": conflicting[:listed]}
    if conflicting:
        warnings.append(f"{len(conflicting):,} source(s) appear with different targets (normalised, over all splits), "
                        f"e.g. {conflicting[0]['origins'][0]}: fine for several references, else fix them")
    return section, warnings
