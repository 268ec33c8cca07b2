"""Preference tuning on the causal-lm task (train.objective: dpo | orpo): rows of a prompt and two answers.

Rows: `prompt` (a string: one user message; or a message list) or `messages` (a message list), plus `chosen` and
`rejected`, each a string (the assistant's answer) or a message list ending with the assistant's answer. A message
list may hold the whole conversation (TRL's implicit prompt: everything before the last assistant turn, which must
be the same on both sides). Only the final answer's tokens are labelled (through its EOS); the prompt is masked.
A batch of B pairs is one forward over 2B rows: the chosen answers, then the rejected ones, right-padded:
  input_ids, labels, attention_mask: [2B, T]      reference: [B, 2] (DPO: the reference's summed log-probs)
Log-probs of an answer: the sum over its label tokens (DPO sigmoid); IPO and ORPO use the mean per token, as TRL.
  dpo sigmoid  -log sigmoid(beta ((pc - rc) - (pr - rr)))                     (Rafailov et al. 2023)
  dpo ipo      ((pc - rc) - (pr - rr) - 1 / (2 beta))^2, on per-token means     (Azar et al. 2023)
  orpo         -pc - lambda log sigmoid(log odds(pc) - log odds(pr)), per-token means, odds p / (1 - p)
               (Hong et al. 2024)
The DPO reference is the model as loaded, before adaptation: its log-probs are computed once, before eval.before
and the first step (Task.precompute), and kept in each feature (full fine-tuning: no frozen copy is held;
LoRA: the same numbers as the adapter-disabled model). Where a feature lacks them (`tunesmith eval` of a run), a
LoRA model gives them with its adapter disabled (peft's disable_adapter(): no second copy of the weights); a merged
or fully fine-tuned model needs the recipe's base model, loaded for that evaluation alone.
Items: pairs (loss sums over pairs; count gives B).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
from collections import Counter

import torch
import torch.nn.functional as F

from tunesmith.tasks.base import Features, batches, blank, model_device
from tunesmith.tasks.causal_lm import CausalLM, label_logits
from tunesmith.tasks.schema import conversation

RATIO = 4.0          # doctor: a pair whose answers' token counts differ by more than this factor is listed
SKEW = 0.8           # doctor: chosen longer (or shorter) in more than this share of pairs: length bias warned


def unwrapped(model):
    """The model inside a DistributedDataParallel wrapper (validation under DDP), else the model."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def reference(model):
    """A context in which `model` is the DPO reference: a peft model with its adapters disabled (the base weights,
    no copy); None for a model without adapters (whose reference is not itself once trained)."""
    from peft import PeftModel

    inner = unwrapped(model)
    return inner.disable_adapter() if isinstance(inner, PeftModel) else None


def answer_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's label tokens [R], label tokens per row [R]) for a batch of R rows."""
    logits, target, where = label_logits(model, batch)
    lp = -F.cross_entropy(logits.float(), target, reduction="none")                 # [N]
    rows = where.nonzero()[:, 0]
    sums = torch.zeros(where.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return sums, where.sum(1)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of a per-token mean log-prob (capped just below 0: p = 1 has no finite odds)."""
    x = mean_logp.clamp(max=-1e-9)
    return x - torch.log(-torch.expm1(x))


class Preference(CausalLM):
    """causal-lm under train.objective dpo or orpo (tunesmith/tasks/schema.py: CausalLMTrain)."""

    def __init__(self, recipe, pad_multiple: int = 1):
        super().__init__(recipe, pad_multiple)
        self.implicit = 0               # rows whose prompt came from their chosen/rejected conversations

    @property
    def metrics(self) -> dict[str, str]:
        return self.recipe.objective_metrics()

    @property
    def pair_loss(self) -> str:
        """"dpo" or "orpo" (train.objective; not `objective`, the Task method naming what fit minimises)."""
        return self.recipe.train.objective

    # --- rows -> (prompt, chosen, rejected) ----------------------------------------------------------
    def side(self, row: dict, column: str) -> tuple[list[dict], str]:
        """(messages before the answer, the answer) of one side; ValueError says what is wrong."""
        value = row.get(column)
        if value is None:
            raise ValueError(f"no '{column}' column: preference rows need a chosen and a rejected answer")
        msgs = conversation(value) if isinstance(value, list) or (isinstance(value, str)
                                                                  and value.lstrip().startswith("[")) else None
        if msgs is None:
            if not isinstance(value, str):
                raise ValueError(f"column '{column}' must be a string or a list of {{role, content}}")
            return [], value
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"column '{column}' must end with an assistant message, not '{msgs[-1]['role']}'")
        return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]

    def prompt_of(self, row: dict) -> list[dict]:
        """The row's explicit prompt (data.messages_column, else data.prompt_column) as messages; [] if none."""
        cfg = self.recipe.data
        for column in (cfg.messages_column, cfg.prompt_column):
            value = row.get(column)
            if value is None:
                continue
            msgs = conversation(value) if not isinstance(value, str) or value.lstrip().startswith("[") else None
            if msgs is not None:
                return [{"role": m["role"], "content": m["content"]} for m in msgs]
            if not isinstance(value, str) or blank(value):
                raise ValueError(f"column '{column}' must be a non-empty string or a list of {{role, content}}")
            return [{"role": "user", "content": value}]
        return []

    def pair(self, row: dict) -> tuple[list[dict], str, str]:
        """(prompt messages, chosen answer, rejected answer); ValueError says what is wrong with the row."""
        cfg = self.recipe.data
        (c_head, chosen), (r_head, rejected) = self.side(row, cfg.chosen_column), self.side(row, cfg.rejected_column)
        if c_head != r_head:
            raise ValueError("prompt differs between chosen and rejected: their conversations before the last "
                             "assistant turn must be the same")
        prompt = self.prompt_of(row) + c_head
        if not prompt:
            raise ValueError(f"no prompt: give a '{cfg.prompt_column}' or '{cfg.messages_column}' column, or "
                             f"conversations as '{cfg.chosen_column}' and '{cfg.rejected_column}'")
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if blank(text):
                raise ValueError(f"empty {name} answer: a pair needs two answers to compare")
        if chosen.strip() == rejected.strip():
            raise ValueError("chosen equals rejected: the pair prefers nothing (its DPO loss is a constant)")
        return prompt, chosen, rejected

    def check(self, row: dict, split: str) -> str | None:
        try:
            prompt, chosen, rejected = self.pair(row)
            sides = [self.encode_side(prompt, chosen), self.encode_side(prompt, rejected)]
        except ValueError as e:
            return str(e)
        for name, (_, labels, _, full) in zip(("chosen", "rejected"), sides):
            if all(x == -100 for x in labels[1:]):
                return (f"every {name} answer token lies beyond data.max_length={self.recipe.data.max_length} "
                        f"(the conversation has {full} tokens): raise it or shorten the prompt")
        self.implicit += not self.prompt_of(row)
        return None

    def check_notes(self) -> list[str]:
        return [f"{self.implicit:,} row(s) without a prompt column: the prompt is their conversations before the "
                f"last assistant turn"] if self.implicit else []

    def check_input(self, item) -> str | None:
        if isinstance(item, dict):
            try:
                self.prompt_of(item) or self.pair(item)
            except ValueError as e:
                return str(e)
            return None
        return super().check_input(item)

    def key(self, row: dict) -> str:
        """The whole pair: duplicate pairs are duplicates; several pairs per prompt are not (data_findings checks
        prompts across splits)."""
        try:
            prompt, chosen, rejected = self.pair(row)
        except ValueError:
            return super().key(row)
        return "\n".join([*(f"{m['role']}: {m['content']}" for m in prompt), f"chosen: {chosen}",
                          f"rejected: {rejected}"])

    # --- features --------------------------------------------------------------------------------------
    def encode_side(self, prompt: list[dict], answer: str) -> tuple[list[int], list[int], bool, int]:
        """(input_ids, labels, cut, tokens before the cut) of prompt + answer; labels on the answer alone."""
        text, spans = self.render(prompt + [{"role": "assistant", "content": answer}])
        start, end = spans[-1]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        labels = [t if start <= s < end else -100 for t, (s, _) in zip(ids, enc["offset_mapping"])]
        limit = self.recipe.data.max_length
        return ids[:limit], labels[:limit], len(ids) > limit, len(ids)

    def encode(self, rows: list[dict]) -> Features:
        """One feature per pair: input_ids/labels (chosen), rejected_ids/rejected_labels; prompt and answer kept
        for generation metrics."""
        out, cut = [], 0
        for row in rows:
            prompt, chosen, rejected = self.pair(row)
            c, r = self.encode_side(prompt, chosen), self.encode_side(prompt, rejected)
            cut += c[2] or r[2]
            out.append({"input_ids": c[0], "labels": c[1], "rejected_ids": r[0], "rejected_labels": r[1],
                        "prompt": prompt, "answer": chosen})
        return Features(out, truncated=cut)

    def length(self, feature: dict) -> int:
        return len(feature["input_ids"]) + len(feature["rejected_ids"])

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # rows 0..B-1 chosen, B..2B-1 rejected; [2B, T] right-padded; reference [B, 2] where every feature has it
        sides = [(f["input_ids"], f["labels"]) for f in features] + \
                [(f["rejected_ids"], f["rejected_labels"]) for f in features]
        width = self.padded(max(len(ids) for ids, _ in sides))
        ids = torch.full((len(sides), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sides), width), -100, dtype=torch.long)
        mask = torch.zeros((len(sides), width), dtype=torch.long)
        for i, (x, y) in enumerate(sides):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if all("reference" in f for f in features):
            batch["reference"] = torch.tensor([f["reference"] for f in features], dtype=torch.float32)
        return batch

    def length_stats(self, rows: list[dict], features: list[dict]) -> dict:
        """Per pair, its longer side (data.max_length cuts each side alone): tokens kept and before the cut, answer
        tokens; a pair with an answer lacking labels or its EOS counts as all-masked or missing its end."""
        eos = self.tokenizer.eos_token_id
        stats = {"kept": [], "lengths": [], "trained": [], "all_masked": [], "missing_end": []}
        for i, row in enumerate(rows):
            prompt, chosen, rejected = self.pair(row)
            sides = [self.encode_side(prompt, chosen), self.encode_side(prompt, rejected)]
            trained = [[y for y in labels[1:] if y != -100] for _, labels, _, _ in sides]
            stats["kept"].append(max(len(s[0]) for s in sides))
            stats["lengths"].append(max(s[3] for s in sides))
            stats["trained"].append(max(map(len, trained)))
            if not all(trained):
                stats["all_masked"].append(i)
            elif any(t[-1] != eos for t in trained):
                stats["missing_end"].append(i)
        return stats

    # --- objective ------------------------------------------------------------------------------------
    def precompute(self, model, features: dict[str, list[dict]], batch_size: int) -> None:
        """DPO: the reference's summed log-probs of both answers, into every feature of every split."""
        if self.pair_loss == "dpo":
            for split in features.values():
                self.reference_logps(model, split, batch_size)

    def reference_logps(self, model, features: list[dict], batch_size: int) -> None:
        """Fill feature["reference"] = [chosen, rejected] summed log-probs where missing: from `model` with its
        adapters disabled, or from `model` itself (precompute: the model as loaded), in the recipe's training
        precision (at the first step policy and reference then agree: the DPO loss is log 2)."""
        missing = [f for f in features if "reference" not in f]
        if not missing:
            return
        context = reference(model) or contextlib.nullcontext()
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), context, self.autocast(model):     # the precision training runs in
                for idx, batch in batches(self, missing, batch_size, model_device(model)):
                    sums, _ = answer_logps(model, batch)
                    for j, i in enumerate(idx):
                        missing[i]["reference"] = [float(sums[j]), float(sums[len(idx) + j])]
        finally:
            model.train(training)

    def pair_terms(self, sums: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None) -> dict:
        """Per pair [B]: loss, chosen and rejected rewards, and the policy's per-token mean log-probs."""
        half = len(sums) // 2
        pc, pr, nc, nr = sums[:half], sums[half:], counts[:half].clamp(min=1), counts[half:].clamp(min=1)
        mc, mr = pc / nc, pr / nr
        if self.pair_loss == "orpo":
            lam = self.recipe.train.orpo.lambda_
            loss = -mc - lam * F.logsigmoid(log_odds(mc) - log_odds(mr))
            return {"loss": loss, "chosen_reward": lam * mc, "rejected_reward": lam * mr, "mc": mc, "mr": mr}
        if ref is None:
            raise ValueError("DPO batch without reference log-probs: Task.precompute was not run on these features")
        cfg, ref = self.recipe.train.dpo, ref.to(sums.dtype)
        if cfg.loss == "ipo":
            dc, dr = mc - ref[:, 0] / nc, mr - ref[:, 1] / nr
            loss = (dc - dr - 1 / (2 * cfg.beta)) ** 2
        else:
            dc, dr = pc - ref[:, 0], pr - ref[:, 1]
            loss = -F.logsigmoid(cfg.beta * (dc - dr))
        return {"loss": loss, "chosen_reward": cfg.beta * dc, "rejected_reward": cfg.beta * dr, "mc": mc, "mr": mr}

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The objective summed over the batch's pairs (one forward over chosen + rejected rows)."""
        sums, counts = answer_logps(model, batch)
        return self.pair_terms(sums, counts, batch.get("reference"))["loss"].sum()

    def count(self, batch: dict) -> float:
        """Pairs."""
        return float(len(batch["input_ids"]) // 2)

    def evaluate(self, model, features: list[dict], batch_size: int, out_dir=None) -> dict:
        """Mean loss per pair; reward accuracy (chosen reward > rejected) and margin; mean summed log-probs of
        each side; logp_accuracy (the policy's own preference: chosen has the higher per-token mean log-prob,
        no reference); with eval.generate, exact match and ROUGE-L of generated answers against the chosen."""
        if self.pair_loss == "dpo":
            self.ensure_reference(model, features, batch_size)
        sums = Counter()
        for _, batch in batches(self, features, batch_size, model_device(model)):
            s, n = answer_logps(model, batch)
            t = self.pair_terms(s, n, batch.get("reference"))
            half = len(s) // 2
            sums.update({"loss": float(t["loss"].sum()),
                         "reward_accuracy": float((t["chosen_reward"] > t["rejected_reward"]).sum()),
                         "reward_margin": float((t["chosen_reward"] - t["rejected_reward"]).sum()),
                         "logp_accuracy": float((t["mc"] > t["mr"]).sum()),
                         "chosen_logp": float(s[:half].sum()), "rejected_logp": float(s[half:].sum())})
        pairs = len(features)
        result = {k: sums[k] / pairs if pairs else float("nan") for k in
                  ("loss", "reward_accuracy", "reward_margin", "logp_accuracy", "chosen_logp", "rejected_logp")}
        result["pairs"] = pairs
        if self.recipe.eval.generate is not None:
            result |= self.generation_metrics(unwrapped(model), [f["prompt"] for f in features],
                                              [f["answer"] for f in features], batch_size, out_dir)
        return result

    def ensure_reference(self, model, features: list[dict], batch_size: int) -> None:
        """DPO reference log-probs for features lacking them (evaluation outside training): a LoRA model's own
        with its adapter disabled; otherwise the recipe's base model, loaded for this evaluation alone."""
        if all("reference" in f for f in features):
            return
        if reference(model) is not None:
            return self.reference_logps(model, features, batch_size)
        print(f"reference log-probs: from the base model {self.recipe.model.name} (loaded for this evaluation)",
              file=sys.stderr)
        base = self.load_model().to(model_device(model))
        self.reference_logps(base, features, batch_size)
        del base

    def evaluate_final(self, model, rows: list[dict], features: list[dict], batch_size: int, out_dir=None) -> dict:
        with self.autocast(model):
            return self.evaluate(model, features, batch_size, out_dir)

    def predict(self, model, inputs: list) -> list[dict]:
        """A bare string is one user message; a row gives its prompt (columns, or its pair's conversations)."""
        prompts = [[{"role": "user", "content": x}] if isinstance(x, str) else (self.prompt_of(x) or self.pair(x)[0])
                   for x in inputs]
        outputs = self.generate(model, prompts, self.recipe.eval.batch_size)
        return [{"prompt": p[-1]["content"] if p else "", "output": o} for p, o in zip(prompts, outputs)]

    # --- doctor ----------------------------------------------------------------------------------------
    def data_findings(self, tables: dict) -> tuple[dict, list[str], list[str]]:
        """Pairs: answer length ratios (DPO learns length where chosen answers are mostly the longer ones),
        prompts shared across splits (held-out reward accuracy inflated), pairs contradicted by a swapped one."""
        section, warnings = {}, []
        seen: dict[str, dict] = {}
        for split, table in tables.items():
            prompts, order = set(), Counter()
            ratios, listed = [], []
            for row, origin in zip(table.rows, table.origins):
                prompt, chosen, rejected = self.pair(row)
                p = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
                prompts.add(p)
                order[(p, chosen, rejected)] += 1
                c, r = (len(self.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in (chosen, rejected))
                ratios.append(max(c, 1) / max(r, 1))
                if not 1 / RATIO <= ratios[-1] <= RATIO:
                    listed.append({"origin": origin, "chosen_tokens": c, "rejected_tokens": r})
            seen[split] = {"prompts": prompts}
            swapped = sum(1 for (p, a, b) in order if (p, b, a) in order) // 2
            longer = sum(x > 1 for x in ratios) / len(ratios) if ratios else 0.0
            shorter = sum(x < 1 for x in ratios) / len(ratios) if ratios else 0.0
            section[split] = {"pairs": len(ratios), "prompts": len(prompts),
                              "median_length_ratio": round(statistics.median(ratios), 3) if ratios else None,
                              "chosen_longer_share": round(longer, 3), "chosen_shorter_share": round(shorter, 3),
                              "extreme_length_ratio": listed, "swapped_pairs": swapped}
            if len(ratios) >= 10 and max(longer, shorter) > SKEW:
                side = "longer" if longer > shorter else "shorter"
                warnings.append(f"{split}: the chosen answer is the {side} one in {max(longer, shorter):.0%} of "
                                f"pairs: DPO/ORPO may learn length rather than quality; balance the lengths")
            if listed:
                warnings.append(f"{split}: {len(listed):,} pair(s) whose answers differ in length more than "
                                f"{RATIO:g}x, e.g. {listed[0]['origin']}")
            if swapped:
                warnings.append(f"{split}: {swapped:,} pair(s) also appear swapped (chosen and rejected exchanged): "
                                f"they contradict each other; fix or drop them")
        for held in ("validation", "test"):
            if held in seen and "train" in seen:
                shared = len(seen[held]["prompts"] & seen["train"]["prompts"])
                section[held]["prompts_in_train"] = shared
                if shared:
                    warnings.append(f"{held}: {shared:,} prompt(s) also in train: held-out reward accuracy is "
                                    f"inflated; split by prompt")
        return {"pairs": section}, warnings, []
