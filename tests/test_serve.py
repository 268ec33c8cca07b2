"""tunesmith serve: answers equal `tunesmith predict`, micro-batching, every limit (401, 413, 422, 503, 504), a bad
input that fails only its own request, the official `openai` client (chat and streaming), schemathesis against
/openapi.json (no 5xx), predictions in the task's declared schema (documented in /openapi.json), and the web page
in headless Chromium drawing each prediction kind. Servers bind 127.0.0.1 only; every wait is bounded."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from deploy_fixtures import Server, chat_run, image_run, text_run  # noqa: F401  (fixtures)

import tunesmith as ts
from tunesmith.serving.app import Limits

TEXTS = ["a great and lovely film", "dull boring plot and weak acting", "the cast was superb", "awful"]


@pytest.fixture
def predictor(text_run):
    return ts.Run(text_run).load("cpu")


def serve_app(predictor, **limits):
    return Server(ts.create_app(predictor, api_key=limits.pop("api_key", None), limits=Limits(**limits)))


def test_served_answers_equal_tunesmith_predict(text_run):
    """`tunesmith serve` in a subprocess (127.0.0.1, a free port) answers exactly what `tunesmith predict` prints."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(text_run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cli = subprocess.Popen([sys.executable, "-m", "tunesmith", "predict", str(text_run), *TEXTS],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)       # meanwhile
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "serve did not come up in 90 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        served = httpx.post(f"{url}/v1/predict", json={"inputs": TEXTS}, timeout=30).json()["predictions"]
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and "<textarea" in page.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err
    assert served == [json.loads(line) for line in out.splitlines()]
    assert "http://127.0.0.1:" in proc.stderr.read()


def test_concurrent_requests_share_batches_and_a_bad_input_fails_alone(predictor):
    expected = predictor.predict(TEXTS)
    with serve_app(predictor, max_batch=5, max_wait_ms=1500) as srv:
        bodies = [{"inputs": [t]} for t in TEXTS] + [{"inputs": [{"review": "no text column"}]}]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{srv.url}/v1/predict", json=b, timeout=30), bodies))
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
    assert [a.status_code for a in answers] == [200] * 4 + [422]
    assert [a.json()["predictions"][0] for a in answers[:4]] == expected
    assert answers[4].json()["detail"][0]["loc"] == ["body", "inputs", 0]
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    assert values["tunesmith_batch_items_total"] == 5
    assert values["tunesmith_batches_total"] < 5                     # several requests per forward pass
    assert values['tunesmith_requests_total{path="/v1/predict",status="422"}'] == 1


def test_api_key_guards_every_route_but_health(predictor):
    with serve_app(predictor, api_key="s3cret") as srv:
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        for method, path in [("POST", "/v1/predict"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs")]:
            assert httpx.request(method, srv.url + path, json={"inputs": ["x"]}, timeout=10).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert httpx.request(method, srv.url + path, json={"inputs": ["x"]}, headers=wrong, timeout=10
                                 ).status_code == 401
        ok = httpx.post(f"{srv.url}/v1/predict", json={"inputs": ["x"]}, headers={"Authorization": "Bearer s3cret"},
                        timeout=10)
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] in ("pos", "neg")


def test_body_limit_malformed_input_queue_full_and_timeout(predictor):
    with serve_app(predictor, max_body=2000, max_items=8) as srv:
        big = {"inputs": ["word " * 500]}
        assert httpx.post(f"{srv.url}/v1/predict", json=big, timeout=10).status_code == 413
        chunks = (b'{"inputs": ["' + b"w" * 500 for _ in range(1)), (b"w" * 2000 + b'"]}' for _ in range(1))
        streamed = httpx.post(f"{srv.url}/v1/predict", content=(c for g in chunks for c in g), timeout=10)
        assert streamed.status_code == 413                           # no Content-Length: counted as it arrives
        for body in [b"{not json", b'{"inputs": []}', b'{"inputs": "one"}', b'{"inputs": ["x"], "extra": 1}',
                     b'{"inputs": [3]}', b'{"inputs": ["  "]}', json.dumps({"inputs": ["x"] * 9}).encode(),
                     b'{"inputs": ["x"], "stream": true}']:                     # a classifier writes no text
            r = httpx.post(f"{srv.url}/v1/predict", content=body, headers={"Content-Type": "application/json"},
                           timeout=10)
            assert r.status_code == 422, body
            assert r.json()["detail"], body
    with serve_app(predictor, max_queue=2, max_wait_ms=800, max_batch=64) as srv:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{srv.url}/v1/predict", json={"inputs": TEXTS[:2]}, timeout=30)
            time.sleep(0.3)                                           # both inputs wait in the batch window
            full = httpx.post(f"{srv.url}/v1/predict", json={"inputs": ["x"]}, timeout=10)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert first.result().status_code == 200
    with serve_app(predictor, timeout_s=0.2, max_wait_ms=1000) as srv:
        assert httpx.post(f"{srv.url}/v1/predict", json={"inputs": ["x"]}, timeout=10).status_code == 504
        time.sleep(1.0)                                               # the dropped input's batch ends
    with serve_app(predictor) as srv:
        assert httpx.post(f"{srv.url}/v1/predict", json={"inputs": ["x"]}, timeout=10).status_code == 200


def test_images_come_as_data_uris_never_as_server_paths(image_run):
    import base64

    predictor = ts.Run(image_run).load("cpu")
    rows = [json.loads(line) for line in (image_run / "data" / "test.jsonl").read_text().splitlines()[:2]]
    files = [str(image_run / "data" / r["image"]) for r in rows]
    uris = ["data:image/png;base64," + base64.b64encode(open(f, "rb").read()).decode() for f in files]
    with serve_app(predictor) as srv:
        ok = httpx.post(f"{srv.url}/v1/predict", json={"inputs": uris}, timeout=30)
        assert ok.status_code == 200 and ok.json()["predictions"] == predictor.predict(files)
        for bad in [files[0], {"image": files[0]}, "data:image/png;base64,AAAA"]:
            r = httpx.post(f"{srv.url}/v1/predict", json={"inputs": [bad]}, timeout=30)
            assert r.status_code == 422, bad
        assert "data: URI" in httpx.post(f"{srv.url}/v1/predict", json={"inputs": [files[0]]}, timeout=30).text


def test_openai_client_chat_and_streaming(chat_run):
    import openai

    predictor = ts.Run(chat_run).load("cpu")
    question = [{"role": "user", "content": "review a great and lovely film verdict"}]
    expected = predictor.predict([{"messages": question}])[0]["output"]
    with Server(ts.create_app(predictor, api_key="k", limits=Limits(max_new_tokens=16))) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", timeout=30, max_retries=0)
        reply = client.chat.completions.create(model="any", messages=question, max_tokens=4)
        assert reply.choices[0].message.content == expected          # eval.generate's settings: same answer
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 4
        stream = client.chat.completions.create(model="any", messages=question, max_tokens=4, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        streamed = httpx.post(f"{srv.url}/v1/predict", json={"inputs": [question[0]["content"]], "stream": True},
                              headers={"Authorization": "Bearer k"}, timeout=30)
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert events[-1] == {"index": 0, "prediction": predictor.predict([question[0]["content"]])[0]}
        assert "".join(e.get("text", "") for e in events).strip() == events[-1]["prediction"]["output"]
        assert [m.id for m in client.models.list()] == [chat_run.resolve().name]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(model="any", messages=[{"role": "wizard", "content": "hi"}])


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_schemathesis_finds_no_server_error(kind, predictor, chat_run):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    served = predictor if kind == "text" else ts.Run(chat_run).load("cpu")
    with Server(ts.create_app(served, limits=Limits(max_new_tokens=4, max_wait_ms=1))) as srv:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/predict", "/health", "/metrics"}
        for op in operations:
            @given(case=op.as_strategy())
            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                case.call_and_validate(checks=[schemathesis.checks.not_a_server_error], timeout=30)

            check()


@pytest.mark.skipif(not shutil.which("chromium") and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_in_headless_chromium_shows_the_label(predictor):
    from playwright.sync_api import sync_playwright

    text = "a great and lovely film"
    with serve_app(predictor) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"], timeout=60_000)
        try:
            page = browser.new_page()
            page.goto(srv.url, timeout=30_000)
            page.fill("#text", text, timeout=10_000)
            page.click("#send", timeout=10_000)
            page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=20_000)
            assert page.text_content("#label") == predictor.predict(text)["label"]
            assert len(page.query_selector_all("#probs .row")) == 2
        finally:
            browser.close()


# ---------------------------------------------------------------- declarations: schema, /health, the page by kind

def test_predictions_follow_the_declared_schema_which_openapi_documents(predictor, image_run, chat_run):
    """Each built-in task's predict output validates against its declared schema (extra fields forbidden);
    /openapi.json names that schema for /v1/predict; /health reports the prediction kind and whether it chats, and
    only a chatting run has the chat routes."""
    from fastapi.testclient import TestClient

    from tunesmith.tasks.outputs import LabelPrediction, TextPrediction

    image = ts.Run(image_run).load("cpu")
    first = json.loads((image_run / "data" / "test.jsonl").read_text().splitlines()[0])
    picture = str(image_run / "data" / first["image"])
    chat = ts.Run(chat_run).load("cpu")
    for served, inputs, schema, kind, chats in [(predictor, TEXTS, LabelPrediction, "label", False),
                                                 (image, [picture], LabelPrediction, "label", False),
                                                 (chat, ["review good film verdict"], TextPrediction, "text", True)]:
        assert served.task.output_schema() is schema and served.task.prediction == kind
        for p in served.predict(inputs):
            schema.model_validate(p)
        client = TestClient(ts.create_app(served))
        health = client.get("/health").json()
        assert (health["prediction"], health["chats"]) == (kind, chats)
        api = client.get("/openapi.json").json()
        ref = api["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        answer = api["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]["predictions"]
        assert answer["items"]["$ref"].endswith(f"/{schema.__name__}")
        assert set(api["components"]["schemas"][schema.__name__]["properties"]) == set(schema.model_fields)
        assert ("/v1/chat/completions" in api["paths"]) == chats


class Declared(ts.Task):
    """A task of declarations and a fixed answer: what the page draws for kinds no built-in task has yet."""

    def __init__(self, prediction: str, input_key: str):
        super().__init__(recipe=None)
        self.name, self.prediction, self.input_key = f"fake-{prediction}", prediction, input_key
        self.answers = []

    @property
    def path_columns(self):
        return (self.input_key,) if self.input_key == "image" else ()

    def output_schema(self):
        from tunesmith.tasks.outputs import SCHEMAS

        return SCHEMAS[self.prediction]

    def predict(self, model, inputs):
        self.answers += inputs
        if self.prediction == "boxes":
            return [{"boxes": [{"box": [2, 3, 20, 24], "label": "cat", "score": 0.9},
                               {"box": [22, 1, 31, 9], "label": "dog", "score": 0.6}]} for _ in inputs]
        return [{"prompt": x, "output": x.upper()} for x in inputs]


def declared_predictor(task, folder):
    """A Predictor around a task without a model (create_app serves any Predictor)."""
    predictor = ts.Predictor.__new__(ts.Predictor)
    predictor.run, predictor.task, predictor.model, predictor.device = ts.Run(folder), task, None, "cpu"
    predictor._lock = threading.Lock()
    return predictor


@pytest.mark.skipif(not shutil.which("chromium") and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("kind", ["text", "boxes"])
def test_page_draws_text_and_boxes_predictions(kind, tmp_path):
    """The page draws by the declared kind: generated text as text; boxes as a list and over the dropped image."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    task = Declared(kind, "image" if kind == "boxes" else "text")
    (tmp_path / "run").mkdir()
    Image.new("RGB", (32, 32), (40, 120, 200)).save(tmp_path / "blue.png")
    with Server(ts.create_app(declared_predictor(task, tmp_path / "run"))) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"], timeout=60_000)
        try:
            page = browser.new_page()
            page.goto(srv.url, timeout=30_000)
            page.wait_for_function("document.getElementById('about').textContent.includes('fake')", timeout=20_000)
            if kind == "text":
                page.fill("#text", "hello there", timeout=10_000)
                page.click("#send", timeout=10_000)
                page.wait_for_function("document.getElementById('output').textContent.length > 0", timeout=20_000)
                assert page.text_content("#output") == "HELLO THERE" and page.is_visible("#output")
                assert not page.is_visible("#canvas") and page.query_selector_all("#probs .row") == []
            else:
                assert page.is_hidden("#text") and page.is_visible("#drop")
                page.set_input_files("#file", str(tmp_path / "blue.png"), timeout=10_000)
                page.wait_for_function("document.getElementById('canvas').dataset.drawn === '2'", timeout=20_000)
                items = [li.text_content() for li in page.query_selector_all("#boxes li")]
                assert items == ["cat 90.0% at [2, 3, 20, 24]", "dog 60.0% at [22, 1, 31, 9]"]
                assert page.eval_on_selector("#canvas", "c => [c.width, c.height]") == [32, 32]
                red = page.eval_on_selector("#canvas", "c => Array.from(c.getContext('2d').getImageData(2, 10, 1, 1)"
                                                       ".data)")
                assert red[0] > 200 and red[2] < 100                 # the box's left edge, drawn in red
                assert task.answers[0].startswith("data:image/png;base64,")
        finally:
            browser.close()
