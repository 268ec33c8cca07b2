"""A federation's parties: the model every party builds alike (`Local`), a client's local training with the one
loop (tunesmith/loop.py) on its own rows (`Site`), and the Flower client that carries it (`flower_client`).

What crosses the wire: only the parameters that may train (adapted.trainable: LoRA adapters, the head, unfrozen
blocks), as float arrays in the model's parameter order, and the number of rows trained on. A client's rows are
read by that client alone (`Site.from_file`) and never leave it.
One learning-rate schedule for the federation: the recipe's train.scheduler, warmup and rate are laid over all
rounds, round r's local steps taking up where round r-1's ended (steps.Schedule's span; a client with S local
steps a round follows a schedule of rounds x S steps from (r-1) x S). Each client's own schedule per round would
warm up again and decay to zero every round (measured: validation stuck at the majority class, docs/federated.md).
FedProx: the proximal term mu/2 * ||w - w_global||^2 joins the loss through an objective (`Proximal`: what the loop
minimises, tunesmith/steps.py), so the loop itself does not know about it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from tunesmith import data as datalib
from tunesmith.errors import TunesmithError


class Local:
    """The model as every party builds it: the task's pretrained model, adapted as the recipe says. `names`: the
    parameters exchanged each round (those that may train), in model order."""

    def __init__(self, task, recipe):
        from transformers import set_seed

        from tunesmith.adapt import adapt

        set_seed(recipe.train.seed)
        self.task, self.recipe = task, recipe
        self.adapted = adapt(task.load_model(), recipe.adapt, task.peft_task_type)
        self.names = [n for n, _ in self.adapted.model.named_parameters() if n in self.adapted.trainable]

    @property
    def model(self):
        return self.adapted.model

    def get(self) -> list[np.ndarray]:
        params = dict(self.model.named_parameters())
        return [params[n].detach().cpu().float().numpy().copy() for n in self.names]

    def set(self, arrays: list[np.ndarray]) -> None:
        params = dict(self.model.named_parameters())
        if len(arrays) != len(self.names):
            raise TunesmithError(f"federation: got {len(arrays)} parameter arrays, this model exchanges "
                                 f"{len(self.names)}; every party must use the same recipe (model and adapt)")
        with torch.no_grad():
            for n, a in zip(self.names, arrays):
                if tuple(a.shape) != tuple(params[n].shape):
                    raise TunesmithError(f"federation: parameter {n} has shape {tuple(a.shape)}, this model's is "
                                         f"{tuple(params[n].shape)}; every party must use the same recipe")
                params[n].copy_(torch.from_numpy(np.asarray(a)).to(params[n].dtype))

    def bytes(self) -> int:
        """Bytes of one exchange (float32 arrays)."""
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() * 4 for n in self.names)


class Proximal:
    """FedProx's objective: the task's loss plus mu/2 * ||w - anchor||^2 over the exchanged parameters (anchor:
    the global weights the round started from). The task's loss is a sum over a batch's items and the loop divides
    by the step's items, so the term is scaled by the batch's count to enter each step once."""

    def __init__(self, task, model, names: list[str], mu: float):
        params = dict(model.named_parameters())
        self.task, self.mu = task, mu
        self.anchor = {n: params[n].detach().clone() for n in names}

    def collate(self, features):
        return self.task.collate(features)

    def count(self, batch) -> float:
        return self.task.count(batch)

    def loss(self, model, batch):
        drift = sum(((p - self.anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in self.anchor)
        return self.task.loss(model, batch) + self.mu / 2 * drift * self.count(batch)


def local_recipe(recipe, examples: int, seed: int):
    """The recipe a client trains each round with: its train section's epochs (epochs: auto has no validation
    split on a client: 1 epoch), its unset rate and batch size made concrete for the shard, a seed per round."""
    from tunesmith import defaults
    from tunesmith.recipe import load

    dumped = recipe.dump()
    epochs = recipe.train.epochs if recipe.train.epochs != "auto" else 1
    local = load({**dumped, "train": {**dumped["train"], "epochs": epochs, "seed": seed, "report_to": [],
                                      "keep": "last", "patience": None}})
    return defaults.resolve(local, examples)[0]


class Site:
    """One client: its rows (read here, never sent), the shared `Local` model, and local training per round in
    `folder` (a scratch run folder: the loop's log of the last round; no checkpoints)."""

    def __init__(self, recipe, rows: list[dict], folder: Path, local: Local | None = None, index: int = 0):
        self.recipe, self.rows, self.folder, self.local, self.index = recipe, rows, Path(folder), local, index
        self.features = local.task.encode(rows) if local else None

    @classmethod
    def from_file(cls, recipe, shard: str | Path, folder: Path) -> Site:
        """A client of a real federation: its rows from its own file (checked as train rows); the model is built
        on the first round, once the server has said the label set."""
        from tunesmith.tasks import get_task

        task = get_task(recipe)
        task.setup()
        table = datalib.read_for(task, str(shard), "train")
        rows = [r for r in table.rows if not task.check(r, "train")]
        if not rows:
            raise datalib.DataError(f"{shard}: no usable training rows")
        site = cls(recipe, rows, folder)
        site.task = task
        return site

    def ready(self, labels: list[str] | None) -> None:
        """Build the model (real federation, first round): the task learns from this client's rows, then takes the
        federation's label order, so that every party's head means the same classes."""
        if self.local is not None:
            return
        task = self.task
        task.prepare(self.rows)
        if labels is not None:
            task.set_labels(labels)
            bad = [r for r in self.rows if task.check(r, "validation")]
            if bad:
                raise datalib.DataError(f"{len(bad)} row(s) of this client have a label outside the federation's "
                                        f"labels {labels}")
        self.local = Local(task, self.recipe)
        self.features = task.encode(self.rows)

    def train(self, arrays: list[np.ndarray], round_: int, mu: float = 0.0,
              rounds: int = 1) -> tuple[list[np.ndarray], dict]:
        """One round of `rounds`: the global weights in, the recipe's local epochs on this client's rows with round
        `round_`'s piece of the federation's learning-rate schedule, the new weights out."""
        from accelerate import Accelerator
        from transformers import set_seed

        from tunesmith.device import choose_precision
        from tunesmith.loop import fit
        from tunesmith.run import Run
        from tunesmith.steps import Schedule

        local = self.local
        local.set(arrays)
        seed = self.recipe.train.seed + 1000 * round_ + self.index
        recipe = local_recipe(self.recipe, len(self.features), seed)
        steps = Schedule.of(recipe.train, len(self.features)).total        # local steps a round
        span = ((min(round_, rounds) - 1) * steps, max(rounds, 1) * steps)
        if self.folder.exists():
            shutil.rmtree(self.folder)              # the last round's scratch log
        self.folder.mkdir(parents=True)
        run = Run(self.folder)
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        mixed = choose_precision(recipe.train.precision, accelerator.device)[0]
        objective = Proximal(local.task, local.model, local.names, mu) if mu else None
        local.model.to(accelerator.device)
        set_seed(seed)
        state = fit(local.task, local.adapted, self.features, None, recipe, run, accelerator, mixed,
                    objective=objective, checkpoints=False, span=span)
        losses = [r["loss"] for r in run.history if "loss" in r and not r.get("summary")]
        local.model.cpu()
        lrs = [r["lr"] for r in run.history if "lr" in r]
        return local.get(), {"loss": float(losses[-1]) if losses else float("nan"), "steps": state.step,
                             "bytes": local.bytes(), "lr": float(lrs[-1]) if lrs else float("nan")}


def flower_client(site: Site):
    """The Flower NumPyClient over `site` (the same in simulation and in a real client process)."""
    from flwr.client import NumPyClient

    class Client(NumPyClient):
        def get_parameters(self, config):
            return site.local.get() if site.local else []

        def fit(self, parameters, config):
            labels = json.loads(str(config.get("labels", "null")))
            site.ready(labels)
            round_ = int(config.get("round", 1))
            arrays, metrics = site.train(parameters, round_, float(config.get("proximal_mu", 0.0)),
                                         int(config.get("rounds", round_)))
            print(f"client {site.index}: round {round_}: {len(site.rows):,} rows, {metrics['steps']} steps, "
                  f"loss {metrics['loss']:.4f}, lr {metrics['lr']:.3g}, sent {metrics['bytes']:,} bytes", flush=True)
            return arrays, len(site.rows), metrics

        def evaluate(self, parameters, config):      # the server evaluates on its own rows (fraction_evaluate 0)
            return 0.0, len(site.rows), {}

    return Client()
