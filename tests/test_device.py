"""Device, precision and thread choice (tunesmith/device.py)."""
import subprocess
import sys
import time

import tunesmith.device as device


def test_threads_take_the_free_cores_and_the_recipe_overrides(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(device, "_cgroup_cores", lambda: None)
    for busy, expected in ((0, 4), (1, 3), (3, 1), (9, 1)):
        monkeypatch.setattr(device, "busy_elsewhere", lambda busy=busy: float(busy))
        n, why = device.choose_threads(None)
        assert n == expected and f"{busy:g} busy elsewhere" in why
    monkeypatch.setattr(device, "busy_elsewhere", lambda: 0.0)
    assert device.choose_threads(None, processes=2)[0] == 2            # two DDP processes share the cores
    monkeypatch.setattr(device, "_cgroup_cores", lambda: 2.5)           # a container's quota caps them
    assert device.choose_threads(None)[0] == 2
    assert device.choose_threads(6) == (6, "6 (train.threads)")


def test_a_busy_process_is_seen():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert device.busy_elsewhere(samples=9) >= 1
    finally:
        spin.kill()
        spin.wait()


def test_fsdp_is_refused_on_a_cpu_only(monkeypatch):
    """accelerate enters FSDP only for GPU-type process groups: on a CPU `accelerate launch --use_fsdp` would be plain
    DDP (fsdp_version 2) or an error deep in accelerate's plugin (version 1); tunesmith says so in one line."""
    import pytest
    import torch

    from tunesmith.errors import TunesmithError

    device.check_sharding(torch.device("cpu"))                          # no FSDP asked: nothing to say
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TunesmithError, match="FSDP needs GPUs.*torchrun --nproc_per_node"):
        device.check_sharding(torch.device("cpu"))
    device.check_sharding(torch.device("cuda"))                         # GPUs: accelerate's FSDP path, untouched
