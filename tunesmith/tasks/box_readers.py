"""Box labels from COCO JSON, YOLO txt (+ data.yaml names) and Pascal VOC XML, as one row per image:

  {"image": path, "width": int, "height": int, "boxes": [[x0, y0, x1, y1], ...] float pixels,
   "labels": [class name, ...], "where": ["file:line" or "file#annotation-id", ...] one per box}

Every box that cannot be used is kept out of its row and recorded as (where, reason) in `BoxData.rejected`: outside
the image, zero or negative area, not finite, an unknown class, a malformed line or object. An image without boxes
is a row with empty lists (a negative). A file that cannot be read at all is a DataError naming it (one line).
Torch-free: the doctor and `tunesmith init` read labels without a model.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunesmith.data import DataError

EDGE = 0.5                  # pixels a box may stick out of the image (rounding in the labeller): clipped, not rejected
YAML_NAMES = ("data.yaml", "dataset.yaml")
YAML_SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclass
class BoxData:
    rows: list[dict] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)          # where each row came from (label file, image id)
    rejected: list[tuple[str, str]] = field(default_factory=list)    # (where, reason), one per unusable box
    names: list[str] | None = None                              # class names in id order, where the format has them


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the image file's header, or None when it is missing or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError):
        return None


def box_problem(box: list[float], width: int, height: int) -> str | None:
    """Why an xyxy pixel box cannot be used on a width x height image, or None."""
    if not all(math.isfinite(v) for v in box):
        return f"box {fmt(box)} is not finite"
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return f"box {fmt(box)} has zero or negative area"
    if x0 < -EDGE or y0 < -EDGE or x1 > width + EDGE or y1 > height + EDGE:
        return f"box {fmt(box)} is outside the image ({width}x{height})"
    return None


def fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def add_box(row: dict, data: BoxData, box: list[float], label: str, where: str) -> None:
    """Put a box into its row (clipped to the image within EDGE), or record why it cannot be used."""
    box = [float(v) for v in box]
    reason = box_problem(box, row["width"], row["height"])
    if reason:
        data.rejected.append((where, reason))
        return
    w, h = row["width"], row["height"]
    row["boxes"].append([min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w),
                         min(max(box[3], 0.0), h)])
    row["labels"].append(label)
    row["where"].append(where)


def new_row(image: Path, width: int, height: int) -> dict:
    return {"image": str(image), "width": int(width), "height": int(height), "boxes": [], "labels": [], "where": []}


# --- format detection ------------------------------------------------------------------------------------------

def detect(source: str) -> str | None:
    """"coco", "yolo" or "voc" for a source in one of them, else None (the shared readers take it: JSONL rows)."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return "yolo"
    if path.is_dir():
        if next(path.rglob("*.xml"), None) is not None:
            return "voc"
        if next(path.rglob("*.txt"), None) is not None or names_file(path) is not None:
            return "yolo"
    return None


def read(source: str, split: str, form: str, images: str | None = None, names: list[str] | None = None) -> BoxData:
    """`source` read as `form` ("coco", "yolo", "voc"); images: the image folder (data.images); names: data.names."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: not found")
    if form == "coco":
        return read_coco(path, images, names)
    if form == "yolo":
        return read_yolo(path, split, names)
    return read_voc(path, images, names)


# --- COCO ------------------------------------------------------------------------------------------------------

def read_coco(path: Path, images: str | None = None, names: list[str] | None = None) -> BoxData:
    """A COCO instances file: images [{id, file_name, width, height}], annotations [{id, image_id, category_id,
    bbox [x, y, w, h]}], categories [{id, name}]; file names relative to `images` (else the JSON's folder).
    names: the classes to train (data.names); boxes of other categories are rejected."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "categories")):
        raise DataError(f"{path}: not a COCO file (needs lists 'images', 'annotations' and 'categories')")
    folder = Path(images) if images else path.parent
    cats = {}
    for c in doc["categories"]:
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise DataError(f"{path}#category-{c.get('id', '?') if isinstance(c, dict) else '?'}: a category needs "
                            f"an id and a name")
        cats[c["id"]] = c["name"]
    data = BoxData(names=[cats[k] for k in sorted(cats, key=lambda k: (str(type(k)), k))])
    rows = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{path}#image-{im.get('id', '?') if isinstance(im, dict) else '?'}: an image needs an "
                            f"id and a file_name")
        file = folder / im["file_name"]
        w, h = im.get("width"), im.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            w, h = image_size(file) or (0, 0)
        rows[im["id"]] = new_row(file, w, h)
        data.origins.append(f"{path}#image-{im['id']}")
    for n, a in enumerate(doc.get("annotations") or []):
        aid = a.get("id", f"index-{n}") if isinstance(a, dict) else f"index-{n}"
        where = f"{path}#annotation-{aid}"
        if not isinstance(a, dict):
            data.rejected.append((where, "an annotation is a JSON object"))
            continue
        row = rows.get(a.get("image_id"))
        bbox = a.get("bbox")
        if row is None:
            data.rejected.append((where, f"unknown image_id {a.get('image_id')!r}"))
        elif a.get("category_id") not in cats:
            data.rejected.append((where, f"unknown category_id {a.get('category_id')!r} (categories: "
                                         f"{', '.join(map(str, sorted(cats, key=str)))})"))
        elif names and cats[a["category_id"]] not in names:
            data.rejected.append((where, f"class {cats[a['category_id']]!r} is not in data.names"))
        elif a.get("iscrowd"):
            data.rejected.append((where, "crowd region (iscrowd: 1): COCO scoring ignores it; not trained"))
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            data.rejected.append((where, f"bbox {bbox!r} is not [x, y, width, height] numbers"))
        elif not row["width"]:
            data.rejected.append((where, f"image {row['image']} has no width/height and cannot be read"))
        else:
            add_box(row, data, [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], cats[a["category_id"]], where)
    data.rows = list(rows.values())
    return data


# --- YOLO ------------------------------------------------------------------------------------------------------

def names_file(folder: Path) -> Path | None:
    """A data.yaml (or classes.txt) in `folder` or up to two folders above it."""
    for f in (folder, *list(folder.parents)[:2]):
        for name in (*YAML_NAMES, "classes.txt"):
            if (f / name).is_file():
                return f / name
    return None


def yaml_names(path: Path) -> list[str]:
    """Class names from a data.yaml (names: list, or {id: name}) or a classes.txt (one a line)."""
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    doc = load_yaml(path)
    names = doc.get("names")
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        names = [names.get(i) for i in range(max(names) + 1)]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'names' must list the class names in id order (or map ids 0..N-1 to names)")
    return names


def load_yaml(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"{path}:{mark.line + 1 if mark else 0}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: a YAML mapping (path, train, val, names) expected")
    return doc


def label_file(image: Path) -> Path:
    """Ultralytics' rule: the last 'images' folder of the path becomes 'labels', the suffix .txt; else beside it."""
    parts = list(image.parts)
    if "images" in parts[:-1]:
        i = len(parts) - 2 - parts[:-1][::-1].index("images")
        parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_yolo(path: Path, split: str, names: list[str] | None = None) -> BoxData:
    """Images under a folder (or the split's folder of a data.yaml: train, val, test), each with a label file
    (`label_file`) of lines `class cx cy w h`, normalised to the image; no label file: a negative."""
    from tunesmith.vision import IMAGE_SUFFIXES  # here: tunesmith.vision imports torch

    if path.is_file():
        doc = load_yaml(path)
        root = Path(doc.get("path") or ".")
        root = root if root.is_absolute() else path.parent / root
        entry = doc.get(YAML_SPLITS.get(split, split))
        if not isinstance(entry, str):
            raise DataError(f"{path}: no '{YAML_SPLITS.get(split, split)}' folder for the {split} split")
        names = names or yaml_names(path)
        path = root / entry
        if not path.is_dir():
            raise DataError(f"{path}: the {split} folder named in the data.yaml does not exist")
    if names is None:
        found = names_file(path)
        if found is None:
            raise DataError(f"{path}: YOLO labels without class names; add a data.yaml (names: [...]) or set "
                            f"data.names")
        names = yaml_names(found)
    data = BoxData(names=list(names))
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"{path}: no images found (YOLO: images/ with labels/ beside it, or .txt beside each image)")
    for image in files:
        size = image_size(image)
        row = new_row(image, *(size or (0, 0)))
        labels = label_file(image)
        data.rows.append(row)
        data.origins.append(str(labels if labels.is_file() else image))
        if not labels.is_file():
            continue
        for n, line in enumerate(labels.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                yolo_line(line, f"{labels}:{n}", row, data, names, size)
    return data


def yolo_line(line: str, where: str, row: dict, data: BoxData, names: list[str], size) -> None:
    fields = line.split()
    if len(fields) != 5:
        why = "a polygon (segmentation label)" if len(fields) > 5 and len(fields) % 2 == 1 else f"{len(fields)} fields"
        data.rejected.append((where, f"{why}: a YOLO box line is 'class cx cy w h'"))
        return
    try:
        cls, (cx, cy, w, h) = fields[0], map(float, fields[1:])
    except ValueError:
        data.rejected.append((where, f"not numbers: {line.strip()[:80]!r}"))
        return
    if not (cls.isdigit() and int(cls) < len(names)):
        data.rejected.append((where, f"unknown class id {cls} (names 0-{len(names) - 1})"))
        return
    if size is None:
        data.rejected.append((where, f"image {row['image']} cannot be read"))
        return
    W, H = size
    add_box(row, data, [(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H], names[int(cls)],
            where)


# --- Pascal VOC ------------------------------------------------------------------------------------------------

def read_voc(path: Path, images: str | None = None, names: list[str] | None = None) -> BoxData:
    """One XML file per image (<filename>, <size>, <object><name><bndbox>xmin ymin xmax ymax); the image beside
    the XML, in ../JPEGImages, or in `images`. names: the known classes (None: any name is a class)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.xml"))
    if not files:
        raise DataError(f"{path}: no .xml files (Pascal VOC: one XML file per image)")
    data = BoxData(names=list(names) if names else None)
    for xml in files:
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise DataError(f"{xml}:{e.position[0]}: not valid XML ({e})") from None
        name = (root.findtext("filename") or "").strip()
        candidates = [xml.parent / name, xml.parent.parent / "JPEGImages" / name]
        if images:
            candidates.insert(0, Path(images) / name)
        image = next((c for c in candidates if name and c.is_file()), candidates[0])
        w, h = (_int(root.findtext("size/width")), _int(root.findtext("size/height")))
        if not (w and h):
            w, h = image_size(image) or (0, 0)
        row = new_row(image, w, h)
        data.rows.append(row)
        data.origins.append(str(xml))
        for n, obj in enumerate(root.iter("object"), 1):
            where = f"{xml}#object-{n}"
            label = (obj.findtext("name") or "").strip()
            try:
                box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                data.rejected.append((where, "no bndbox with numeric xmin, ymin, xmax, ymax"))
                continue
            if not label or (names and label not in names):
                data.rejected.append((where, f"unknown class {label!r}" + (f" (data.names: {', '.join(names)})"
                                                                            if names else "")))
            elif not w:
                data.rejected.append((where, f"image {image} has no <size> and cannot be read"))
            else:
                add_box(row, data, box, label, where)
    return data


def _int(text) -> int:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return 0
