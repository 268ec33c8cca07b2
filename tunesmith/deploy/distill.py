"""`tunesmith distill RUN --student SPEC`: knowledge distillation of a fine-tuned model into a smaller student, for
a task that declares it (Task.distills; its loss: Task.distillation, e.g. Hinton et al.'s for classifiers).

The student trains through the one pipeline (tunesmith/pipeline.py: lock, SIGTERM/Ctrl-C checkpoints, out-of-memory
back-off, trackers, feature cache); Distiller supplies only what differs: the student model, the teacher's outputs
on the train features (Task.teacher_outputs) and the objective. Its run folder is one like any other (run.json,
recipe.yaml, metrics.jsonl, eval.json, model/, data/), plus distill.json comparing size, speed and test metric
with the teacher. run.json's made_by records the teacher, SPEC, T and alpha, so `tunesmith train --resume STUDENT`
continues it as a distillation (the teacher's outputs computed again).

Student SPEC: "half" (the teacher's config with half its blocks, rounded up), "layers=N", both initialised from the
teacher (embeddings, its bottom N blocks, pooler and head: names and shapes match); or a model (bundled alias,
folder) that takes the teacher's processor, with a new head for the teacher's labels.
Data: the teacher's own splits, read again through its recipe and checked against its data/splits.json (same
rows, same split, so the test rows stay unseen); the student's data/ holds the same held-out rows.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.pipeline import Trainer, train_with
from tunesmith.run import Run
from tunesmith.splits import fingerprint
from tunesmith.tasks.base import model_device


class Distiller(Trainer):
    """The pipeline's trainer for a student learning from `teacher_dir`'s fine-tuned model."""
    command = "distill"

    def __init__(self, teacher_dir, student: str = "half", temperature: float = 2.0, alpha: float = 0.5,
                 device: str = "auto"):
        if not 0 <= alpha <= 1 or temperature <= 0:
            raise TunesmithError("--alpha must lie in [0, 1] and --temperature be above 0")
        self.teacher_run = Run(Path(teacher_dir).resolve())
        self.spec, self.temperature, self.alpha, self.device = student, temperature, alpha, device
        self.copied = 0                     # tensors the student took from the teacher
        self.report: dict | None = None     # distill.json, once written
        self._teacher = None

    @classmethod
    def resuming(cls, run: Run) -> Distiller:
        made = run.made_by
        teacher = Path(made["teacher"])
        if not (teacher / "model").is_dir():
            raise TunesmithError(f"{run.path} is a distillation of {teacher}, which is gone (no model/ there); put "
                                 f"the teacher's run folder back at that path to resume, or distill anew")
        return cls(teacher, made["student"], made["temperature"], made["alpha"])

    def made_by(self) -> dict:
        return {"command": self.command, "teacher": str(self.teacher_run.path), "student": self.spec,
                "temperature": self.temperature, "alpha": self.alpha}

    @property
    def teacher(self):
        """The teacher's Predictor (model and task), loaded on first use."""
        if self._teacher is None:
            self._teacher = self.teacher_run.load(self.device)
        return self._teacher

    def describe(self, recipe) -> str:
        return f"student {self.spec} of {self.teacher_run.path}"

    def check(self, task, loaded) -> None:
        splits = io.read_json(self.teacher_run.path / "data" / "splits.json", {})
        if fingerprint(loaded.tables) != splits.get("fingerprint"):
            raise TunesmithError(f"{task.recipe.data.train}: the data differ from what {self.teacher_run.path} "
                                 "trained on (data/splits.json); distilling on other rows could leak its test split")
        if task.labels != self.teacher.labels:
            raise TunesmithError(f"{self.teacher_run.path}: its labels {self.teacher.labels} differ from the data's "
                                 f"{task.labels}; the student must learn the teacher's outputs in their order")

    def load_model(self, task):
        model, self.copied = student_model(self.spec, self.teacher.model, task, task.recipe)
        return model

    def objective(self, task, features: dict, batch_size: int):
        outputs = task.teacher_outputs(self.teacher.model, features["train"], batch_size)
        for f, out in zip(features["train"], outputs):
            f["teacher"] = out
        return task.distillation(self.temperature, self.alpha)

    def finish(self, run: Run, task, model, features: dict, result: dict, say) -> None:
        metric, test = task.recipe.train.metric, features["test"]
        self.report = {
            "teacher": {"run": str(self.teacher_run.path), metric: self.teacher_run.metrics.get(metric),
                        **_profile(self.teacher.model, task, test, self.teacher_run.model_dir)},
            "student": {"run": str(run.path), "spec": self.spec, metric: result[metric], "copied_tensors": self.copied,
                        **_profile(model, task, test, run.model_dir)},
            "metric": metric, "temperature": self.temperature, "alpha": self.alpha, "test_rows": len(test)}
        run.write_json("distill.json", self.report)


def student_model(spec: str, teacher, task, recipe):
    """(the student model, tensors copied from the teacher) for a SPEC (see the module docstring)."""
    if spec == "half" or spec.startswith("layers="):
        config = copy.deepcopy(teacher.config)
        blocks = getattr(config, "num_hidden_layers", None)
        if not isinstance(blocks, int):
            raise TunesmithError(f"--student {spec}: the teacher's config has no num_hidden_layers; give a model")
        try:
            n = (blocks + 1) // 2 if spec == "half" else int(spec.removeprefix("layers="))
        except ValueError:
            raise TunesmithError(f"--student {spec}: expected layers=N with N a whole number") from None
        if not 0 < n < blocks:
            raise TunesmithError(f"--student {spec}: the teacher has {blocks} blocks; a student needs 1 to "
                                 f"{blocks - 1}")
        config.num_hidden_layers = n
        student = type(teacher)(config)
        own = student.state_dict()
        shared = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
        student.load_state_dict(shared, strict=False)
        return student, len(shared)
    from tunesmith.tasks import get_task

    other = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": spec, "pretrained": True})})
    fresh = get_task(other)
    fresh.set_labels(task.labels)                       # the teacher's label order: its soft labels index them
    return fresh.load_model(), 0


def _profile(model, task, features, folder: Path) -> dict:
    """Parameters, size on disk and latency (batches of 1 and 32 test examples) of a model saved in `folder`."""
    from accelerate.utils import send_to_device

    from tunesmith.deploy.export import latency

    one, many = task.collate(features[:1]), task.collate([features[i % len(features)] for i in range(32)])
    for b in (one, many):
        b.pop("labels", None)
    one, many = (send_to_device(b, model_device(model)) for b in (one, many))
    with torch.no_grad():
        speed = {"batch1": latency(lambda: model(**one), 20), "batch32": latency(lambda: model(**many), 5)}
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "size_mb": round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6, 3), **speed}


def distill(teacher_dir, student: str = "half", run_dir=None, overrides=(), temperature: float = 2.0,
            alpha: float = 0.5, device: str = "auto") -> dict:
    """Train a student on a fine-tuned run's outputs (see the module docstring); returns the report written to the
    student's distill.json."""
    from tunesmith.recipe import load
    from tunesmith.tasks import task_class

    trainer = Distiller(teacher_dir, student, temperature, alpha, device)
    teacher_run = trainer.teacher_run
    if not task_class(teacher_run.recipe).distills:
        raise TunesmithError(f"{teacher_run.path}: task '{teacher_run.recipe.task}' cannot be distilled (it declares "
                             "no distillation loss)")
    base = teacher_run.recipe.dump()
    base["model"] = {**base["model"], "name": str(teacher_run.model_dir), "revision": None}
    base["adapt"] = {"method": "full"}
    base["eval"] = {**base["eval"], "before": False}
    base["name"] = f"{teacher_run.path.name}-student"
    recipe = load(base, list(overrides))
    train_with(trainer, recipe, run_dir or Path("runs") / recipe.name, device=device)
    return trainer.report


def render(report: dict) -> str:
    from tunesmith.io import table

    metric, t, s = report["metric"], report["teacher"], report["student"]
    rows = [["parameters", f"{t['parameters']:,}", f"{s['parameters']:,}"],
            ["size (MB)", f"{t['size_mb']:.2f}", f"{s['size_mb']:.2f}"],
            ["p50 ms, batch 1", f"{t['batch1']['p50_ms']:.2f}", f"{s['batch1']['p50_ms']:.2f}"],
            ["p50 ms, batch 32", f"{t['batch32']['p50_ms']:.2f}", f"{s['batch32']['p50_ms']:.2f}"],
            [f"{metric} (test)", "-" if t[metric] is None else f"{t[metric]:.4f}", f"{s[metric]:.4f}"]]
    return (table(["", "teacher", "student"], rows) + f"\nstudent run: {s['run']} ({report['test_rows']:,} test rows; "
            f"T={report['temperature']}, alpha={report['alpha']})")
