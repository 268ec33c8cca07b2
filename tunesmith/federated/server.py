"""A federation's server side: the strategy (Flower's FedAvg or FedProx, weighted by rows, with --min-clients
answers required to move the global model), the per-round evaluation on the server's held-out rows, the run folder.

The run folder is like `train`'s (run.json, recipe.yaml, data/, metrics.jsonl, model/, eval.json) plus
federation.json: the partition (simulation), and per round the validation metrics, clients asked / answered /
failed, and the bytes sent each way. metrics.jsonl holds one validation record per round (step = round).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tunesmith import io
from tunesmith.device import autocast
from tunesmith.federated.site import Local
from tunesmith.run import Run


class Board:
    """The server's state: its rows (validation: per-round evaluation; test: eval.json), the global model and the
    run folder, created before round 1 (a failed load leaves nothing behind)."""

    def __init__(self, recipe, run_dir, made_by: dict, say=print):
        from tunesmith.device import choose_device, choose_precision
        from tunesmith.pipeline import Trainer, pad_multiple, prepare

        self.device = choose_device("cpu")
        self.mixed = choose_precision(recipe.train.precision, self.device)[0]
        self.recipe, self.say, self.made_by = recipe, say, made_by
        task, self.loaded = prepare(Trainer(), recipe, self.device)
        task.pad_multiple = pad_multiple(recipe.train, self.device)
        self.task, self.tables = task, self.loaded.tables
        t0 = time.perf_counter()
        self.local = Local(task, recipe)
        say(f"model: {recipe.model.name} loaded in {time.perf_counter() - t0:.1f}s; {self.local.adapted.summary()}; "
            f"exchanged per client and round: {len(self.local.names)} arrays, {self.local.bytes():,} bytes")
        self.features = {s: task.encode(self.tables[s].rows) for s in ("validation", "test")}
        if run_dir:
            Run.check_new(run_dir, resumable=False)             # a federation keeps no checkpoints
        self.run_dir, self.run = run_dir, None
        self.rounds: list[dict] = []
        self.pending: dict = {}
        self.partition: list[dict] = []
        self.latest = self.local.get()

    def open(self) -> Run:
        """Create the run folder (once the data, the model and the partition are known to be good)."""
        from tunesmith.splits import fingerprint

        task = self.task
        self.run = Run.create(self.recipe, self.run_dir, made_by=self.made_by)
        stamp = {"rows": {s: len(t) for s, t in self.tables.items()}, "rejected": len(self.loaded.rejects),
                 "labels": task.labels, "fingerprint": fingerprint(self.tables), "files": self.loaded.files,
                 "unused_rows": self.loaded.unused}
        self.run.write_json("data/splits.json", stamp)
        for split in ("validation", "test"):
            table = self.tables[split]
            self.run.write_rows(f"data/{split}.jsonl", [{**r, "_origin": o} for r, o in zip(table.rows, table.origins)],
                                task.path_columns)
        return self.run

    def close(self) -> None:
        if self.run is not None:
            self.run.unlock()

    def fit_config(self, server_round: int) -> dict:
        """What each client is told with the weights: the round of how many (its piece of the one learning-rate
        schedule, site.py), and the label order of the global head."""
        return {"round": server_round, "rounds": self.made_by["rounds"], "labels": io.dumps(self.task.labels)}

    def answered(self, server_round: int, asked: int, results, failures) -> None:
        """Record a round's answers (bytes up: the serialized arrays each answering client sent; bytes down: the
        float32 arrays sent to each client asked)."""
        self.pending = {"asked": asked, "answered": len(results), "failed": len(failures),
                        "rows": sum(r.num_examples for _, r in results),
                        "bytes_up": sum(len(t) for _, r in results for t in r.parameters.tensors),
                        "bytes_down": asked * self.local.bytes()}

    def evaluate(self, server_round: int, arrays, config) -> tuple[float, dict]:
        """Flower's centralised evaluation: the global weights on the server's validation rows, logged and kept."""
        task, model = self.task, self.local.model
        self.local.set(arrays)
        self.latest = [a.copy() for a in arrays]           # the global weights after this round
        model.to(self.device).eval()
        with torch.no_grad(), autocast(self.device, self.mixed):      # as the loop's validation scores it
            result = task.evaluate(model, self.features["validation"], self.recipe.eval.batch_size)
        model.train()
        shown = task.loggable(result)
        self.run.log({"step": server_round, "round": server_round, "split": "validation", **shown})
        self.rounds.append({"round": server_round, **shown, **self.pending})
        self.run.write_json("federation.json", self.summary())
        extra = self.pending
        self.say(f"round {server_round}: validation {task.summary(result)}"
                 + (f" ({extra['answered']} of {extra['asked']} clients answered, {extra['rows']:,} rows; "
                    f"{extra['bytes_up']:,} bytes up, {extra['bytes_down']:,} down)" if extra else " (initial model)"))
        self.pending = {}
        scalars = {k: float(v) for k, v in shown.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return float(result.get("loss", 0.0)), scalars

    def summary(self) -> dict:
        return {**self.made_by, "exchanged": {"arrays": len(self.local.names), "bytes": self.local.bytes(),
                                              "names": self.local.names},
                "partition": self.partition, "rounds": self.rounds}

    def finish(self) -> Run:
        """The final global weights as the run's model: model/, eval.json on the test split (pipeline's end)."""
        from tunesmith.pipeline import Trainer, _finish

        self.local.set(self.latest)
        self.run.note("training", {"ended": f"federated: {len(self.rounds) - 1} rounds", "steps": len(self.rounds) - 1})
        _finish(Trainer(), self.recipe, self.task, self.local.model, self.run, self.tables, self.features, None,
                self.device, self.say)
        return self.run


def make_strategy(board: Board, kind: str, mu: float, fraction: float, min_clients: int, wait_for: int = 0,
                  wait_s: float = 600.0):
    """Flower's FedAvg / FedProx (weighted by rows; FedProx sends proximal_mu to the clients), evaluated by the
    board each round; a round with fewer than min_clients answers leaves the global weights as they were.
    wait_for: clients to wait for before round 1 (a real federation)."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvg, FedProx

    from tunesmith.errors import TunesmithError

    base = FedProx if kind == "fedprox" else FedAvg

    class Strategy(base):
        def configure_fit(self, server_round, parameters, client_manager):
            if server_round == 1 and wait_for and not client_manager.wait_for(wait_for, timeout=int(wait_s)):
                raise TunesmithError(f"only {client_manager.num_available()} of {wait_for} clients connected "
                                     f"within {wait_s:.0f}s")
            pairs = super().configure_fit(server_round, parameters, client_manager)
            self.asked = len(pairs)
            return pairs

        def aggregate_fit(self, server_round, results, failures):
            board.answered(server_round, getattr(self, "asked", len(results) + len(failures)), results, failures)
            for f in failures:
                board.say(f"round {server_round}: a client failed: "
                          f"{type(f).__name__ + ': ' + str(f) if isinstance(f, BaseException) else 'no result'}")
            if len(results) < min_clients:
                board.say(f"round {server_round}: {len(results)} client(s) answered, fewer than --min-clients "
                          f"{min_clients}; the global model stays as it was")
                return None, {}
            return super().aggregate_fit(server_round, results, failures)

    options = {"proximal_mu": mu} if kind == "fedprox" else {}
    return Strategy(fraction_fit=fraction, fraction_evaluate=0.0, min_fit_clients=min_clients,
                    min_evaluate_clients=0, min_available_clients=min_clients, evaluate_fn=board.evaluate,
                    on_fit_config_fn=board.fit_config, accept_failures=True,
                    initial_parameters=ndarrays_to_parameters(board.local.get()),
                    fit_metrics_aggregation_fn=mean_loss, **options)


def mean_loss(answers: list[tuple[int, dict]]) -> dict:
    """The clients' last training loss, weighted by rows (Flower's fit metrics)."""
    rows = sum(n for n, _ in answers)
    return {"loss": sum(n * float(m.get("loss", 0.0)) for n, m in answers) / max(rows, 1)}


def in_process(cid: str, client):
    """A Flower ClientProxy that calls a client in this process: the simulation's clients train one after another
    (the server's ThreadPool is set to one worker), with no Ray actors or network."""
    from flwr.common import DisconnectRes
    from flwr.server.client_proxy import ClientProxy

    class InProcess(ClientProxy):
        def get_properties(self, ins, timeout, group_id):
            return client.get_properties(ins)

        def get_parameters(self, ins, timeout, group_id):
            return client.get_parameters(ins)

        def fit(self, ins, timeout, group_id):
            return client.fit(ins)

        def evaluate(self, ins, timeout, group_id):
            return client.evaluate(ins)

        def reconnect(self, ins, timeout, group_id):
            return DisconnectRes(reason="")

    return InProcess(cid)


def scratch(base: Path | None = None) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="tunesmith-fed-", dir=base))
