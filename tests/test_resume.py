"""Exact resume: a run SIGKILLed at a random step and resumed ends bitwise equal to an uninterrupted one."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
import yaml
from conftest import recipe_dict, tunesmith, write_reviews
from safetensors.torch import load_file


def tensors_equal(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    bad = [k for k in x if not torch.equal(x[k], y[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def last_step(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for x in path.read_text().splitlines():
        try:
            steps.append(json.loads(x).get("step", 0))
        except json.JSONDecodeError:        # the last line, read while the trainer writes it
            pass
    return max(steps, default=0)


def kill_and_resume(tmp_path, tiny_bert, train_cfg: dict) -> tuple:
    """Train `train_cfg` whole, then again SIGKILLed at a random step and resumed; assert both end bitwise equal.
    Returns (the whole run's folder, its last step)."""
    data = write_reviews(tmp_path / "r.csv", n=300)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_bert, data, train=train_cfg)))

    whole = tmp_path / "whole"
    out = tunesmith("train", recipe, "--run-dir", whole)
    assert out.returncode == 0, out.stderr
    total = last_step(whole)

    killed = tmp_path / "killed"
    # a new kill point each run, from a seed that is printed (and shown on failure): KILL_SEED=N replays it
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 1_000_000))
    kill_at = random.Random(seed).randint(5, total - 8)
    print(f"KILL_SEED={seed}: SIGKILL after step {kill_at}")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(recipe), "--run-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while last_step(killed) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reached = last_step(killed)
    assert reached < total, f"run finished before the kill (KILL_SEED={seed}, kill_at={kill_at})"

    # a checkpoint folder that never got its marker must be skipped, with a reason
    fake = killed / "checkpoints" / "step-99999999"
    fake.mkdir(parents=True)
    (fake / "model.safetensors").write_bytes(b"partial")

    out = tunesmith("train", "--resume", killed)
    assert out.returncode == 0, out.stderr
    assert "skipping step-99999999: no COMMITTED marker" in out.stdout
    assert "resume: continuing from step-" in out.stdout, out.stdout
    assert last_step(killed) == total

    final = f"step-{total:08d}"
    tensors_equal(whole / "checkpoints" / final / "model.safetensors",
                  killed / "checkpoints" / final / "model.safetensors")
    tensors_equal(whole / "checkpoints" / final / "optimizer.safetensors",
                  killed / "checkpoints" / final / "optimizer.safetensors")
    tensors_equal(whole / "model" / "model.safetensors", killed / "model" / "model.safetensors")
    a, b = (json.loads((d / "eval.json").read_text()) for d in (whole, killed))
    assert a == b
    # the log has no steps from the killed process after its last checkpoint: each step once
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x) and "split" not in json.loads(x)]
    assert steps == sorted(set(steps)) and steps[-1] == total, (kill_at, reached)
    ended = [json.loads((d / "run.json").read_text())["training"]["ended"] for d in (whole, killed)]
    assert ended[0] == ended[1]
    return whole, total


def test_sigkill_and_resume_is_bitwise_equal(tiny_bert, tmp_path):
    # dropout on (RNG matters), grouped batches, grad accumulation, a checkpoint every 2 steps
    whole, total = kill_and_resume(tmp_path, tiny_bert, {
        "epochs": 6, "batch_size": 8, "grad_accum": 2, "save_every": 2, "eval_every": 5, "keep_checkpoints": 3,
        "learning_rate": 1e-3, "warmup": 0.1})
    assert total == 6 * 12   # 180 train rows / 8 = 23 micro-batches -> 12 optimizer steps per epoch


def test_sigkill_and_resume_under_epochs_auto_is_bitwise_equal(tiny_bert, tmp_path):
    """epochs: auto: the stop on a plateau (patience counted across the kill) and the schedule over
    train.max_epochs resume exactly."""
    whole, total = kill_and_resume(tmp_path, tiny_bert, {
        "epochs": "auto", "max_epochs": 30, "patience": 3, "batch_size": 8, "grad_accum": 2, "save_every": 2,
        "eval_every": 4, "keep_checkpoints": 3, "learning_rate": 1e-3, "warmup": 0.1})
    assert total < 30 * 12
    ended = json.loads((whole / "run.json").read_text())["training"]["ended"]
    assert ended.startswith("stopped: validation accuracy has not improved for 3 evaluations")
