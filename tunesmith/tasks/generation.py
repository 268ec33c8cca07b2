"""Generation, one implementation for every caller: evaluation and predict (Generative.generate, batched),
`tunesmith chat` (streamed to the terminal) and the OpenAI routes (streamed or not, stopped by an event on a timeout
or a client that went away). Also what every generative task shares: settings from `eval.generate`, exact match
and ROUGE-L against references, and samples.jsonl in the run folder.

`predict` (batched) and `stream` (one input, its text handed on as it is written: serve's /v1/predict with stream,
`tunesmith predict --stream`) take the task's `prediction_prompt` of each input.

`complete` takes prompts as token ids (a subclass supplies `prompt_ids`) and is correct for both model families
(model.config.is_encoder_decoder):
  decoder-only     the prompt is left-padded and continued; the output repeats it: those tokens are dropped
  encoder-decoder  the prompt is the encoder's input (right-padded); the output holds no prompt, only the decoder
                   start token before the reply: that one token is dropped
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith import io, metrics
from tunesmith.device import autocast, choose_precision
from tunesmith.tasks.base import Task, model_device
from tunesmith.tasks.schema import GenerateConfig

SAMPLES = 20                        # sample generations written to the run folder


@dataclass(frozen=True)
class Completion:
    text: str                       # decoded, special tokens skipped, stripped
    tokens: int                     # new tokens, through the EOS that ended them
    finish: str                     # "stop": EOS (or the stop event) before max_new_tokens; "length": the limit


def complete(model, tokenizer, prompts: list[list[int]], settings: GenerateConfig, stop=None,
             on_text=None) -> list[Completion]:
    """One batch: the completion of each prompt (token ids). Sampling is seeded by settings.seed without touching
    the global RNG. stop: a threading.Event; once set, generation ends at the next token. on_text(piece): called
    with the reply's text as it is finalised (one prompt only)."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    class Streamer(TextStreamer):         # skip_prompt: the first `put` is the prompt (decoder-only) or the
        def on_finalized_text(self, text: str, stream_end: bool = False):   # decoder start (encoder-decoder)
            if text:
                on_text(text)

    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming (on_text) takes one prompt")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    x = torch.full((len(prompts), width), pad if pad is not None else 0, dtype=torch.long)    # [B, T]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        where = slice(0, len(ids)) if encoder_decoder else slice(width - len(ids), width)
        x[row, where] = torch.tensor(ids)
        mask[row, where] = 1
    extra = {}
    if stop is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([Stop()])
    if on_text is not None:
        extra["streamer"] = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    device = model_device(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        out = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), pad_token_id=pad,
                             eos_token_id=eos, **extra, **settings.kwargs())
    new = out[:, 1:] if encoder_decoder else out[:, width:]           # [B, new tokens]
    done = []
    for row in new.tolist():
        n = row.index(eos) + 1 if eos in row else len(row)          # after EOS: padding of a finished row
        finish = "stop" if eos in row or n < settings.max_new_tokens else "length"
        done.append(Completion(tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n, finish))
    return done


class Generative(Task):
    prediction = "text"
    generative = True

    def generation_settings(self) -> GenerateConfig:
        """eval.generate, or the defaults (greedy, 32 new tokens) when the recipe sets none."""
        return self.recipe.eval.generate or GenerateConfig()

    def autocast(self, model):
        """Inference in the recipe's training precision (bf16 where the hardware computes it natively: about
        twice the fp32 speed on such CPUs), so eval.json, predict and chat match what validation saw."""
        device = model_device(model)
        return autocast(device, choose_precision(self.recipe.train.precision, device)[0])

    def complete(self, model, prompts: list[list[int]], settings: GenerateConfig | None = None, stop=None,
                 on_text=None) -> list[Completion]:
        """`complete` (above) in the recipe's precision, with the recipe's settings unless given."""
        with self.autocast(model):
            return complete(model, self.processor, prompts, settings or self.generation_settings(), stop, on_text)

    def prediction_prompt(self, item) -> tuple[list[int], str]:
        """(the prompt's token ids, the prompt text a prediction reports) for one input of `predict`."""
        raise NotImplementedError

    def completions(self, model, prompts: list[list[int]], batch_size: int, settings=None) -> list[Completion]:
        """The Completion of each prompt (token ids), in batches of similar length, in order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [None] * len(prompts)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            for i, c in zip(idx, self.complete(model, [prompts[i] for i in idx], settings)):
                out[i] = c
        return out

    def predict(self, model, inputs: list) -> list[dict]:
        """{prompt, output: the generated text} per input, in batches of eval.batch_size."""
        pairs = [self.prediction_prompt(x) for x in inputs]
        done = self.completions(model, [ids for ids, _ in pairs], self.recipe.eval.batch_size)
        return [{"prompt": prompt, "output": c.text} for (_, prompt), c in zip(pairs, done)]

    def stream(self, model, item, on_text, stop=None) -> dict:
        """`predict` for one input, its text passed to on_text(piece) as it is finalised (serve's /v1/predict with
        stream, `tunesmith predict --stream`); stop: a threading.Event ending generation at the next token."""
        ids, prompt = self.prediction_prompt(item)
        return {"prompt": prompt, "output": self.complete(model, [ids], stop=stop, on_text=on_text)[0].text}

    def generate(self, model, prompts: list, batch_size: int, settings: GenerateConfig | None = None) -> list[str]:
        """The completion text of each prompt (as `prompt_ids` encodes it), in batches, shortest first."""
        settings = settings or self.generation_settings()
        ids = [self.prompt_ids(p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [""] * len(ids)
        bar = tqdm(total=len(ids), desc="generate", unit="example", disable=len(ids) <= batch_size)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            for i, c in zip(idx, self.complete(model, [ids[i] for i in idx], settings)):
                out[i] = c.text
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
            io.write_jsonl(Path(out_dir) / "samples.jsonl", [{"prompt": p, "reference": r, "output": o} for p, r, o
                                                            in list(zip(prompts, references, outputs))[:SAMPLES]])
        return result
