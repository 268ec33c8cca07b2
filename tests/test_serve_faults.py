"""tunesmith serve against hostile requests (issue 20): a PNG declaring a huge size is refused from its header, before
any decoding (fast, no memory spike, the next request still answered); NaN or Infinity anywhere in a JSON body and a
text of nothing but control characters are 422s naming the input, never a 500."""
import base64
import json
import resource
import struct
import time
import zlib

import pytest
from deploy_fixtures import chat_run, image_run, text_run  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient

import tunesmith as ts
from tunesmith.serving.app import Limits


def png_bomb(side: int = 12000) -> bytes:
    """A grayscale PNG declaring side x side pixels, all black: ~140 KB for 12000 (144 M pixels once decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []   # each row: filter byte 0, then the pixels
    for _ in range(side):
        parts.append(z.compress(row))
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def uri(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # Linux: kilobytes


def test_pixel_bomb_is_refused_from_its_header(image_run):
    predictor = ts.Run(image_run).load("cpu")
    row = json.loads((image_run / "data" / "test.jsonl").read_text().splitlines()[0])
    normal = uri((image_run / "data" / row["image"]).read_bytes())
    bomb = uri(png_bomb())
    assert len(bomb) < 200_000
    app = ts.create_app(predictor, limits=Limits(max_body=8_000_000, max_items=32, timeout_s=60))
    with TestClient(app) as client:
        t0 = time.perf_counter()
        r = client.post("/v1/predict", json={"inputs": [bomb]})
        assert time.perf_counter() - t0 < 1.0
        assert r.status_code == 422
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "inputs", 0] and "144,000,000 pixels" in detail["msg"]
        assert f"{Limits().max_pixels:,}" in detail["msg"]
        before = peak_rss_mb()
        r = client.post("/v1/predict", json={"inputs": [bomb] * 20})
        assert r.status_code == 422 and len(r.json()["detail"]) == 20
        assert peak_rss_mb() - before < 200                  # decoded, 20 bombs would take gigabytes
        t0 = time.perf_counter()
        ok = client.post("/v1/predict", json={"inputs": [normal]})
        assert ok.status_code == 200 and ok.json()["predictions"] == predictor.predict([normal])
        assert time.perf_counter() - t0 < 5.0                # no bomb is still decoding on the model thread
    small = ts.create_app(predictor, limits=Limits(max_pixels=10))              # the limit is configurable
    with TestClient(small) as client:
        r = client.post("/v1/predict", json={"inputs": [normal]})
        assert r.status_code == 422 and "over the limit of 10 pixels" in r.text


@pytest.mark.parametrize("body, loc", [
    (b'{"inputs": [NaN]}', ["body", "inputs", 0]),
    (b'{"inputs": ["fine", Infinity]}', ["body", "inputs", 1]),
    (b'{"inputs": ["fine"], "x": {"y": [-Infinity]}}', ["body", "x", "y", 0]),
])
def test_non_finite_numbers_in_a_body_are_422_naming_the_field(text_run, body, loc):
    app = ts.create_app(ts.Run(text_run).load("cpu"))
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == loc
        r = client.post("/v1/predict", json={"inputs": ["\u0000"]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "inputs", 0]
        assert client.post("/v1/predict", json={"inputs": ["a fine film"]}).status_code == 200
        r = client.post("/v1/predict", json={"inputs": [{"text": "\u0000\u200b"}]})     # a row, not a bare string
        assert r.status_code == 422 or "error" in r.json()["predictions"][0], r.text
    assert ts.Run(text_run).load("cpu").predict("\u0000") == {"error": "empty text"}       # the API refuses it too


def test_chat_temperature_nan_is_422(chat_run):
    app = ts.create_app(ts.Run(chat_run).load("cpu"))
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "temperature"]


def test_failed_batch_rerun_skips_inputs_of_timed_out_requests():
    """A batch that raises is re-run input by input; an input whose request already got its 504 is not started."""
    import asyncio

    from tunesmith.serving.app import Batcher, Metrics

    calls = []

    class Failing:
        def predict(self, items):
            calls.append(list(items))
            if len(items) > 1:
                raise ValueError("bad batch")
            return [{"label": "x"}]

    loop = asyncio.new_event_loop()
    try:
        gone, live = loop.create_future(), loop.create_future()
        gone.cancel()                                               # what wait() does at the request's timeout
        out = Batcher(Failing(), Limits(), Metrics())._predict(["a", "b"], [gone, live])
    finally:
        loop.close()
    assert calls == [["a", "b"], ["b"]] and out[1] == {"label": "x"}
