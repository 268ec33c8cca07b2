"""`tunesmith serve RUN`: a run's model behind HTTP (FastAPI + uvicorn, the `serve` extra).

Routes: POST /v1/predict (texts, images as data: URIs, or rows; batched; each prediction in the task's declared
schema, Task.output_schema, which /openapi.json documents; `stream: true` for a generating task: server-sent events,
tunesmith/serving/stream.py), GET /health (with the task's declarations: its input,
its prediction kind, whether it chats), GET /metrics (Prometheus text), /openapi.json and /docs, GET / (a small web
page that draws predictions by their kind); runs whose task declares `chats` add POST /v1/chat/completions (the
OpenAI API, SSE streaming included; tunesmith/serving/openai_chat.py) and GET /v1/models.

Micro-batching: every input joins one queue; one worker takes the first waiting input, waits at most max_wait_ms for
more (up to max_batch), and runs them as one `Predictor.predict` call on the single model thread (the model and
tokenizer are used by that thread alone). An input the task refuses (Task.check_input) comes back as {"error"}, and a
batch that raises is re-run one input at a time, so a bad input fails only its own request (422). Limits: 413 over
max_body bytes, 503 (Retry-After) when max_queue inputs already wait, 504 after timeout_s, 401 without the key
(--api-key) on every route but /health and the static page, 422 on malformed input. The server reads no file a
request names (images come as data: URIs) and never runs remote code.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from tunesmith.errors import TunesmithError

PAGE = Path(__file__).parent / "static" / "index.html"
MAX_TEXT = 100_000                  # characters of one text input (images: only --max-body bounds them)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)     # seconds, request latency histogram
OPEN_PATHS = ("/health", "/")       # no key needed: liveness, and the page (static; it asks for the key)


@dataclass
class Limits:
    max_batch: int = 8              # inputs per forward pass (CPU: padding to the longest makes big batches cost)
    max_wait_ms: float = 0.0        # how long the first input of a batch waits for company; 0: a batch is what
                                    # queued while the previous one ran
    max_queue: int = 256            # inputs waiting; more: 503
    timeout_s: float = 30.0         # per request; past it: 504
    max_body: int = 4_000_000       # bytes per request body; more: 413
    max_items: int = 256            # inputs per request; more: 422
    max_new_tokens: int = 512       # cap on a chat request's max_tokens
    # pixels per image, read from the header before decoding; more: 422. 4096x4096 = 16.8 M: ~335x a 224x224 model
    # input, while a 12000x12000 PNG bomb (144 M pixels, 140 KB compressed) would decode to 430 MB+
    max_pixels: int = 4096 * 4096


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[str | dict[str, Any]] = Field(min_length=1, description="texts, images as data: URIs, prompts, or "
                                               "rows with the recipe's columns")
    stream: bool = Field(False, description="generating tasks: server-sent events, each input's text as it is "
                         "written (tunesmith/serving/stream.py)")


def response_model(schema: type[BaseModel]) -> type[BaseModel]:
    """POST /v1/predict's answer: the run's name and one prediction per input, each in the task's schema."""
    return create_model("PredictResponse", model=(str, ...),
                        predictions=(list[schema], Field(description="one per input, in order")))


class QueueFull(Exception):
    pass


class ItemError:
    """A failed input's reason, in place of its prediction."""

    def __init__(self, error: Exception):
        self.message = str(error) or type(error).__name__


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


class Batcher:
    """Groups concurrent inputs into batches run on the one model thread (see the module docstring)."""

    def __init__(self, predictor, limits: Limits, metrics: Metrics):
        self.predictor, self.limits, self.metrics = predictor, limits, metrics
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="tunesmith-model")
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.waiting = 0

    def start(self) -> None:
        """The queue and its worker, on the running event loop (at startup, or on first use)."""
        if self.worker is None or self.worker.done():
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self.run())

    def submit(self, items: list) -> list[asyncio.Future]:
        if self.waiting + len(items) > self.limits.max_queue:
            raise QueueFull
        self.start()
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            futures.append(loop.create_future())
            self.queue.put_nowait((item, futures[-1]))
        self.waiting += len(items)
        return futures

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self.queue.get()]
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while len(group) < self.limits.max_batch:
                try:
                    group.append(self.queue.get_nowait() if deadline <= loop.time()
                                 else await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            self.waiting -= len(group)
            live = [(item, f) for item, f in group if not f.done()]          # requests past their timeout: dropped
            if not live:
                continue
            results = await loop.run_in_executor(self.thread, self._predict, [item for item, _ in live],
                                                 [f for _, f in live])
            for (_, f), r in zip(live, results):
                if not f.done():
                    f.set_result(r)

    def _predict(self, items: list, futures: list) -> list:
        t0 = time.perf_counter()
        self.metrics.batches += 1
        self.metrics.batch_items += len(items)
        try:
            return self.predictor.predict(items)
        except Exception:                               # one bad input: the others still get their answers
            out = []
            for item, f in zip(items, futures):
                if f.done():                            # its request timed out meanwhile: not started
                    out.append(ItemError(TimeoutError("request timed out")))
                    continue
                try:
                    out.append(self.predictor.predict([item])[0])
                except Exception as e:
                    out.append(ItemError(e))
            return out
        finally:
            self.metrics.model_seconds += time.perf_counter() - t0

    async def call(self, fn, *args):
        """Run fn(*args) on the model thread (chat generation)."""
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)


def _checked(task, item, max_pixels: int):
    """The input as the task takes it; ValueError when it names a file (path columns take data: URIs only) or an
    image declares more than max_pixels (read from its header, before any decoding)."""
    from tunesmith.tasks.base import blank
    from tunesmith.vision import pixels

    for col in task.path_columns:
        v = item if isinstance(item, str) else item.get(col)        # a bare input is the path column's value
        if v is not None and not (isinstance(v, str) and v.startswith("data:")):
            raise ValueError(f"'{col}' must be a data: URI (base64 image bytes); the server reads no files")
        if v is not None:
            try:
                n = pixels(v)
            except Exception:                       # unreadable: the model thread reports it, as before
                n = 0
            if n > max_pixels:
                raise ValueError(f"'{col}' declares {n:,} pixels, over the limit of {max_pixels:,} pixels "
                                 "(serve --max-pixels)")
    if isinstance(item, str) and not task.path_columns and len(item) > MAX_TEXT:
        raise ValueError(f"longer than {MAX_TEXT:,} characters")
    if isinstance(item, str) and not task.path_columns and blank(item):
        raise ValueError("empty input (nothing but whitespace and control characters)")
    return item


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


def create_app(run, api_key: str | None = None, onnx: str | None = None, device: str = "auto",
               limits: Limits | None = None):
    """The FastAPI app for a run folder (or a loaded Predictor); see the module docstring. onnx: "fp32" or
    "int8" to serve the checked export (tunesmith export) instead of the PyTorch model."""
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import HTMLResponse, PlainTextResponse
    except ImportError:
        raise TunesmithError("tunesmith serve needs FastAPI and uvicorn: pip install 'tunesmith[serve]'") from None

    from tunesmith.run import Predictor, Run
    from tunesmith.serving.stream import predict_events

    if isinstance(run, Predictor):
        predictor = run
    elif onnx:
        from tunesmith.deploy.export import load_onnx

        predictor = load_onnx(run, onnx)
    else:
        predictor = Run(run).load(device)
    task, limits = predictor.task, limits or Limits()
    name = predictor.run.path.resolve().name
    metrics = Metrics()
    batcher = Batcher(predictor, limits, metrics)

    @asynccontextmanager
    async def lifespan(_):
        batcher.start()
        yield
        batcher.worker.cancel()
        batcher.thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tunesmith", version="1", lifespan=lifespan,
                  description=f"{task.name} model from run {name}")
    app.state.batcher, app.state.predictor, app.state.limits, app.state.model_name = batcher, predictor, limits, name

    async def wait(futures, what: str):
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), limits.timeout_s)
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()
            raise HTTPException(504, f"{what} took longer than {limits.timeout_s:g} s") from None

    @app.post("/v1/predict", response_model=response_model(task.output_schema()),
              responses={413: {"description": "body too large"}, 422: {"description": "malformed input"},
                         503: {"description": "queue full"}, 504: {"description": "timeout"}})
    async def predict(body: PredictRequest):
        """One prediction per input, in order; concurrent requests share forward passes."""
        if len(body.inputs) > limits.max_items:
            raise HTTPException(422, f"at most {limits.max_items} inputs per request, got {len(body.inputs)}")
        errors = []
        for i, item in enumerate(body.inputs):
            try:
                _checked(task, item, limits.max_pixels)
            except ValueError as e:
                errors.append({"loc": ["body", "inputs", i], "msg": str(e), "type": "value_error"})
        if errors:
            raise HTTPException(422, errors)
        if body.stream:
            if not task.generative:
                raise HTTPException(422, f"stream: task '{task.name}' does not generate text; leave stream out")
            if batcher.waiting + 1 > limits.max_queue:
                raise HTTPException(503, "queue full; retry shortly", headers={"Retry-After": "1"})
            return predict_events(predictor, batcher, body.inputs, limits.timeout_s)
        try:
            futures = batcher.submit(body.inputs)
        except QueueFull:
            raise HTTPException(503, f"queue full ({limits.max_queue} inputs waiting); retry shortly",
                                headers={"Retry-After": "1"}) from None
        results = await wait(futures, "prediction")
        bad = [{"loc": ["body", "inputs", i], "msg": r.message if isinstance(r, ItemError) else r["error"],
                "type": "value_error"} for i, r in enumerate(results) if isinstance(r, ItemError) or "error" in r]
        if bad:
            raise HTTPException(422, bad)
        return {"model": name, "predictions": results}

    @app.get("/health")
    async def health():
        """Liveness, and what the page needs to know: the task's input, its prediction kind, whether it chats."""
        return {"status": "ok", "model": name, "task": task.name, "input": task.input_key,
                "prediction": task.prediction, "chats": task.chats, "backend": f"onnx-{onnx}" if onnx else "pytorch"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(batcher.waiting), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    if task.chats:
        from tunesmith.serving.openai_chat import add_chat_routes

        add_chat_routes(app, predictor, batcher, limits, name, wait)
    app.add_middleware(Guard, limit=limits.max_body, api_key=api_key, metrics=metrics,
                       paths={r.path for r in app.routes})
    return app


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, onnx: str | None = None,
          device: str = "auto", **limits) -> None:
    """Serve a run until interrupted (see the module docstring); limits: fields of `Limits`."""
    try:
        import uvicorn
    except ImportError:
        raise TunesmithError("tunesmith serve needs FastAPI and uvicorn: pip install 'tunesmith[serve]'") from None
    app = create_app(run_dir, api_key, onnx, device, Limits(**{k: v for k, v in limits.items() if v is not None}))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who reaches this address can use the model",
              file=sys.stderr)
    print(f"serving {run_dir} on http://{host}:{port}  (page /, API /docs, health /health)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)

