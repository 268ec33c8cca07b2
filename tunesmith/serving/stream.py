"""Streaming generated text over HTTP, one implementation for both routes that stream: POST /v1/chat/completions with
`stream: true` (tunesmith/serving/openai_chat.py, OpenAI's chunks) and POST /v1/predict with `stream: true` (here).

`streamed` runs a generation on the model thread (tunesmith/serving/app.py's Batcher) and yields its text pieces as
the task's streamer finalises them, then one `Finished`; the caller sets its stop event when the response ends, so a
timeout or a client that went away stops generation at the next token.

/v1/predict's stream: server-sent events, the inputs one after another, in order:
  data: {"index": i, "text": piece}                  as input i's text is written
  data: {"index": i, "prediction": {...}}            input i done: its prediction, as /v1/predict returns it
  data: {"index": i, "error": reason}                input i cannot be used, or the request ran past its timeout
  data: [DONE]
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from tunesmith import io


@dataclass
class Finished:
    result: object = None               # what the call returned; None: past the deadline, or it raised
    error: BaseException | None = None  # what it raised


def streamed(batcher, call, timeout_s: float):
    """Start call(on_text) on the model thread now (counted as one waiting input until it ends) and return an async
    iterator over the text pieces it passes to on_text, then a Finished."""
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
    batcher.waiting += 1
    job = asyncio.ensure_future(batcher.call(call, lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t)))

    def finished(_):
        batcher.waiting -= 1
        pieces.put_nowait(None)
    job.add_done_callback(finished)

    async def iterate():
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            try:
                piece = await asyncio.wait_for(pieces.get(), left)
            except asyncio.TimeoutError:
                break
            if piece is None:
                break
            yield piece
        if job.done() and not job.cancelled():
            error = job.exception()
            yield Finished(None if error else job.result(), error)
        else:
            yield Finished()

    return iterate()


def predict_events(predictor, batcher, items: list, timeout_s: float):
    """/v1/predict's streamed answer (see the module docstring): each input generated in turn, all within
    timeout_s."""
    from fastapi.responses import StreamingResponse

    stop = threading.Event()

    def event(data) -> str:
        return f"data: {io.dumps(data) if isinstance(data, dict) else data}\n\n"

    async def events():
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            for i, item in enumerate(items):
                left = deadline - loop.time()
                outcome = Finished()
                if left > 0:
                    async for piece in streamed(batcher, lambda on_text, x=item: predictor.stream(x, on_text, stop),
                                                left):
                        if isinstance(piece, Finished):
                            outcome = piece
                        else:
                            yield event({"index": i, "text": piece})
                if outcome.error is not None:
                    yield event({"index": i, "error": str(outcome.error) or type(outcome.error).__name__})
                elif outcome.result is None:
                    yield event({"index": i, "error": f"generation took longer than {timeout_s:g} s"})
                    break
                elif "error" in outcome.result:
                    yield event({"index": i, "error": outcome.result["error"]})
                else:
                    yield event({"index": i, "prediction": outcome.result})
            yield event("[DONE]")
        finally:
            stop.set()                          # timeout or a client that went away: generation stops

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
