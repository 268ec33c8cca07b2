"""The parts of fit() (tunesmith/loop.py): the schedule, the batches of an epoch, one optimizer step (its
micro-batches, out-of-memory retry and non-finite skip), the training state a checkpoint holds, the throughput
meter. Each is a pure function or a small class, so fit() reads as the order of events.

An objective (what fit minimises) has collate(features) -> batch, loss(model, batch) -> the SUM over the batch's
items, count(batch) -> its items; `validates` (the pipeline gives fit the validation rows) and finish(model,
batch_size, say) (run after fit, before saving): a Task is one (plain fine-tuning); Task.distillation and
Task.objective (adapt.method contrastive: tunesmith/tasks/contrastive.py) return others.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device

from tunesmith import defaults, safety
from tunesmith.device import autocast
from tunesmith.dropout import CheapDropout
from tunesmith.errors import TunesmithError


@dataclass
class State:
    step: int = 0              # optimizer steps done
    epoch: int = 0
    position: int = 0          # optimizer steps done within the epoch
    best: float | None = None  # best value of the selection metric
    best_step: int = 0
    best_loss: float | None = None  # validation loss at the best step (epochs: auto breaks the metric's ties by it)
    bad_evals: int = 0         # evaluations since the last improvement (early stopping)
    bad_steps: int = 0         # optimizer steps in a row skipped for a non-finite loss or gradient
    skipped: int = 0           # optimizer steps skipped in all
    seconds: float = 0.0       # wall time of training so far, every session (train.budget)


def plan(lengths: list[int], batch_size: int, seed: int, epoch: int, by_length: bool) -> list[list[int]]:
    """Batches (lists of example indices) for one epoch; a pure function of its arguments.

    by_length: within shuffled chunks of 50 batches, sort by length so a batch pads to similar lengths;
    the batch order is then shuffled so long and short batches still mix across the epoch.
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if by_length:
        chunk = batch_size * 50
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


@dataclass
class Schedule:
    """Optimizer steps as the recipe's train section asks: per epoch, in all, of warmup; the evaluation and
    checkpoint cadence. Under epochs: auto (tunesmith/defaults.py) `total` is the train.max_epochs cap, which the
    learning-rate schedule runs over, and the validation curve decides the stop; `floor`: steps before it may.
    A run that is one piece of a longer schedule (a federated client's round, tunesmith/federated/site.py) gives
    `span` = (offset, steps): its learning rate follows steps 'offset' on of a schedule over `steps` steps (warmup
    a share of those), instead of a schedule of its own that warms up and decays within it."""
    per_epoch: int
    total: int                 # train.max_steps, else train.epochs (auto: train.max_epochs) of steps
    warmup: int
    eval_every: int
    save_every: int
    auto: bool = False         # epochs: auto: the validation curve decides the stop
    floor: int = 0             # auto: no early stop before this many steps (train.min_steps)
    lr_offset: int = 0         # the learning-rate schedule's step at this run's step 0 (span)
    lr_total: int = 0          # steps the learning-rate schedule spans; 0: total

    @classmethod
    def of(cls, cfg, examples: int, span: tuple[int, int] | None = None) -> Schedule:
        per_epoch = defaults.steps_per_epoch(examples, cfg.batch_size, cfg.grad_accum)
        curve = defaults.auto(cfg)
        total = cfg.max_steps or math.ceil((cfg.max_epochs if curve else cfg.epochs) * per_epoch)
        offset, lr_total = span or (0, total)
        warmup = int(cfg.warmup) if cfg.warmup >= 1 else round(cfg.warmup * lr_total)
        eval_every = cfg.eval_every or per_epoch
        return cls(per_epoch, total, warmup, eval_every, cfg.save_every or eval_every, curve,
                   cfg.min_steps if curve else 0, offset, lr_total if span else 0)

    def evaluates(self, step: int, position: int, epoch_steps: int) -> bool:
        """Evaluate after optimizer step `step`, `position` steps into an epoch of `epoch_steps`? At the end of
        training; else every eval_every steps and at each epoch's end. Under auto the cadence restarts each epoch
        and an evaluation under half an eval_every before the epoch's end is dropped: two evaluations 1-3 steps
        apart (an eval_every that does not divide the epoch) would count twice toward patience."""
        if step == self.total or position == epoch_steps:
            return True
        if not self.auto:
            return step % self.eval_every == 0
        return position % self.eval_every == 0 and epoch_steps - position >= self.eval_every / 2

    def epoch(self, cfg, lengths: list[int], epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps, each a list of micro-batches (lists of example indices)."""
        batches = plan(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
        return [batches[s:s + cfg.grad_accum] for s in range(0, len(batches), cfg.grad_accum)]


def optimizer_for(adapted, recipe, schedule: Schedule, device):
    """(AdamW over the adapted model's parameter groups, its learning-rate schedule)."""
    from transformers import get_scheduler

    cfg = recipe.train
    groups = adapted.param_groups(cfg.learning_rate, cfg.weight_decay, recipe.adapt.layer_lr_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=device.type in ("cpu", "cuda"))
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=schedule.warmup,
                              num_training_steps=schedule.lr_total or schedule.total)
    if schedule.lr_offset:              # a piece of a longer schedule: start `lr_offset` steps into it
        scheduler.lr_lambdas = [Shifted(f, schedule.lr_offset) for f in scheduler.lr_lambdas]
        for group, base, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * f(0)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return optimizer, scheduler


class Shifted:
    """A learning-rate factor (LambdaLR's lr_lambda) read `offset` steps later. A class, not a closure: LambdaLR's
    state_dict keeps a callable object's attributes."""

    def __init__(self, factor, offset: int):
        self.factor, self.offset = factor, offset

    def __call__(self, step: int) -> float:
        return self.factor(step + self.offset)


def accumulate(objective, model, batches: list[dict], accelerator, mixed: str = "no",
               weights: list[float] | None = None, scaler=None, cheap_dropout: bool = False):
    """Forward and backward over one optimizer step's micro-batches; returns the step's mean loss (a tensor).

    Each micro-batch's loss is a sum over its items (examples or label tokens, `objective.count`); all are divided
    by the items of the whole step, summed over micro-batches and processes, so grad_accum=4 gives the gradient
    of one 4x batch and DDP's mean over processes gives that of one batch of all processes' items. weights: 0 for
    a stand-in micro-batch (a process with no examples left in a short last batch still joins DDP's reduction).
    scaler: fp16's GradScaler, or None. cheap_dropout: CPU dropout masks from tunesmith.dropout (train.fast_dropout).
    """
    weights = weights or [1.0] * len(batches)
    counts = torch.tensor([objective.count(b) * w for b, w in zip(batches, weights)], dtype=torch.float64)
    world = accelerator.num_processes
    items = accelerator.reduce(counts.sum().to(accelerator.device), "sum") if world > 1 else counts.sum()
    items = max(float(items), 1e-12)
    total = torch.zeros((), device=accelerator.device)
    for k, (batch, w) in enumerate(zip(batches, weights)):
        last = k == len(batches) - 1
        with accelerator.no_sync(model) if not last and world > 1 else nullcontext():
            with autocast(accelerator.device, mixed), CheapDropout() if cheap_dropout else nullcontext():
                loss = objective.loss(model, batch) * (w * world / items)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                accelerator.backward(loss)
        total += loss.detach() / world
    return total


def split_micro(shares: list[list[int]], weights: list[float], cap: int) -> tuple[list[list[int]], list[float]]:
    """Each micro-batch cut into pieces of at most `cap` examples (out-of-memory back-off): the same examples,
    so the same gradient, in smaller forward passes."""
    out, ws = [], []
    for idx, w in zip(shares, weights):
        for s in range(0, len(idx), cap):
            out.append(idx[s:s + cap])
            ws.append(w)
    return out, ws


def back_off(pieces: list[list[int]], cfg, say, error) -> int:
    """The micro-batch cap after an out-of-memory error in a step made of `pieces`: half the largest piece; raise
    at micro-batch 1."""
    biggest = max(len(p) for p in pieces)
    if biggest <= 1:
        raise TunesmithError(f"out of memory even at micro-batch 1 ({error}); use a smaller model, data.max_length "
                             f"or train.precision bf16, or adapt.method lora") from None
    safety.free_memory()
    cap = math.ceil(biggest / 2)
    say(f"out of memory at micro-batch {biggest}: continuing with micro-batches of {cap} and grad_accum "
        f"{cfg.grad_accum * math.ceil(cfg.batch_size / cap)} (the same {cfg.batch_size * cfg.grad_accum} examples "
        f"per optimizer step)")
    return cap


def grads_finite(model, loss: torch.Tensor, norm, scaler) -> bool:
    """Whether an optimizer step may be taken: a finite loss and (without fp16's scaler, which skips overflowed
    steps itself) a finite gradient norm. One host sync per step."""
    ok = torch.isfinite(loss)
    if scaler is None:
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        ok = ok & torch.isfinite(norm.to(ok.device))
    return bool(ok)


class OptimizerStep:
    """One optimizer step: `backward(group)` runs its micro-batches (this process's share of each), halving them
    after an out-of-memory error (the same examples, so the same gradient); `update(loss)` clips, then steps, or
    skips a step whose loss or gradient is not finite (the weights stay as they were)."""

    def __init__(self, objective, model, optimizer, scheduler, train: list[dict], cfg, accelerator, mixed: str):
        self.objective, self.model, self.optimizer, self.scheduler = objective, model, optimizer, scheduler
        self.train, self.cfg, self.accelerator, self.mixed = train, cfg, accelerator, mixed
        # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(accelerator.device.type) if mixed == "fp16" else None
        # train.fast_dropout: tunesmith.dropout's CPU masks (compiled models use inductor's own)
        self.cheap = cfg.fast_dropout and accelerator.device.type == "cpu" and not cfg.compile
        self.cap = cfg.batch_size              # examples per forward pass (lowered by out-of-memory back-off)

    def backward(self, group: list[list[int]]) -> tuple[torch.Tensor, list[tuple[list[int], float]]]:
        """(the step's mean loss, this process's examples of each micro-batch with their weight)."""
        acc = self.accelerator
        rank, world = acc.process_index, acc.num_processes
        shares = [idx[rank::world] for idx in group]             # this process's part of each micro-batch
        weights = [1.0 if mine else 0.0 for mine in shares]      # none left: a stand-in that weighs nothing
        shares = [mine or idx[:1] for mine, idx in zip(shares, group)]
        while True:
            pieces, piece_weights = split_micro(shares, weights, self.cap)
            batches = [send_to_device(self.objective.collate([self.train[i] for i in mine]), acc.device)
                       for mine in pieces]
            try:
                loss = accumulate(self.objective, self.model, batches, acc, self.mixed, piece_weights, self.scaler,
                                  self.cheap)
                return loss, list(zip(shares, weights))
            except Exception as e:
                if not safety.is_oom(e):
                    raise
                batches = None
                self.optimizer.zero_grad(set_to_none=True)
                self.cap = back_off(pieces, self.cfg, acc.print, e)

    def update(self, loss: torch.Tensor) -> bool:
        """Clip, step (or skip when not finite), advance the learning rate; True when the weights changed."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.cfg.max_grad_norm:
            norm = self.accelerator.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                    self.cfg.max_grad_norm)
        ok = grads_finite(self.model, loss, norm, self.scaler)
        if ok and self.scaler is not None:
            self.scaler.step(self.optimizer)
        elif ok:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ok


def skipped(state: State, loss: torch.Tensor, cfg, run, say) -> None:
    """Count and report a step skipped for a non-finite loss or gradient; raise after train.max_bad_steps in a row."""
    state.bad_steps, state.skipped = state.bad_steps + 1, state.skipped + 1
    run.log({"step": state.step + 1, "skipped_step": f"non-finite loss or gradient (loss {float(loss)})"})
    say(f"step {state.step + 1}: non-finite loss or gradient ({float(loss)}); step skipped "
        f"({state.bad_steps} in a row, train.max_bad_steps={cfg.max_bad_steps})")
    if state.bad_steps >= cfg.max_bad_steps:
        raise TunesmithError(
            f"training diverged: {state.bad_steps} optimizer steps in a row had a non-finite loss or "
            f"gradient (up to step {state.step + 1}); lower train.learning_rate, set train.max_grad_norm, "
            f"or use train.precision fp32/bf16. Checkpoints in {run.checkpoints} hold finite weights")


class Meter:
    """Throughput: the training loss, examples and tokens since the last log record (the window), and this
    session's totals (train, evaluation and checkpoint seconds, examples, tokens) for the summary record."""

    def __init__(self, world: int):
        self.world = world
        self.window = {"loss": 0.0, "steps": 0, "samples": 0, "tokens": 0, "time": time.perf_counter()}
        self.totals = {"train_seconds": time.perf_counter(), "eval_seconds": 0.0, "checkpoint_seconds": 0.0,
                       "samples": 0, "tokens": 0}

    def examples(self, mine: list[tuple[list[int], float]], lengths: list[int]) -> None:
        for idx, w in mine:
            n, tokens = len(idx) * w, sum(lengths[i] for i in idx) * w
            self.window["samples"] += n
            self.window["tokens"] += tokens
            self.totals["samples"] += n * self.world
            self.totals["tokens"] += tokens * self.world

    def stepped(self, loss: torch.Tensor) -> None:
        self.window["loss"] += loss                                   # no sync until we log
        self.window["steps"] += 1

    def record(self, accelerator, step: int, epoch: float, lr: float) -> dict | None:
        """The window as a metrics.jsonl record (mean loss over its steps, examples and tokens per second), then a
        new window; None when no step of the window was taken."""
        w = self.window
        if not w["steps"]:
            return None
        dt = time.perf_counter() - w["time"]
        loss_sum = accelerator.reduce(w["loss"], "sum") if self.world > 1 else w["loss"]
        self.window = {"loss": 0.0, "steps": 0, "samples": 0, "tokens": 0, "time": time.perf_counter()}
        return {"step": step, "epoch": epoch, "loss": float(loss_sum) / w["steps"], "lr": lr,
                "samples_per_s": w["samples"] * self.world / dt, "tokens_per_s": w["tokens"] * self.world / dt}

    def add(self, key: str, since: float) -> None:
        """Seconds since `since` (time.perf_counter) added to totals[key]."""
        self.totals[key] += time.perf_counter() - since

    def summary(self) -> dict:
        return {**self.totals, "train_seconds": time.perf_counter() - self.totals["train_seconds"]}
