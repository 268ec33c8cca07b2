"""How a federation's training rows are cut into clients' shards; each a pure function of (keys, clients, seed).

  iid              a seeded shuffle dealt round-robin: every shard a random sample of the rows
  dirichlet:ALPHA  per label, the label's rows split among clients in proportions drawn from Dirichlet(ALPHA)
                   (small ALPHA: each client sees few labels; large: close to iid); a client left empty gets a
                   row from the fullest client, so every client trains
  by:COLUMN        one client per distinct value of COLUMN (a site, a hospital); --clients must equal their number
"""
from __future__ import annotations

import collections

from tunesmith.errors import TunesmithError


def parse(spec: str) -> tuple[str, float | str | None]:
    """(kind, argument) of a --partition value; a one-line error for anything else."""
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = 0.0
        if alpha > 0:
            return "dirichlet", alpha
        raise TunesmithError(f"--partition {spec}: give dirichlet:ALPHA with ALPHA > 0, e.g. dirichlet:0.3")
    if kind == "by" and arg:
        return "by", arg
    raise TunesmithError(f"--partition {spec}: give iid, dirichlet:ALPHA or by:COLUMN")


def partition(rows: list[dict], keys: list, clients: int, spec: str, seed: int) -> list[list[int]]:
    """Row indices of each client's shard (sorted); every row in exactly one shard. keys: each row's label (the
    task's stratify_key; None for tasks without one)."""
    import numpy as np

    kind, arg = parse(spec)
    if clients < 1:
        raise TunesmithError("--clients must be at least 1")
    if kind == "by":
        values = [r.get(arg) for r in rows]
        if any(v in (None, "") for v in values):
            raise TunesmithError(f"--partition by:{arg}: {sum(v in (None, '') for v in values)} row(s) have no "
                                 f"'{arg}' value; fill them or partition another way")
        names = sorted({str(v) for v in values})
        if len(names) != clients:
            raise TunesmithError(f"--partition by:{arg} makes {len(names)} client(s) ({', '.join(names[:8])}); "
                                 f"give --clients {len(names)}")
        index = {n: i for i, n in enumerate(names)}
        shards = [[] for _ in names]
        for i, v in enumerate(values):
            shards[index[str(v)]].append(i)
        return shards
    if len(rows) < clients:
        raise TunesmithError(f"--clients {clients} is more than the {len(rows)} training row(s)")
    rng = np.random.default_rng(seed)
    if kind == "iid" or keys[0] is None:
        order = rng.permutation(len(rows))
        return [sorted(order[c::clients].tolist()) for c in range(clients)]
    by_label = collections.defaultdict(list)
    for i, k in enumerate(keys):
        by_label[str(k)].append(i)
    shards = [[] for _ in range(clients)]
    for label in sorted(by_label):
        idx = rng.permutation(by_label[label])
        cuts = (np.cumsum(rng.dirichlet([arg] * clients)) * len(idx)).astype(int)[:-1]
        for c, part in enumerate(np.split(idx, cuts)):
            shards[c].extend(part.tolist())
    for c in range(clients):                        # an empty client would have nothing to train on
        if not shards[c]:
            donor = max(range(clients), key=lambda d: len(shards[d]))
            shards[c].append(shards[donor].pop())
    return [sorted(s) for s in shards]


def describe(shards: list[list[int]], keys: list) -> list[dict]:
    """Per client: rows and class counts (what `federate` prints and federation.json keeps)."""
    out = []
    for c, shard in enumerate(shards):
        counts = collections.Counter(str(keys[i]) for i in shard) if keys and keys[0] is not None else {}
        out.append({"client": c, "rows": len(shard), "classes": dict(sorted(counts.items()))})
    return out


def render(described: list[dict]) -> str:
    return "\n".join(f"client {d['client']}: {d['rows']:,} rows"
                     + (" (" + ", ".join(f"{k} {v}" for k, v in d["classes"].items()) + ")" if d["classes"] else "")
                     for d in described)
