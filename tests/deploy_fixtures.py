"""Runs the deploy tests (export, distill, serve) share: a tiny BERT classifier trained on separable reviews and a
tiny Llama chat run, each trained in seconds through the real `ts.train`."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import recipe_dict, write_reviews

import tunesmith as ts

_RUNS: dict[str, Path] = {}         # one training per test session, whichever module asks first


@pytest.fixture
def text_run(tiny_bert, tmp_path_factory) -> Path:
    if "text" not in _RUNS:
        _RUNS["text"] = _train_text(tiny_bert, tmp_path_factory)
    return _RUNS["text"]


@pytest.fixture
def chat_run(tmp_path_factory) -> Path:
    if "chat" not in _RUNS:
        _RUNS["chat"] = _train_chat(tmp_path_factory)
    return _RUNS["chat"]


@pytest.fixture
def image_run(tmp_path_factory) -> Path:
    if "image" not in _RUNS:
        from test_image_classification import image_folder, save_processor, tiny_model
        from test_image_classification import recipe_dict as image_recipe

        tmp = tmp_path_factory.mktemp("deploy-image")
        tiny_model("resnet").save_pretrained(tmp / "resnet")
        save_processor(tmp / "resnet")
        recipe = image_recipe(tmp / "resnet", image_folder(tmp / "pictures", per_class=12), train={"epochs": 2})
        _RUNS["image"] = ts.train(ts.load_recipe(recipe), run_dir=tmp / "run").path
    return _RUNS["image"]


def _train_text(tiny_bert, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("deploy")
    data = write_reviews(tmp / "reviews.csv", n=240)
    run = ts.train(ts.load_recipe(recipe_dict(tiny_bert, data)), run_dir=tmp / "run")
    assert run.metrics["accuracy"] > 0.9        # a model that learned: its labels and soft labels mean something
    return run.path


def _train_chat(tmp_path_factory) -> Path:
    from test_causal_lm import build_tiny_llama, lm_recipe, write_chats

    tmp = tmp_path_factory.mktemp("deploy-chat")
    model = build_tiny_llama(tmp / "llama")
    recipe = lm_recipe(model, write_chats(tmp / "chats.jsonl", n=60), train={"max_steps": 2},
                       eval={"generate": {"max_new_tokens": 4}})
    return ts.train(ts.load_recipe(recipe), run_dir=tmp / "run").path


class Server:
    """A uvicorn server for an app, in a thread, on 127.0.0.1 and a free port; stopped on exit (bounded waits)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start in 30 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
