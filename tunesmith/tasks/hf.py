"""Loading Hugging Face models and processors for tasks: bundled alias, hub id or folder, with one-line errors
that say what to do. Kept out of the Task protocol file (base.py): a task may load its model another way."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

from tunesmith.errors import TunesmithError

DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                "attention_dropout", "hidden_dropout", "classifier_dropout_prob", "activation_dropout",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "drop_path_rate")


def load_error(name: str, e: Exception):
    """A failed model or processor load as one line that says what to do."""
    text = str(e)
    if "trust_remote_code" in text or "custom code" in text:
        return TunesmithError(f"model '{name}' ships its own Python code (auto_map in config.json); it runs only "
                              f"with model.trust_remote_code: true, which you should set only if you trust it")
    if "weights_only" in text or "Unpickl" in type(e).__name__ or "Unpickl" in text:
        return TunesmithError(f"model '{name}': pytorch_model.bin holds more than plain tensors, refused by "
                              f"torch.load(weights_only=True) ({text.splitlines()[0][:200]}); use a safetensors copy "
                              f"from a source you trust")
    if Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:     # a hub id: [org/]name
        what = "exists but is not a model folder" if Path(name).exists() else "does not exist"
        return TunesmithError(f"model '{name}': {what}; give a folder with config.json (save_pretrained), a "
                              f"bundled alias (minilm, smollm2, mobilenet_v2) or a hub id")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return TunesmithError(f"model '{name}' is not a local folder and the hub is offline (HF_HUB_OFFLINE=1): "
                              f"download it where there is a network (hf download {name} --local-dir DIR) and give "
                              f"that folder")
    return TunesmithError(f"model '{name}' could not be loaded from the hub ({text.splitlines()[0][:200]}); check "
                          f"the name and the network, or give a local folder")


def load_hf(auto_cls, model_cfg, **config_kwargs):
    """An HF model from a bundled alias, hub id or folder; `pretrained: false` keeps only the config.

    config_kwargs set task fields (num_labels, id2label, ...); `model.dropout` overrides every dropout
    probability the config has. A model folder's own code runs only with model.trust_remote_code; pickle
    weights (pytorch_model.bin) load only as plain tensors (weights_only=True) and are reported.
    """
    from transformers import AutoConfig

    from tunesmith.assets.bundled import resolve_model

    path = resolve_model(model_cfg.name)
    trust = model_cfg.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(path, revision=model_cfg.revision, trust_remote_code=trust,
                                            **config_kwargs)
    except (OSError, ValueError) as e:
        raise load_error(model_cfg.name, e) from None
    if model_cfg.dropout is not None:
        for key in DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, model_cfg.dropout)
    if not model_cfg.pretrained:
        return auto_cls.from_config(config, trust_remote_code=trust), path
    # a checkpoint's own head (other label count) is replaced: that is the point of fine-tuning
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("pytorch_model*.bin")):
        print(f"model: {path} has pickle weights only (pytorch_model.bin): loaded as plain tensors with "
              f"torch.load(weights_only=True), which runs no code; prefer safetensors")
    try:
        model, info = auto_cls.from_pretrained(path, config=config, revision=model_cfg.revision, weights_only=True,
                                               trust_remote_code=trust, ignore_mismatched_sizes=True,
                                               output_loading_info=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise load_error(model_cfg.name, e) from None
    line = weights_report(model, info)
    if line:
        print(line)
    return model, path


def load_saved(task, auto_cls, folder):
    """A fine-tuned model as `task.save` wrote it to `folder` (weights as plain tensors; the folder's own code runs
    only with model.trust_remote_code), then the task's processor from the same folder."""
    model = auto_cls.from_pretrained(folder, weights_only=True, trust_remote_code=task.trust_remote_code)
    task.setup(str(folder))
    return model


def load_image_processor(source: str, revision: str | None, trust_remote_code: bool, example: str):
    """The image processor saved with a model (folder or hub id); a missing or unusable one is one line that says
    to save one beside the model, like `example` (a processor class call ending in .save_pretrained(path))."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TunesmithError(f"{source}: no usable image processor ({e}); save one beside the model, e.g. "
                             f"{example}") from None


def weights_report(model, info: dict, shown: int = 3) -> str | None:
    """One line about the weights that did not load as they were saved, or None when only the task head is new.

    The head is everything outside the model's body (`base_model_prefix`: bert.*, model.*, mobilenet_v2.*):
    a new head (classifier.*, score.*) starts at random and a checkpoint's old head is dropped, which is what
    fine-tuning means. A body weight missing, left unused or reshaped is reported: it trains from random."""
    body = f"{model.base_model_prefix}." if model.base_model is not model else ""

    def inside(keys) -> list[str]:
        return sorted(k for k in keys if k.startswith(body))

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f" (and {len(keys) - shown} more)" if len(keys) > shown else "")

    missing, unused = inside(info.get("missing_keys", ())), inside(info.get("unexpected_keys", ()))
    reshaped = inside(k[0] for k in info.get("mismatched_keys", ()))
    parts = [f"{len(missing)} weight(s) not in the checkpoint were initialised at random: {names(missing)}"
             if missing else "",
             f"{len(reshaped)} weight(s) of another shape in the checkpoint were initialised at random: "
             f"{names(reshaped)}" if reshaped else "",
             f"{len(unused)} checkpoint weight(s) were not used: {names(unused)}" if unused else ""]
    parts = [x for x in parts if x]
    return f"model: {'; '.join(parts)}" if parts else None
