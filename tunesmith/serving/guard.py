"""What every HTTP request of `tunesmith serve` passes through before its route (tunesmith/serving/app.py): the API
key (401), the body size (413), NaN and Infinity in the JSON body (422), and the counters /metrics reports."""
from __future__ import annotations

import hmac
import json
import math
import time
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)     # seconds, request latency histogram
OPEN_PATHS = ("/health", "/")       # no key needed: liveness, and the page (static; it asks for the key)


class Metrics:
    """Counters for /metrics, in Prometheus' text format."""

    def __init__(self):
        self.requests = defaultdict(int)            # (path, status) -> count
        self.latency = defaultdict(int)             # bucket upper bound -> requests at or under it
        self.latency_sum = 0.0
        self.latency_count = 0
        self.batches = 0
        self.batch_items = 0
        self.model_seconds = 0.0

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        self.latency_sum += seconds
        self.latency_count += 1
        for b in BUCKETS:
            if seconds <= b:
                self.latency[b] += 1

    def render(self, queued: int) -> str:
        out = ["# HELP tunesmith_requests_total HTTP requests by path and status.",
               "# TYPE tunesmith_requests_total counter"]
        out += [f'tunesmith_requests_total{{path="{p}",status="{s}"}} {n}'
                for (p, s), n in sorted(self.requests.items())]
        out += ["# HELP tunesmith_request_seconds Request latency.", "# TYPE tunesmith_request_seconds histogram"]
        out += [f'tunesmith_request_seconds_bucket{{le="{b}"}} {self.latency[b]}' for b in BUCKETS]
        out += [f'tunesmith_request_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"tunesmith_request_seconds_sum {self.latency_sum:.6f}",
                f"tunesmith_request_seconds_count {self.latency_count}",
                "# HELP tunesmith_batches_total Forward passes (micro-batches) run.",
                "# TYPE tunesmith_batches_total counter", f"tunesmith_batches_total {self.batches}",
                "# HELP tunesmith_batch_items_total Inputs run in micro-batches.",
                "# TYPE tunesmith_batch_items_total counter", f"tunesmith_batch_items_total {self.batch_items}",
                "# HELP tunesmith_model_seconds_total Seconds the model thread spent predicting.",
                "# TYPE tunesmith_model_seconds_total counter",
                f"tunesmith_model_seconds_total {self.model_seconds:.6f}",
                "# HELP tunesmith_queue_inputs Inputs waiting for a batch.", "# TYPE tunesmith_queue_inputs gauge",
                f"tunesmith_queue_inputs {queued}"]
        return "\n".join(out) + "\n"


def _non_finite(body: bytes) -> list | None:
    """Where the JSON body holds NaN or +-Infinity (which Python's json accepts and the routes cannot answer), or
    None (also for a body that is not JSON: the route says what is wrong with it)."""
    if b"NaN" not in body and b"Infinity" not in body:      # the fast path: most bodies
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    stack = [(value, [])]
    while stack:
        v, loc = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return loc
        if isinstance(v, dict):
            stack.extend((x, [*loc, k]) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, [*loc, i]) for i, x in enumerate(v))
    return None


class Guard:
    """ASGI middleware, outermost: the API key (401), the body size (413, by Content-Length or, without one, as the
    body arrives: it is read here, at most `limit` bytes, and handed on whole), and each request's status and
    latency for /metrics. Plain ASGI: no per-request task or copy beyond the body."""

    def __init__(self, app, limit: int, api_key: str | None, metrics: Metrics, paths: set[str]):
        self.app, self.limit, self.key, self.metrics, self.paths = app, limit, api_key, metrics, paths

    async def __call__(self, scope, receive, send):
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def tracked(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, tracked, JSONResponse)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.observe(path, status, time.perf_counter() - t0)

    async def _guarded(self, scope, receive, send, JSONResponse):
        headers = dict(scope["headers"])
        if self.key and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth.removeprefix("Bearer ").strip() or headers.get(b"x-api-key", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), self.key.encode()):
                return await JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer KEY)"},
                                          status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_large = JSONResponse({"detail": f"request body over {self.limit:,} bytes"}, status_code=413)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":          # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        where = _non_finite(body)
        if where is not None:
            return await JSONResponse({"detail": [{"loc": ["body", *where], "type": "value_error",
                                                   "msg": "NaN and Infinity are not JSON numbers"}]},
                                      status_code=422)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()                      # after the body: disconnect notices (streaming)
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
