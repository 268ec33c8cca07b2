"""Two workers share one study through a real PostgreSQL server: every trial is finished once, none is lost or
run twice, and a worker killed mid-trial leaves its trial failed and retried by the other (Optuna heartbeat).
The server: $TUNESMITH_TEST_POSTGRES (set by .ci/run), else one started here from Debian's postgresql."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml
from conftest import recipe_dict, write_reviews

pytest.importorskip("optuna")
pytest.importorskip("psycopg", reason="the postgres extra: pip install 'tunesmith[postgres]'")


@pytest.fixture(scope="module")
def postgres_url():
    if os.environ.get("TUNESMITH_TEST_POSTGRES"):
        yield os.environ["TUNESMITH_TEST_POSTGRES"]
        return
    import pgserver

    root = tempfile.mkdtemp(prefix="tunesmith-pg-")          # under /tmp: the postgres user can reach it
    try:
        url = pgserver.start(root)
    except (RuntimeError, OSError) as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server could be started: {e}")
    yield url
    pgserver.stop(root)
    shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_study_and_retry_a_killed_workers_trial(tiny_bert, tmp_path, postgres_url):
    import optuna

    from tunesmith.selection.search import storage_url

    data = write_reviews(tmp_path / "r.csv", n=100)
    recipe = tmp_path / "s.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(
        tiny_bert, data, train={"epochs": 3, "log_every": 5},
        search={"trials": 3, "pruner": "none", "heartbeat": 1,
                "space": {"train.learning_rate": {"low": 1e-3, "high": 5e-3, "log": True}}})))
    study, folder = f"pg-{uuid.uuid4().hex[:8]}", tmp_path / "study"
    cmd = [sys.executable, "-m", "tunesmith", "search", str(recipe), "--storage", postgres_url,
           "--study", study, "--dir", str(folder)]
    a = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    b = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    storage = optuna.storages.RDBStorage(storage_url(postgres_url, folder))
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline and a.poll() is None:   # a's trial, once it is training
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
        except KeyError:                                                   # not created yet
            trials = []
        for t in trials:
            if t.user_attrs.get("worker", "").endswith(f":{a.pid}") and t.state.name == "RUNNING" \
                    and (folder / t.user_attrs["run_dir"] / "metrics.jsonl").exists():
                victim = t.number
        time.sleep(0.05)
    assert victim is not None, "worker a never started a trial"
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    _, err = b.communicate(timeout=300)
    assert b.returncode == 0, err

    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    assert by_number[victim].state.name == "FAIL"                          # marked by the heartbeat
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert [t.state.name for t in retries] == ["COMPLETE"] and retries[0].params == by_number[victim].params
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) >= 3 and all(t.state.name in ("COMPLETE", "FAIL") for t in trials)   # none left behind
    dirs = [t.user_attrs["run_dir"] for t in complete]
    assert len(set(dirs)) == len(dirs)                                     # one run folder per trial
    for t in complete:                                                     # each ran once, start to end
        steps = [json.loads(x)["step"] for x in (folder / t.user_attrs["run_dir"] / "metrics.jsonl").read_text()
                 .splitlines() if '"validation"' in x]
        assert steps == sorted(set(steps)) and len(steps) == 3
        assert (folder / t.user_attrs["run_dir"] / "eval.json").exists()
    workers = {t.user_attrs["worker"] for t in complete}
    assert any(w.endswith(f":{b.pid}") for w in workers)
