"""`tunesmith export RUN`: the run's model as ONNX (fp32, and int8 by onnxruntime's dynamic quantization, per
channel), checked on the run's own held-out test rows (data/test.jsonl) before it is written as done.

The graph's inputs and outputs are what the task declares: `Task.export_inputs()` (names, example tensors, dynamic
axes) and `Task.export_outputs()` (output names and their dynamic axes; None: the task has no ONNX export of this
kind, e.g. a generating task, whose graph would need a KV cache: `--format hf` copies its run's model/ folder, LoRA
already merged). A task whose `export_generation()` names an optimum export task (an encoder-decoder text2text run)
is exported through optimum-onnx instead, with the same gate (tunesmith/deploy/export_generate.py).

For each file: max |difference| of the declared outputs (logits, for classifiers) against the PyTorch model, the test
metric (train.metric, scored as eval.json scores it) against eval.json, latency p50/p95 at batch 1 and 32, and file
size. A file whose metric falls more than `max_drop` below eval.json is removed and the export fails (exit 1);
export.json (the "done" record) lists only files that passed. Everything is written into a temporary folder inside
the out folder and moved into place only after the check (export.json last), so a full disk, a read-only folder or
Ctrl-C leaves no file behind, only one line saying what happened.

Out folder (default RUN/export/): model.onnx, model.int8.onnx, config.json (labels), the tokenizer or image
processor, export.json. `OnnxModel` puts an exported file behind the call tasks make (`model(**batch).logits`: each
declared output as an attribute), so the task's own evaluate and predict score and serve it (tunesmith serve --onnx).
"""
from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from tunesmith import io
from tunesmith.errors import TunesmithError

FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


def onnx_model(path, threads: int | None = None):
    """An exported ONNX file as a torch module: `model(**batch)` has each output of the graph as an attribute
    (`.logits`), a float tensor on the CPU."""
    import onnxruntime as ort
    import torch

    class OnnxModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.session.get_inputs()]
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # model_device() reads a parameter
            self.path = Path(path)

        def forward(self, **batch):
            feed = {n: batch[n].detach().cpu().numpy() for n in self.names}
            values = self.session.run(self.outputs, feed)
            return SimpleNamespace(**{n: torch.from_numpy(v) for n, v in zip(self.outputs, values)})

    return OnnxModel().eval()


def load_onnx(run_dir, kind: str = "fp32", device: str = "cpu"):
    """The run's Predictor with its model replaced by an exported, checked ONNX file (RUN/export/, `kind` fp32 or
    int8): predict and evaluate then run through onnxruntime."""
    from tunesmith.run import Run

    run = Run(run_dir)
    record = run.path / "export" / "export.json"
    if not record.exists():
        raise TunesmithError(f"{run.path}: no checked export (export/export.json); run tunesmith export {run.path}"
                             f"{' --quantize int8' if kind == 'int8' else ''} first")
    files = io.read_json(record)["files"]
    if "exporter" in io.read_json(record):
        raise TunesmithError(f"{record.parent}: an optimum export (encoder and decoder graphs): load it with "
                             "optimum.onnxruntime.ORTModelForSeq2SeqLM.from_pretrained; serve the run without --onnx")
    if kind not in files:
        raise TunesmithError(f"{record}: no {kind} model passed the export check (have: {', '.join(files)})")
    predictor = run.load(device)
    predictor.model = onnx_model(record.parent / files[kind])     # the task scores it through its outputs
    return predictor


def latency(call, repeats: int, budget_s: float = 10.0) -> dict:
    """p50/p95 milliseconds of `call()` over `repeats` timed calls (after one warm-up), stopping early after
    `budget_s` seconds."""
    call()
    times, end = [], time.perf_counter() + budget_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t0))
        if time.perf_counter() > end:
            break
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3),
            "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 3), "calls": len(times)}


def _batch(task, features, size: int):
    """A collated batch of `size` features (the test rows, repeated if fewer), without labels."""
    chosen = [features[i % len(features)] for i in range(size)]
    batch = task.collate(chosen)
    batch.pop("labels", None)
    return batch


def _outputs(task, model, names, features, batch_size) -> list:
    """Per batch (in `batches` order, sorted by length), the declared outputs `names` as float CPU tensors."""
    import torch

    from tunesmith.tasks.base import batches

    out = []
    with torch.no_grad():
        for _, b in batches(task, features, batch_size, torch.device("cpu")):
            result = model(**{k: v for k, v in b.items() if k != "labels"})
            out.append([getattr(result, n).float() for n in names])
    return out


def _check(task, model, names, reference, rows, features, batch_size, metric, repeats) -> dict:
    """Parity against the PyTorch outputs `reference` (from `_outputs`; None: `model` is the PyTorch model, whose
    metric is eval.json's), the test metric, and speed of `model` on the test features."""
    import torch

    out = {}
    if reference is not None:
        mine = _outputs(task, model, names, features, batch_size)
        out["max_abs_logit_diff"] = max(float((a - b).abs().max()) for ra, rb in zip(reference, mine)
                                        for a, b in zip(ra, rb))
        with torch.no_grad():
            out[metric] = task.evaluate_final(model, rows, features, batch_size)[metric]
    with torch.no_grad():
        for size in (1, 32):
            batch = _batch(task, features, size)
            out[f"batch{size}"] = latency(lambda b=batch: model(**b), repeats if size == 1 else max(3, repeats // 4))
    return out


def _declared(model, inputs: list[str], outputs: list[str]):
    """`model` as the ONNX graph sees it: the declared inputs, in order, positionally; the declared outputs, in
    order, as a tuple."""
    import torch

    class Declared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            result = self.model(**dict(zip(inputs, args)))
            return tuple(getattr(result, name) for name in outputs)

    return Declared().eval()


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*.safetensors")]
    return round(sum(p.stat().st_size for p in files) / 1e6, 3)


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _write_error(e: BaseException, out: Path, work: Path | None, needed: int) -> TunesmithError | None:
    """One line for a failed write into `out`; None: not a writing problem (a bug keeps its traceback). A write
    cut short by a full disk can surface as a parse error of the cut file (onnx's "Wire format was corrupt"): any
    error while `out`'s file system has less than `needed` bytes free is read as a full disk."""
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or 0 <= _free(work or out) < needed
    if full:
        return TunesmithError(f"no space left on device writing {out} (a model file needs about "
                              f"{needed / 2**20:,.0f} MiB); free space or choose --out")
    if isinstance(e, OSError):
        return TunesmithError(f"cannot write {e.filename or out}: {e.strerror or e}; choose another --out")
    return None


@contextmanager
def staging(out: Path, needed: int):
    """`with staging(out, needed) as work:` write into `work`, a temporary folder inside `out` (created if
    missing), and move what is done into `out` with `publish`. On any error `work` is removed, and `out` too
    (with the folders above it that this call made) when nothing else is in it; a full disk or a folder that cannot
    be written becomes one line (TunesmithError)."""
    top = io.first_missing(out)                     # the first folder made here
    work = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
        yield work
    except TunesmithError:
        raise
    except Exception as e:
        error = _write_error(e, out, work, needed)
        if error is None:
            raise
        raise error from None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if top is not None and top.is_dir() and not any(p.is_file() for p in top.rglob("*")):
            shutil.rmtree(top, ignore_errors=True)


def publish(work: Path, out: Path, names: list[str], record: Path | None = None) -> None:
    """Move `names` (files or folders in `work`) into `out`, replacing what is there; `record` (already written in
    `work`) last, so a reader never finds a record naming a file not yet in place. Renames in one file system:
    no byte is written, so no disk can fill here."""
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(work / name, target)
    if record is not None:
        os.replace(record, out / record.name)


def export(run_dir, format: str = "onnx", quantize: str | None = None, out=None, max_drop: float = 0.01,
           repeats: int = 30) -> dict:
    """Export a finished run (see the module docstring); returns the report (as export.json holds it, plus
    `rejected`: files whose test metric dropped by more than max_drop, removed; `passed`: none was)."""
    from tunesmith.run import Run
    from tunesmith.splits import load_rows

    if not (math.isfinite(max_drop) and max_drop >= 0):        # nan compares false: it would turn the gate off
        raise TunesmithError(f"max_drop {max_drop}: give a finite number >= 0 (0.01 = one point of the metric)")

    if format == "onnx":
        try:
            import onnx  # noqa: F401  (torch.onnx.export writes through it)
            import onnxruntime  # noqa: F401
        except ImportError:
            raise TunesmithError("tunesmith export --format onnx needs onnx and onnxruntime: "
                                 "pip install 'tunesmith[export]'") from None
    run = Run(run_dir)
    out = Path(out) if out else run.path / "export"
    if format == "hf":
        if not run.model_dir.is_dir():
            raise TunesmithError(f"{run.path}: no model/ folder (the run has not finished)")
        needed = sum(p.stat().st_size for p in run.model_dir.rglob("*") if p.is_file())
        with staging(out, needed) as work:
            shutil.copytree(run.model_dir, work / "model")
            publish(work / "model", out, sorted(p.name for p in (work / "model").iterdir()))
        return {"format": "hf", "out": str(out), "size_mb": _size_mb(out)}
    if format != "onnx":
        raise TunesmithError(f"--format {format}: use onnx or hf")
    if quantize not in (None, "int8"):
        raise TunesmithError(f"--quantize {quantize}: only int8 is supported")
    reference_metrics = run.metrics
    predictor = run.load("cpu")
    task, model = predictor.task, predictor.model
    outputs = task.export_outputs()
    if outputs is None and task.export_generation() is not None:     # encoder-decoder: optimum-onnx's graphs
        from tunesmith.deploy.export_generate import export_generating, optimum

        optimum()                                   # before the test rows are read: one line if not installed
    if outputs is None and task.export_generation() is None:
        raise TunesmithError(f"task '{task.name}' declares no ONNX outputs (Task.export_outputs), so it has no ONNX "
                             f"export; its merged HF folder is {run.model_dir}: use --format hf to copy it")
    metric = run.recipe.train.metric
    if metric not in reference_metrics:
        raise TunesmithError(f"{run.path}: eval.json has no {metric}; the run has not finished")
    rows = load_rows(task, str(run.path / "data" / "test.jsonl"))
    features = task.encode(rows)
    if outputs is None:
        with staging(out, 2 * int(_size_mb(run.model_dir) * 1e6) + 2**20) as work:
            report = export_generating(task, model, run, rows, features, work, out, task.export_generation(),
                                       quantize, max_drop, repeats, latency)
            (out / "export.json").unlink(missing_ok=True)     # this export replaces the last one's record
            if report["files"]:
                publish(work, out, [p.name for p in work.iterdir() if p.name != "export.json"], work / "export.json")
                report["files"]["fp32"] = ", ".join(report["files"]["fp32"])      # render names them
        return report

    with staging(out, int(_size_mb(run.model_dir) * 1e6) + 2**20) as work:
        report = _export_checked(task, model, run, outputs, rows, features, work, out, quantize, max_drop, repeats)
        kept = [p.name for p in work.iterdir() if p.name != "export.json"]
        for name in ["export.json", *(FILES[kind] for kind in report["rejected"])]:
            (out / name).unlink(missing_ok=True)    # this export replaces the last one's record; rejected: no file
        if report["files"]:
            publish(work, out, kept, work / "export.json")
    return report


def _export_checked(task, model, run, outputs, rows, features, work: Path, out: Path, quantize, max_drop,
                    repeats) -> dict:
    """Write the ONNX file(s), the processor and config into `work`, check each file, remove the ones that fail
    the gate and write export.json (naming `out`) into `work`; returns the report."""
    import torch

    metric, direction = run.recipe.train.metric, run.recipe.direction
    reference_metrics = run.metrics
    batch_size = run.recipe.eval.batch_size
    inputs = task.export_inputs()
    fp32 = work / FILES["fp32"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # tracer notes on shape-dependent Python branches: parity checks them
        torch.onnx.export(_declared(model, list(inputs), list(outputs)), tuple(x for x, _ in inputs.values()),
                          str(fp32), input_names=list(inputs), output_names=list(outputs), opset_version=17,
                          dynamo=False, dynamic_axes={**{k: axes for k, (_, axes) in inputs.items()}, **outputs})
    paths = {"fp32": fp32}
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(logging.ERROR)               # its advice to pre-process goes to the root logger
        paths["int8"] = work / FILES["int8"]
        quantize_dynamic(str(fp32), str(paths["int8"]), weight_type=QuantType.QInt8,
                         per_channel=True)          # per output channel: 0.2-0.4 vs 1.2 points lost (MiniLM)
    task.processor.save_pretrained(work)
    model.config.save_pretrained(work)

    report = {"format": "onnx", "run": str(run.path), "out": str(out), "metric": metric, "direction": direction,
              "eval_json": reference_metrics[metric], "max_drop": max_drop, "test_rows": len(rows),
              "files": {}, "rejected": {}, "results": {}}
    report["results"]["pytorch"] = {"size_mb": _size_mb(run.model_dir), "max_abs_logit_diff": 0.0,
                                    metric: reference_metrics[metric],
                                    **_check(task, model, None, None, rows, features, batch_size, metric, repeats)}
    names = list(outputs)
    reference = _outputs(task, model, names, features, batch_size)          # once, for every exported file
    for kind, path in paths.items():
        result = {"size_mb": _size_mb(path), **_check(task, onnx_model(path), names, reference, rows, features,
                                                        batch_size, metric, repeats)}
        drop = (reference_metrics[metric] - result[metric]) * (1 if direction == "max" else -1)
        result["drop"] = round(drop, 6)
        report["results"][kind] = result
        if drop > max_drop + 1e-9:
            path.unlink()
            report["rejected"][kind] = f"{metric} {result[metric]:.4f} vs {reference_metrics[metric]:.4f} in " \
                                       f"eval.json: drops {drop:.4f} > --max-drop {max_drop}"
        else:
            report["files"][kind] = path.name
    report["passed"] = not report["rejected"]
    if report["files"]:
        io.write_json(work / "export.json", {k: v for k, v in report.items() if k != "rejected"})
    return report


def render(report: dict) -> str:
    """The parity table: one column per model (PyTorch, ONNX fp32, ONNX int8)."""
    if report["format"] == "hf":
        return f"HF folder (merged weights): {report['out']} ({report['size_mb']:.1f} MB)"
    cols = list(report["results"])
    metric = report["metric"]
    rows = [("file size (MB)", "size_mb"), ("max |logit diff|", "max_abs_logit_diff"), (f"{metric} (test)", metric),
            ("p50 ms, batch 1", ("batch1", "p50_ms")), ("p95 ms, batch 1", ("batch1", "p95_ms")),
            ("p50 ms, batch 32", ("batch32", "p50_ms")), ("p95 ms, batch 32", ("batch32", "p95_ms"))]
    value = lambda r, key: r[key[0]][key[1]] if isinstance(key, tuple) else r[key]
    lines = [io.table(["", *cols], [[name] + [value(report["results"][c], key) for c in cols] for name, key in rows])]
    lines.append(f"eval.json {metric}: {report['eval_json']:.4f} on {report['test_rows']:,} test rows; "
                 f"max drop allowed {report['max_drop']}")
    for kind, why in report["rejected"].items():
        lines.append(f"REJECTED {kind}: {why} (file removed)")
    if report["files"]:
        lines.append(f"written: {', '.join(str(Path(report['out']) / f) for f in report['files'].values())}")
    return "\n".join(lines)
