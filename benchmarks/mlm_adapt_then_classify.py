"""Does masked-LM adaptation on the domain's raw text help a classifier? (issue 24, evidence for item 2)

    flock /tmp/heavy.lock .venv/bin/python benchmarks/mlm_adapt_then_classify.py [--folds 3] [--mlm-rows 1600]
        [--train-rows 400] [--test-rows 300] [--mlm-epochs 1] [--out FILE.json]

Data (bundled only): the Rotten Tomatoes snippets (fresh / rotten). `folds` disjoint test sets of `test-rows`
snippets are set aside first and never read by the adaptation. Arms, on each fold (classifier seed = fold):
  original   text-classification from the bundled MiniLM (all-MiniLM-L6-v2)
  adapted    the same recipe with `model:` the model/ of one pretrain-masked run of MiniLM on `mlm-rows` snippets'
             text (labels unused; drawn from everything but the test sets, so it holds the folds' training text:
             task-adaptive pretraining), 15% masking, 80/10/10
The classifier trains on `train-rows` labelled snippets of its own (disjoint across folds), 3 epochs of batch 16 at
1e-4 (the adaptation: 1 epoch of batch 16 at 1e-4, BERT's pretraining rate: MiniLM's checkpoint has no MLM head, so
the head starts at random), and is scored
on its fold's test set. Prints accuracy and macro F1 per arm (mean, 95% t interval over folds) and the paired
difference adapted - original with its 95% t interval; the adaptation's perplexity before/after on held-out text.
One adaptation run serves every fold: the interval covers the classifier's seed and data, not the adaptation's seed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def machine() -> str:
    flags = subprocess.run("grep -o 'avx512[a-z_0-9]*\\|avx2' /proc/cpuinfo | sort -u | tr '\\n' ' '", shell=True,
                           capture_output=True, text=True).stdout.strip()
    return f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}\ncpu flags: {flags}"


def write(path: Path, rows: list[dict], fields=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def interval(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval)."""
    from scipy import stats

    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    sd = (sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / n ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--mlm-rows", type=int, default=1600)
    ap.add_argument("--mlm-epochs", type=float, default=1)
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--test-rows", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import tunesmith as ts
    from tunesmith.assets.bundled import rotten_tomatoes

    print(machine(), flush=True)
    t_start = time.time()
    rows = list(csv.DictReader(open(rotten_tomatoes(), newline="", encoding="utf-8")))
    random.Random(0).shuffle(rows)
    k, n_test, n_train = args.folds, args.test_rows, args.train_rows
    tests = [rows[i * n_test:(i + 1) * n_test] for i in range(k)]
    rest = rows[k * n_test:]                                      # never a test row
    trains = [rest[i * (n_train + 100):(i + 1) * (n_train + 100)] for i in range(k)]   # + 100 for validation
    corpus = rest[:max(args.mlm_rows, 0)]                         # holds every fold's training text
    assert len(corpus) >= k * (n_train + 100), "--mlm-rows should cover the classifiers' training text"
    tmp = Path(tempfile.mkdtemp(prefix="mlm-adapt-"))
    common = {"adapt": {"method": "full"}, "eval": {"batch_size": 64}}

    t0 = time.time()
    mlm = ts.train(ts.load_recipe({
        "task": "pretrain-masked", "name": "mlm", "model": "minilm",
        "data": {"train": str(write(tmp / "corpus.csv", corpus)), "max_length": 64, "validation_size": 100,
                 "test_size": 200},
        **common, "train": {"epochs": args.mlm_epochs, "learning_rate": 1e-4, "batch_size": 16, "seed": 42,
                            "threads": args.threads}}), run_dir=tmp / "mlm")
    mlm_seconds = time.time() - t0
    adapted = str(mlm.path / "model")
    print(f"adaptation: {len(corpus) - 300:,} snippets, {mlm_seconds:.0f}s; masked-LM on held-out text: perplexity "
          f"{mlm.metrics['before']['perplexity']:.2f} -> {mlm.metrics['perplexity']:.2f}, accuracy "
          f"{mlm.metrics['before']['accuracy']:.3f} -> {mlm.metrics['accuracy']:.3f}", flush=True)

    scores = {"original": [], "adapted": []}
    for fold in range(k):
        train = write(tmp / f"train{fold}.csv", trains[fold])
        test = write(tmp / f"test{fold}.csv", tests[fold])
        for arm, model in (("original", "minilm"), ("adapted", adapted)):
            t0 = time.time()
            run = ts.train(ts.load_recipe({
                "task": "text-classification", "name": f"{arm}{fold}", "model": model,
                "data": {"train": str(train), "test": str(test), "validation_size": 100, "max_length": 64},
                **common, "train": {"epochs": 3, "learning_rate": 1e-4, "batch_size": 16, "seed": fold,
                                    "threads": args.threads}}), run_dir=tmp / f"{arm}{fold}")
            m = run.metrics
            scores[arm].append({"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]})
            print(f"fold {fold} {arm}: accuracy {m['accuracy']:.4f} f1_macro {m['f1_macro']:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)

    lines = [f"| arm | accuracy (mean ± 95% CI, {k} folds) | macro F1 |", "|---|---|---|"]
    for arm in scores:
        cells = [interval([s[m] for s in scores[arm]]) for m in ("accuracy", "f1_macro")]
        lines.append(f"| {arm} | " + " | ".join(f"{a:.4f} ± {b:.4f}" for a, b in cells) + " |")
    diffs = {m: [a[m] - o[m] for a, o in zip(scores["adapted"], scores["original"])] for m in ("accuracy", "f1_macro")}
    cells = [interval(diffs[m]) for m in ("accuracy", "f1_macro")]
    lines.append("| adapted - original (paired) | " + " | ".join(f"{a:+.4f} ± {b:.4f}" for a, b in cells) + " |")
    print("\n".join(lines))
    print(f"total {time.time() - t_start:.0f}s\n{machine()}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "scores": scores, "diffs": diffs,
                                              "mlm": {"before": mlm.metrics["before"], "after": {
                                                  k2: v for k2, v in mlm.metrics.items() if k2 != "before"}},
                                              "mlm_seconds": mlm_seconds}, indent=1))


if __name__ == "__main__":
    main()
