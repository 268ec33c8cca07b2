"""POST /v1/chat/completions and GET /v1/models for runs whose task declares `chats`, as the OpenAI API defines them,
so the official `openai` client works unchanged; `stream: true` answers with server-sent events (chat.completion.chunk
objects, then `data: [DONE]`; the streaming itself is tunesmith/serving/stream.py's, shared with /v1/predict). The
prompt is the run's own chat template (Task.prompt_ids); settings start from the recipe's eval.generate and take the
request's max_tokens, temperature (under 0.01: greedy), top_p and seed. Generation is the task's own (Task.complete,
tunesmith/tasks/generation.py), on the model thread (tunesmith/serving/app.py); a request past its timeout, or whose
client went away, stops at the next token.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.serving.stream import Finished, streamed

MAX_TEXT = 100_000                  # characters per message
MIN_TEMPERATURE = 0.01              # lower temperatures decode greedily


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")      # OpenAI clients may send options this server does not use
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False


def add_chat_routes(app, predictor, batcher, limits, name: str, wait) -> None:
    from fastapi.responses import StreamingResponse

    task, model = predictor.task, predictor.model
    context = getattr(model.config, "max_position_embeddings", None)

    def settings_for(body: ChatRequest):
        s = task.generation_settings()
        update = {"max_new_tokens": min(body.max_completion_tokens or body.max_tokens or s.max_new_tokens,
                                        limits.max_new_tokens)}
        if body.temperature is not None:             # below MIN_TEMPERATURE: greedy (tiny ones overflow softmax)
            sample = body.temperature >= MIN_TEMPERATURE
            update |= {"do_sample": sample, "temperature": body.temperature if sample else None}
        if body.top_p is not None:
            update["top_p"] = body.top_p
        if body.seed is not None:
            update["seed"] = body.seed
        return s.model_copy(update=update)

    def prompt(messages: list[dict], max_new: int) -> list[int]:
        try:
            ids = task.prompt_ids(messages)
        except Exception as e:                  # jinja2 errors: a template that rejects this conversation
            raise ValueError(f"the chat template cannot render these messages: {e}") from None
        if context and len(ids) + max_new > context:
            raise ValueError(f"{len(ids)} prompt tokens + max_tokens {max_new} exceed the {context}-token context")
        return ids

    def generate(ids: list[int], settings, stop: threading.Event, on_text=None):
        """A Completion (text, tokens, finish) on the model thread; on_text(piece) as text is finalised."""
        return task.complete(model, [ids], settings, stop=stop, on_text=on_text)[0]

    def envelope(ident: str, created: int, kind: str, choice: dict) -> dict:
        return {"id": ident, "object": kind, "created": created, "model": name, "choices": [choice]}

    @app.get("/v1/models")
    async def models():
        """The one model this server holds (OpenAI's model list)."""
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tunesmith"}]}

    @app.post("/v1/chat/completions",
              responses={422: {"description": "malformed request"}, 503: {"description": "busy"},
                         504: {"description": "timeout"}})
    async def chat_completions(body: ChatRequest):
        """OpenAI's chat completion: the assistant's reply to `messages` (streamed as SSE when `stream`)."""
        settings = settings_for(body)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        if batcher.waiting >= limits.max_queue:
            raise HTTPException(503, "queue full; retry shortly", headers={"Retry-After": "1"})
        try:
            ids = await batcher.call(prompt, messages, settings.max_new_tokens)
        except (ValueError, TunesmithError) as e:
            raise HTTPException(422, str(e)) from None
        ident, created, stop = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), threading.Event()
        if not body.stream:
            batcher.waiting += 1                # a generation holds the model thread like a batch of inputs
            job = asyncio.ensure_future(batcher.call(generate, ids, settings, stop))
            job.add_done_callback(lambda _: setattr(batcher, "waiting", batcher.waiting - 1))
            try:
                done = (await wait([job], "generation"))[0]
            finally:
                stop.set()
            return {**envelope(ident, created, "chat.completion",
                               {"index": 0, "message": {"role": "assistant", "content": done.text},
                                "finish_reason": done.finish}),
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": done.tokens,
                              "total_tokens": len(ids) + done.tokens}}

        pieces = streamed(batcher, lambda on_text: generate(ids, settings, stop, on_text), limits.timeout_s)

        def event(delta: dict, finish: str | None) -> str:
            chunk = envelope(ident, created, "chat.completion.chunk",
                             {"index": 0, "delta": delta, "finish_reason": finish})
            return f"data: {io.dumps(chunk)}\n\n"

        async def events():
            finish = "length"                   # past the timeout, or failed
            try:
                yield event({"role": "assistant", "content": ""}, None)
                async for piece in pieces:
                    if isinstance(piece, Finished):
                        finish = piece.result.finish if piece.result is not None else finish
                    else:
                        yield event({"content": piece}, None)
                yield event({}, finish)
                yield "data: [DONE]\n\n"
            finally:
                stop.set()                      # timeout or a client that went away: generation stops

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
