"""Recipe pieces several tasks share: how a recipe recognises data (`tunesmith init`) and the generation settings
and tuning of generative tasks. No torch here (tunesmith/tasks/schema.py's reason); schema.py re-exports them."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from tunesmith.recipe import EvalConfig, Section

# --- recognising data (`tunesmith init`: Recipe.sniff; the profile is tunesmith/starter.py's) ------------

TOKENS_PER_WORD = 1.4           # sub-word tokens per whitespace word, a rough mean for English and BERT/Llama
PROMPTS = ("prompt", "instruction", "question", "query", "input")     # column names of a prompt ...
RESPONSES = ("response", "output", "answer", "completion")             # ... and of its response


def column(profile, key: str, shapes: tuple[str, ...], what: str, option: str, names=None):
    """(the column for data.`key`, None) or (None, why the user must choose): the user's (profile.hints), else the
    only column of one of `shapes` (and, given `names`, with one of those names)."""
    chosen = profile.hints.get(key)
    if chosen is not None:
        if chosen not in profile.columns:
            return None, f"no column '{chosen}' for data.{key} (the columns: {', '.join(profile.columns)})"
        return chosen, None
    found = [c for c in profile.columns if profile.shape(c) in shapes and (names is None or c.lower() in names)]
    if len(found) == 1:
        return found[0], None
    listed = "".join(f"\n  {profile.describe(c)}" for c in (found or profile.columns))
    head = f"{len(found)} {what} columns" if found else f"no {what} column"
    return None, f"{head}: choose one with {option}{listed}"


def tokens_needed(words: list[int], default: int, cap: int) -> int | None:
    """A max_length (tokens, a multiple of 32) holding 95% of the rows whole, when `default` does not; else None."""
    xs = sorted(words)
    need = xs[round(0.95 * (len(xs) - 1))] * TOKENS_PER_WORD if xs else 0
    return min(cap, math.ceil(need / 32) * 32) if need > default else None


# --- generation (shared by generative tasks: causal-lm now, seq2seq next) ----------------------------

class GenerateConfig(Section):
    """model.generate settings for evaluation, predict, chat and serve."""
    max_new_tokens: int = Field(32, gt=0)
    min_new_tokens: int | None = Field(None, ge=0)
    do_sample: bool = False                     # False: greedy (or beam search with num_beams > 1)
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    num_beams: int = Field(1, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, gt=0)
    length_penalty: float | None = None         # beam search: > 1 favours longer outputs
    seed: int = 0                               # sampling is seeded per call: the same input gives the same output

    def kwargs(self) -> dict:
        """The settings model.generate takes (unset ones left to the model's generation config)."""
        return {k: v for k, v in self.model_dump(exclude={"seed"}).items() if v is not None}


class GenerativeEval(EvalConfig):
    generate: GenerateConfig | None = None      # set: final evaluation also generates (exact match, ROUGE-L)


class GenerativeTuning:
    """What `tune` scores and races for a generative task's recipe (mixed in before Recipe)."""

    def tune_metric(self) -> tuple[str, Literal["max", "min"]]:
        """With eval.generate: exact match of the generated answers on the validation rows (what a chat model is
        judged by: the loss can fall while the answers stay wrong); else validation loss."""
        return ("exact_match", "max") if self.eval.generate is not None else super().tune_metric()

    def search_space(self, blocks: int | None, learning_rate: float, lora: bool = True) -> list[tuple[str, dict]]:
        """LoRA candidates, strongest first (tune races them in this order while its budget lasts, rather than
        many at runs too short to tell them apart): the plain recipe's rank and alpha at its learning rate x3 and
        /3 (the rate matters most for a small adapter; QLoRA's 2e-4 and PEFT's examples sit in 1e-4 .. 1e-3),
        then 4x the rank (alpha scaled with it: the update's scale kept) at the rate and x3. A plain recipe that
        is not LoRA starts from LoRA's own rate and rank (a full fine-tuning rate leaves an adapter untrained).
        None where LoRA has no modules to wrap in the model."""
        if not lora:
            return []
        own = self.adapt.method == "lora"
        cfg = self.adapt.lora if own else type(self.adapt.lora)()      # the recipe's LoRA, else the defaults
        r, alpha = cfg.r, cfg.alpha
        lr = learning_rate if own else type(self).learning_rates["lora"]
        out = []
        for rank, rate in ((r, 3 * lr), (r, lr / 3), (4 * r, lr), (4 * r, 3 * lr)):
            rate = float(f"{rate:.3g}")
            out.append((f"lora r{rank} lr {rate:g}", {"adapt.method": "lora", "adapt.lora.r": rank,
                                                      "adapt.lora.alpha": alpha * rank / r,
                                                      "train.learning_rate": rate}))
        return out
