"""What a run saw, in words: why training stopped, and what its validation curve says about the epochs chosen.

Pure functions of numbers (no torch), so the loop prints them and tests feed them constructed curves.
  stop_line(why, ...)   one line: the plateau (since when), the cap (train.max_epochs / max_steps / epochs), the
                        time budget, or a callback
  verdict(points, ...)  {"kind", "line", "key"} when the curve was still improving at its last evaluation (likely
                        undertrained) or fell well after its best (overfitting), else None
"""
from __future__ import annotations

import math

FALL = 0.05     # relative: a curve ending this much worse than its best "fell well" (accuracy 0.90 -> 0.85)


def _better(direction: str, new: float, old: float) -> bool:
    return new > old if direction == "max" else new < old


def stop_line(why: str | None, cfg, state, per_epoch: int, auto: bool, callback: str | None = None) -> str:
    """Why training ended. why: "plateau", "budget" or None (ran to its end); callback: a callback's reason."""
    epoch = state.step / max(per_epoch, 1)
    if callback:
        return f"stopped by a callback: {callback}"
    if why == "plateau":
        since = state.best_step / max(per_epoch, 1)
        return (f"stopped: validation {cfg.metric} has not improved for {state.bad_evals} evaluations since epoch "
                f"{since:.1f} (step {state.best_step}); train.patience={cfg.patience}")
    if why == "budget":
        return f"stopped: time budget train.budget={cfg.budget} used at step {state.step} (epoch {epoch:.1f})"
    if cfg.max_steps:
        return f"stopped: reached train.max_steps={cfg.max_steps}"
    if auto:
        return f"stopped: reached train.max_epochs={cfg.max_epochs:g} ({state.step} steps)"
    return f"stopped: trained train.epochs={cfg.epochs:g} ({state.step} steps)"


def _key(why: str | None, cfg, auto: bool) -> tuple[str, str]:
    """(the recipe key that lengthens training, its advice) for a run that ended undertrained."""
    if why == "budget":
        return "train.budget", "raise train.budget"
    if cfg.max_steps:
        return "train.max_steps", "raise train.max_steps or drop it for epochs: auto"
    if auto:
        return "train.max_epochs", "raise train.max_epochs"
    return "train.epochs", "raise train.epochs or use epochs: auto"


def verdict(points: list[tuple[int, float]], metric: str, direction: str, cfg, auto: bool,
            why: str | None = None) -> dict | None:
    """The curve's one-line diagnosis, or None. points: (step, value) of each validation, in order; direction:
    "max" or "min"; why: how training stopped (stop_line's). Under epochs: auto a fall after the best is what
    stopped training and the best was restored, so only an unfinished rise is reported."""
    points = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(points) < 2:
        return None
    values = [v for _, v in points]
    best = 0
    for i, v in enumerate(values):
        if _better(direction, v, values[best]):
            best = i
    last, prev = values[-1], values[-2]
    word = "rising" if direction == "max" else "falling"
    if best == len(values) - 1 and _better(direction, last, prev):
        key, advice = _key(why, cfg, auto)
        return {"kind": "undertrained", "key": key, "step": points[-1][0],
                "line": f"likely undertrained: validation {metric} still {word} at the last evaluation "
                        f"({prev:.4g} -> {last:.4g}); {advice}"}
    fell = abs(last - values[best]) > FALL * max(abs(values[best]), 1e-12)
    after = values[best + 1:]
    if auto or not after or not fell or any(not _better(direction, values[best], v) for v in after):
        return None
    moved = "fell" if direction == "max" else "rose"
    key = "train.max_steps" if cfg.max_steps else "train.epochs"
    return {"kind": "overfitting", "key": key, "step": points[best][0],
            "line": f"overfitting after step {points[best][0]}: validation {metric} {moved} from "
                    f"{values[best]:.4g} to {last:.4g}; lower {key} or use epochs: auto"}
