"""Training settings a recipe leaves unset, made concrete once at training start (no torch here).

`resolve(recipe, examples)` returns a copy of the recipe with train.learning_rate, train.batch_size and, under
`epochs: auto`, train.eval_every and train.patience filled in, from the task's recipe class (its learning rates per
method), adapt.method and the number of training examples. The pipeline does this before the run folder exists, so
recipe.yaml holds the numbers that ran and `train --resume` reads the same ones. A key the user set is kept as is.

Where the numbers come from (common practice, not one data set):
  learning rate  full fine-tuning 5e-5: HF Trainer's default and the top of the BERT paper's grid {5e-5, 3e-5,
                 2e-5}; HF's image-classification guide uses it for ViT. Causal-LM full fine-tuning 2e-5: TRL's
                 SFTConfig default, the Alpaca and Zephyr SFT recipes. LoRA 2e-4: QLoRA (Dettmers et al. 2023) and
                 the TRL/PEFT examples; the LoRA paper used 2e-4..5e-4 (adapters start at zero and need ~10x a full
                 rate). A new head alone 1e-3: a small layer trained from scratch, Adam's default rate (Kingma & Ba).
  batch size     32 or 16 (the BERT paper's grid; HF examples) once an epoch still has BATCH_STEPS optimizer steps;
                 smaller data gets 16, then 8 (HF Trainer's per-device default), so a few hundred rows still take
                 enough updates per epoch, and evaluations several times per epoch each see new steps.
  epochs: auto   evaluations: EVALS_SMALL per epoch when an epoch is at most SMALL_EPOCH steps, EVALS_MEDIUM up
                 to MEDIUM_EPOCH, else one, so a small run's curve has points; patience: the evaluations of
                 PATIENCE_EPOCHS epochs and at least MIN_PATIENCE (HF's EarlyStoppingCallback examples use 3
                 evaluations), so the noise of a small validation split does not end a rising curve.
                 An improvement (min_delta): a rate metric (accuracy, exact match, F1, ROUGE; better when higher)
                 must rise by half a validation row's worth, ROW_SHARE / rows (accuracy moves in steps of 1/rows,
                 F1 by about that when one row changes: less is noise, not a row more right); a loss (better when
                 lower) must fall by LOSS_DELTA nats. A tie of the metric counts when the validation loss falls by
                 LOSS_DELTA from the best checkpoint's: 13 rows tie at 10/13 while the loss still falls. Absolute
                 margins bound the improvements a saturated curve can make (a loss of 0.05 at most 5 more), so
                 accuracy 1.0 with a creeping loss stops instead of running to train.max_epochs. Keras' and
                 Lightning's EarlyStopping default min_delta to 0; their users set 0.001-0.01, as here for a loss.
                 The learning-rate schedule runs over train.max_epochs (as HF Trainer with EarlyStoppingCallback
                 does over num_train_epochs): the rate at a step never depends on when training will stop, so a
                 stop decided later changes nothing before it and resume stays exact.
"""
from __future__ import annotations

import math

BATCH_SIZES = (32, 16, 8)       # largest first
BATCH_STEPS = 30                # optimizer steps per epoch the default batch size keeps, where it can
SMALL_EPOCH, EVALS_SMALL = 50, 4        # optimizer steps per epoch; evaluations per epoch
MEDIUM_EPOCH, EVALS_MEDIUM = 200, 2
PATIENCE_EPOCHS, MIN_PATIENCE = 2, 3
ROW_SHARE = 0.5                 # a rate metric's improvement under auto: half a validation row's worth
LOSS_DELTA = 0.01               # nats: a loss's improvement under auto (the metric, or a tie's tie-break)


def auto(cfg) -> bool:
    """Whether training length is decided by the validation curve: epochs: auto, and no train.max_steps."""
    return cfg.epochs == "auto" and not cfg.max_steps


def min_delta(cfg, direction: str, rows: int) -> float:
    """The least change of train.metric that counts as an improvement under epochs: auto: train.min_delta, else
    ROW_SHARE / rows for a metric better when higher, LOSS_DELTA for one better when lower (a loss)."""
    if cfg.min_delta is not None:
        return cfg.min_delta
    return ROW_SHARE / max(rows, 1) if direction == "max" else LOSS_DELTA


def learning_rate(recipe) -> float:
    """train.learning_rate, or the task's rate for what trains (recipe class `learning_rates`)."""
    if recipe.train.learning_rate is not None:
        return recipe.train.learning_rate
    a = recipe.adapt
    kind = "head" if a.method == "freeze" and a.freeze_backbone else a.method if a.method in ("lora", "contrastive") \
        else "full"
    return type(recipe).learning_rates[kind]


def batch_size(recipe, examples: int) -> int:
    """train.batch_size, or the largest of BATCH_SIZES whose epoch has BATCH_STEPS optimizer steps (else the
    smallest)."""
    cfg = recipe.train
    if cfg.batch_size is not None:
        return cfg.batch_size
    return next((b for b in BATCH_SIZES if examples / (b * cfg.grad_accum) >= BATCH_STEPS), BATCH_SIZES[-1])


def steps_per_epoch(examples: int, batch: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(examples / batch) / grad_accum)


def evals_per_epoch(per_epoch: int) -> int:
    return EVALS_SMALL if per_epoch <= SMALL_EPOCH else EVALS_MEDIUM if per_epoch <= MEDIUM_EPOCH else 1


def resolve(recipe, examples: int):
    """(a copy of `recipe` with the unset training settings made concrete, the lines that say what was chosen).
    examples: the training examples (encoded features: packed rows, windows)."""
    cfg = recipe.train
    values = {"learning_rate": learning_rate(recipe), "batch_size": batch_size(recipe, examples)}
    per_epoch = steps_per_epoch(examples, values["batch_size"], cfg.grad_accum)
    if auto(cfg):
        evals = min(evals_per_epoch(per_epoch), per_epoch)
        values["eval_every"] = cfg.eval_every or math.ceil(per_epoch / evals)
        per = per_epoch / values["eval_every"]                       # evaluations per epoch, as resolved
        values["patience"] = cfg.patience or max(MIN_PATIENCE, math.ceil(PATIENCE_EPOCHS * per))
    chosen = {k: v for k, v in values.items() if getattr(cfg, k) is None}
    lines = []
    if chosen:
        lines.append("train: " + ", ".join(f"{k} {v:g}" for k, v in chosen.items())
                     + f" (defaults for adapt.method {recipe.adapt.method} and {examples:,} training examples; "
                     "set the keys to change them)")
    resolved = recipe.model_copy(deep=True)
    resolved.train = cfg.model_copy(update=values)
    return resolved, lines
