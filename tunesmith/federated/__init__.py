"""`ts.federate(recipe, ...)` and `tunesmith federate`: federated fine-tuning on Flower (flwr; the federated extra).

Three ways to run, one client code (tunesmith/federated/site.py) and one server code (server.py):
  simulation (default)   the recipe's train rows cut into --clients shards (partition.py), each client trained in
                         this process one after another through Flower's server loop and strategy
  server=HOST:PORT       a real Flower server (gRPC): waits for --clients clients, runs --rounds rounds; its rows
                         are the recipe's validation and test splits (its train rows give the label set only)
  client=HOST:PORT       a real Flower client: trains on `shard` (its own file) when the server asks
Each round: the server sends the global trainable weights; each sampled client (--fraction) trains the recipe's
local epochs on its shard with the one loop and sends its weights and row count back; the server averages them
weighted by rows (fedavg; fedprox adds mu/2 * ||w - w_global||^2 to each client's loss) when at least
--min-clients answered, and evaluates the result on its validation rows. The final weights make a run folder.
"""
from __future__ import annotations

import logging
import shutil
import socket
import time

from tunesmith.errors import TunesmithError

STRATEGIES = ("fedavg", "fedprox")


def _flower():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise TunesmithError("federate needs Flower: pip install 'tunesmith[federated]'") from None
    logging.getLogger("flwr").setLevel(logging.WARNING)     # its per-round INFO lines; ours say the same


def federate(recipe, clients: int = 2, rounds: int = 3, partition: str = "iid", fraction: float = 1.0,
             strategy: str = "fedavg", mu: float = 0.01, min_clients: int | None = None, run_dir=None,
             server: str | None = None, client: str | None = None, shard: str | None = None,
             wait_s: float = 600.0, say=print):
    """Federated fine-tuning; returns the run (server, simulation) or None (a client). recipe: a Recipe or what
    ts.load_recipe reads. min_clients: answers a round needs to move the global model (default: every sampled
    client in simulation, 1 with a real server). wait_s: how long a real server waits for its clients, and a
    client for its server."""
    from tunesmith.federated.partition import parse
    from tunesmith.recipe import Recipe, load

    recipe = recipe if isinstance(recipe, Recipe) else load(recipe)
    if strategy not in STRATEGIES:
        raise TunesmithError(f"--strategy {strategy}: give one of {', '.join(STRATEGIES)}")
    if not 0 < fraction <= 1:
        raise TunesmithError(f"--fraction {fraction}: give a fraction of clients in (0, 1]")
    if rounds < 1 or clients < 1:
        raise TunesmithError("--rounds and --clients must be at least 1")
    if server and client:
        raise TunesmithError("give --server (run the server) or --client (run one client), not both")
    if client and not shard:
        raise TunesmithError("--client needs --shard FILE: the client's own training rows")
    parse(partition)
    _flower()
    if client:
        return _threads(recipe, lambda: join(recipe, client, shard, wait_s, say))
    sampled = max(1, int(clients * fraction))
    min_clients = min_clients if min_clients is not None else (1 if server else sampled)
    if not 1 <= min_clients <= clients:
        raise TunesmithError(f"--min-clients {min_clients}: give 1 to --clients ({clients})")
    made_by = {"command": "federate", "clients": clients, "rounds": rounds, "partition": None if server else partition,
               "fraction": fraction, "strategy": strategy, "mu": mu if strategy == "fedprox" else None,
               "min_clients": min_clients, "mode": "server" if server else "simulation"}
    return _threads(recipe, lambda: (serve if server else simulate)(recipe, made_by, run_dir, server, wait_s, say))


def _threads(recipe, work):
    """torch threads as `train` sets them on a CPU (train.threads, or the free cores), restored afterwards."""
    import torch

    from tunesmith.device import choose_threads

    threads = torch.get_num_threads()
    n, why = choose_threads(recipe.train.threads)
    torch.set_num_threads(n)
    try:
        return work()
    finally:
        torch.set_num_threads(threads)


def simulate(recipe, made_by: dict, run_dir, address, wait_s, say):
    """Every client in this process, one after another, under Flower's server loop (no Ray: see docs/federated.md
    for the measurement that chose this)."""
    from flwr.server import Server, SimpleClientManager

    from tunesmith.federated.partition import describe, partition, render
    from tunesmith.federated.server import Board, in_process, make_strategy, scratch
    from tunesmith.federated.site import Site, flower_client

    board = Board(recipe, run_dir, made_by, say)
    try:
        rows = board.tables["train"].rows
        keys = [board.task.stratify_key(r) for r in rows]
        shards = partition(rows, keys, made_by["clients"], made_by["partition"], recipe.train.seed)
        board.partition = describe(shards, keys)
        say(f"partition {made_by['partition']}:\n{render(board.partition)}")
        board.open()
        folder = scratch()
        try:
            manager = SimpleClientManager()
            for c, shard in enumerate(shards):
                site = Site(recipe, [rows[i] for i in shard], folder / f"client-{c}", board.local, c)
                manager.register(in_process(str(c), flower_client(site).to_client()))
            server = Server(client_manager=manager, strategy=make_strategy(
                board, made_by["strategy"], made_by["mu"] or 0.0, made_by["fraction"], made_by["min_clients"]))
            server.set_max_workers(1)
            server.fit(made_by["rounds"], timeout=None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return board.finish()
    finally:
        board.close()


def serve(recipe, made_by: dict, run_dir, address: str, wait_s: float, say):
    """A real Flower server on `address` (gRPC): round 1 waits for every client; a later round goes on with those
    still connected. It reads only the recipe's files (its held-out rows), never a client's."""
    from flwr.server import ServerConfig, start_server

    from tunesmith.federated.server import Board, make_strategy

    board = Board(recipe, run_dir, made_by, say)
    board.open()
    try:
        strategy = make_strategy(board, made_by["strategy"], made_by["mu"] or 0.0, made_by["fraction"],
                                 made_by["min_clients"], wait_for=made_by["clients"], wait_s=wait_s)
        say(f"server: listening on {address} for {made_by['clients']} clients, {made_by['rounds']} rounds")
        start_server(server_address=address, strategy=strategy,
                     config=ServerConfig(num_rounds=made_by["rounds"], round_timeout=wait_s))
        if len(board.rounds) < made_by["rounds"] + 1:
            raise TunesmithError(f"the federation stopped after {len(board.rounds) - 1} of {made_by['rounds']} "
                                 "rounds")
        return board.finish()
    finally:
        board.close()


def _reachable(address: str, wait_s: float) -> None:
    """Wait until something listens on `address` (the server loads its model before it listens; Flower's gRPC
    client gives up at once on a refused connection)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TunesmithError(f"no federation server answered on {address} within {wait_s:.0f}s") from None
            time.sleep(0.5)


def join(recipe, address: str, shard: str, wait_s: float, say) -> None:
    """A real Flower client: reads its own `shard`, trains when asked, until the server ends the federation."""
    from flwr.client import start_client

    from tunesmith.federated.server import scratch
    from tunesmith.federated.site import Site, flower_client

    folder = scratch()
    try:
        site = Site.from_file(recipe, shard, folder / "client")
        say(f"client: {len(site.rows):,} rows from {shard}; connecting to {address}")
        _reachable(address, wait_s)
        start_client(server_address=address, client=flower_client(site).to_client(), insecure=True,
                     max_wait_time=wait_s)
        say("client: the server ended the federation")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
