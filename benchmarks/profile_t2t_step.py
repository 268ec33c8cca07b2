"""Where an encoder-decoder training step spends its time: tunesmith's text2text step vs HF Seq2SeqTrainer's, by phase
and by kind of op (torch.profiler self CPU time), on the T5 of t5-small's shape and the data of t2t_vs_hf.py.

    .venv/bin/python benchmarks/profile_t2t_step.py [--rows 400] [--steps 4] [--batch 16]

Each side runs --steps optimizer steps (after one unprofiled warm-up step) as its trainer does them:
  HF         random batches, DataCollatorForSeq2Seq, model(**batch).loss (its mean cross-entropy over the full
             [B, T, V] logits), backward, clip at 1.0, fused AdamW (Seq2SeqTrainingArguments' default optimizer)
  tunesmith  length-grouped batches (steps.plan), task.collate, task.loss / task.count under train.fast_dropout's
             CPU dropout, backward, clip at 1.0, fused AdamW (steps.optimizer_for's)
and prints: phase shares (collate, forward, backward, optimizer), op-kind shares (ops over the vocabulary: the LM head,
its cross-entropy and the tied embedding's gradient, told apart by their 32k dimension), and the padding each side
computes: encoder and decoder positions that are padding. Shares are meaningful under load; absolute times are not.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from t2t_vs_hf import build_model, write_pairs  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from tunesmith.dropout import CheapDropout  # noqa: E402
from tunesmith.recipe import load  # noqa: E402
from tunesmith.splits import load_splits  # noqa: E402
from tunesmith.steps import plan  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402

PHASES = ("collate", "forward", "backward", "optimizer")
KINDS = [("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm")),
         ("attention softmax", ("softmax", "_softmax", "_softmax_backward_data")),
         ("dropout", ("dropout", "bernoulli", "native_dropout")),
         ("optimizer", ("_fused_adam", "adam", "_foreach", "linalg_vector_norm", "clip_grad")),
         ("norm and elementwise", ("pow", "mean", "rsqrt", "mul", "add", "relu", "threshold_backward", "div", "sum"))]


def kind(event, vocab: int) -> str:
    op = event.key.removeprefix("aten::").lower()
    if any(vocab in shape for shape in event.input_shapes or () if isinstance(shape, list)):
        return "over the vocabulary (LM head, CE, embedding grad)"
    for k, keys in KINDS:
        if any(op == key or op.startswith(key) for key in keys):
            return k
    return "the rest"


def backward_and_step(model, optimizer, loss):
    """The part both arms share: backward, clip at 1.0, optimizer step."""
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def hf_step(model, optimizer, collator, feats):
    with record_function("collate"):
        batch = collator([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats])
    with record_function("forward"):
        loss = model(**batch).loss
    backward_and_step(model, optimizer, loss)
    return batch


def full_head_loss(task, model, batch):
    """text2text's loss before the LM head ran only at the target tokens: logits [B, T, V] at every position."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, decoder_input_ids=task.decoder_inputs(model, labels)).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def ts_step(task, model, optimizer, feats, full_head=False):
    with record_function("collate"):
        batch = task.collate(feats)
    with record_function("forward"), CheapDropout():
        loss = full_head_loss(task, model, batch) if full_head else task.loss(model, batch)
        loss = loss / task.count(batch)
    backward_and_step(model, optimizer, loss)
    return batch


def padding(batches: list[dict]) -> str:
    enc = sum(b["attention_mask"].numel() for b in batches)
    enc_real = sum(int(b["attention_mask"].sum()) for b in batches)
    dec = sum(b["labels"].numel() for b in batches)
    dec_real = sum(int((b["labels"] != -100).sum()) for b in batches)
    return (f"encoder {enc:,} positions, {100 * (1 - enc_real / enc):.0f}% padding; decoder {dec:,} positions, "
            f"{100 * (1 - dec_real / dec):.0f}% padding")


def run(name, step, groups, vocab, steps):
    step(groups[0])                                  # warm-up, not profiled
    batches = []
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for g in groups[1:steps + 1]:
            batches.append(step(g))
    wall = time.perf_counter() - t0
    events = prof.key_averages(group_by_input_shape=True)
    phases = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    total = sum(phases.values())
    kinds = defaultdict(float)
    for e in events:
        if e.key not in PHASES and not e.key.startswith("Optimizer") and e.self_cpu_time_total > 0:
            kinds[kind(e, vocab)] += e.self_cpu_time_total
    ops = sum(kinds.values())
    print(f"\n== {name}: {steps} steps, {wall:.1f}s wall under the profiler; {padding(batches)}")
    print("  phases: " + ", ".join(f"{p} {100 * phases.get(p, 0) / total:.1f}%" for p in PHASES))
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<52}{100 * v / ops:6.1f}%")
    top = defaultdict(float)
    for e in events:
        if e.key not in PHASES and not e.key.startswith("Optimizer"):
            top[e.key] += e.self_cpu_time_total
    ranked = sorted(top.items(), key=lambda kv: -kv[1])[:8]
    print("  top ops: " + ", ".join(f"{k} {100 * v / ops:.1f}%" for k, v in ranked))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq

    tmp = Path(tempfile.mkdtemp(prefix="profile-t2t-"))
    try:
        model_dir, data = build_model(tmp / "t5"), write_pairs(tmp / "pairs.jsonl", args.rows)
        recipe = load({"task": "text2text", "model": str(model_dir),
                       "data": {"train": str(data), "validation_size": 20, "test_size": 20, "prefix": "summarize: ",
                                "max_length": 64, "max_target_length": 16},
                       "adapt": {"method": "full"}, "train": {"batch_size": args.batch, "precision": "fp32"},
                       "eval": {"generate": None}})
        task = get_task(recipe)
        features = task.encode(load_splits(task, recipe)[0]["train"].rows)
        vocab = len(task.tokenizer)
        print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{len(features)} pairs, batch {args.batch}, vocab {vocab}")
        n = args.steps + 1
        g = torch.Generator().manual_seed(0)
        random = torch.randperm(len(features), generator=g).tolist()
        hf_groups = [[features[i] for i in random[s * args.batch:(s + 1) * args.batch]] for s in range(n)]
        grouped = plan([task.length(f) for f in features], args.batch, 42, 0, True)
        ts_groups = [[features[i] for i in idx] for idx in grouped[:n]]

        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        collator = DataCollatorForSeq2Seq(task.tokenizer, model=model)
        run("HF Seq2SeqTrainer step", lambda f: hf_step(model, opt, collator, f), hf_groups, vocab, args.steps)

        for name, full in (("tunesmith text2text step, LM head at every position (before)", True),
                           ("tunesmith text2text step, LM head at the target tokens", False)):
            model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            run(name, lambda f, m=model, o=opt, full=full: ts_step(task, m, o, f, full), ts_groups, vocab, args.steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
