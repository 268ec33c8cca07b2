"""`tunesmith distill RUN --student SPEC`: knowledge distillation of a fine-tuned classifier into a smaller student,
trained by the one loop (tunesmith/loop.py fit) on the teacher's soft labels.

Student SPEC: "half" (the teacher's config with half its blocks, rounded up), "layers=N", both initialised from the
teacher (embeddings, its bottom N blocks, pooler and head: names and shapes match); or a model (bundled alias,
folder) that takes the teacher's processor, with a new head for the teacher's labels.
Loss (Hinton et al., 2015), summed over examples as the Task contract asks:
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(true label)
Data: the teacher's own train split, read again through its recipe and checked against data/splits.json (same
rows, same split, so the test rows stay unseen). The student is a run folder like any other (eval, predict,
export, serve take it; data/ is the teacher's); distill.json compares size, speed and test metric with the teacher.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError
from tunesmith.tasks.base import Task, batches, model_device


class Distillation(Task):
    """A classification task whose loss also matches the teacher's soft labels: train features carry `teacher`
    (the teacher's logits, [C]); everything else is the wrapped task's."""

    def __init__(self, inner: Task, temperature: float, alpha: float):
        super().__init__(inner.recipe)
        self.inner, self.temperature, self.alpha = inner, temperature, alpha

    @property
    def pad_multiple(self):
        return self.inner.pad_multiple

    @pad_multiple.setter
    def pad_multiple(self, value):                      # the loop sets it; the wrapped task's collate pads
        self.inner.pad_multiple = value

    @property
    def metrics(self):
        return self.inner.metrics

    @property
    def labels(self):
        return self.inner.labels

    def length(self, feature: dict) -> int:
        return self.inner.length(feature)

    def collate(self, features: list[dict]) -> dict:
        batch = self.inner.collate(features)
        if "teacher" in features[0]:
            batch["teacher"] = torch.tensor([f["teacher"] for f in features])        # [B, C]
        return batch

    def loss(self, model, batch: dict) -> torch.Tensor:
        t = self.temperature
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "teacher")}).logits.float()
        soft = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(batch["teacher"].float() / t, -1),
                        log_target=True, reduction="sum") * t * t
        hard = F.cross_entropy(logits, batch["labels"], reduction="sum")
        return self.alpha * soft + (1 - self.alpha) * hard

    def count(self, batch: dict) -> float:
        return float(len(batch["labels"]))

    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        return self.inner.evaluate(model, features, batch_size)

    def loggable(self, metrics: dict) -> dict:
        return self.inner.loggable(metrics)


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
            raise TunesmithError(f"--student {spec}: the teacher has {blocks} blocks; a student needs 1 to {blocks - 1}")
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


def _logits(model, task, features, batch_size) -> list[list[float]]:
    out = [None] * len(features)
    with torch.no_grad():
        for idx, batch in batches(task, features, batch_size, model_device(model)):
            batch.pop("labels", None)
            for i, row in zip(idx, model(**batch).logits.float().cpu().tolist()):
                out[i] = row
    return out


def _profile(model, task, features, batch_size, folder: Path) -> dict:
    from tunesmith.deploy.export import latency

    one, many = task.collate(features[:1]), task.collate([features[i % len(features)] for i in range(32)])
    for b in (one, many):
        b.pop("labels", None)
    with torch.no_grad():
        speed = {"batch1": latency(lambda: model(**one), 20), "batch32": latency(lambda: model(**many), 5)}
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "size_mb": round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6, 3), **speed}


def distill(teacher_dir, student: str = "half", run_dir=None, overrides=(), temperature: float = 2.0,
            alpha: float = 0.5, device: str = "auto") -> dict:
    """Train a student on a classifier run's soft labels (see the module docstring); returns the report written to
    the student's distill.json."""
    from accelerate import Accelerator
    from transformers import set_seed

    from tunesmith.adapt import adapt
    from tunesmith.device import choose_precision
    from tunesmith.loop import fit
    from tunesmith.pipeline import save_model
    from tunesmith.recipe import load
    from tunesmith.run import Run
    from tunesmith.splits import fingerprint, load_data

    teacher_run = Run(teacher_dir)
    teacher = teacher_run.load(device)
    task = teacher.task
    if task.labels is None:
        raise TunesmithError(f"{teacher_run.path}: task '{task.name}' has no labels to distil; distill takes a "
                             "classification run")
    if not 0 <= alpha <= 1 or temperature <= 0:
        raise TunesmithError("--alpha must lie in [0, 1] and --temperature be above 0")
    base = teacher_run.recipe.dump()
    base["model"] = {**base["model"], "name": str(teacher_run.model_dir.resolve())}
    base["adapt"] = {"method": "full"}
    base["eval"] = {**base["eval"], "before": False}
    base["name"] = f"{teacher_run.path.name}-student"
    recipe = load(base, list(overrides))

    loaded = load_data(task, recipe)
    splits = json.loads((teacher_run.path / "data" / "splits.json").read_text())
    if fingerprint(loaded.tables) != splits["fingerprint"]:
        raise TunesmithError(f"{recipe.data.train}: the data differ from what {teacher_run.path} trained on "
                             "(data/splits.json); distilling on other rows could leak its test split")
    features = {split: task.encode(table.rows) for split, table in loaded.tables.items()}
    for f, soft in zip(features["train"], _logits(teacher.model, task, features["train"], recipe.eval.batch_size)):
        f["teacher"] = soft

    set_seed(recipe.train.seed)
    model, copied = student_model(student, teacher.model, task, recipe)
    run = Run.create(recipe, run_dir or Path("runs") / recipe.name)
    shutil.copytree(teacher_run.path / "data", run.path / "data", dirs_exist_ok=True)   # the same held-out rows
    accelerator = Accelerator(cpu=teacher.device.type == "cpu")
    mixed, _ = choose_precision(recipe.train.precision, accelerator.device)
    adapted = adapt(model.to(accelerator.device), recipe.adapt, task.peft_task_type)
    set_seed(recipe.train.seed)
    fit(Distillation(task, temperature, alpha), adapted, features["train"], features["validation"], recipe, run,
        accelerator, mixed)
    save_model(task, adapted.model, run.model_dir, lora=False)
    final = task.load_trained(run.model_dir).to(accelerator.device).eval()
    with torch.no_grad():
        result = task.evaluate_final(final, loaded.tables["test"].rows, features["test"], recipe.eval.batch_size,
                                     run.path)
    run.write_json("eval.json", result)
    metric = recipe.train.metric
    test = [{k: v for k, v in f.items() if k != "teacher"} for f in features["test"]]
    report = {"teacher": {"run": str(teacher_run.path), metric: teacher_run.metrics.get(metric),
                          **_profile(teacher.model, task, test, recipe.eval.batch_size, teacher_run.model_dir)},
              "student": {"run": str(run.path), "spec": student, metric: result[metric], "copied_tensors": copied,
                          **_profile(final, task, test, recipe.eval.batch_size, run.model_dir)},
              "metric": metric, "temperature": temperature, "alpha": alpha, "test_rows": len(test)}
    run.write_json("distill.json", report)
    run.end()
    return report


def render(report: dict) -> str:
    metric, t, s = report["metric"], report["teacher"], report["student"]
    rows = [("parameters", f"{t['parameters']:,}", f"{s['parameters']:,}"),
            ("size (MB)", f"{t['size_mb']:.2f}", f"{s['size_mb']:.2f}"),
            ("p50 ms, batch 1", f"{t['batch1']['p50_ms']:.2f}", f"{s['batch1']['p50_ms']:.2f}"),
            ("p50 ms, batch 32", f"{t['batch32']['p50_ms']:.2f}", f"{s['batch32']['p50_ms']:.2f}"),
            (f"{metric} (test)", f"{t[metric]:.4f}" if t[metric] is not None else "-", f"{s[metric]:.4f}")]
    lines = [f"{'':<20}{'teacher':>14}{'student':>14}"] + [f"{a:<20}{b:>14}{c:>14}" for a, b, c in rows]
    lines.append(f"student run: {s['run']} ({report['test_rows']:,} test rows; T={report['temperature']}, "
                 f"alpha={report['alpha']})")
    return "\n".join(lines)
