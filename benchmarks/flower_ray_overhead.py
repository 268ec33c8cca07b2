"""Flower's Ray simulation engine, measured with trivial clients (NumPy only), to decide how `tunesmith federate`
simulates (docs/federated.md): the wall time of `run_simulation` (Ray start-up, actors, rounds) for N clients x 3
rounds, 1 CPU per client. Needs ray (flwr[simulation]), which tunesmith itself does not.

    .venv/bin/python benchmarks/flower_ray_overhead.py [N]
"""
import subprocess
import sys
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation


class Trivial(NumPyClient):
    def fit(self, parameters, config):
        return [parameters[0] + 1] if parameters else [np.zeros(1000, np.float32)], 10, {}

    def evaluate(self, parameters, config):
        return 0.0, 10, {}


def main() -> None:
    rounds, n = 3, int(sys.argv[1]) if len(sys.argv) > 1 else 4
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    def server_fn(context):
        return ServerAppComponents(strategy=FedAvg(fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n),
                                   config=ServerConfig(num_rounds=rounds))

    t = time.perf_counter()
    run_simulation(ServerApp(server_fn=server_fn), ClientApp(client_fn=lambda context: Trivial().to_client()),
                   num_supernodes=n, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    print(f"ray simulation: {n} clients x {rounds} rounds of trivial fits: {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
