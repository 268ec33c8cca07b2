"""`tunesmith chat RUN_DIR`: talk to a fine-tuned model in the terminal, for runs whose task declares `chats`.

Tokens stream as they are generated (the shared generation of tunesmith/tasks/generation.py); the conversation is
kept and re-sent each turn through the model's chat template, dropping the oldest turns when prompt +
max_new_tokens would exceed the context length.
Commands: /reset clears the history, /exit (or end of input) quits.
"""
from __future__ import annotations

import sys

from tunesmith.errors import TunesmithError

HELP = "/reset clears the history, /exit or Ctrl-D quits"


def trim(task, history: list[dict], budget: int) -> tuple[list[int] | None, int]:
    """Prompt ids of `history` within `budget` tokens, dropping the oldest exchange (a user message and the
    replies after it) first; `history` is shortened in place. (None, dropped) when even the last user message
    alone does not fit."""
    dropped = 0
    while True:
        ids = task.prompt_ids(history)
        if len(ids) <= budget:
            return ids, dropped
        turns = [i for i, m in enumerate(history) if m["role"] != "system"]
        if len(turns) <= 1:
            return None, dropped
        del history[turns[0]]
        dropped += 1
        while history[turns[0]]["role"] == "assistant":        # turns[0] now indexes the next message
            del history[turns[0]]
            dropped += 1


def chat(run_dir: str, max_new_tokens: int | None = None, context: int | None = None, system: str | None = None,
         stdin=None, stdout=None) -> int:
    from tunesmith.run import Run
    from tunesmith.tasks import task_class

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    run = Run(run_dir)
    if task_class(run.recipe).chats is False:           # known from the class: refused before weights load
        raise TunesmithError(f"{run.path}: task '{run.recipe.task}' does not chat; tunesmith chat needs a run of a "
                             "task that declares chats (Task.chats)")
    loaded = run.load()
    task, model = loaded.task, loaded.model
    if not task.chats:                                  # declared by the loaded model (text2text: a chat model)
        raise TunesmithError(f"{run.path}: this {run.recipe.task} model is not a chat model (no chat template of "
                             "its own); use tunesmith predict")
    settings = task.generation_settings()
    if max_new_tokens:
        settings = settings.model_copy(update={"max_new_tokens": max_new_tokens})
    context = context or getattr(model.config, "max_position_embeddings", 2048)
    budget = context - settings.max_new_tokens
    if budget <= 0:
        raise TunesmithError(f"--max-new-tokens {settings.max_new_tokens} leaves no room in a {context}-token context")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    write = lambda text: print(text, end="", file=stdout, flush=True)
    print(f"chatting with {run.model_dir} (context {context} tokens); {HELP}", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            print("(history cleared)", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        ids, dropped = trim(task, history, budget)
        if dropped:
            print(f"(history trimmed: dropped the {dropped} oldest message(s) to fit {context} tokens)",
                  file=stdout, flush=True)
        if ids is None:
            history.pop()
            print(f"(message too long: it does not fit {budget} tokens; nothing sent)", file=stdout, flush=True)
            continue
        print("bot> ", end="", file=stdout, flush=True)
        reply = task.complete(model, [ids], settings, on_text=write)[0]
        print(file=stdout, flush=True)
        history.append({"role": "assistant", "content": reply.text})
