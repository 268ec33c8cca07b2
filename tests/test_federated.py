"""`tunesmith federate` (issue 25, items 2-4): partitions, the weighted average, what is sent, a simulation end to end,
and a real federation (one Flower server process, client processes on localhost) with a client that dies."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import recipe_dict, write_reviews

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.federated.partition import describe, partition

pytest.importorskip("flwr")


# --- partitions ----------------------------------------------------------------------------------------------
def rows_and_keys(n=200):
    rows = [{"text": f"r{i}", "label": "a" if i % 4 else "b", "site": f"s{i % 3}"} for i in range(n)]
    return rows, [r["label"] for r in rows]


def test_iid_partition_is_balanced_complete_and_seeded():
    rows, keys = rows_and_keys()
    shards = partition(rows, keys, 4, "iid", seed=1)
    assert sorted(i for s in shards for i in s) == list(range(200))
    assert [len(s) for s in shards] == [50, 50, 50, 50]
    assert partition(rows, keys, 4, "iid", seed=1) == shards
    assert partition(rows, keys, 4, "iid", seed=2) != shards


def test_dirichlet_partition_skews_labels_and_leaves_no_client_empty():
    rows, keys = rows_and_keys()
    skewed = describe(partition(rows, keys, 4, "dirichlet:0.1", seed=0), keys)
    even = describe(partition(rows, keys, 4, "dirichlet:1000", seed=0), keys)
    assert sum(d["rows"] for d in skewed) == 200 and all(d["rows"] > 0 for d in skewed)

    def share_b(d):
        return d["classes"].get("b", 0) / d["rows"]

    spread = max(map(share_b, skewed)) - min(map(share_b, skewed))
    assert spread > 0.4 > max(map(share_b, even)) - min(map(share_b, even))
    assert partition(rows, keys, 4, "dirichlet:0.1", seed=0) == partition(rows, keys, 4, "dirichlet:0.1", seed=0)


def test_by_column_partition_is_one_client_per_value():
    rows, keys = rows_and_keys(30)
    shards = partition(rows, keys, 3, "by:site", seed=0)
    assert [{rows[i]["site"] for i in s} for s in shards] == [{"s0"}, {"s1"}, {"s2"}]
    with pytest.raises(TunesmithError, match="give --clients 3"):
        partition(rows, keys, 2, "by:site", seed=0)
    for bad in ("dirichlet:0", "dirichlet:x", "by:", "shards"):
        with pytest.raises(TunesmithError, match="--partition"):
            partition(rows, keys, 2, bad, seed=0)


# --- aggregation -------------------------------------------------------------------------------------------
def test_aggregation_is_the_row_weighted_average_and_needs_min_clients():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from tunesmith.federated.server import make_strategy

    said = []
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    board = SimpleNamespace(local=SimpleNamespace(get=lambda: start, bytes=lambda: 0), say=said.append,
                            answered=lambda *a: None, evaluate=lambda *a: None, fit_config=lambda r: {})
    clients = [([a + rng.normal(size=a.shape).astype(np.float32) for a in start], n) for n in (10, 30, 60)]
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"loss": 1.0}))
               for arrays, n in clients]
    merged, _ = make_strategy(board, "fedavg", 0.0, 1.0, 3).aggregate_fit(1, results, [])
    for k, got in enumerate(parameters_to_ndarrays(merged)):
        expected = sum(arrays[k] * n for arrays, n in clients) / 100
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert make_strategy(board, "fedprox", 0.1, 1.0, 3).aggregate_fit(1, results[:2], [RuntimeError("gone")]) \
        == (None, {})
    assert any("fewer than --min-clients 3" in s for s in said) and any("gone" in s for s in said)


# --- the client: what it sends, FedProx's term -------------------------------------------------------------
@pytest.fixture
def lora_site(tiny_bert, tmp_path):
    import torch

    from tunesmith.federated.site import Local, Site
    from tunesmith.pipeline import Trainer, prepare
    from tunesmith.recipe import load

    recipe = load(recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=60),
                              adapt={"method": "lora", "lora": {"r": 2, "target_modules": ["query", "value"]}},
                              train={"epochs": 1}))
    task, loaded = prepare(Trainer(), recipe, torch.device("cpu"))
    return Site(recipe, loaded.tables["train"].rows, tmp_path / "client", Local(task, recipe))


def test_a_client_sends_only_the_trainable_parameters(lora_site):
    from flwr.common import ndarrays_to_parameters

    from tunesmith.federated.site import flower_client

    local = lora_site.local
    model = local.model
    arrays, rows, metrics = flower_client(lora_site).fit(local.get(), {"round": 1, "labels": io.dumps(["neg", "pos"])})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert rows == len(lora_site.rows) and set(local.names) == set(trainable)
    assert (lora_site.folder / "metrics.jsonl").exists() and not (lora_site.folder / "checkpoints").exists()
    assert all("lora_" in n or "classifier" in n for n in local.names)
    sent = sum(a.nbytes for a in arrays)
    assert sent == sum(p.numel() * 4 for p in trainable.values()) == metrics["bytes"]
    assert sent * 5 < sum(p.numel() * 4 for p in model.parameters())
    wire = sum(len(t) for t in ndarrays_to_parameters(arrays).tensors)
    assert sent <= wire < sent + 200 * len(arrays)           # the serialized arrays: data plus small headers


def test_fedprox_adds_the_proximal_term_to_the_loss(lora_site):
    import torch

    from tunesmith.federated.site import Proximal

    local, task = lora_site.local, lora_site.local.task
    batch = task.collate(lora_site.features[:8])
    prox = Proximal(task, local.model, local.names, mu=0.5)
    with torch.no_grad():
        assert torch.isclose(prox.loss(local.model, batch), task.loss(local.model, batch))
        params = dict(local.model.named_parameters())
        params[local.names[0]].add_(0.1)
        drift = 0.01 * params[local.names[0]].numel()
        assert torch.isclose(prox.loss(local.model, batch) - task.loss(local.model, batch),
                             torch.tensor(0.25 * drift * len(batch["labels"])), rtol=1e-3)


# --- one learning-rate schedule over the federation ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_pieces_of_a_span_follow_the_one_schedule(kind):
    import torch

    from tunesmith.steps import Schedule, optimizer_for

    cfg = SimpleNamespace(batch_size=4, grad_accum=1, epochs=1, max_epochs=1, max_steps=None, warmup=0.25,
                          eval_every=None, save_every=None, min_steps=0, learning_rate=1e-3, weight_decay=0.0,
                          scheduler=kind)
    recipe = SimpleNamespace(train=cfg, adapt=SimpleNamespace(layer_lr_decay=None))

    def rates(examples, span, steps):
        weight = torch.nn.Parameter(torch.zeros(2))
        adapted = SimpleNamespace(param_groups=lambda lr, wd, decay: [{"params": [weight], "lr": lr}])
        optimizer, scheduler = optimizer_for(adapted, recipe, Schedule.of(cfg, examples, span), torch.device("meta"))
        seen = [scheduler.get_last_lr()[0]]
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            seen.append(scheduler.get_last_lr()[0])
        return seen

    whole = rates(80, None, 20)                    # one run of 20 steps; a round: 20 rows, 5 steps, of 4 rounds
    pieces = [rates(20, (r * 5, 20), 5) for r in range(4)]
    assert [p[0] for p in pieces] + [pieces[-1][-1]] == pytest.approx(whole[::5])
    assert sum((p[1:] for p in pieces), []) == pytest.approx(whole[1:])
    assert pieces[1][0] == pytest.approx(1e-3) and pieces[1][0] >= pieces[1][-1]   # no warm-up after round 1
    assert rates(20, None, 5) != pytest.approx(pieces[0])      # a round on its own schedule: another warm-up and decay


def test_a_clients_second_round_continues_the_first_rounds_rates(lora_site):
    local = lora_site.local
    seen = []
    for round_ in (1, 2):
        lora_site.train(local.get(), round_, rounds=2)
        seen.append([r["lr"] for r in io.read_jsonl(lora_site.folder / "metrics.jsonl") if "lr" in r])
    steps = len(seen[0])
    assert steps >= 2 and len(seen[1]) == steps
    base, total = lora_site.recipe.train.learning_rate, 2 * steps     # linear, warmup 0, over both rounds
    assert seen[0] + seen[1] == pytest.approx([base * (total - s) / total for s in range(1, total + 1)])
    assert seen[1][0] < seen[0][-1]                   # round 2 takes up where round 1 ended, no restart


# --- simulation end to end ---------------------------------------------------------------------------------
def test_simulation_trains_a_run_folder_like_any_other(tiny_bert, tmp_path, capsys):
    import tunesmith as ts
    from tunesmith.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_bert, write_reviews(tmp_path / "reviews.csv", n=200),
                                                 train={"epochs": 3, "threads": 1})))
    run_dir = tmp_path / "run"
    assert main(["federate", str(recipe), "--clients", "3", "--rounds", "3", "--partition", "dirichlet:0.5",
                 "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "client 0:" in out and "round 3: validation accuracy" in out
    fed = io.read_json(run_dir / "federation.json")
    assert [r["round"] for r in fed["rounds"]] == [0, 1, 2, 3]
    assert all(r["answered"] == 3 and r["bytes_up"] >= 3 * fed["exchanged"]["bytes"] for r in fed["rounds"][1:])
    assert sum(d["rows"] for d in fed["partition"]) == io.read_json(run_dir / "data/splits.json")["rows"]["train"]
    assert fed["rounds"][-1]["accuracy"] > fed["rounds"][0]["accuracy"]      # it learns
    curve = [r for r in io.read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "validation"]
    assert [r["step"] for r in curve] == [0, 1, 2, 3]
    run = ts.Run(run_dir)
    assert run.made_by["command"] == "federate" and run.metrics["accuracy"] > 0.6
    assert run.load().predict(["a great moving film"])[0]["label"] in ("pos", "neg")
    assert ts.Run(run_dir).load().evaluate()["accuracy"] == pytest.approx(run.metrics["accuracy"])
    # no checkpoints: `train --resume` says so (one line, exit 1) and points to federate, never to an upgrade
    assert main(["train", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "cannot be resumed with `train --resume`" in err and "run `tunesmith federate` again" in err
    assert "upgrade" not in err
    # federating into that folder again is refused without offering a --resume that federate does not have
    assert main(["federate", str(recipe), "--clients", "3", "--rounds", "1", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "holds a run: give another --run-dir" in err and "--resume" not in err


def test_fedprox_simulation_runs_with_a_fraction_of_clients(tiny_bert, tmp_path):
    import tunesmith as ts

    data = write_reviews(tmp_path / "reviews.csv", n=80)
    run = ts.federate(recipe_dict(tiny_bert, data, train={"epochs": 3, "threads": 1}), clients=4, rounds=1,
                      fraction=0.5, strategy="fedprox", mu=10.0, run_dir=tmp_path / "run")
    fed = io.read_json(run.path / "federation.json")
    assert fed["strategy"] == "fedprox" and fed["mu"] == 10.0
    assert fed["rounds"][1]["asked"] == 2 and fed["rounds"][1]["answered"] == 2
    plain = ts.federate(recipe_dict(tiny_bert, data, train={"epochs": 3, "threads": 1}), clients=4, rounds=1,
                        fraction=0.5, strategy="fedavg", run_dir=tmp_path / "plain")
    assert io.read_json(plain.path / "federation.json")["rounds"][1]["answered"] == 2
    assert plain.metrics["loss"] != run.metrics["loss"]     # steps 2-3 of each client felt the proximal term


# --- real processes ----------------------------------------------------------------------------------------
SERVER = """
import os, sys
log = open(sys.argv[1], "w")
def opened(event, args):                      # every file this process opens, by any route (open, os.open)
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        log.write(os.path.abspath(os.fsdecode(args[0])) + "\\n")
        log.flush()
sys.addaudithook(opened)
from tunesmith.cli import main
sys.exit(main(sys.argv[2:]))
"""

DYING = """
import os, sys
from tunesmith.federated import site
def dies(self, arrays, round_, *rest):        # the round's weights arrived; the process dies before answering
    print(f"dying in round {round_}", flush=True)
    os._exit(3)
site.Site.train = dies
from tunesmith.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def federation(tiny_bert, tmp_path_factory):
    """One real federation: a server process and three client processes on localhost, each reading its own shard
    file; the third client dies in round 1 (--min-clients 1: the round goes on with the two that answered)."""
    work = tmp_path_factory.mktemp("federation")
    held_out = write_reviews(work / "server.csv", n=60, seed=1)
    recipe = recipe_dict(tiny_bert, held_out, train={"epochs": 2, "threads": 1})
    recipe["data"].update(validation_size=0.4, test_size=0.4)        # the server's own rows (train: the labels)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shards = [write_reviews(work / f"shard-{c}.csv", n=40, seed=10 + c) for c in range(3)]
    (work / "server.py").write_text(SERVER)
    (work / "dying.py").write_text(DYING)
    address = f"127.0.0.1:{free_port()}"
    common = ["federate", str(work / "recipe.yaml"), "--wait", "120"]
    env = {**os.environ, "TMPDIR": str(work)}          # a dead client's scratch folder stays in the test's folder

    def start(args, log):
        return subprocess.Popen([sys.executable, *map(str, args)], stdout=open(work / log, "w"),
                                stderr=subprocess.STDOUT, env=env)

    server = start([work / "server.py", work / "opened.log", *common, "--server", address, "--clients", 3,
                    "--rounds", 2, "--min-clients", 1, "--run-dir", work / "run"], "server.log")
    clients = [start(["-m", "tunesmith", *common, "--client", address, "--shard", shards[0]], "client-0.log"),
               start(["-m", "tunesmith", *common, "--client", address, "--shard", shards[1]], "client-1.log"),
               start([work / "dying.py", *common, "--client", address, "--shard", shards[2]], "client-2.log")]
    try:
        codes = [server.wait(timeout=400)] + [c.wait(timeout=60) for c in clients]
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    logs = {p.stem: p.read_text() for p in work.glob("*.log")}
    return SimpleNamespace(work=work, codes=codes, logs=logs, shards=shards, run=work / "run")


@pytest.mark.slow             # four processes importing torch and Flower: 90-130 s at load average 9-14
def test_a_real_server_and_client_processes_make_a_run_folder(federation):
    import tunesmith as ts

    assert federation.codes[:3] == [0, 0, 0], federation.logs
    fed = io.read_json(federation.run / "federation.json")
    assert fed["mode"] == "server" and [r["round"] for r in fed["rounds"]] == [0, 1, 2]
    assert fed["rounds"][2]["answered"] == 2 and fed["rounds"][2]["rows"] == 80
    assert "client: the server ended the federation" in federation.logs["client-0"]
    run = ts.Run(federation.run)
    assert (run.model_dir / "config.json").exists() and "accuracy" in run.metrics
    assert run.load().predict(["a great film"])[0]["label"] in ("pos", "neg")


@pytest.mark.slow             # four processes importing torch and Flower: 90-130 s at load average 9-14
def test_the_server_process_never_opens_a_clients_rows(federation):
    opened = set(federation.logs["opened"].splitlines())
    assert str(federation.work / "server.csv") in opened          # the hook saw the server's own data file
    assert str(federation.work / "recipe.yaml") in opened
    assert not opened & ({str(Path(s).resolve()) for s in federation.shards} | {str(s) for s in federation.shards})


@pytest.mark.slow             # four processes importing torch and Flower: 90-130 s at load average 9-14
def test_a_client_that_dies_mid_round_is_tolerated(federation):
    assert federation.codes[3] == 3 and "dying in round 1" in federation.logs["client-2"]
    first = io.read_json(federation.run / "federation.json")["rounds"][1]
    assert (first["asked"], first["answered"], first["failed"]) == (3, 2, 1)
    assert "round 1: a client failed" in federation.logs["server"]
