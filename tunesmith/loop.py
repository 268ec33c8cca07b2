"""fit(): the one training loop, for every task and every adaptation method.

Read top to bottom: plan batches -> optimizer and schedule -> (resume) -> for each optimizer step:
forward/backward over its micro-batches, clip, step, log, evaluate, keep the best, checkpoint, stop early.
Faults (docs/faults.md): a step with a non-finite loss or gradient is skipped (train.max_bad_steps in a row stop
the run); out of memory halves the micro-batches of the step and keeps the examples per step; SIGTERM/Ctrl-C
commit a checkpoint and stop; a damaged checkpoint is skipped on resume, a damaged best/ keeps the final weights.
Data order is a pure function of (seed, epoch), so a checkpoint needs only the position, not a sampler.
The loop knows tasks only through the Task contract (tunesmith/tasks/base.py): collate, loss, count, evaluate.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tunesmith import checkpoint, safety
from tunesmith.adapt import trainable_state
from tunesmith.device import autocast
from tunesmith.dropout import CheapDropout
from tunesmith.errors import TunesmithError
from tunesmith.metrics import better


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


def accumulate(task, model, batches: list[dict], accelerator, mixed: str = "no", weights: list[float] | None = None,
               scaler=None, cheap_dropout: bool = False):
    """Forward and backward over one optimizer step's micro-batches; returns the step's mean loss (a tensor).

    Each micro-batch's loss is a sum over its items (examples or label tokens, `task.count`); all are divided by
    the items of the whole step, summed over micro-batches and processes, so grad_accum=4 gives the gradient of
    one 4x batch and DDP's mean over processes gives that of one batch of all processes' items. weights: 0 for
    a stand-in micro-batch (a process with no examples left in a short last batch still joins DDP's reduction).
    scaler: fp16's GradScaler, or None. cheap_dropout: CPU dropout masks from tunesmith.dropout (train.fast_dropout).
    """
    weights = weights or [1.0] * len(batches)
    counts = torch.tensor([task.count(b) * w for b, w in zip(batches, weights)], dtype=torch.float64)
    world = accelerator.num_processes
    items = accelerator.reduce(counts.sum().to(accelerator.device), "sum") if world > 1 else counts.sum()
    items = max(float(items), 1e-12)
    total = torch.zeros((), device=accelerator.device)
    for k, (batch, w) in enumerate(zip(batches, weights)):
        last = k == len(batches) - 1
        with accelerator.no_sync(model) if not last and world > 1 else nullcontext():
            with autocast(accelerator.device, mixed), CheapDropout() if cheap_dropout else nullcontext():
                loss = task.loss(model, batch) * (w * world / items)
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


@dataclass
class State:
    step: int = 0              # optimizer steps done
    epoch: int = 0
    position: int = 0          # optimizer steps done within the epoch
    best: float | None = None  # best value of the selection metric
    best_step: int = 0
    bad_evals: int = 0         # evaluations since the last improvement (early stopping)
    bad_steps: int = 0         # optimizer steps in a row skipped for a non-finite loss or gradient
    skipped: int = 0           # optimizer steps skipped in all


def grads_finite(model, loss: torch.Tensor, norm, scaler) -> bool:
    """Whether an optimizer step may be taken: a finite loss and (without fp16's scaler, which skips overflowed
    steps itself) a finite gradient norm. One host sync per step."""
    ok = torch.isfinite(loss)
    if scaler is None:
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        ok = ok & torch.isfinite(norm.to(ok.device))
    return bool(ok)


def fit(task, adapted, train, evalset, recipe, run, accelerator, mixed: str = "no", resume: bool = False,
        stop_flag: safety.StopFlag | None = None) -> State:
    """Train `adapted.model` on encoded `train` features; evaluate on `evalset`; write into `run`.
    mixed: "no", "bf16" or "fp16" (tunesmith.device.choose_precision) for autocast. stop_flag: set by SIGTERM or
    Ctrl-C; checked after each optimizer step (a checkpoint, then safety.Interrupted)."""
    from accelerate.utils import send_to_device

    cfg = recipe.train
    model = adapted.model
    if cfg.compile:
        model.compile()                 # in place: parameter names, and so checkpoints, stay as they are
    task.pad_multiple = cfg.pad_multiple or (16 if accelerator.device.type == "cuda" else 1)
    lengths = [task.length(f) for f in train]
    micro = math.ceil(len(train) / cfg.batch_size)            # micro-batches per epoch
    per_epoch = math.ceil(micro / cfg.grad_accum)             # optimizer steps per epoch
    asked = math.ceil(cfg.epochs * per_epoch)                 # optimizer steps of train.epochs
    total = cfg.max_steps or max(asked, cfg.min_steps)
    if total > asked and not cfg.max_steps and not resume:
        accelerator.print(f"train: {cfg.epochs:g} epoch(s) are {asked} optimizer steps, fewer than train.min_steps: "
                          f"training {total} steps ({total / per_epoch:.1f} epochs)")
    metric, direction = cfg.metric, recipe.direction
    warmup = int(cfg.warmup) if cfg.warmup >= 1 else round(cfg.warmup * total)
    eval_every = cfg.eval_every or per_epoch
    save_every = cfg.save_every or eval_every

    groups = adapted.param_groups(cfg.learning_rate, cfg.weight_decay, recipe.adapt.layer_lr_decay)
    fused = accelerator.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused)
    from transformers import get_scheduler
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)
    names = adapted.trainable
    # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(accelerator.device.type) if mixed == "fp16" else None
    cheap = cfg.fast_dropout and accelerator.device.type == "cpu" and not cfg.compile   # compiled: inductor's own

    state = State()
    for last in checkpoint.candidates(run.checkpoints, log=accelerator.print) if resume else ():
        try:
            saved = checkpoint.load(last, accelerator.unwrap_model(model), optimizer, scheduler)
        except Exception as e:                       # unreadable though complete (a checkpoint without checksums)
            accelerator.print(f"resume: skipping {last.name}: cannot be read ({type(e).__name__}: {e})")
            continue
        state = State(**{k: saved.get(k, f.default) for k, f in State.__dataclass_fields__.items()})
        run.truncate_log(state.step)
        accelerator.print(f"resume: continuing from {last.name} (step {state.step}, epoch {state.epoch})")
        break
    else:
        if resume:
            accelerator.print("resume: no complete checkpoint yet, starting from step 0")
            run.truncate_log(0)
    eval_batch = recipe.eval.batch_size             # lowered for evaluation alone after an out-of-memory error

    def save_best(value: float) -> None:
        if accelerator.is_main_process:
            checkpoint.save(run.checkpoints / "best", trainable_state(accelerator.unwrap_model(model), names),
                            None, None, {"step": state.step, metric: value})

    def evaluate() -> bool:
        """Evaluate, keep the best; True when early stopping says stop."""
        t0 = time.perf_counter()
        model.eval()

        def scored(batch_size):
            nonlocal eval_batch
            eval_batch = batch_size
            return task.evaluate(model, evalset, batch_size)

        with torch.no_grad(), autocast(accelerator.device, mixed):
            result = safety.with_backoff(scored, eval_batch, "evaluation", accelerator.print)
        model.train()
        value = result[metric]                      # the recipe checked it is one of the task's metrics
        seconds = time.perf_counter() - t0
        run.log({"step": state.step, "epoch": state.epoch, "split": "validation", **task.loggable(result),
                 "examples_per_s": round(len(evalset) / max(seconds, 1e-9), 2)})
        broken = [k for k in task.metrics if isinstance(result.get(k), float) and not math.isfinite(result[k])]
        if broken:
            accelerator.print(f"step {state.step}: validation {', '.join(broken)} not finite; not a best checkpoint")
        if not broken and better(direction, value, state.best):
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            save_best(value)
        else:
            state.bad_evals += 1
        best = "-" if state.best is None else f"{state.best:.4f}"
        bar.set_postfix_str(f"{metric}={value:.4f} best={best}", refresh=False)
        totals["eval_seconds"] += time.perf_counter() - t0     # with saving the best checkpoint
        return cfg.patience is not None and state.bad_evals >= cfg.patience

    model.train()
    bar = tqdm(total=total, initial=state.step, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not accelerator.is_main_process, desc="train")
    window = {"loss": 0.0, "steps": 0, "samples": 0, "tokens": 0, "time": time.perf_counter()}
    totals = {"train_seconds": time.perf_counter(), "eval_seconds": 0.0, "checkpoint_seconds": 0.0,
              "samples": 0, "tokens": 0}
    stop = False
    cap = cfg.batch_size                            # examples per forward pass (lowered by out-of-memory back-off)
    rank, world = accelerator.process_index, accelerator.num_processes
    while state.step < total and not stop:
        adapted.set_epoch(state.epoch)
        batches = plan(lengths, cfg.batch_size, cfg.seed, state.epoch, cfg.group_by_length)
        steps = [batches[s:s + cfg.grad_accum] for s in range(0, len(batches), cfg.grad_accum)]
        for group in steps[state.position:]:
            shares = [idx[rank::world] for idx in group]             # this process's part of each micro-batch
            weights = [1.0 if mine else 0.0 for mine in shares]      # none left: a stand-in that weighs nothing
            shares = [mine or idx[:1] for mine, idx in zip(shares, group)]
            while True:
                pieces, piece_weights = split_micro(shares, weights, cap)
                batches = [send_to_device(task.collate([train[i] for i in mine]), accelerator.device)
                           for mine in pieces]
                try:
                    loss = accumulate(task, model, batches, accelerator, mixed, piece_weights, scaler, cheap)
                    break
                except Exception as e:
                    if not safety.is_oom(e):
                        raise
                    batches = None
                    optimizer.zero_grad(set_to_none=True)
                    cap = back_off(pieces, cfg, accelerator.print, e)
            for mine, w in zip(shares, weights):
                n, tokens = len(mine) * w, sum(lengths[i] for i in mine) * w
                window["samples"] += n
                window["tokens"] += tokens
                totals["samples"] += n * world
                totals["tokens"] += tokens * world
            if scaler is not None:
                scaler.unscale_(optimizer)
            norm = None
            if cfg.max_grad_norm:
                norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   cfg.max_grad_norm)
            if grads_finite(model, loss, norm, scaler):
                window["loss"] += loss                                   # no sync until we log
                window["steps"] += 1
                state.bad_steps = 0
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            else:                                   # skipped: the weights stay as they were
                if scaler is not None:
                    scaler.update()
                state.bad_steps, state.skipped = state.bad_steps + 1, state.skipped + 1
                run.log({"step": state.step + 1, "skipped_step": f"non-finite loss or gradient (loss {float(loss)})"})
                accelerator.print(f"step {state.step + 1}: non-finite loss or gradient ({float(loss)}); step skipped "
                                  f"({state.bad_steps} in a row, train.max_bad_steps={cfg.max_bad_steps})")
                if state.bad_steps >= cfg.max_bad_steps:
                    bar.close()
                    raise TunesmithError(
                        f"training diverged: {state.bad_steps} optimizer steps in a row had a non-finite loss or "
                        f"gradient (up to step {state.step + 1}); lower train.learning_rate, set train.max_grad_norm, "
                        f"or use train.precision fp32/bf16. Checkpoints in {run.checkpoints} hold finite weights")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.position += 1
            bar.update(1)

            if (state.step % cfg.log_every == 0 or state.step == total) and window["steps"]:
                dt = time.perf_counter() - window["time"]
                loss_sum = accelerator.reduce(window["loss"], "sum") if world > 1 else window["loss"]
                loss_avg = float(loss_sum) / window["steps"]          # mean over the window's steps
                run.log({"step": state.step, "epoch": round(state.epoch + state.position / len(steps), 4),
                         "loss": loss_avg, "lr": scheduler.get_last_lr()[0],
                         "samples_per_s": window["samples"] * world / dt, "tokens_per_s": window["tokens"] * world / dt})
                bar.set_description(f"train loss={loss_avg:.4f} {window['samples'] * world / dt:.0f} samples/s")
                window.update(loss=0.0, steps=0, samples=0, tokens=0, time=time.perf_counter())
            at_end = state.position == len(steps) or state.step == total
            if evalset and (state.step % eval_every == 0 or at_end):
                stop = evaluate()
            if at_end and state.position == len(steps):
                state.epoch, state.position = state.epoch + 1, 0
            stop = stop or run.stop_reason is not None            # a callback raised StopTraining
            if world > 1:                                # callbacks run on the main process: all stop together
                stop = bool(accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum") > 0)
            signum = stop_flag.signal if stop_flag else None
            if world > 1 and stop_flag:             # every process stops at the same step
                signum = int(accelerator.reduce(torch.tensor(signum or 0, device=accelerator.device), "max")) or None
            if state.step % save_every == 0 or state.step == total or stop or signum:
                t0 = time.perf_counter()
                if accelerator.is_main_process:
                    checkpoint.save(run.checkpoints / f"step-{state.step:08d}",
                                    trainable_state(accelerator.unwrap_model(model), names),
                                    optimizer, scheduler, vars(state))
                    checkpoint.prune(run.checkpoints, cfg.keep_checkpoints)
                accelerator.wait_for_everyone()
                totals["checkpoint_seconds"] += time.perf_counter() - t0
            if signum:
                bar.close()
                raise safety.interrupted(signum, state.step, run.path)
            if stop or state.step >= total:
                break
    bar.close()
    totals["train_seconds"] = time.perf_counter() - totals["train_seconds"]   # this session, evals included
    run.log({"step": state.step, "summary": True, **totals, "skipped_steps": state.skipped,
             **({"stopped": run.stop_reason} if run.stop_reason else {})})
    if state.skipped:
        accelerator.print(f"warning: {state.skipped} of {state.step} optimizer steps were skipped for a non-finite "
                          f"loss or gradient")
    if run.stop_reason:
        accelerator.print(f"stopped by a callback: {run.stop_reason}")
    elif stop:
        accelerator.print(f"early stopping: no improvement in {metric} for {cfg.patience} evaluations")
    best = run.checkpoints / "best"
    why = checkpoint.damage(best) if best.exists() else None
    if best.exists() and not why:
        try:
            checkpoint.load_model_state(accelerator.unwrap_model(model), best / "model.safetensors")
            accelerator.print(f"best {metric} = {state.best:.4f} at step {state.best_step}; restored those weights")
        except Exception as e:
            why = f"cannot be read ({type(e).__name__}: {e})"
    if why:
        accelerator.print(f"warning: {best} is damaged ({why}); keeping the final weights (step {state.step}) "
                          f"instead of the best (step {state.best_step})")
    adapted.model = accelerator.unwrap_model(model)
    return state

