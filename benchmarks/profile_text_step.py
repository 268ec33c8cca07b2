"""Where a text-classification training step spends its time: torch.profiler over tunesmith's loop, by kind of op.

    .venv/bin/python benchmarks/profile_text_step.py [--rows 640] [--precision fp32]

The bundled MiniLM on Rotten Tomatoes rows (max_length 64, batch 32, the demo recipe), one epoch, no evaluation
inside the profiled part: only `loop.fit` is profiled (model loading and tokenising are not). Prints the self CPU
time of the ops grouped by kind (matmul, attention, normalisation, activation, dropout, embedding backward,
optimizer, the rest) and the top ops, so the share that is not matmul can be attacked where it is largest.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = [("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm")),
         ("attention", ("scaled_dot_product", "_scaled_dot_product", "_flash_attention", "softmax")),
         ("normalisation", ("layer_norm", "native_layer_norm")),
         ("activation", ("gelu", "tanh")),
         ("dropout", ("dropout", "bernoulli", "native_dropout")),
         ("embedding backward", ("embedding_dense_backward", "embedding_backward", "index_add", "index_put")),
         ("optimizer", ("_fused_adam", "adam", "_foreach", "linalg_vector_norm", "clip_grad")),
         ("copies and casts", ("copy_", "to", "_to_copy", "clone", "contiguous", "zero_", "fill_", "cat"))]


def kind(name: str) -> str:
    op = name.removeprefix("aten::").lower()
    for k, keys in KINDS:
        if any(op == key or op.startswith(key) for key in keys):
            return k
    return "the rest"


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile

    import tunesmith as ts
    import tunesmith.loop as loop
    from tunesmith.device import cpu_flags

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"cpu flags: {flags}; load average {os.getloadavg()[0]:.2f}; torch kernels "
          f"{torch.backends.cpu.get_cpu_capability()}")
    recipe = ts.load_recipe(Path(ts.__file__).parent / "recipes" / "rotten_tomatoes.yaml",
                            [f"data.max_rows={args.rows}", "eval.before=false", f"train.precision={args.precision}",
                             "train.min_steps=0", "train.eval_every=1000000", "data.test_size=200"])
    fit, profiles = loop.fit, []

    def profiled(*a, **k):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fit(*a, **k)
        profiles.append((prof, time.perf_counter() - t0))
        return out

    loop.fit = profiled
    try:
        with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
            ts.train(recipe, run_dir=Path(tmp) / "run")
    finally:
        loop.fit = fit
    prof, wall = profiles[0]
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind = defaultdict(float)
    for e in events:
        by_kind[kind(e.key)] += e.self_cpu_time_total
    print(f"\nloop.fit: {wall:.1f}s wall under the profiler (which adds its own overhead); self CPU time of aten "
          f"ops: {total / 1e6:.1f}s ({100 * total / 1e6 / wall:.0f}%; the rest is Python, collation, checkpoints)")
    for k, t in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"  {k:<20}{t / 1e6:>8.2f}s {100 * t / total:>6.1f}%")
    print("\ntop ops:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {e.key:<45}{e.self_cpu_time_total / 1e6:>8.2f}s {100 * e.self_cpu_time_total / total:>6.1f}%"
              f"  calls {e.count:>6}  [{kind(e.key)}]")


if __name__ == "__main__":
    main()
