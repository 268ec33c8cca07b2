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
(--api-key) on every route but /health and the static page, 422 on malformed input (the key, size and JSON
checks: tunesmith/serving/guard.py). The server reads no file a request names (images come as data: URIs) and never
runs remote code.
"""
from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from tunesmith.errors import TunesmithError
from tunesmith.serving.guard import Guard, Metrics

PAGE = Path(__file__).parent / "static" / "index.html"
MAX_TEXT = 100_000                  # characters of one text input (images: only --max-body bounds them)


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

