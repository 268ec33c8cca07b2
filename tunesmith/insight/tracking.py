"""Experiment-tracking callbacks (`train.report_to: [tensorboard, mlflow]`; `ts.train` adds them through
`callbacks_for`): the run calls `on_log(record)` for every metrics.jsonl record and `on_end(run)` once the
run folder holds eval.json. Both mirror what the run folder already has; the run folder stays the source of
truth.

Tags (the same in both trackers), from a metrics.jsonl record at record["step"]:
  train/<key>         training records (loss, lr, epoch, samples_per_s, tokens_per_s)
  validation/<key>    records with split == "validation" (other splits: <split>/<key>)
  summary/<key>       the final {"summary": true} record (train_seconds, samples, ...)
  test/<key>          eval.json scalars at the last logged step; nested dicts flattened with "/"
                      (test/per_class/pos/f1, test/before/accuracy); lists (confusion matrix) are skipped

TensorBoard values are written as float64 tensors (new-style scalar summaries) so they read back exactly as
in metrics.jsonl; TensorBoard's scalar dashboard shows them like any scalar. Read them with
EventAccumulator(...).Tensors(tag), not .Scalars(tag).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.run import Callback

SKIP = {"step", "split", "summary"}          # record keys that say where a record belongs, not values
MLFLOW_BATCH = 100                            # params/metrics per log_batch call (MLflow caps a batch at 1000)
MLFLOW_PARAM_CHARS = 6000                     # MLflow's limit on one param value


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def record_scalars(record: dict) -> dict[str, float]:
    """{tag: value} for every scalar of a metrics.jsonl record (see the module docstring for tags)."""
    prefix = "summary" if record.get("summary") else record.get("split") or "train"
    return {f"{prefix}/{k}": float(v) for k, v in record.items() if k not in SKIP and _is_scalar(v)}


def flat_scalars(d: dict, prefix: str) -> dict[str, float]:
    """eval.json -> {"test/accuracy": .9, "test/per_class/pos/f1": .8, ...}; lists and strings skipped."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}/{k}"))
        elif _is_scalar(v):
            out[f"{prefix}/{k}"] = float(v)
    return out


def flat_params(d, prefix: str = "") -> dict[str, str]:
    """The recipe flattened with dots ({"train.learning_rate": "0.003"}), values as MLflow-sized strings."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = (v if isinstance(v, str) else json.dumps(v))[:MLFLOW_PARAM_CHARS]
    return out


def _eval_and_recipe(run_path: Path) -> tuple[dict, str | None]:
    recipe = run_path / "recipe.yaml"
    return io.read_json(run_path / "eval.json", {}), (recipe.read_text() if recipe.exists() else None)


def callbacks_for(train, run_path: Path) -> list[Callback]:
    """The trackers `train.report_to` names, writing for the run folder `run_path`."""
    make = {"tensorboard": lambda: TensorBoard(run_path), "mlflow": lambda: MLflow(run_path, train.mlflow_uri)}
    return [make[name]() for name in train.report_to]


class TensorBoard(Callback):
    """Event files in <run>/tensorboard/; `tensorboard --logdir runs/` compares runs."""

    def __init__(self, run_path: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise TunesmithError("train.report_to: tensorboard needs the tensorboard package: "
                                     "pip install 'tunesmith[tracking]' (or pip install tensorboard)") from e
        self.path = Path(run_path)
        self.writer = SummaryWriter(log_dir=str(self.path / "tensorboard"))
        self.last_step = 0

    def _scalar(self, tag: str, value: float, step: int) -> None:
        try:                                  # torch's writer: float64 tensor summary, exact read-back
            self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)
        except TypeError:                     # tensorboardX has no double_precision: float32
            self.writer.add_scalar(tag, value, step)

    def on_log(self, record: dict) -> None:
        step = int(record["step"])
        self.last_step = max(self.last_step, step)
        for tag, value in record_scalars(record).items():
            self._scalar(tag, value, step)

    def on_end(self, run) -> None:
        ev, recipe = _eval_and_recipe(Path(run.path))
        for tag, value in flat_scalars({k: v for k, v in ev.items() if k != "predictions"}, "test").items():
            self._scalar(tag, value, self.last_step)
        if recipe is not None:                # markdown: indent 4 spaces to show the YAML verbatim
            self.writer.add_text("recipe", "\n".join("    " + line for line in recipe.splitlines()), self.last_step)
        self.writer.flush()
        self.writer.close()


class MLflow(Callback):
    """One MLflow run per tunesmith run. Default store: sqlite:///<run>/mlflow.db (a file store at
    <run>/mlruns if SQLite is unavailable); artifacts (recipe.yaml, eval.json) under <run>/mlartifacts."""

    def __init__(self, run_path: Path, tracking_uri: str | None = None, experiment: str | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise TunesmithError("train.report_to: mlflow needs the mlflow package: "
                                 "pip install 'tunesmith[tracking]' (or pip install mlflow)") from e
        self.path = Path(run_path).resolve()
        self.last_step = 0
        name = experiment or "tunesmith"
        uris = [tracking_uri] if tracking_uri else [f"sqlite:///{self.path / 'mlflow.db'}",
                                                    (self.path / "mlruns").as_uri()]
        error = None
        for uri in uris:
            try:
                self.client = MlflowClient(tracking_uri=uri)
                exp = self.client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(
                    name, artifact_location=(self.path / "mlartifacts").as_uri())
                break
            except Exception as e:            # noqa: BLE001  sqlite driver/migration missing: try the file store
                error = e
        else:
            raise TunesmithError(f"MLflow: could not open a tracking store ({', '.join(uris)}): {error}") from error
        self.tracking_uri = uri
        found = self.client.search_runs([exp_id], f"tags.mlflow.runName = '{self.path.name}'", max_results=1)
        # a resumed run continues its own MLflow run
        self.run_id = (found[0] if found else self.client.create_run(exp_id, run_name=self.path.name)).info.run_id
        self._params_logged = False
        self._log_params()

    def _log_params(self) -> None:
        """The flattened recipe as params, once recipe.yaml exists (it does from Run.create on)."""
        recipe = self.path / "recipe.yaml"
        if self._params_logged or not recipe.exists():
            return
        import yaml
        from mlflow.entities import Param
        params = [Param(k, v) for k, v in flat_params(yaml.safe_load(recipe.read_text())).items()]
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])
        self._params_logged = True

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)         # ms since the epoch, MLflow's timestamp unit
        rows = [Metric(k, v, now, step) for k, v in values.items()]      # nan/inf allowed (is_nan column)
        for i in range(0, len(rows), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[i:i + MLFLOW_BATCH])

    def on_log(self, record: dict) -> None:
        step = int(record["step"])
        self.last_step = max(self.last_step, step)
        self._metrics(record_scalars(record), step)

    def on_end(self, run) -> None:
        path = Path(run.path)
        self._log_params()
        ev, _ = _eval_and_recipe(path)
        self._metrics(flat_scalars({k: v for k, v in ev.items() if k != "predictions"}, "test"), self.last_step)
        for name in ("recipe.yaml", "eval.json"):
            if (path / name).exists():
                self.client.log_artifact(self.run_id, str(path / name))
        self.client.set_terminated(self.run_id, "FINISHED")
