"""`tunesmith serve` vs a plain FastAPI server calling `transformers.pipeline` per request, same model, same machine.

    .venv/bin/python benchmarks/serve_vs_pipeline.py [--run RUN] [--requests 200] [--seconds 30] [--export]

Without --run it first fine-tunes the bundled MiniLM briefly on bundled Rotten Tomatoes (a real run folder; the
speed of serving does not depend on how well the model learned). Both servers are subprocesses bound to 127.0.0.1,
started with the same environment (OMP_NUM_THREADS: set it for both); the baseline builds one pipeline at start-up
and calls it for each request under a lock (HF pipelines and fast tokenizers are not safe across threads).
Clients: an asyncio load generator in this process, one text per request (the run's test snippets), at 1, 8 and
32 concurrent clients; each level stops after --requests answers or --seconds, whichever comes first. Prints the
CPU model, flags and load average before and after (other people may be using the machine), requests/s,
p50/p99 latency and the ratios (req/s, p99). A third server, `tunesmith serve --onnx int8`, joins when the run
has a checked int8 export. --export also prints `tunesmith export --quantize int8`'s table for the run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from pydantic import BaseModel


class Body(BaseModel):
    """The baseline's request: the same JSON as tunesmith serve's /v1/predict."""
    inputs: list[str]


FLAGS = ("avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "fma", "f16c")


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = set(fields.get("flags\t\t", "").split())
    model = fields.get("model name\t", "?").strip()
    return (f"cpu: {model}; {os.cpu_count()} cores visible; flags: {' '.join(f for f in FLAGS if f in flags)}\n"
            f"load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def baseline_server(model_dir: str, port: int) -> None:
    """The plain server: FastAPI, one `transformers.pipeline`, called per request."""
    import threading

    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    classify = pipeline("text-classification", model=model_dir, device="cpu", truncation=True)
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(body: Body):
        with lock:
            return {"predictions": [{"label": r["label"], "score": r["score"]} for r in classify(body.inputs)]}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start in 180 s")


async def load(url: str, texts: list[str], clients: int, requests: int, seconds: float) -> dict:
    """`clients` concurrent loops posting one text each, until `requests` answers or `seconds` pass."""
    import httpx

    latencies, errors, sent = [], 0, 0
    end = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        async def loop():
            nonlocal errors, sent
            while sent < requests and time.perf_counter() < end:
                text = texts[sent % len(texts)]
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/predict", json={"inputs": [text]})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    if not latencies:
        raise SystemExit(f"{url}: every request failed")
    latencies.sort()
    pick = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"clients": clients, "answers": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "rps": round(len(latencies) / elapsed, 2), "p50_ms": round(pick(0.5), 1), "p99_ms": round(pick(0.99), 1)}


def make_run(out: Path, steps: int) -> Path:
    import tunesmith as ts

    recipe = ts.load_recipe(Path(ts.__file__).parent / "recipes" / "rotten_tomatoes.yaml",
                            [f"train.max_steps={steps}", "data.test_size=500", "data.validation_size=200",
                             "eval.before=false", "train.eval_every=1000"])
    return ts.train(recipe, run_dir=out).path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", help="a finished text-classification run (default: fine-tune MiniLM briefly)")
    p.add_argument("--steps", type=int, default=60, help="training steps of the default run")
    p.add_argument("--requests", type=int, default=200, help="answers per concurrency level (at most)")
    p.add_argument("--seconds", type=float, default=30, help="seconds per concurrency level (at most)")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--export", action="store_true", help="also run tunesmith export --quantize int8 on the run")
    p.add_argument("--out", default="serve_vs_pipeline.json")
    p.add_argument("--baseline", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline:
        return baseline_server(args.baseline[0], int(args.baseline[1]))

    print(machine())
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} for both servers")
    run = Path(args.run) if args.run else make_run(Path("runs") / f"serve-bench-{time.strftime('%Y%m%d-%H%M%S')}",
                                                   args.steps)
    texts = [json.loads(line)["text"] for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    if args.export:
        import tunesmith as ts
        from tunesmith.deploy.export import render

        print(render(ts.export(run, quantize="int8")))
    levels = [int(x) for x in args.levels.split(",")]
    results = {}
    serve = [sys.executable, "-m", "tunesmith", "serve", str(run)]
    servers = {"tunesmith serve": serve}
    record = run / "export" / "export.json"
    if record.exists() and "int8" in json.loads(record.read_text())["files"]:
        servers["serve --onnx int8"] = serve + ["--onnx", "int8"]
    servers["FastAPI + pipeline"] = [sys.executable, __file__, "--baseline", str(run / "model")]
    for name, command in servers.items():
        port = free_port()
        args_ = command + (["--port", str(port)] if command[:3] == serve[:3] else [str(port)])
        proc = start(args_, port)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(load(url, texts, 4, 16, 10))                    # warm-up
            results[name] = [asyncio.run(load(url, texts, c, args.requests, args.seconds)) for c in levels]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n{'clients':>8}{'server':>22}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'answers':>9}{'errors':>8}")
    for i, c in enumerate(levels):
        for name, rows in results.items():
            r = rows[i]
            print(f"{c:>8}{name:>22}{r['rps']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['answers']:>9}"
                  f"{r['errors']:>8}")
        b = results["FastAPI + pipeline"][i]
        for name in [n for n in results if n != "FastAPI + pipeline"]:
            a = results[name][i]
            print(f"{'':>8}{'ratio ' + name.removeprefix('tunesmith '):>22}{a['rps'] / max(b['rps'], 1e-9):>9.2f}x"
                  f"{'':>10}{a['p99_ms'] / max(b['p99_ms'], 1e-9):>9.2f}x")
    print(machine().splitlines()[1] + " (after)")
    Path(args.out).write_text(json.dumps({"run": str(run), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
