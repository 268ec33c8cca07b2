"""Federated vs centralised fine-tuning on the same rows (issue 25, item 4), bundled MiniLM + Rotten Tomatoes.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/federated_vs_central.py [--train 320] [--rounds 4] [--batch 8]

Every arm reads the same rows through the shipped rotten_tomatoes.yaml (data.max_rows train rows, the same
validation and test rows, seed 42), full fine-tuning, learning rate 1e-4, batch --batch (8: small shards need steps):
  central      `ts.train`, --central-epochs epochs over all train rows
  fed-iid      `ts.federate`, --clients clients, iid shards, --rounds rounds of 1 local epoch (FedAvg)
  fed-dir0.3   the same with dirichlet:0.3 shards (non-IID by label)
Each round's global model is scored on the validation rows (the server's); "rounds to 95%" is the first round whose
validation accuracy reaches 95% of the centralised run's final validation accuracy. Bytes per round: what the
clients sent up (serialized arrays) in the full run, and in a 1-round LoRA run (r=8 on query/value) of the same
model. Prints uptime and CPU flags before and after (the machine is shared: the load average says how busy).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def machine() -> str:
    flags = sorted(set(re.findall(r"avx512[a-z_0-9]*|avx2", Path("/proc/cpuinfo").read_text())))
    return f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}; cpu flags: {' '.join(flags)}"


def main() -> None:
    import tunesmith as ts
    from tunesmith import io
    from tunesmith.cli import RECIPES, quiet

    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--validation", type=int, default=160)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--central-epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    quiet()
    print(machine(), flush=True)
    base = [f"data.max_rows={args.train}", f"data.validation_size={args.validation}", f"data.test_size={args.test}",
            "eval.before=false", "train.keep=last", f"train.batch_size={args.batch}"]
    work = Path(tempfile.mkdtemp(prefix="fed-bench-"))
    results = {}

    t0 = time.perf_counter()
    run = ts.train(ts.load_recipe(RECIPES / "rotten_tomatoes.yaml", base + [f"train.epochs={args.central_epochs}"]),
                   run_dir=work / "central")
    curve = [r["accuracy"] for r in run.history if r.get("split") == "validation"]
    results["central"] = {"test": run.metrics["accuracy"], "validation": curve[-1], "curve": curve,
                          "seconds": time.perf_counter() - t0}
    target = 0.95 * curve[-1]
    for name, spec in (("fed-iid", "iid"), ("fed-dir0.3", "dirichlet:0.3")):
        t0 = time.perf_counter()
        run = ts.federate(ts.load_recipe(RECIPES / "rotten_tomatoes.yaml", base + ["train.epochs=1"]),
                          clients=args.clients, rounds=args.rounds, partition=spec, run_dir=work / name)
        fed = io.read_json(run.path / "federation.json")
        curve = [r["accuracy"] for r in fed["rounds"]]
        reached = next((r["round"] for r in fed["rounds"][1:] if r["accuracy"] >= target), None)
        results[name] = {"test": run.metrics["accuracy"], "validation": curve[-1], "curve": curve,
                         "rounds_to_95": reached, "bytes_up": fed["rounds"][1]["bytes_up"],
                         "partition": fed["partition"], "seconds": time.perf_counter() - t0}
    run = ts.federate(ts.load_recipe(RECIPES / "rotten_tomatoes.yaml",
                                     base[1:] + ["data.max_rows=64", "train.epochs=1", "adapt.method=lora",
                                                 "adapt.lora.r=8", "adapt.lora.target_modules=[query,value]"]),
                      clients=args.clients, rounds=1, run_dir=work / "lora-bytes")
    lora = io.read_json(run.path / "federation.json")
    results["lora"] = {"bytes_up": lora["rounds"][1]["bytes_up"], "exchanged": lora["exchanged"]["bytes"]}

    print(f"\n{args.train} train rows, {args.validation} validation, {args.test} test; {args.clients} clients, "
          f"{args.rounds} rounds x 1 local epoch; central {args.central_epochs} epochs; target (95% of central "
          f"validation accuracy {results['central']['validation']:.4f}) = {target:.4f}")
    print(f"{'arm':<12} {'test acc':>9} {'val acc':>8} {'rounds to 95%':>14} {'minutes':>8}  validation curve")
    for name, r in results.items():
        if name == "lora":
            continue
        print(f"{name:<12} {r['test']:>9.4f} {r['validation']:>8.4f} {str(r.get('rounds_to_95', '-')):>14} "
              f"{r['seconds'] / 60:>8.1f}  {' '.join(f'{v:.3f}' for v in r['curve'])}")
    for name in ("fed-iid", "fed-dir0.3"):
        shards = [f"{d['rows']} ({', '.join(f'{k} {v}' for k, v in d['classes'].items())})"
                  for d in results[name]["partition"]]
        print(f"{name} partition: " + "; ".join(shards))
    full = results["fed-iid"]["bytes_up"]
    print(f"bytes sent up per round ({args.clients} clients): full {full:,} ({full / args.clients / 1e6:.1f} MB a "
          f"client); LoRA r=8 {results['lora']['bytes_up']:,} ({results['lora']['bytes_up'] / args.clients / 1e6:.2f} "
          f"MB a client), {full / results['lora']['bytes_up']:.0f}x less")
    print(machine())


if __name__ == "__main__":
    main()
