"""fit(): the one training loop, for every task, adaptation method and trainer (fine-tuning, distillation).

Read top to bottom: schedule -> optimizer -> (resume) -> for each optimizer step: forward/backward over its
micro-batches, clip, step, log, evaluate, keep the best, checkpoint, stop early. Its parts (the schedule, one
optimizer step, the throughput meter) live in tunesmith/steps.py; resume, validation, the stop agreed by every
process and the end of training are below fit.
Faults (docs/faults.md): a step with a non-finite loss or gradient is skipped (train.max_bad_steps in a row stop
the run); out of memory halves the micro-batches of the step and keeps the examples per step; SIGTERM/Ctrl-C
commit a checkpoint and stop; a damaged checkpoint is skipped on resume, a damaged best/ keeps the final weights.
Data order is a pure function of (seed, epoch), so a checkpoint needs only the position, not a sampler.
The loop knows tasks only through the Task contract (tunesmith/tasks/base.py): length, evaluate, loggable, metrics;
what it minimises comes from an objective (collate, loss, count: the task itself unless a trainer gives another).
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from tunesmith import checkpoint, defaults, safety
from tunesmith.adapt import trainable_state
from tunesmith.curve import stop_line, verdict
from tunesmith.device import autocast
from tunesmith.metrics import better, improves
from tunesmith.selection.space import seconds as wall_seconds
from tunesmith.steps import Meter, OptimizerStep, Schedule, State, accumulate, optimizer_for, skipped

__all__ = ["fit", "State", "accumulate"]        # accumulate: its callers and tests import it from the loop


def fit(task, adapted, train, evalset, recipe, run, accelerator, mixed: str = "no", resume: bool = False,
        stop_flag: safety.StopFlag | None = None, objective=None, checkpoints: bool = True,
        span: tuple[int, int] | None = None) -> State:
    """Train `adapted.model` on encoded `train` features; evaluate on `evalset`; write into `run`.
    mixed: "no", "bf16" or "fp16" (tunesmith.device.choose_precision) for autocast. stop_flag: set by SIGTERM or
    Ctrl-C; checked after each optimizer step (a checkpoint, then safety.Interrupted). objective: what to minimise
    (collate, loss, count; tunesmith/steps.py); None: the task's own loss. checkpoints: False writes none (a
    federated client's round: the server keeps the weights). span: (offset, steps) of a longer learning-rate
    schedule this run is a piece of (a federated client's round; steps.Schedule); None: the run's own."""
    cfg, say = recipe.train, accelerator.print
    model = adapted.model
    if cfg.compile:
        model.compile()                 # in place: parameter names, and so checkpoints, stay as they are
    lengths = [task.length(f) for f in train]
    schedule = Schedule.of(cfg, len(train), span)
    total = schedule.total
    if schedule.auto and not resume:
        say(auto_plan(cfg, schedule, len(evalset or ()), recipe.direction))
    optimizer, scheduler = optimizer_for(adapted, recipe, schedule, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = OptimizerStep(objective or task, model, optimizer, scheduler, train, cfg, accelerator, mixed)
    state = resumed(run, model, optimizer, scheduler, accelerator) if resume else State()
    meter = Meter(accelerator.num_processes)
    validate = Validation(task, model, evalset, recipe, run, accelerator, mixed, adapted.trainable, state, meter,
                          schedule)
    clock = Clock(cfg.budget, state)
    # an early stop: "plateau" (train.patience) or "budget" (train.budget); a resumed run may have reached one
    why = "plateau" if evalset and validate.done() else "budget" if clock.spent() else None

    model.train()
    stop = why is not None
    with tqdm(total=total, initial=state.step, unit="step", dynamic_ncols=True, mininterval=1.0,
              disable=not accelerator.is_main_process, desc="train") as bar:
        while state.step < total and not stop:
            adapted.set_epoch(state.epoch)
            steps = schedule.epoch(cfg, lengths, state.epoch)
            for group in steps[state.position:]:
                loss, mine = step.backward(group)
                meter.examples(mine, lengths)
                if step.update(loss):
                    meter.stepped(loss)
                    state.bad_steps = 0
                else:
                    skipped(state, loss, cfg, run, say)     # raises after train.max_bad_steps in a row
                state.step += 1
                state.position += 1
                bar.update(1)

                if state.step % cfg.log_every == 0 or state.step == total:
                    record = meter.record(accelerator, state.step, round(state.epoch + state.position / len(steps), 4),
                                          scheduler.get_last_lr()[0])
                    if record:
                        run.log(record)
                        bar.set_description(f"train loss={record['loss']:.4f} {record['samples_per_s']:.0f} "
                                            f"samples/s")
                at_end = state.position == len(steps) or state.step == total
                if evalset and schedule.evaluates(state.step, state.position, len(steps)) and validate(bar):
                    why = why or "plateau"
                if at_end and state.position == len(steps):
                    state.epoch, state.position = state.epoch + 1, 0
                if clock.spent():
                    why = why or "budget"
                stop, signum = agreed_stop(why is not None or run.stop_reason is not None, stop_flag, accelerator)
                if checkpoints and (state.step % schedule.save_every == 0 or state.step == total or stop or signum):
                    t0 = time.perf_counter()
                    save_step(run, model, adapted.trainable, optimizer, scheduler, state, cfg, accelerator)
                    meter.add("checkpoint_seconds", t0)
                if signum:
                    raise safety.interrupted(signum, state.step, run.path)
                if stop or state.step >= total:
                    break
    ended = stop_line(why, cfg, state, schedule.per_epoch, schedule.auto, run.stop_reason)
    seen = verdict([(r["step"], r.get(cfg.metric)) for r in run.history if r.get("split") == "validation"],
                   cfg.metric, recipe.direction, cfg, schedule.auto, why) if evalset else None
    run.log({"step": state.step, "summary": True, **meter.summary(), "skipped_steps": state.skipped,
             **({"stopped": run.stop_reason} if run.stop_reason else {}), "ended": ended,
             **({"curve": seen} if seen else {})})
    if state.skipped:
        say(f"warning: {state.skipped} of {state.step} optimizer steps were skipped for a non-finite "
            f"loss or gradient")
    say(ended)
    if seen:
        say(seen["line"])
    run.note("training", {"ended": ended, "steps": state.step, "epochs": round(state.step / schedule.per_epoch, 2),
                          "best_step": state.best_step, "curve": seen})
    restore_best(run, accelerator.unwrap_model(model), state, cfg.metric, say)
    adapted.model = accelerator.unwrap_model(model)
    return state


def resumed(run, model, optimizer, scheduler, accelerator) -> State:
    """The state of the newest intact checkpoint, with model, optimizer, scheduler and RNGs restored from it; the
    log cut back to its step. No checkpoint yet: step 0."""
    say = accelerator.print
    for last in checkpoint.candidates(run.checkpoints, log=say):
        try:
            saved = checkpoint.load(last, accelerator.unwrap_model(model), optimizer, scheduler)
        except Exception as e:                       # unreadable though complete (a checkpoint without checksums)
            say(f"resume: skipping {last.name}: cannot be read ({type(e).__name__}: {e})")
            continue
        state = State(**{k: saved.get(k, f.default) for k, f in State.__dataclass_fields__.items()})
        run.truncate_log(state.step)
        say(f"resume: continuing from {last.name} (step {state.step}, epoch {state.epoch})")
        return state
    say("resume: no complete checkpoint yet, starting from step 0")
    run.truncate_log(0)
    return State()


class Validation:
    """Evaluation on the validation features: logged, the best kept in checkpoints/best, early stopping counted.
    A call returns True when early stopping says stop."""

    def __init__(self, task, model, evalset, recipe, run, accelerator, mixed, names, state: State, meter: Meter,
                 schedule: Schedule | None = None):
        self.task, self.model, self.evalset, self.run, self.names = task, model, evalset, run, names
        self.floor = schedule.floor if schedule else 0  # no early stop before this step (auto: train.min_steps)
        self.auto = bool(schedule and schedule.auto)    # improvements by a margin, ties broken by the loss
        self.accelerator, self.mixed, self.state, self.meter = accelerator, mixed, state, meter
        self.cfg, self.direction = recipe.train, recipe.direction
        self.batch_size = recipe.eval.batch_size    # lowered for evaluation alone after an out-of-memory error

    def scored(self, batch_size: int) -> dict:
        self.batch_size = batch_size
        return self.task.evaluate(self.model, self.evalset, batch_size)

    def __call__(self, bar) -> bool:
        acc, state, metric = self.accelerator, self.state, self.cfg.metric
        t0 = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), autocast(acc.device, self.mixed):
            result = safety.with_backoff(self.scored, self.batch_size, "evaluation", acc.print)
        self.model.train()
        value = result[metric]                      # the recipe checked it is one of the task's metrics
        seconds = time.perf_counter() - t0
        self.run.log({"step": state.step, "epoch": state.epoch, "split": "validation", **self.task.loggable(result),
                      "examples_per_s": round(len(self.evalset) / max(seconds, 1e-9), 2)})
        broken = [k for k in self.task.metrics if isinstance(result.get(k), float) and not math.isfinite(result[k])]
        if broken:
            acc.print(f"step {state.step}: validation {', '.join(broken)} not finite; not a best checkpoint")
        if not broken and self.improves(value, result):
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            state.best_loss = result.get("loss") if self.auto else None
            if acc.is_main_process and self.cfg.keep == "best":      # keep: last saves no best checkpoint
                weights = trainable_state(acc.unwrap_model(self.model), self.names)
                checkpoint.save(self.run.checkpoints / "best", weights, None, None, {"step": state.step, metric: value})
        else:
            state.bad_evals += 1
        best = "-" if state.best is None else f"{state.best:.4f}"
        bar.set_postfix_str(f"{metric}={value:.4f} best={best}", refresh=False)
        self.meter.add("eval_seconds", t0)          # with saving the best checkpoint
        return self.done()

    def improves(self, value: float, result: dict) -> bool:
        """A new best: under epochs: auto by defaults.min_delta, or a tie with the loss lower by LOSS_DELTA
        (metrics.improves); a number of epochs: any better value, as always."""
        state = self.state
        if not self.auto:
            return better(self.direction, value, state.best)
        delta = defaults.min_delta(self.cfg, self.direction, len(self.evalset))
        loss = result.get("loss") if self.cfg.metric != "loss" else None
        return improves(self.direction, value, state.best, delta, loss, state.best_loss, defaults.LOSS_DELTA)

    def done(self) -> bool:
        """Whether early stopping says stop: train.patience evaluations without improvement, past the floor."""
        state, patience = self.state, self.cfg.patience
        return patience is not None and state.bad_evals >= patience and state.step >= self.floor


def improvement(cfg, direction: str, held_out: int) -> str:
    """What counts as an improvement under auto, in words (defaults.min_delta)."""
    delta = defaults.min_delta(cfg, direction, held_out)
    way = "up" if direction == "max" else "down"
    tie = f", or equal and loss down by {defaults.LOSS_DELTA:g}" if cfg.metric != "loss" else ""
    return f"{way} by {delta:.3g} or more{tie}"


def auto_plan(cfg, schedule: Schedule, held_out: int, direction: str = "max") -> str:
    """The line that says how epochs: auto will decide (tunesmith/defaults.py chose the numbers)."""
    per = schedule.per_epoch / schedule.eval_every
    return (f"epochs: auto: until validation {cfg.metric} stops improving on {held_out:,} held-out rows (checkpoint "
            f"choice): an evaluation every {schedule.eval_every} steps ({per:.3g} per epoch of "
            f"{schedule.per_epoch}), patience {cfg.patience} evaluations"
            + f" (an improvement: {cfg.metric} {improvement(cfg, direction, held_out)})"
            + (f" after step {schedule.floor} (train.min_steps)" if schedule.floor else "")
            + f", at most train.max_epochs={cfg.max_epochs:g}" + (f" or train.budget={cfg.budget}" if cfg.budget
                                                                  else ""))


class Clock:
    """train.budget: training's wall time over every session (State.seconds, kept in checkpoints)."""

    def __init__(self, budget: str | None, state: State):
        self.limit = wall_seconds(budget) if budget else None
        self.state, self.start = state, time.monotonic() - state.seconds

    def spent(self) -> bool:
        """Update the state's seconds; True once the budget is used."""
        self.state.seconds = round(time.monotonic() - self.start, 3)
        return self.limit is not None and self.state.seconds >= self.limit


def agreed_stop(stop: bool, stop_flag, accelerator) -> tuple[bool, int | None]:
    """(stop, the signal to stop for) as every process sees them: callbacks run on the main process alone and a
    signal may reach one process, but all stop at the same step."""
    signum = stop_flag.signal if stop_flag else None
    if accelerator.num_processes > 1:
        device = accelerator.device
        stop = bool(accelerator.reduce(torch.tensor(float(stop), device=device), "sum") > 0)
        if stop_flag:
            signum = int(accelerator.reduce(torch.tensor(signum or 0, device=device), "max")) or None
    return stop, signum


def save_step(run, model, names, optimizer, scheduler, state: State, cfg, accelerator) -> None:
    """checkpoints/step-NNNNNNNN (the newest train.keep_checkpoints kept), written by the main process."""
    if accelerator.is_main_process:
        weights = trainable_state(accelerator.unwrap_model(model), names)
        checkpoint.save(run.checkpoints / f"step-{state.step:08d}", weights, optimizer, scheduler, vars(state))
        checkpoint.prune(run.checkpoints, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def restore_best(run, model, state: State, metric: str, say) -> None:
    """The best evaluation's weights back into `model`; a damaged best/ keeps the final weights (said why)."""
    best = run.checkpoints / "best"
    why = checkpoint.damage(best) if best.exists() else None
    if best.exists() and not why:
        try:
            checkpoint.load_model_state(model, best / "model.safetensors")
            say(f"best {metric} = {state.best:.4f} at step {state.best_step}; restored those weights")
        except Exception as e:
            why = f"cannot be read ({type(e).__name__}: {e})"
    if why:
        say(f"warning: {best} is damaged ({why}); keeping the final weights (step {state.step}) "
            f"instead of the best (step {state.best_step})")
