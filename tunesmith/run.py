"""A run is a folder; everything after training (eval, predict, export, serve) takes only that folder.

  recipe.yaml      the resolved recipe (overrides applied)
  metrics.jsonl    one JSON object per log or evaluation step
  eval.json        final metrics of the best checkpoint on the test split (+ `before`)
  data/            the held-out splits as JSONL (validation.jsonl, test.jsonl), with row origins
  rejects.jsonl    rows that could not be used, with origin and reason (data.bad_rows: skip)
  model/           HF format (safetensors, tokenizer, label names); LoRA runs add model/adapter/
  checkpoints/     step-NNNNNNNN/ for resume, best/ for the best evaluation so far
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from tunesmith.recipe import Recipe, load


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @staticmethod
    def default_path(recipe: Recipe) -> Path:
        return Path("runs") / f"{recipe.name or recipe.task}-{time.strftime('%Y%m%d-%H%M%S')}"

    @classmethod
    def create(cls, recipe: Recipe, run_dir: str | Path | None = None) -> "Run":
        run = cls(run_dir or cls.default_path(recipe))
        if (run.path / "recipe.yaml").exists():
            raise FileExistsError(f"{run.path} already holds a run: use --resume {run.path} or another --run-dir")
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "recipe.yaml").write_text(yaml.safe_dump(recipe.dump(), sort_keys=False))
        return run

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def recipe(self) -> Recipe:
        path = self.path / "recipe.yaml"
        if not path.exists():
            raise FileNotFoundError(f"{self.path} is not a run folder (no recipe.yaml)")
        return load(path)

    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines after `step` (written by a run that died after its last checkpoint)."""
        path = self.path / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
            path.write_text("".join(ln + "\n" for ln in lines))

    def write_json(self, name: str, obj) -> None:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        (self.path / name).write_text(json.dumps(obj, indent=2) + "\n")

    def write_rows(self, name: str, rows: list[dict]) -> None:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
