"""`tunesmith init DATA`: a starter recipe from the data alone. The data is read once, without torch, into a
Profile; every task's recipe class is asked what it makes of it (`Recipe.sniff` -> a Guess: a score, the data
keys to write, the profile lines to print, or why the user must choose); the best-fitting task's recipe is
written with a model (the task's bundled one when installed), the data's profile in comments, and nothing else:
the training keys keep their defaults. A choice that is not clear (two text-like columns, no label column, two
tasks fitting equally) is never guessed: it is an InitError (exit 2) listing the candidates and the option that
chooses, and nothing is written.

Profile, what a sniffer reads (duck-typed: tasks never import this module):
  source, path, suffix, format        the data as given ("reviews.csv", or a bundled alias), and what it is
  rows, columns, rejects              a table's rows (CSV, TSV, JSONL, Parquet), its column names, unreadable rows
  lines                               a text file's lines (formats a task reads itself: CoNLL); None otherwise
  images, folders                     an image folder: {split: {class: [files]}} (split "" when there are no
                                      train/validation/test subfolders) and {split: folder as written in a recipe}
  hints                               data keys the user chose (--text-column, data.X=Y): a sniffer takes them
  values(c), shape(c), describe(c)    a column's values; "text", "category", "list", "dict", "number", "other"
                                      or "empty"; one line about it (for the candidates of an ambiguous choice)
  spread(numbers, unit), words(texts), classes(labels), image_sizes(files)     profile lines, counted
"""
from __future__ import annotations

import math
import statistics
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunesmith import __version__, io
from tunesmith.data import DataError
from tunesmith.errors import TunesmithError
from tunesmith.recipe import Guess, RecipeError, apply_override, load

# tunesmith/vision.py's IMAGE_SUFFIXES (tests/test_init.py checks they agree), here so init never imports torch
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
TABLES = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSONL", ".json": "JSONL", ".parquet": "Parquet"}
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
          "dev": "validation", "test": "test"}         # image folder subfolder names -> data keys
MAX_CLASSES = 100               # a column with more distinct values is not a label column
SIZES_SAMPLED = 200             # images whose header is read for the size profile
SHOWN = 10                      # classes listed by name in a profile line


class InitError(RecipeError):
    """A choice init will not make alone, or a file it will not overwrite: the message says how to choose."""

    def __init__(self, message: str):
        self.source, self.errors = "init", [message]
        Exception.__init__(self, message)


@dataclass
class Profile:
    source: str
    path: Path
    format: str = ""
    absolute: bool = False              # write paths absolute (the recipe goes to another folder than the cwd)
    rows: list[dict] | None = None
    columns: list[str] = field(default_factory=list)
    rejects: int = 0
    lines: list[str] | None = None
    images: dict[str, dict[str, list[Path]]] | None = None
    folders: dict[str, str] = field(default_factory=dict)
    hints: dict = field(default_factory=dict)
    _shapes: dict = field(default_factory=dict, repr=False)

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()

    # --- reading ---------------------------------------------------------------------------------------
    @classmethod
    def read(cls, source: str, hints: dict | None = None, absolute: bool = False) -> Profile:
        from tunesmith import data
        from tunesmith.assets.bundled import DATASETS

        path = Path(source)
        if not path.exists() and source in DATASETS:
            path = Path(DATASETS[source]())
        elif absolute:
            source = str(path.absolute())
        p = cls(source, path, absolute=absolute, hints=dict(hints or {}))
        if not path.exists():
            raise DataError(f"{source}: file or folder not found")
        if not (path.is_file() or path.is_dir()):
            raise DataError(f"{source}: not a regular file (a FIFO, socket or device)")
        if path.is_dir():
            p.format = "image folder"
            p._image_folder()
            return p
        if p.suffix in TABLES:
            p.format = TABLES[p.suffix]
            try:
                table = data.read(str(path))
                p.rows, p.rejects = table.rows, len(table.rejects)
                p.columns = list(dict.fromkeys(k for r in p.rows for k in r))
            except DataError:
                if p.suffix != ".tsv":              # a TSV may be CoNLL (no header): read its lines below
                    raise
        if p.rows is None or p.suffix == ".tsv":
            with open(path, "rb") as f:
                binary = b"\0" in f.read(4096)
            if binary:
                raise DataError(f"{source}: a binary file; init reads .csv .tsv .jsonl .parquet files, text files "
                                f"a task reads (CoNLL) and image folders")
            p.lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            p.format = p.format or "text"
        return p

    def _image_folder(self) -> None:
        subs = [d for d in sorted(self.path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        splits = {SPLITS[d.name.lower()]: d for d in subs if d.name.lower() in SPLITS}
        if "train" in splits and _classes(splits["train"]):
            self.images = {split: _classes(d) for split, d in splits.items()}
            self.folders = {split: self.name(Path(self.source) / d.name) for split, d in splits.items()}
        else:
            self.images = {"": _classes(self.path)}
        if not any(self.images.values()):
            raise DataError(f"{self.source}: no images in class subfolders; init reads a data file (.csv .tsv .jsonl "
                            f".parquet, CoNLL) or an image folder (one subfolder of images per class, or train/ "
                            f"val/ test/ subfolders holding them)")

    def name(self, path: Path) -> str:
        return str(path.absolute()) if self.absolute else str(path)

    # --- columns ---------------------------------------------------------------------------------------
    def values(self, column: str) -> list:
        return [r[column] for r in self.rows or () if r.get(column) not in (None, "")]

    def shape(self, column: str) -> str:
        if column not in self._shapes:
            self._shapes[column] = _shape(self.values(column), len(self.rows or ()))
        return self._shapes[column]

    def describe(self, column: str) -> str:
        vals = self.values(column)
        shape = self.shape(column)
        text = [v for v in vals if isinstance(v, str)]
        out = f"{column}: {shape}, {len(vals):,} values"
        if shape in ("text", "category", "other", "number"):
            out += f", {len(set(map(str, vals))):,} distinct"
        if text:
            out += f", {self.words(text)}"
        return out

    # --- profile lines ---------------------------------------------------------------------------------
    @staticmethod
    def spread(numbers, unit: str) -> str:
        xs = sorted(numbers)
        if not xs:
            return f"no {unit}"
        at = [xs[round(q * (len(xs) - 1))] for q in (0.1, 0.5, 0.9)]
        return f"{unit} p10 {at[0]:,} · p50 {at[1]:,} · p90 {at[2]:,} · max {xs[-1]:,}"

    def words(self, texts) -> str:
        return self.spread((len(t.split()) for t in texts), "words")

    @staticmethod
    def classes(labels) -> str:
        counts = Counter(map(str, labels)).most_common()
        n = sum(c for _, c in counts)
        shown = ", ".join(f"{k} {c:,} ({c / n:.0%})" for k, c in counts[:SHOWN])
        more = f", ... {len(counts) - SHOWN} more" if len(counts) > SHOWN else ""
        ratio = f"; largest/smallest {counts[0][1] / counts[-1][1]:.1f}" if counts else ""
        return f"{len(counts)} classes: {shown}{more}{ratio}"

    @staticmethod
    def image_sizes(files: list[Path]) -> str:
        """Width x height read from the headers of up to SIZES_SAMPLED files (evenly spaced), no decoding."""
        from PIL import Image

        step = max(1, math.ceil(len(files) / SIZES_SAMPLED))
        sizes, bad = [], []
        for f in files[::step]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(f) as image:
                        sizes.append(image.size)
            except Exception:                       # PIL raises OSError, SyntaxError, ValueError, ...
                bad.append(f)
        seen = f"{len(sizes) + len(bad):,} sampled" if step > 1 else "all"
        common = Counter(sizes).most_common(1)
        out = f"image sizes ({seen}): "
        if common and common[0][1] == len(sizes):
            out += f"{common[0][0][0]}x{common[0][0][1]} in all"
        elif sizes:
            w, h = sorted(s[0] for s in sizes), sorted(s[1] for s in sizes)
            out += (f"width {w[0]}-{w[-1]} (median {statistics.median_low(w)}), height {h[0]}-{h[-1]} "
                    f"(median {statistics.median_low(h)})")
        return out + (f"; unreadable: {len(bad)} (first {bad[0]})" if bad else "")


def _classes(folder: Path) -> dict[str, list[Path]]:
    """class -> image files under each class subfolder (hidden files and folders skipped), as data.py reads them."""
    out = {}
    for d in sorted(folder.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            files = [f for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                     and not any(part.startswith(".") for part in f.relative_to(d).parts)]
            if files:
                out[d.name] = files
    return out


def _shape(vals: list, rows: int) -> str:
    """A column's shape from its (present) values: lists, dicts, a category (few distinct short values), numbers,
    text (strings of several words, or mostly distinct ones), or other."""
    if not vals:
        return "empty"
    for kind, t in (("list", list), ("dict", dict)):
        if all(isinstance(v, t) for v in vals):
            return kind
    if any(isinstance(v, (list, dict)) for v in vals):
        return "other"
    distinct = len(set(map(str, vals)))
    strings = [v for v in vals if isinstance(v, str)]
    words = statistics.median(len(s.split()) for s in strings) if strings else 0
    if 2 <= distinct <= min(MAX_CLASSES, max(2, rows // 3)) and words <= 4:
        return "category"
    if all(_number(v) for v in vals):
        return "number"
    if len(strings) < 0.9 * len(vals):
        return "other"
    if words >= 3 or (distinct >= len(vals) / 2 and words >= 2):
        return "text"
    return "other"


def _number(v) -> bool:
    """An int or float, or a string reading as one (a CSV's numbers)."""
    if isinstance(v, bool):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


# --- the recipe ------------------------------------------------------------------------------------------

def _flow(value) -> str:
    """One YAML scalar or flow collection, as safe_load reads it back."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).removesuffix(
        "\n...\n").strip()


def _lines(node: dict, indent: int = 0) -> list[str]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += [" " * indent + f"{key}:", *_lines(value, indent + 2)]
        else:
            out.append(" " * indent + f"{key}: {_flow(value)}")
    return out


def _model(cls, chosen: str | None) -> tuple[str, str]:
    """(model.name, a comment on it): --model, else the task's bundled model when installed, else its hub id."""
    from tunesmith.assets.bundled import missing

    if chosen:
        return chosen, "given with --model"
    if cls.starter_model is None:
        raise InitError(f"task '{cls.task_name()}' names no starter model: give one with --model (a hub id or a "
                        f"local folder)")
    alias, hub = cls.starter_model
    need = missing(alias)
    if need is None:
        return alias, "bundled, works offline; --model NAME for another (a hub id or a local folder)"
    return hub, f"the bundled '{alias}' is not installed ({need}); this hub id downloads on first use"


def _choose(profile: Profile, task: str | None, classes: dict) -> tuple[str, Guess]:
    names = [task] if task else list(classes)
    if task and task not in classes:
        raise InitError(f"--task {task}: unknown task; choose one of {', '.join(classes)}")
    guesses = [(n, g) for n in names if (g := classes[n].sniff(profile)) is not None and g.score > 0]
    guesses.sort(key=lambda x: -x[1].score)
    what = f"{profile.source} ({profile.format}" + (f"; columns {', '.join(profile.columns)}" if profile.columns
                                                    else "") + ")"
    if not guesses and task:
        fields = classes[task].model_fields["data"].annotation.model_fields
        keys = [k for k, f in fields.items() if k.endswith("_column") and isinstance(f.default, str)]
        raise InitError(f"{what} does not look like {task} data" +
                        (f"; name its columns with data.KEY=NAME ({', '.join(keys)})" if keys else "") +
                        "".join(f"\n  {profile.describe(c)}" for c in profile.columns))
    if not guesses:
        raise InitError(f"{what} matches no task's data format; choose the task with --task ({', '.join(classes)})" +
                        "".join(f"\n  {profile.describe(c)}" for c in profile.columns))
    name, guess = guesses[0]
    rivals = [n for n, g in guesses[1:] if g.score == guess.score and not g.ambiguous]
    if guess.ambiguous:
        others = [n for n, g in guesses[1:] if g.score >= 0.3]
        raise InitError(f"{what} as {name}: {guess.ambiguous}" +
                        (f"\n  (or choose another task with --task: {', '.join(others)})" if others else ""))
    if rivals:
        raise InitError(f"{what} fits {name} and {', '.join(rivals)} equally: choose with --task")
    return name, guess


def init(data: str | Path, task: str | None = None, model: str | None = None, out: str | Path | None = "recipe.yaml",
         text_column: str | None = None, label_column: str | None = None, overrides=(), force: bool = False) -> dict:
    """Write a starter recipe for `data` (a .csv .tsv .jsonl .parquet file, a CoNLL file, an image folder, or a
    bundled dataset alias) to `out` (None: write nothing). task, model, text_column, label_column: choices init
    would otherwise make or refuse to make; overrides: `key.path=value` written into the recipe (`data.X=Y`
    also guides the choice of columns). Returns {"task", "recipe" (the dict written), "text" (the YAML),
    "path"}. InitError (exit 2) when a choice is the user's or `out` exists without force; nothing written."""
    from tunesmith.tasks import recipe_classes

    out = Path(out) if out is not None else None
    if out is not None and out.is_dir():
        raise InitError(f"--out {out} is a folder; give the recipe's file name (e.g. {out / 'recipe.yaml'})")
    if out is not None and out.exists() and not force:
        raise InitError(f"{out} exists; choose another --out, or --force to replace it")
    hints = {k: v for k, v in (("text_column", text_column), ("label_column", label_column)) if v}
    scratch: dict = {}
    for o in overrides:
        apply_override(scratch, o)                  # RecipeError for a malformed one, before reading the data
    hints.update({k: v for k, v in scratch.get("data", {}).items() if isinstance(v, str)})
    absolute = out is not None and out.parent.absolute() != Path.cwd()
    profile = Profile.read(str(data), hints, absolute)
    classes = recipe_classes()
    name, guess = _choose(profile, task, classes)
    model_name, model_note = _model(classes[name], model)
    recipe = {"task": name, "model": model_name, "data": {"train": profile.source, **hints, **guess.data}}
    for o in overrides:
        apply_override(recipe, o)
    load(recipe)                                    # every recipe error, before anything is written
    text = render(recipe, profile, guess, model_note, out.name if out is not None else "recipe.yaml")
    if yaml.safe_load(text) != recipe:              # the comments and quoting must not change what is read
        raise AssertionError(f"init wrote a recipe that reads back differently:\n{text}")
    if out is not None:
        if out.exists() and not force:
            raise InitError(f"{out} exists; choose another --out, or --force to replace it")
        try:
            io.atomic_write(out, text)
        except OSError as e:
            raise TunesmithError(f"cannot write {out}: {e.strerror or e}") from None
    return {"task": name, "recipe": recipe, "text": text, "path": str(out) if out is not None else None}


def render(recipe: dict, profile: Profile, guess: Guess, model_note: str, name: str = "recipe.yaml") -> str:
    lines = [f"# Written by `tunesmith init` (tunesmith {__version__}) from {_one_line(profile.source)} "
             f"({profile.format}).", *(f"#   {_one_line(a)}" for a in guess.about)]
    if profile.rejects:
        lines.append(f"#   unreadable rows: {profile.rejects:,} (`tunesmith doctor` lists them)")
    lines += [f"# Check the task and columns below; `tunesmith doctor {name}` looks for problems in the data,",
              f"# `tunesmith train {name}` trains.", ""]
    for key, value in recipe.items():
        body = _lines({key: value})
        if key == "model":
            body[-1] += f"    # {model_note}"
        lines += body
    if "validation" not in recipe["data"]:
        lines.append("# validation and test rows are split from train (data.validation_size, data.test_size: "
                     "0.1 each)")
    if "train" not in recipe:
        lines += ["# training: epochs auto (until validation stops improving, then the best checkpoint), the",
                  "# learning rate of the method and a batch size for the data size; to set them (for example):",
                  "# train:", "#   epochs: 5", "#   learning_rate: 5.0e-5", "#   batch_size: 16"]
    lines += [f"# {_one_line(n)}" for n in guess.notes]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    """A comment stays one line whatever the data holds (a label or column name with a line break in it)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")
