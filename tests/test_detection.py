"""object-detection on tiny detectors built from configs and generated images with known boxes (coloured rectangles
on noise): the three label formats read alike, with provenance for every rejected box (the doctor and training
reject the same); a tiny YOLOS overfits 8 images (mAP@.5 > 0.9) through `train`, its eval.json equals pycocotools run
directly on the saved detections, predict equals pipeline("object-detection"), a moved run reloads, serves, draws
and exports to ONNX; DETR, Conditional DETR and RT-DETR train through the same task."""
import base64
import shutil
import sys
import types

import pytest
import torch
from detection_fixtures import NAMES, images, tiny_detector, write_coco, write_voc, write_yolo

import tunesmith as ts
from tunesmith import io
from tunesmith.data import DataError
from tunesmith.diagnosis.report import render
from tunesmith.recipe import RecipeError, load
from tunesmith.tasks import box_readers, get_task


def recipe(model, data_file, **sections) -> dict:
    out = {"task": "object-detection", "model": str(model), "data": {"train": str(data_file)},
           "train": {"epochs": 200, "learning_rate": 3e-3, "batch_size": 8, "seed": 0, "precision": "fp32",
                     "log_every": 10, "warmup": 0, "weight_decay": 0.0, "scheduler": "constant", "threads": 1,
                     "save_every": 100000, "metric": "map_50"}, "eval": {"batch_size": 8}}
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value}
    return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """8 images (the last a negative) as COCO, YOLO and VOC labels; a tiny YOLOS."""
    tmp = tmp_path_factory.mktemp("det")
    truth = images(tmp / "images")
    return {"tmp": tmp, "truth": truth, "coco": write_coco(tmp / "ann.json", truth),
            "yolo": write_yolo(tmp / "yolo", truth), "voc": write_voc(tmp / "voc", truth),
            "yolos": tiny_detector(tmp / "yolos", "yolos")}


@pytest.fixture(scope="module")
def run(scenes):
    """YOLOS trained to overfit the 8 images (validation and test are the same images)."""
    c = str(scenes["coco"])
    return ts.train(load(recipe(scenes["yolos"], c, data={"validation": c, "test": c})),
                    run_dir=scenes["tmp"] / "run")


def test_the_three_formats_read_the_same_rows(scenes):
    got = {}
    for form in ("coco", "yolo", "voc"):
        assert box_readers.detect(str(scenes[form])) == form
        data = box_readers.read(str(scenes[form]), "train", form)
        assert data.rejected == [] and len(data.rows) == 8
        got[form] = sorted((r["image"].rsplit("/", 1)[1], r["width"], r["height"], tuple(r["labels"]),
                            tuple(tuple(round(v, 2) for v in b) for b in r["boxes"])) for r in data.rows)
        assert all(len(r["where"]) == len(r["boxes"]) for r in data.rows)
    assert got["coco"] == got["yolo"] == got["voc"]
    assert got["coco"][-1][3] == ()                         # the negative is kept, without boxes
    expected = sorted((t["file"].name, tuple(t["labels"])) for t in scenes["truth"])
    assert [(g[0], g[3]) for g in got["coco"]] == expected
    assert box_readers.read(str(scenes["yolo"]), "train", "yolo").names == NAMES


def test_rejected_boxes_name_their_file_and_line_or_object(tmp_path, scenes):
    truth = scenes["truth"][:2]
    bad = [{"id": 90, "image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 30]},      # past the 64x48 edge
           {"id": 91, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 4]},          # zero width
           {"id": 92, "image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4]},          # unknown class
           {"id": 93, "image_id": 5, "category_id": 1, "bbox": [1, 1, 4, 4]}]          # unknown image
    shutil.copytree(scenes["truth"][0]["file"].parent, tmp_path / "images")
    coco = write_coco(tmp_path / "ann.json", [{**t, "file": tmp_path / "images" / t["file"].name} for t in truth], bad)
    data = box_readers.read(str(coco), "train", "coco")
    assert [(w.rsplit("#", 1)[1], why.split(" (")[0]) for w, why in data.rejected] == [
        ("annotation-90", "box [50, 40, 80, 70] is outside the image"), ("annotation-91",
                                                                         "box [5, 5, 5, 9] has zero or negative area"),
        ("annotation-92", "unknown category_id 7"), ("annotation-93", "unknown image_id 5")]
    yolo = write_yolo(tmp_path / "yolo", truth)
    label = tmp_path / "yolo" / "labels" / f"{truth[0]['file'].stem}.txt"
    label.write_text(label.read_text() + "7 0.5 0.5 0.1 0.1\n0 0.5 0.5\n1 0.9 0.9 0.5 0.5\n")
    data = box_readers.read(str(yolo), "train", "yolo")
    assert [(w, why.split(" (")[0].split(":")[0]) for w, why in data.rejected] == [
        (f"{label}:2", "unknown class id 7"), (f"{label}:3", "3 fields"),
        (f"{label}:4", "box [41.6, 31.2, 73.6, 55.2] is outside the image")]
    voc = write_voc(tmp_path / "voc", truth)
    xml = voc / f"{truth[1]['file'].stem}.xml"
    xml.write_text(xml.read_text().replace("</annotation>", "<object><name>red</name><bndbox><xmin>9</xmin><ymin>9"
                                                            "</ymin><xmax>3</xmax><ymax>20</ymax></bndbox></object>"
                                                            "</annotation>"))
    data = box_readers.read(str(voc), "train", "voc")
    n = len(truth[1]["boxes"]) + 1
    assert data.rejected == [(f"{xml}#object-{n}", "box [9, 9, 3, 20] has zero or negative area")]


def test_doctor_and_training_reject_the_same_boxes(tmp_path, scenes, monkeypatch):
    """One rejected list: train under bad_rows=error stops naming each box, under skip writes them to rejects.jsonl;
    the doctor lists the same rows and hands the same (where, reason) pairs to the box checks."""
    coco = tmp_path / "ann.json"
    shutil.copytree(scenes["truth"][0]["file"].parent, tmp_path / "images")
    truth = [{**t, "file": tmp_path / "images" / t["file"].name} for t in scenes["truth"]]
    write_coco(coco, truth, [{"id": 90, "image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 30]},
                             {"id": 91, "image_id": 2, "category_id": 9, "bbox": [1, 1, 4, 4]}])
    base = recipe(scenes["yolos"], coco, data={"validation_size": 2, "test_size": 2},
                  train={"epochs": 1, "metric": "loss"}, doctor={"label_noise": False})
    with pytest.raises(DataError) as e:
        ts.train(load(base), run_dir=tmp_path / "stopped")
    assert "ann.json#annotation-90: box [50, 40, 80, 70] is outside the image" in str(e.value)
    assert "ann.json#annotation-91: unknown category_id 9" in str(e.value)
    seen = {}
    fake = types.ModuleType("tunesmith.diagnosis.boxes")
    fake.box_findings = lambda rows, names, rejected, **kw: (seen.update(rows=rows, names=names, rejected=rejected,
                                                                         **kw) or ({"boxes": True}, [], []))
    monkeypatch.setitem(sys.modules, "tunesmith.diagnosis.boxes", fake)
    report = ts.doctor(load(base), out=None)
    run = ts.train(load({**base, "data": {**base["data"], "bad_rows": "skip"}}), run_dir=tmp_path / "run")
    trained = [(r["origin"], r["reason"]) for r in io.read_jsonl(run.path / "rejects.jsonl")]
    assert len(trained) == 2
    assert [(r["origin"], r["reason"]) for r in report["rejects"]] == trained
    assert [tuple(x) for x in seen["rejected"]] == trained and report["task"] == {"boxes": True}
    splits = io.read_json(run.path / "data" / "splits.json")        # images and boxes counted apart
    boxes = sum(len(t["boxes"]) for t in truth)
    assert splits["files"][0] == {**splits["files"][0], "read": 8, "usable": 8, "rejected": 0, "unit": "images",
                                  "part": "boxes", "parts": {"read": boxes + 2, "usable": boxes, "rejected": 2,
                                                             "dropped": 0}}
    assert splits["rejected"] == 0 and splits["parts"] == splits["files"][0]["parts"] and report["files"] == \
        splits["files"] and sum(splits["rows"].values()) == 8
    assert seen["names"] == NAMES and sum(len(rows) for rows in seen["rows"].values()) == 8
    assert seen["bad_rows"] == "error" and seen["listed"] == 20


def test_bad_label_files_are_one_line_naming_the_place(tmp_path):
    cases = []
    (tmp_path / "a.json").write_text('{"images": [],\n "categories": [\n}')
    cases.append(("coco", tmp_path / "a.json", r"a\.json:3: not valid JSON"))
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "x.xml").write_text("<annotation>\n<filename>x.png</filename>\n<object>\n</annotation>")
    cases.append(("voc", tmp_path / "voc", r"x\.xml:4: not valid XML"))
    (tmp_path / "y" / "images").mkdir(parents=True)
    (tmp_path / "y" / "images" / "a.png").write_bytes(b"")
    cases.append(("yolo", tmp_path / "y", r"without class names; add a data.yaml"))
    (tmp_path / "d.yaml").write_text("names: [a, b\ntrain: images\n")
    cases.append(("yolo", tmp_path / "d.yaml", r"d\.yaml:2: not valid YAML"))
    for form, path, words in cases:
        with pytest.raises(DataError, match=words) as e:
            box_readers.read(str(path), "train", form)
        assert "\n" not in str(e.value)


def test_recipe_section_and_processor_size(scenes):
    r = load(recipe(scenes["yolos"], scenes["coco"], data={"image_size": 96, "format": "coco"},
                    augment={"hflip": 0.5}))
    assert r.augment.enabled and r.train.metric == "map_50" and r.eval.score_threshold == 0.5
    task = get_task(r)
    task.setup()
    assert type(task.processor).__name__ == "YolosImageProcessorPil"
    task.set_labels(NAMES)
    (f,) = task.encode([{"image": str(scenes["truth"][0]["file"]), "boxes": [[8, 8, 32, 24]], "labels": ["red"]}])
    _, h, w = f["pixels"].shape                     # YOLOS rounds the height to a multiple of 16: 72 -> 64
    assert (h, w) == (64, 96) and f["boxes"][0].tolist() == pytest.approx([8 * 1.5, 8 * h / 48, 32 * 1.5, 24 * h / 48])
    for bad, words in [({"data": {"format": "csv"}}, "format"), ({"data": {"names": ["a", "a"]}}, "distinct"),
                       ({"train": {"metric": "accuracy"}}, "map_50"),
                       ({"data": {"label_column": "x"}}, "does not apply")]:
        with pytest.raises(RecipeError, match=words):
            load(recipe("m", "d.json", **bad))


def test_overfits_eight_images_and_the_loss_falls(run):
    assert run.metrics["map_50"] > 0.9, run.metrics
    losses = [r["loss"] for r in io.read_jsonl(run.path / "metrics.jsonl") if "lr" in r]           # training records
    assert losses[-1] < 0.5 * losses[0]
    assert set(run.metrics["per_class"]) == set(NAMES) and run.metrics["n_images"] == 8


def test_eval_json_equals_pycocotools_on_the_saved_detections(run):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO()
    truth.dataset = io.read_json(run.path / "coco_truth.json")
    truth.createIndex()
    ev = COCOeval(truth, truth.loadRes(io.read_json(run.path / "coco_detections.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
             "mar_small", "mar_medium", "mar_large"]
    assert [run.metrics[k] for k in names] == pytest.approx([float(v) for v in ev.stats], abs=1e-9)
    p = ev.eval["precision"][:, :, 0, 0, -1]                    # class "red" (category 1), every IoU threshold
    assert run.metrics["per_class"]["red"]["ap"] == pytest.approx(float(p[p > -1].mean()), abs=1e-9)


def test_predict_equals_the_transformers_pipeline(run, scenes):
    from transformers import pipeline

    files = [str(t["file"]) for t in scenes["truth"][:4]]
    mine = run.load("cpu").predict(files)
    pipe = pipeline("object-detection", model=str(run.model_dir))
    for got, file in zip(mine, files):
        theirs = pipe(file)
        assert [(b["label"], round(b["score"], 4)) for b in got["boxes"]] == \
               [(b["label"], round(b["score"], 4)) for b in sorted(theirs, key=lambda b: -b["score"])]
        for b, t in zip(got["boxes"], sorted(theirs, key=lambda b: -b["score"])):
            box = t["box"]
            assert [int(v) for v in b["box"]] == pytest.approx([box["xmin"], box["ymin"], box["xmax"], box["ymax"]],
                                                                abs=1)
    assert any(got["boxes"] for got in mine)


def test_moved_run_evaluates_predicts_serves_and_draws(run, scenes, tmp_path):
    from fastapi.testclient import TestClient

    from tunesmith.cli import main

    saved, moved = run.metrics, tmp_path / "moved"
    shutil.copytree(run.path, moved)
    hidden = run.path.with_name(run.path.name + "-hidden")
    run.path.rename(hidden)
    try:
        predictor = ts.Run(moved).load("cpu")
        assert predictor.evaluate()["map"] == pytest.approx(saved["map"])
        file = scenes["truth"][0]["file"]
        expected = predictor.predict([str(file)])
        uri = "data:image/png;base64," + base64.b64encode(file.read_bytes()).decode()
        answer = TestClient(ts.create_app(predictor)).post("/v1/predict", json={"inputs": [uri]})
        assert answer.status_code == 200 and answer.json()["predictions"] == expected and expected[0]["boxes"]
        out = tmp_path / "drawn.png"
        assert main(["predict", str(moved), str(file), "--out", str(out)]) == 0
        from PIL import Image
        drawn, plain = Image.open(out).convert("RGB"), Image.open(file).convert("RGB")
        assert drawn.size == plain.size and drawn.tobytes() != plain.tobytes()
    finally:
        hidden.rename(run.path)


def test_onnx_export_passes_the_parity_gate(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from tunesmith.deploy.export import export

    report = export(run.path, out=tmp_path / "onnx", repeats=2)
    assert report["passed"] and report["results"]["fp32"]["max_abs_logit_diff"] < 1e-3
    assert report["results"]["fp32"]["map_50"] == pytest.approx(run.metrics["map_50"])


@pytest.mark.parametrize("kind", ["detr", "conditional_detr", "rt_detr"])
def test_other_detr_family_models_learn_through_the_task(scenes, kind, tmp_path):
    """The loss of a fixed batch falls over a few steps; evaluate and predict give COCO scores and boxes."""
    model_dir = tiny_detector(tmp_path / kind, kind)
    task = get_task(load(recipe(model_dir, scenes["coco"])))
    table = task.read(str(scenes["coco"]), "train")
    task.prepare(table.rows)
    features = task.encode(table.rows[:4])
    torch.manual_seed(0)
    model = task.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    batch = task.collate(features)
    losses = []
    for _ in range(8):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        scores = task.evaluate(model, features, 4)
    assert 0 <= scores["map_50"] <= 1 and scores["loss"] > 0
    (got,) = task.predict(model, [table.rows[0]["image"]])
    assert all(len(b["box"]) == 4 and b["label"] in NAMES for b in got["boxes"])


def test_the_augmentation_call_point_hands_pixels_and_boxes_and_takes_them_back(scenes, monkeypatch):
    """box_augment.augment_boxes (kornia) gets images [B, 3, H, W] in [0, 1] and xyxy pixel boxes; an identity
    augmentation leaves the loss as it was, a horizontal flip moves the boxes with the pixels."""
    calls = []

    def augment_boxes(images, boxes, labels, settings, generator, flip=False):
        calls.append((images.clone(), [b.clone() for b in boxes], settings))
        if flip:
            w = images.shape[-1]
            return images.flip(-1), [torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], -1) for b in boxes], \
                labels, 0
        return images, boxes, labels, 0

    fake = types.ModuleType("tunesmith.tasks.box_augment")
    fake.augment_boxes = augment_boxes
    monkeypatch.setitem(sys.modules, "tunesmith.tasks.box_augment", fake)
    task = get_task(load(recipe(scenes["yolos"], scenes["coco"], augment={"hflip": 0.5})))
    table = task.read(str(scenes["coco"]), "train")
    task.prepare(table.rows)
    features = task.encode(table.rows[:2])
    batch = task.collate(features)
    model = task.load_model().eval()
    with torch.no_grad():
        plain = model(**batch).loss * 2
        assert task.loss(model, batch) == pytest.approx(float(plain), rel=1e-4)
        images, boxes, settings = calls[0]
        assert 0 <= images.min() and images.max() <= 1 and settings.hflip == 0.5
        assert boxes[0][0].tolist() == pytest.approx(features[0]["boxes"][0].tolist(), abs=1e-3)   # xyxy pixels
        fake.augment_boxes = lambda *a: augment_boxes(*a, flip=True)
        flipped = task.augmented(batch, task.recipe.augment)
        w = batch["pixel_values"].shape[-1]
        assert torch.allclose(flipped["pixel_values"], batch["pixel_values"].flip(-1), atol=1e-5)
        cx = batch["labels"][0]["boxes"][:, 0]
        assert torch.allclose(flipped["labels"][0]["boxes"][:, 0], 1 - cx, atol=1e-5) and w > 0


def test_coco_scores_of_no_and_of_perfect_detections():
    from tunesmith.tasks.detection_schema import coco_files, coco_scores

    images, truth = [{"width": 64, "height": 48}], [[([1, 1, 20, 20], 0)]]
    none = coco_scores(*coco_files(images, truth, [[]], NAMES), NAMES)
    assert none["map"] == 0 and none["map_large"] == -1 and none["per_class"] == {
        "red": {"ap": 0.0, "ap_50": 0.0}, "blue": {"ap": -1.0, "ap_50": -1.0}}     # no true blue box: undefined
    perfect = coco_scores(*coco_files(images, truth, [[([1, 1, 20, 20], 0, 0.9), ([30, 30, 40, 40], 1, 0.5)]],
                                      NAMES), NAMES)
    assert perfect["map"] == perfect["mar_100"] == 1.0 and perfect["n_boxes"] == 1


def test_yolo_splits_from_the_data_yaml_and_negatives_left_out_when_asked(scenes):
    assert len(box_readers.read(str(scenes["yolo"]), "validation", "yolo").rows) == 8      # data.yaml's val: images
    with pytest.raises(DataError, match="no 'test' folder"):
        box_readers.read(str(scenes["yolo"]), "test", "yolo")
    task = get_task(load(recipe(scenes["yolos"], scenes["yolo"], data={"negatives": False})))
    table = task.read(str(scenes["yolo"]), "train")
    assert len(table.rows) == 7 and all(r["boxes"] for r in table.rows)
    assert task.check_notes() == ["train: 1 image(s) without boxes left out (data.negatives: false)"]


def test_init_recognises_coco_and_yolo_labels_without_torch(scenes):
    from tunesmith import starter

    for form in ("coco", "yolo"):
        made = starter.init(scenes[form], model=str(scenes["yolos"]), out=None)
        assert made["task"] == "object-detection" and made["recipe"]["data"]["format"] == form
        assert ("7 boxes" if form == "coco" else "2 classes (red, blue)") in made["text"]
    code = "import sys, tunesmith.tasks.box_readers, tunesmith.tasks.detection_schema; print('torch' in sys.modules)"
    import subprocess
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_class_outside_data_names_is_a_rejected_box(scenes):
    task = get_task(load(recipe(scenes["yolos"], scenes["coco"], data={"names": ["red"]})))
    table = task.read(str(scenes["coco"]), "train")
    blue = sum(t["labels"].count("blue") for t in scenes["truth"])
    assert [r.reason for r in table.rejects] == ["class 'blue' is not in data.names"] * blue
    assert all(task.check(r, "train") is None and set(r["labels"]) <= {"red"} for r in table.rows)
    blue_row = {"image": table.rows[0]["image"], "width": 64, "height": 48, "boxes": [[1, 1, 9, 9]], "labels": ["blue"]}
    assert task.check(blue_row, "train") == "class 'blue' is not among the classes (red; data.names or train's)"


def test_report_shows_per_class_ap_pr_curves_and_images_with_boxes(run, tmp_path):
    """The trained tiny detector's report: eval.json's per-class AP as a table, one precision-recall subplot per class
    (from pr_curves.json, which evaluate_final writes from the same COCOeval), each sample image with its boxes."""
    import re

    from tunesmith.insight.kinds import pr_figure
    from tunesmith.insight.report import write_report

    curves = io.read_json(run.path / "pr_curves.json")
    assert set(curves["classes"]) == set(NAMES) and len(curves["recall"]) == 101
    for name, c in curves["classes"].items():          # AP@.5 is the mean of the IoU .5 curve (COCO's definition)
        assert abs(sum(c["iou_50"]) / 101 - run.metrics["per_class"][name]["ap_50"]) < 1e-5
    html = write_report([run.path], tmp_path / "r.html", explain=False).read_text()
    section = lambda sid: re.search(rf'<section id="{sid}">(.*?)</section>', html, re.DOTALL).group(1)
    per_class = section("per-class")
    for name in NAMES:
        assert f'<td class="l">{name}</td><td>{run.metrics["per_class"][name]["ap"]:.4f}</td>' in per_class
    assert f'<td>{run.metrics["map"]:.4f}</td>' in per_class
    assert section("pr-curves").count("data:image/png;base64,") == 1
    fig = pr_figure(curves)
    drawn = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in drawn] == list(curves["classes"]) and all(len(ax.lines) == 2 for ax in drawn)
    samples = section("samples")
    assert samples.count('<img alt="boxes on ') == len(io.read_jsonl(run.path / "samples.jsonl")) == 8
    assert "does not apply" in section("confusion") and "does not apply" not in section("pr-curves")


def test_augment_is_the_one_torch_free_box_augment_section(scenes):
    from tunesmith.tasks.box_augment_schema import BoxAugment
    from tunesmith.tasks.detection_schema import DetectionRecipe

    assert DetectionRecipe.model_fields["augment"].annotation is BoxAugment
    r = load(recipe(scenes["yolos"], scenes["coco"], augment={"hflip": 0.5, "mosaic": 0.25}))
    assert isinstance(r.augment, BoxAugment) and r.augment.enabled
    with pytest.raises(RecipeError, match="crop_scale"):                  # BoxAugment's own check
        load(recipe(scenes["yolos"], scenes["coco"], augment={"crop_scale": [0.5, 1.5]}))


@pytest.mark.parametrize("bad_rows", ["error", "skip"])
def test_the_doctor_says_each_box_finding_once(tmp_path, scenes, bad_rows):
    """A real doctor run (the box checks included): the rejected boxes and a class missing from validation/test
    are each one line, the shared doctor's (unusable rows, class balance); doctor.json's task section keeps the
    box checks' detail of both."""
    shutil.copytree(scenes["truth"][0]["file"].parent, tmp_path / "images")
    truth = [{**t, "file": tmp_path / "images" / t["file"].name} for t in scenes["truth"]]
    x0, y0, x1, y1 = truth[0]["boxes"][0]
    coco = write_coco(tmp_path / "ann.json", truth, [
        {"id": 90, "image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 30]},
        {"id": 91, "image_id": 1, "category_id": NAMES.index(truth[0]["labels"][0]) + 1,   # a duplicate box
         "bbox": [x0, y0, x1 - x0, y1 - y0]}])
    held = write_coco(tmp_path / "held.json", [t for t in truth if t["labels"] and set(t["labels"]) == {NAMES[0]}])
    r = recipe(scenes["yolos"], coco, data={"validation": str(held), "test": str(held), "bad_rows": bad_rows},
               doctor={"label_noise": False})
    report = ts.doctor(load(r), out=None)
    lines = report["blocking"] + report["warnings"]
    assert sum("unusable" in x or "rejected" in x for x in lines) == 1, lines
    assert (report["blocking"] if bad_rows == "error" else report["warnings"])[0].startswith("1 unusable boxes: ")
    boxes = sum(len(t["boxes"]) for t in truth)
    assert report["files"][0]["parts"] == {"read": boxes + 2, "usable": boxes + 1, "rejected": 1, "dropped": 0}
    shown = render(report)          # what `tunesmith doctor` prints: every box finding, not only the warnings
    assert "images read" in shown and "boxes rejected" in shown and "Checks of object-detection" in shown
    negative = truth[-1]["file"]
    assert f"train: 1 image(s) without boxes (kept as background): {negative}" in shown
    assert f"1 x box … is outside the image (64x48), e.g. {coco}#annotation-90" in shown
    assert f"duplicate train: {coco}#annotation-91 repeats {coco}#annotation-1" in shown
    tiny = report["task"]["splits"]["train"]
    assert f"{tiny['tiny']:,} ({tiny['tiny_share']:.1%})" in shown and "images holding each class:" in shown
    for split in ("validation", "test"):
        assert sum(x.startswith(f"{split} has no box") for x in lines) == 1, lines
    assert report["task"]["rejected"]["count"] == 1
    assert report["task"]["balance"]["boxes"]["validation"][NAMES[1]] == 0
