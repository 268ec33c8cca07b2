"""tunesmith's object-detection task vs HF Trainer on the same tiny detector, data and settings, in one process, fp32.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/detection_vs_hf.py [--epochs E] [--repeats R] [--tile PX]
        [--data trees|shapes] [--images N] [--lr LR] [--profile STEPS]

NEEDS the object-detection task (issue 23: tunesmith/tasks/detection.py, recipe `task: object-detection`); it was
written beside that task, before the merge, and runs once both are on one branch.

Data: the deepforest package's tree boxes cut into tiles and split by tile exactly as
benchmarks/detection_demo_study.py does (non-overlapping TILE x TILE tiles, 80 / 20 at random by tile), written
once as PNG tiles and two COCO files (train.json, test.json). --data shapes: N generated images with known boxes
instead (filled rectangles in bright colours on grey noise, 1-3 an image, one class, `shapes`), which a detector
from scratch learns in minutes, so the two arms can be compared at a non-trivial mAP; 80 / 20 split the same way.
--profile STEPS: each arm trains STEPS steps under cProfile; the table shows where its loop's time goes.

Model: the study's small RT-DETR (a basic-block ResNet backbone, d_model 128, 3 decoder layers, 100 queries; TILE
at least 96: its 100 queries are picked among the feature-map cells) built from a config with seeded random
weights and saved once as a local folder with an RTDetrImageProcessorPil at TILE x TILE, so both arms start from
the same weights and preprocessing. Both train with the same batch size, learning rate, AdamW, weight decay,
gradient clipping, linear schedule with the same warmup, epochs and seed, no augmentation; HF Trainer gets its
inputs preprocessed once by that processor (the HF object-detection guide's recipe, without its on-the-fly
transforms), a collate that stacks pixel_values and passes the labels list, remove_unused_columns off. Both end
with their last weights (tunesmith train.keep: last; its per-epoch validation on the test images is left out of
its time). The arms alternate (HF, tunesmith, ...) so load from other processes falls on both; the table shows
images/s per run, the ratio of each pair, and the test mAP@[.5:.95] and mAP@.5 of each trained model, scored by
the same code (faster-coco-eval, benchmarks/detection_demo_study.coco_map), so equal mAP can be checked beside the
speed.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from detection_demo_study import build, coco_map, tiles  # noqa: E402
from text_cls_vs_hf import PeakRSS  # noqa: E402

from tunesmith.device import cpu_flags  # noqa: E402


def shapes(n: int, size: int, seed: int) -> list[dict]:
    """n generated size x size images with known boxes, the kind tests/detection_fixtures.py draws (filled
    rectangles on grey noise), one class, 1-3 rectangles an image of 1/6 to 1/2 the side in random bright colours,
    overlapping allowed (a later one covers an earlier one's pixels, so a box whose visible part is under half of it
    is left out): {pixels [3, S, S] float 0-1, boxes [n, 4] xyxy px}."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        gen = np.random.default_rng(rng.randrange(2**32))
        pixels = gen.integers(90, 150, (size, size, 3), dtype=np.uint8)
        owner = np.full((size, size), -1)
        boxes = []
        for k in range(rng.randint(1, 3)):
            w, h = rng.randint(size // 6, size // 2), rng.randint(size // 6, size // 2)
            x, y = rng.randint(0, size - w), rng.randint(0, size - h)
            colour = [rng.choice((rng.randint(0, 60), rng.randint(190, 255))) for _ in range(3)]
            colour[rng.randrange(3)] = rng.randint(200, 255)          # never grey: it must stand out of the noise
            pixels[y:y + h, x:x + w] = colour
            owner[y:y + h, x:x + w] = k
            boxes.append([x, y, x + w, y + h])
        seen = [k for k, (x0, y0, x1, y1) in enumerate(boxes) if (owner[y0:y1, x0:x1] == k).mean() >= 0.5]
        out.append({"pixels": torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
                    "boxes": torch.tensor([boxes[k] for k in seen], dtype=torch.float32).reshape(-1, 4)})
    return out


def write_data(folder: Path, data: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Images as PNGs plus train.json / test.json (COCO, one category: 1 "tree"); returns (train, test):
    80 / 20 at random."""
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    cut = int(0.8 * len(order))
    splits = {"train": [data[i] for i in order[:cut]], "test": [data[i] for i in order[cut:]]}
    for split, chunk in splits.items():
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "tree"}]}
        for k, t in enumerate(chunk):
            name = f"{split}_{k:04d}.png"
            Image.fromarray((t["pixels"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / name)
            coco["images"].append({"id": k + 1, "file_name": name, "width": size, "height": size})
            for b in t["boxes"].tolist():
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": k + 1, "category_id": 1,
                                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0,
                                            "area": (b[2] - b[0]) * (b[3] - b[1])})
        (folder / f"{split}.json").write_text(json.dumps(coco))
    return splits["train"], splits["test"]


def write_model(folder: Path, size: int, seed: int) -> None:
    """The study's RT-DETR with seeded random weights and its processor, as a local transformers folder."""
    from transformers import RTDetrImageProcessorPil

    torch.manual_seed(seed)
    model, _, _ = build("rtdetr")
    model.config.id2label, model.config.label2id = {0: "tree"}, {"tree": 0}
    model.save_pretrained(folder)
    RTDetrImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)


def run_hf(model_dir: Path, data_dir: Path, args, out_dir: str) -> dict:
    from transformers import AutoImageProcessor, AutoModelForObjectDetection, Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForObjectDetection.from_pretrained(model_dir)
    coco = json.loads((data_dir / "train.json").read_text())
    by_image = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:                   # HF models count classes from 0, COCO categories from 1
        by_image[a["image_id"]].append(a | {"category_id": a["category_id"] - 1})
    train_set = []
    for im in coco["images"]:
        enc = processor(images=Image.open(data_dir / im["file_name"]).convert("RGB"),
                        annotations={"image_id": im["id"], "annotations": by_image[im["id"]]}, return_tensors="pt")
        train_set.append({"pixel_values": enc["pixel_values"][0], "labels": enc["labels"][0]})

    def collate(items):
        return {"pixel_values": torch.stack([x["pixel_values"] for x in items]), "labels": [x["labels"] for x in items]}

    steps = -(-len(train_set) // args.batch) * args.epochs
    targs = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=args.batch, learning_rate=args.lr,
                              num_train_epochs=args.epochs, weight_decay=args.weight_decay,
                              warmup_steps=round(0.06 * steps), lr_scheduler_type="linear", max_grad_norm=0.1,
                              seed=args.seed, save_strategy="no", report_to="none", disable_tqdm=True,
                              logging_steps=50, remove_unused_columns=False, dataloader_num_workers=0,
                              max_steps=args.max_steps or -1)
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=collate)
    with PeakRSS() as mem:
        seconds = trainer.train().metrics["train_runtime"]
    return {"name": "HF Trainer (fp32)", "seconds": seconds, "images": len(train_set) * args.epochs, "mem": mem.mib,
            "model": model.eval()}


def run_tunesmith(model_dir: Path, data_dir: Path, args, out_dir: str) -> dict:
    from transformers import AutoModelForObjectDetection

    from tunesmith.pipeline import train
    from tunesmith.recipe import load

    recipe = load({"task": "object-detection", "model": {"name": str(model_dir)},
                   "data": {"train": str(data_dir / "train.json"), "validation": str(data_dir / "test.json"),
                            "test": str(data_dir / "test.json"), "format": "coco", "image_size": args.tile},
                   "train": {"epochs": args.epochs, "batch_size": args.batch, "learning_rate": args.lr,
                             "weight_decay": args.weight_decay, "warmup": 0.06, "scheduler": "linear",
                             "max_grad_norm": 0.1, "seed": args.seed, "precision": "fp32",
                             "threads": torch.get_num_threads(), "eval_every": 10 ** 6, "keep": "last",
                             **({"max_steps": args.max_steps} if args.max_steps else {})},
                   "eval": {"before": False}})
    with PeakRSS() as mem:
        run = train(recipe, run_dir=out_dir)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    model = AutoModelForObjectDetection.from_pretrained(run.path / "model")
    return {"name": "tunesmith (fp32)", "seconds": summary["train_seconds"] - summary["eval_seconds"],
            "images": summary["samples"], "mem": mem.mib, "model": model.eval()}


def cumulative(stats: dict, file: str, func: str, line: int | None = None) -> float:
    """The largest cumulative seconds of a function named `func` in a file ending with `file` (cProfile stats)."""
    return max([v[3] for (f, ln, fn), v in stats.items() if f.endswith(file) and fn == func
                and (line is None or ln == line)], default=0.0)


def profile(args, tmp: Path) -> None:
    """Each arm for args.profile optimizer steps under cProfile; where its training loop's time goes, as shares.
    cProfile adds a cost per Python call, so Python-heavy parts (the matcher, the loss, collate) read somewhat
    high next to the C++ kernels of forward and backward; both arms carry the same bias."""
    import cProfile
    import inspect
    import pstats

    from transformers.loss import loss_rt_detr

    def line(fn) -> int:
        return inspect.getsourcelines(inspect.unwrap(fn))[1]

    matcher = ("loss_rt_detr.py", "forward", line(loss_rt_detr.RTDetrHungarianMatcher.forward))
    args.max_steps = args.profile
    print(f"\nprofile: {args.profile} optimizer steps of batch {args.batch} per arm under cProfile (shares of the "
          f"training loop)")
    import transformers

    from tunesmith import loop as ts_loop

    def window(prof, fn, on: bool):
        """fn with the profiler on (the training loop) or off (validation and checkpoints inside it)."""
        def wrapped(*a, **k):
            prof.enable() if on else prof.disable()
            try:
                return fn(*a, **k)
            finally:
                prof.disable() if on else prof.enable()
        return wrapped

    rows = {}
    for arm, run in (("HF Trainer", run_hf), ("tunesmith", run_tunesmith)):
        prof = cProfile.Profile()
        patched = [(transformers.Trainer, "_inner_training_loop", True), (ts_loop, "fit", True),
                   (ts_loop.Validation, "__call__", False), (ts_loop, "save_step", False),
                   (ts_loop, "restore_best", False)]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
        for owner, name, on in patched:
            setattr(owner, name, window(prof, getattr(owner, name), on))
        try:
            run(tmp / "model", tmp / "data", args, str(tmp / f"profile-{arm[:2]}"))
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)
        st = pstats.Stats(prof).stats
        loop = sum(v[2] for v in st.values())      # every second profiled: the loop, less what `window` paused
        data = cumulative(st, "tunesmith/tasks/detection.py", "collate") if arm == "tunesmith" else \
            cumulative(st, "torch/utils/data/_utils/fetch.py", "fetch")
        model = cumulative(st, "modeling_rt_detr.py", "forward")
        loss = cumulative(st, "loss_rt_detr.py", "RTDetrForObjectDetectionLoss")
        match = cumulative(st, *matcher)
        parts = {"model forward": model - loss, "loss (without matcher)": loss - match, "Hungarian matcher": match,
                 "backward": cumulative(st, "torch/autograd/__init__.py", "backward"),
                 "clip grad norm": cumulative(st, "torch/nn/utils/clip_grad.py", "clip_grad_norm_"),
                 "optimizer step": cumulative(st, "torch/optim/adam.py", "step"),
                 "data: batches, collate": data}
        parts["other (loop, scheduler, logging)"] = loop - sum(parts.values())
        rows[arm] = (loop, parts)
    print(f"{'part':<34}" + "".join(f"{a:>22}" for a in rows))
    for name in next(iter(rows.values()))[1]:
        print(f"{name:<34}" + "".join(f"{p[name]:>9.2f}s {p[name] / loop:>6.1%}     " for loop, p in rows.values()))
    print(f"{'training loop':<34}" + "".join(f"{loop:>9.2f}s {loop / args.profile:>6.2f}s/step" for loop, _ in
                                             rows.values()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="HF/tunesmith pairs, alternating (default 2)")
    ap.add_argument("--data", choices=["trees", "shapes"], default="trees",
                    help="deepforest tree tiles (real, near-zero mAP in minutes) or generated rectangles (learnable)")
    ap.add_argument("--images", type=int, default=400, help="--data shapes: how many images (80%% train, 20%% test)")
    ap.add_argument("--tile", type=int, default=224, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="instead of the timed pairs: each arm STEPS optimizer steps under cProfile, where time goes")
    args = ap.parse_args()
    args.max_steps = None

    tmp = Path(tempfile.mkdtemp(prefix="bench-det-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    (tmp / "data").mkdir()
    data = tiles(args.tile) if args.data == "trees" else shapes(args.images, args.tile, args.seed)
    train_tiles, test_tiles = write_data(tmp / "data", data, args.tile, args.seed)
    write_model(tmp / "model", args.tile, args.seed)
    simd = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cpu flags: {' '.join(simd)}; "
          f"{args.data}: {len(train_tiles)} train, {len(test_tiles)} test images of {args.tile}px; batch "
          f"{args.batch}, lr {args.lr}, epochs {args.epochs}, seed {args.seed}; load average "
          f"{os.getloadavg()[0]:.2f} at the start")
    if args.profile:
        return profile(args, tmp)
    results = []
    for k in range(args.repeats):
        for arm in ("hf", "ts"):
            before = os.getloadavg()[0]
            run = run_hf if arm == "hf" else run_tunesmith
            r = run(tmp / "model", tmp / "data", args, str(tmp / f"{arm}{k}"))
            # the processor scales pixels to [0, 1] (RT-DETR: no normalisation), as the study's tiles are
            r |= coco_map(r.pop("model"), test_tiles, args.tile, sigmoid=True) | {"load": before}
            results.append(r)
            print(f"  {r['name']} #{k + 1}: {r['images'] / r['seconds']:.2f} images/s, mAP {r['map']:.4f}, "
                  f"mAP@.5 {r['map_50']:.4f} (load average {before:.2f} before it)", flush=True)
    print(f"\n{'run':<24}{'images/s':>10}{'ratio':>7}{'peak MiB':>10}{'mAP':>8}{'mAP@.5':>8}{'load':>6}")
    ratios = []
    for k in range(0, len(results), 2):
        base = results[k]["images"] / results[k]["seconds"]
        ratios.append(results[k + 1]["images"] / results[k + 1]["seconds"] / base)
        for r in results[k:k + 2]:
            ips = r["images"] / r["seconds"]
            print(f"{r['name'] + f' #{k // 2 + 1}':<24}{ips:>10.2f}{ips / base:>7.2f}{r['mem']:>10.0f}"
                  f"{r['map']:>8.4f}{r['map_50']:>8.4f}{r['load']:>6.2f}")
    print(f"\nratio (images/s, tunesmith over the HF run before it): median {statistics.median(ratios):.2f}, range "
          f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} pair(s); load average {os.getloadavg()[0]:.2f} at "
          f"the end")


if __name__ == "__main__":
    main()
