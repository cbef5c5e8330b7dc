"""Serving numbers: the OpenAI-compatible server (continuous batching) vs `generate` one by one.

For each model (the tiny test NVLM-D and the 126M-param NVLM-D of `bench/train_step.py`, random
weights drawn from a fixed seed, float32 on CPU (and bfloat16 with `--dtypes float32,bfloat16`:
the serve CLI's default dtype), decoder params held as `load_pretrained` holds them (per layer
on CPU), tiny test tokenizer), in one run:

* the same `--requests` text prompts (different lengths, greedy, `--max_tokens` each) are sent
  by 1, 4 and 8 concurrent streaming clients (the real `openai` client, one thread each) to a
  server started as a subprocess (`python bench/serve.py --serve_model=...`, uvicorn, its own
  cores and GIL), and answered one by one by `model.generate` (batch 1) in this process, before
  and after the server runs (ratios against the mean of the two: machine speed drifts);
* throughput = completion tokens / wall time (both sides produce the same tokens: greedy, the
  same stop token; checked by token counts), the ratio server/generate, time to first token
  p50/p99 and inter-token latency p50/p99 (gaps between streamed chunks);
* the HTTP floor: the same requests from the same clients against a server on the same stack
  (Starlette, uvicorn) that runs no model and streams each answer at once, one chunk per token
  (OpenAI's chunk format, with usage), as our server streams a one-token text piece. The
  fastest any server can answer these clients on this machine: `generate`'s wall time over the
  floor's is the largest "vs generate" ratio any server could reach;
* with `--load_seconds S`: a load test of 16 concurrent clients for S seconds on the tiny model
  (mixed streaming / non-streaming, some with an image), reporting requests, errors and the
  server's running/waiting slots afterwards (must be 0).

Warm-up requests compile every program first (the server's prefill buckets and decode step,
`generate`'s programs) and are not timed.

    python bench/serve.py [--models tiny,126m] [--dtypes float32] [--requests 16] [--max_tokens 64]
        [--load_seconds 60]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

QUESTIONS = ["What is the colour of the sky?", "Name three shapes.", "Count from one to ten.",
             "Describe a red circle and a blue square.", "Why is the grass green?", "Hello!",
             "Tell me about triangles, circles and squares in a picture.", "What is two plus two?"]


def build_model(name: str, dtype: str = "float32"):
    """(NVLMModel, description) with weights drawn on the host from a fixed seed."""
    import jax
    from flax import linen as nn

    import nvlm_jax
    from bench.train_step import bench_config
    from nvlm_jax import config as C
    from nvlm_jax.data.pipeline import config_for_tokenizer
    from nvlm_jax.models import nvlm as nvlm_model
    from nvlm_jax.models.layer_layout import auto_layout, to_layout
    from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer

    tok = load_tokenizer(make_tiny_tokenizer(tempfile.mkdtemp(prefix="serve_bench_tok")))
    # Params in the compute dtype, as `load_pretrained(dtype=...)` and the serve CLI hold them.
    # (bench_config is a training config: float32 params under bf16 compute. Served that way,
    # every engine step converted every weight, while `generate` hoists that out of its loop.)
    base = (C.tiny("D") if name == "tiny" else bench_config(dtype, "none")).replace(dtype=dtype, param_dtype=dtype)
    cfg = config_for_tokenizer(base, tok)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key in ("scale", "q_norm", "k_norm"):
            return np.ones(leaf.shape, leaf.dtype)
        return (0.05 * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype)

    params = jax.device_put(jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(nvlm_model.abstract_params(cfg))))
    cfg, params = to_layout(params, cfg, auto_layout(cfg))  # as `load_pretrained` holds them
    model = nvlm_jax.NVLMModel(cfg, params, tok)
    return model, (f"{name}: {C.param_count(cfg) / 1e6:.0f}M params, llm {cfg.llm.num_layers}x{cfg.llm.hidden_size}, "
                   f"{cfg.dtype}, {cfg.layer_layout} layers")


def serve_main(args) -> None:
    """The server subprocess: build the model, serve it until killed."""
    import uvicorn

    from nvlm_jax.serve.app import create_app
    from nvlm_jax.serve.engine import Engine

    model, _ = build_model(args.serve_model, args.serve_dtype)
    engine = Engine(model, max_batch=8, max_len=args.max_len).start(warmup=True)  # as the server CLI
    uvicorn.run(create_app(engine, model_name="nvlm"), host="127.0.0.1", port=args.port, log_level="warning")


def floor_main(args) -> None:
    """The HTTP-floor subprocess: answers every chat request at once, no model: `max_tokens`
    one-character content chunks, then the finish and usage chunks and `[DONE]`."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def chunk(delta, finish=None, usage=None):
        body = dict(id="floor", object="chat.completion.chunk", created=0, model="nvlm",
                    choices=[] if usage else [dict(index=0, delta=delta, finish_reason=finish)])
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def chat(request):
        n = int((await request.json()).get("max_tokens", 16))

        async def stream():
            yield chunk(dict(role="assistant", content=""))
            for _ in range(n):
                yield chunk(dict(content="a"))
            yield chunk({}, "length")
            yield chunk(None, usage=dict(prompt_tokens=1, completion_tokens=n, total_tokens=n + 1))
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(request):
        return JSONResponse(dict(status="ok"))

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def start_server(name: str, max_len: int, dtype: str) -> tuple[subprocess.Popen, str]:
    """Serves model `name` (or, for name "floor", the HTTP floor) in a subprocess."""
    from tests.serve.server import free_port

    port = free_port()
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would block the server
    what = ["--floor_server"] if name == "floor" else [f"--serve_model={name}", f"--max_len={max_len}",
                                                       f"--serve_dtype={dtype}"]
    proc = subprocess.Popen([sys.executable, __file__, f"--port={port}", *what], stdout=subprocess.DEVNULL,
                            stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode()[-2000:]}")
        try:
            if json.loads(_get(f"{base}/health"))["status"] == "ok":
                return proc, base
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def stream_one(client, question: str, max_tokens: int, image_url: str | None = None):
    """(completion tokens, time to first token, inter-chunk gaps) of one streamed request."""
    content = [{"type": "text", "text": question}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    for chunk in client.chat.completions.create(
            model="nvlm", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last = now
    return tokens, first, gaps


def run_clients(base: str, questions, clients: int, max_tokens: int):
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: stream_one(client, q, max_tokens), questions))
    wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    ttft = [r[1] for r in results if r[1] is not None]
    gaps = [g for r in results for g in r[2]]
    return dict(wall_s=wall, tokens=tokens, tok_s=tokens / wall, ttft_p50=_pct(ttft, 50), ttft_p99=_pct(ttft, 99),
                itl_p50=_pct(gaps, 50), itl_p99=_pct(gaps, 99))


def _pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def run_generate(model, questions, max_tokens: int):
    from nvlm_jax.generate import cut_at_stop
    from nvlm_jax.processing import get_special_tokens

    im_end = get_special_tokens(model.tokenizer).im_end
    start = time.perf_counter()
    tokens = 0
    for q in questions:
        out = model.generate(model.prepare_chat(None, q), max_new_tokens=max_tokens)[0]
        tokens += cut_at_stop(out, (im_end,))[0].size
    wall = time.perf_counter() - start
    return dict(wall_s=wall, tokens=tokens, tok_s=tokens / wall)


def load_test(base: str, seconds: float, clients: int = 16) -> dict:
    import openai

    from tests.serve.server import data_url, image

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    picture = data_url(image(60, 30, seed=1))
    stop_at = time.monotonic() + seconds
    done, errors, lock = [0], [], threading.Lock()

    def worker(i):
        k = 0
        while time.monotonic() < stop_at:
            try:
                if k % 2:
                    stream_one(client, QUESTIONS[(i + k) % len(QUESTIONS)], 16, picture if k % 3 == 0 else None)
                else:
                    client.chat.completions.create(model="nvlm", max_tokens=16, temperature=0.7, seed=k,
                                                   messages=[{"role": "user", "content": QUESTIONS[i % 8]}])
                with lock:
                    done[0] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
            k += 1

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    metrics = dict(line.split() for line in _get(f"{base}/metrics").splitlines() if line)
    return dict(clients=clients, seconds=round(wall, 1), requests=done[0], errors=len(errors),
                first_error=errors[0] if errors else None, running=int(metrics["nvlm_running"]),
                waiting=int(metrics["nvlm_waiting"]), finished_cancelled=int(metrics.get("nvlm_finished_cancelled", 0)))


def bench_model(name: str, dtype: str, args) -> dict:
    model, description = build_model(name, dtype)
    questions = [f"{QUESTIONS[i % len(QUESTIONS)]} " + "Please answer. " * (i % 4) for i in range(args.requests)]
    proc, base = start_server(name, args.max_len, dtype)
    try:
        # Warm-up: compiles every prompt bucket and the decode programs (one slot alone, all slots).
        run_clients(base, questions[:4], 1, args.max_tokens)
        run_clients(base, questions[:8], 8, args.max_tokens)
        run_generate(model, questions[:8], args.max_tokens)
        before = run_generate(model, questions, args.max_tokens)
        rows = {}
        for clients in (1, 4, 8):
            rows[f"server, {clients} streaming clients"] = run_clients(base, questions, clients, args.max_tokens)
        after = run_generate(model, questions, args.max_tokens)
        load = load_test(base, args.load_seconds) if name == "tiny" and args.load_seconds else None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # This host's speed drifts by tens of percent within minutes: `generate` is timed before and
    # after the server runs, and the ratios are against the mean of the two times.
    if after["tokens"] != before["tokens"]:
        raise RuntimeError(f"generate gave {before['tokens']} then {after['tokens']} tokens for the same prompts")
    baseline = dict(wall_s=(before["wall_s"] + after["wall_s"]) / 2, tokens=before["tokens"])
    baseline["tok_s"] = baseline["tokens"] / baseline["wall_s"]
    rows = {f"generate, one by one (before / after: {before['tok_s']:.1f} / {after['tok_s']:.1f} tok/s)": baseline,
            **rows}
    # The floor streams as many tokens per request as the model's answers had.
    per_request = max(1, round(baseline["tokens"] / len(questions)))
    proc, base = start_server("floor", args.max_len, dtype)
    try:
        run_clients(base, questions[:8], 8, per_request)
        for clients in (1, 4, 8):
            rows[f"HTTP floor (no model), {clients} clients"] = run_clients(base, questions, clients, per_request)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for row in rows.values():
        row["vs_generate"] = row["tok_s"] / baseline["tok_s"]
        if row["tokens"] != baseline["tokens"]:
            row["note"] = f"{row['tokens']} tokens vs generate's {baseline['tokens']}"
    return dict(model=description, rows=rows, load=load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,126m")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--dtypes", default="float32", help="comma-separated: each model runs in each")
    parser.add_argument("--load_seconds", type=float, default=0)
    parser.add_argument("--serve_dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--serve_model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--floor_server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_model:
        serve_main(args)
        return
    if args.floor_server:
        floor_main(args)
        return
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print(f"# python bench/serve.py {' '.join(sys.argv[1:])}")
    for name, dtype in [(n, d) for n in args.models.split(",") for d in args.dtypes.split(",")]:
        result = bench_model(name, dtype, args)
        print(f"\n## {result['model']} ({args.requests} requests, max_tokens {args.max_tokens}, greedy)")
        print("| run | wall s | tokens | tok/s | vs generate | TTFT p50/p99 ms | ITL p50/p99 ms |")
        print("|---|---|---|---|---|---|---|")
        for label, r in result["rows"].items():
            latency = ("-", "-") if "ttft_p50" not in r else (
                f"{1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f}", f"{1e3 * r['itl_p50']:.1f} / "
                f"{1e3 * r['itl_p99']:.1f}")
            print(f"| {label} | {r['wall_s']:.2f} | {r['tokens']} | {r['tok_s']:.1f} | {r['vs_generate']:.2f}x | "
                  f"{latency[0]} | {latency[1]} |{' ' + r['note'] if 'note' in r else ''}")
        if result["load"]:
            print(f"\nload test: {json.dumps(result['load'])}")
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
