"""ONNX export of a generating encoder-decoder run through optimum-onnx, for a task whose `export_generation()` names
optimum's export task (text2text on T5, BART, Marian...: "text2text-generation-with-past"). optimum's `main_export`
writes the encoder and the decoder (with its KV cache) as separate graphs, which
`optimum.onnxruntime.ORTModelForSeq2SeqLM` runs behind `generate`; the graph would otherwise need the cache inside it,
which tunesmith's own exporter (tunesmith/deploy/export.py) does not write.

The gate is export.py's: the exported model is put behind the call the task makes (`Exported`: `model(**batch)
.logits`, `model.generate`), so the task's own evaluate_final scores it on the run's test rows; the file set is kept
only when train.metric stays within max_drop of eval.json. Also reported: max |logit diff| against the PyTorch model
(teacher-forced on the test targets), and generation latency p50/p95 at batch 1 and 32.

optimum-onnx is a separate package from optimum, and today it pins transformers<5 (tunesmith runs on transformers 5):
where it cannot be imported the export stops with one line saying so (`--format hf` copies the model folder).
UNTESTED against the real optimum-onnx here (it cannot be installed beside transformers 5); the tests run this path
with a stand-in that has its documented names (main_export, ORTModelForSeq2SeqLM.from_pretrained).
"""
from __future__ import annotations

from pathlib import Path

from tunesmith import io
from tunesmith.errors import TunesmithError

NEEDS = ("ONNX export of an encoder-decoder run needs optimum-onnx (pip install optimum-onnx), which needs "
         "transformers<5 today (tunesmith runs on transformers 5); tunesmith export RUN --format hf copies the "
         "model folder")


def optimum():
    """(main_export, ORTModelForSeq2SeqLM) from optimum-onnx, or the one-line error naming what to install."""
    try:
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTModelForSeq2SeqLM
    except ImportError:
        raise TunesmithError(NEEDS) from None
    return main_export, ORTModelForSeq2SeqLM


def exported(ort_model):
    """An ORTModelForSeq2SeqLM as the task calls a model: `model(input_ids, attention_mask, labels)` returns the
    logits teacher-forced on the labels (decoder inputs: the labels shifted right after the decoder start token, as
    the PyTorch model builds them), `generate` is its own; a parameter-less anchor gives model_device() the CPU."""
    import torch

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ort, self.config = ort_model, ort_model.config
            self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

        def forward(self, input_ids, attention_mask, labels=None, decoder_input_ids=None):
            if decoder_input_ids is None:                   # [B, T]: start token, then labels[:, :-1]
                start = self.config.decoder_start_token_id
                decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
                decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == -100, self.config.pad_token_id)
            return self.ort(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)

        def generate(self, **kwargs):
            return self.ort.generate(**kwargs)

    return Exported().eval()


def export_generating(task, model, run, rows, features, work: Path, out: Path, optimum_task: str, quantize,
                      max_drop, repeats, latency) -> dict:
    """Export through optimum-onnx into `work` and check it (see the module docstring); writes export.json into
    `work` when the files pass. Returns the report as export.py's `export` does (`render` draws it). latency:
    export.py's timer (passed in: export.py imports this module)."""
    import torch

    from tunesmith.tasks.base import batches

    main_export, ort_class = optimum()
    if quantize is not None:
        raise TunesmithError(f"--quantize {quantize}: not offered for an encoder-decoder export (optimum-cli "
                             "onnxruntime quantize works on the exported folder); export fp32")
    metric, direction = run.recipe.train.metric, run.recipe.direction
    reference_metrics, batch_size = run.metrics, run.recipe.eval.batch_size
    size_mb = lambda files: round(sum(p.stat().st_size for p in files) / 1e6, 3)

    def timing(m) -> dict:                          # one generate call per size, the test prompts repeated
        prompts = [features[i % len(features)]["prompt_ids"] for i in range(32)]
        return {f"batch{n}": latency(lambda n=n: task.complete(m, prompts[:n]), repeats if n == 1 else
                                     max(3, repeats // 4)) for n in (1, 32)}

    main_export(str(run.model_dir), output=str(work), task=optimum_task, local_files_only=True, do_validation=False)
    onnx = exported(ort_class.from_pretrained(str(work)))
    with torch.no_grad():
        diff = max(float((model(**b).logits.float() - onnx(**b).logits.float()).abs().max())
                   for _, b in batches(task, features, batch_size, torch.device("cpu")))
        result = {"size_mb": size_mb(work.glob("*.onnx*")), "max_abs_logit_diff": diff,
                  metric: task.evaluate_final(onnx, rows, features, batch_size)[metric], **timing(onnx)}
        pytorch = {"size_mb": size_mb(run.model_dir.glob("*.safetensors")), "max_abs_logit_diff": 0.0,
                   metric: reference_metrics[metric], **timing(model)}
    drop = (reference_metrics[metric] - result[metric]) * (1 if direction == "max" else -1)
    result["drop"] = round(drop, 6)
    report = {"format": "onnx", "exporter": f"optimum {optimum_task}", "run": str(run.path), "out": str(out),
              "metric": metric, "direction": direction, "eval_json": reference_metrics[metric], "max_drop": max_drop,
              "test_rows": len(rows), "files": {}, "rejected": {}, "results": {"pytorch": pytorch, "fp32": result}}
    if drop > max_drop + 1e-9:
        report["rejected"]["fp32"] = (f"{metric} {result[metric]:.4f} vs {reference_metrics[metric]:.4f} in "
                                      f"eval.json: drops {drop:.4f} > --max-drop {max_drop}")
    else:
        report["files"]["fp32"] = sorted(p.name for p in work.glob("*.onnx"))
        io.write_json(work / "export.json", {k: v for k, v in report.items() if k != "rejected"})
    report["passed"] = not report["rejected"]
    return report
