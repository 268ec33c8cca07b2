"""tunesmith's loop vs a plain PyTorch training loop on the same model, data and hyperparameters, in one process.

    .venv/bin/python benchmarks/image_cls_vs_torch.py [--rows N] [--epochs E] [--size PX] [--skip-bf16]

Both fine-tune the bundled MobileNetV2 on the same Fashion-MNIST rows (the Debian package; without it,
generated stripe/checker pictures), preprocessed once by the same image processor, with the same batch
size, learning rate, AdamW and linear schedule, no augmentation, and are scored on the same test rows.
The plain loop indexes a pre-stacked uint8 tensor, normalizes, forward, backward, step: nothing else.
tunesmith's time is its training time without evaluations (checkpoint writes included). A third row runs
tunesmith with the demo recipe's augmentation (flip + random resized crop) to show what that costs.
Prints images/s and the ratio to the plain loop, peak memory (resident set growth), test accuracy.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from text_cls_vs_hf import PeakRSS  # noqa: E402  (resident-memory sampler shared with the text bench)

from tunesmith.pipeline import train
from tunesmith.recipe import load  # noqa: E402
from tunesmith.splits import load_splits  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402

RECIPE = Path(__file__).parent.parent / "tunesmith" / "recipes" / "fashion_mnist.yaml"


def generated_images(folder: Path, per_class: int) -> Path:
    """Fallback data without the Debian package: 28x28 stripes and checkerboards, 3 classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    for kind in ("hstripes", "vstripes", "checker"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            p, ph = rng.integers(3, 6), rng.integers(0, 6)
            on = {"hstripes": (i + ph) // p % 2, "vstripes": (j + ph) // p % 2,
                  "checker": ((i + ph) // p + (j + ph) // p) % 2}[kind]
            Image.fromarray((on * 170 + 40 + rng.normal(0, 20, on.shape)).clip(0, 255).astype(np.uint8)).save(
                folder / kind / f"{n}.png")
    return folder


def run_torch(recipe, task, features: dict) -> dict:
    """The plain loop: same model init, AdamW, linear schedule with warmup, batch size, precision."""
    from transformers import get_scheduler, set_seed

    cfg = recipe.train
    set_seed(cfg.seed)
    model = task.load_model()
    model.train()
    x = torch.stack([f["pixels"] for f in features["train"]])            # [N, 3, H, W] uint8
    y = torch.tensor([f["labels"] for f in features["train"]])
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    total = int(cfg.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=round(cfg.warmup * total), num_training_steps=total)
    bf16 = cfg.precision == "bf16"
    g = torch.Generator().manual_seed(cfg.seed)
    with PeakRSS() as mem:
        t = time.perf_counter()
        step = 0
        scale, shift = task.normalization                     # [3, 1, 1] each
        while step < total:
            order = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                pixel_values = x[idx].float() * scale + shift
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(pixel_values=pixel_values, labels=y[idx]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step == total:
                    break
        seconds = time.perf_counter() - t
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        acc = task.evaluate(model, features["test"], recipe.eval.batch_size)["accuracy"]
    return {"name": f"plain PyTorch ({cfg.precision})", "precision": cfg.precision, "seconds": seconds,
            "images": total * cfg.batch_size, "mem": mem.mib, "accuracy": acc}


def warm_up(task, features: list[dict], batch_size: int) -> None:
    """Two training steps on a throwaway model, so no measured run pays for first-use allocations."""
    model = task.load_model()
    batch = task.collate(features[:batch_size])
    for _ in range(2):
        model(**batch).loss.backward()


def run_tunesmith(recipe, out_dir: str, label: str) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)         # accelerate fixes the precision once per process otherwise
    with PeakRSS() as mem:
        run = train(recipe, run_dir=out_dir)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    result = json.loads((run.path / "eval.json").read_text())
    return {"name": f"tunesmith ({recipe.train.precision}{label})", "precision": recipe.train.precision,
            "seconds": summary["train_seconds"] - summary["eval_seconds"], "images": summary["samples"],
            "mem": mem.mib, "accuracy": result["accuracy"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000, help="training images (default 4000)")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--size", type=int, default=64, help="input pixels (default 64, as the demo)")
    ap.add_argument("--skip-bf16", action="store_true", help="only fp32 runs")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-img-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)   # run folders: GBs per run
    overrides = [f"data.max_rows={args.rows}", f"train.epochs={args.epochs}", f"data.image_size={args.size}",
                 "augment.hflip=0", "augment.crop_scale=null", "train.eval_every=1000000", "train.min_steps=0"]
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        print("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): using generated pictures")
        folder = generated_images(tmp / "pictures", per_class=(args.rows + 1000) // 3 + 400)
        overrides += [f"data.train={folder}", "data.test=null", "data.test_size=1000"]
    from tunesmith.device import choose_precision
    precisions = ["fp32"]
    if not args.skip_bf16 and choose_precision("auto", torch.device("cpu"))[0] == "bf16":
        precisions.append("bf16")

    results = []
    for precision in precisions:
        recipe = load(RECIPE, overrides + [f"train.precision={precision}"])
        task = get_task(recipe)
        tables, _ = load_splits(task, recipe)
        if not results:
            from tunesmith.device import cpu_flags
            flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
            print(f"cpu flags: {flags}; load average {os.getloadavg()[0]:.2f}")
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
                  f"train {len(tables['train']):,} images, test {len(tables['test']):,}; {args.size} px, "
                  f"batch {recipe.train.batch_size}, lr {recipe.train.learning_rate}, epochs {args.epochs}")
        task.load_model()
        features = {s: task.encode(tables[s].rows) for s in ("train", "test")}
        warm_up(task, features["train"], recipe.train.batch_size)
        results.append(run_torch(recipe, task, features))
        results.append(run_tunesmith(recipe, str(tmp / f"ts-{precision}"), ""))
    recipe = load(RECIPE, [o for o in overrides if not o.startswith("augment.")] + ["train.precision=fp32"])
    results.append(run_tunesmith(recipe, str(tmp / "ts-aug"), ", + flip/crop augmentation"))

    print(f"\n{'run':<48}{'images/s':>10}{'ratio':>7}{'peak MiB':>10}{'accuracy':>10}")
    for r in results:
        base = next(b for b in results if b["name"].startswith("plain") and b["precision"] == r["precision"])
        ips = r["images"] / r["seconds"]
        print(f"{r['name']:<48}{ips:>10.1f}{ips / (base['images'] / base['seconds']):>7.2f}{r['mem']:>10.0f}"
              f"{r['accuracy']:>10.4f}")
    print("\nratio: images/s relative to the plain PyTorch loop of the same precision; peak MiB: resident memory "
          "growth during training (tunesmith's includes reading and preprocessing the data)")


if __name__ == "__main__":
    main()
