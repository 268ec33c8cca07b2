"""What every generative task shares (causal-lm now, seq2seq next): generation settings from `eval.generate`,
batched generation, exact match and ROUGE-L against references, and samples.jsonl in the run folder.

A subclass supplies `prompt_ids(prompt)` (token ids the model continues). Decoder-only models continue a
left-padded prompt; a seq2seq task overrides `generate` (its outputs do not repeat the prompt).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith import metrics
from tunesmith.device import autocast, choose_precision
from tunesmith.tasks.base import Task, model_device
from tunesmith.tasks.schema import GenerateConfig

SAMPLES = 20                        # sample generations written to the run folder


class Generative(Task):
    generative = True

    def generation_settings(self) -> GenerateConfig:
        """eval.generate, or the defaults (greedy, 32 new tokens) when the recipe sets none."""
        return self.recipe.eval.generate or GenerateConfig()

    def autocast(self, model):
        """Inference in the recipe's training precision (bf16 where the hardware computes it natively: about
        twice the fp32 speed on such CPUs), so eval.json, predict and chat match what validation saw."""
        device = model_device(model)
        return autocast(device, choose_precision(self.recipe.train.precision, device)[0])

    def generate(self, model, prompts: list, batch_size: int, settings: GenerateConfig | None = None) -> list[str]:
        """A completion of each prompt (as `prompt_ids` encodes it), left-padded in batches, shortest first;
        stops at EOS. Sampling (do_sample) is seeded by settings.seed without touching the global RNG."""
        tok, device = self.processor, model_device(model)
        settings = settings or self.generation_settings()
        ids = [self.prompt_ids(p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [""] * len(ids)
        bar = tqdm(total=len(ids), desc="generate", unit="example", disable=len(ids) <= batch_size)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                x[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            with torch.no_grad(), self.autocast(model), torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)
                gen = model.generate(input_ids=x.to(device), attention_mask=mask.to(device),
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     **settings.kwargs())
            for row, i in enumerate(idx):
                out[i] = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
            bar.update(len(idx))
        bar.close()
        return out

    def generation_metrics(self, model, prompts: list, references: list[str], batch_size: int,
                           out_dir=None) -> dict:
        """exact_match (SQuAD-normalised), rouge_l (rouge-score's ROUGE-L F1) of generated answers; the first
        SAMPLES (prompt, reference, output) go to out_dir/samples.jsonl."""
        outputs = self.generate(model, prompts, batch_size)
        result = metrics.generation(references, outputs)
        if out_dir is not None:
            with open(Path(out_dir) / "samples.jsonl", "w") as f:
                for p, r, o in list(zip(prompts, references, outputs))[:SAMPLES]:
                    f.write(json.dumps({"prompt": p, "reference": r, "output": o}) + "\n")
        return result
