"""Load test for `tunesmith serve`: N concurrent streaming clients against /v1/chat/completions.

Starts a server in a subprocess (or targets --url), then for each concurrency level N runs N clients that each
send streaming requests back to back until --rounds x N requests are done, and reports requests/s, latency
p50/p95, time to first token (TTFT) p50/p95, decode tokens/s per stream and tokens/s over all streams.

    python bench/serve_load.py --model smollm2-135m-instruct --device cpu --concurrency 1,8,32
    python bench/serve_load.py --model smollm2-135m-instruct --device cuda --concurrency 1,4,16,32,64 --json out.json
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Sample:
    ok: bool
    latency: float = 0.0  # request sent -> [DONE]
    ttft: float = 0.0  # request sent -> first content piece
    tokens: int = 0  # completion tokens (usage)
    error: str = ""


async def one_request(client: httpx.AsyncClient, body: dict) -> Sample:
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    return Sample(False, error=ev["error"].get("message", "error"))
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                if not first and ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    except httpx.HTTPError as e:
        return Sample(False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if not done:
        return Sample(False, error="stream ended without [DONE]")
    return Sample(True, end - t0, (first or end) - t0, tokens)


async def run_level(url: str, headers: dict, model: str | None, n: int, total: int, max_tokens: int,
                    temperature: float) -> tuple[list[Sample], float]:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "stream": True,
            "temperature": temperature, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    left = total
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(1800), limits=limits) as c:

        async def client_loop():
            nonlocal left
            while left > 0:
                left -= 1
                samples.append(await one_request(c, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(n)))
        wall = time.perf_counter() - t0
    return samples, wall


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(n: int, samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.ok]
    per_stream = [(s.tokens - 1) / (s.latency - s.ttft) for s in ok if s.tokens > 1 and s.latency > s.ttft]
    lat, ttft = [s.latency for s in ok], [s.ttft for s in ok]
    return {
        "concurrency": n, "requests": len(samples), "failed": len(samples) - len(ok), "wall_s": wall,
        "req_per_s": len(ok) / wall, "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
        "tok_per_s_per_stream": statistics.median(per_stream) if per_stream else float("nan"),
        "tok_per_s_total": sum(s.tokens for s in ok) / wall,
        "completion_tokens_mean": statistics.mean(s.tokens for s in ok) if ok else 0,
        "errors": sorted({s.error for s in samples if not s.ok})[:5],
    }


def table(rows: list[dict]) -> str:
    cols = [("N", "concurrency", "{}"), ("reqs", "requests", "{}"), ("fail", "failed", "{}"),
            ("req/s", "req_per_s", "{:.2f}"), ("lat p50 s", "latency_p50_s", "{:.2f}"),
            ("lat p95 s", "latency_p95_s", "{:.2f}"), ("TTFT p50 s", "ttft_p50_s", "{:.2f}"),
            ("TTFT p95 s", "ttft_p95_s", "{:.2f}"), ("tok/s/stream", "tok_per_s_per_stream", "{:.1f}"),
            ("tok/s total", "tok_per_s_total", "{:.1f}"), ("tokens/req", "completion_tokens_mean", "{:.1f}")]
    cells = [[h for h, _, _ in cols]] + [[f.format(r[k]) for _, k, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tunesmith", "serve", args.model, "--port", str(port), "--device", args.device,
           "--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    logf = tempfile.NamedTemporaryFile("w+", prefix="serve_load-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            logf.seek(0)
            sys.exit(f"the server exited ({proc.returncode}):\n{logf.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() - t0 > args.start_timeout:
            proc.kill()
            sys.exit(f"the server did not come up in {args.start_timeout}s; log: {logf.name}")
        time.sleep(0.5)
    print(f"server up in {time.time() - t0:.1f}s: {' '.join(cmd)} (log: {logf.name})", file=sys.stderr)
    return proc, url, logf.name


def environment(args) -> dict:
    import torch

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server; else one is started")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model to serve (and to ask for)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (for the started server)")
    ap.add_argument("--threads", type=int, help="torch CPU threads of the started server")
    ap.add_argument("--batch-size", type=int, default=16, help="the started server's --batch-size")
    ap.add_argument("--api-key", help="sent as Bearer token (and given to the started server)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    proc = None
    try:
        if args.url:
            url, model = args.url.rstrip("/"), None
            if args.model:
                ids = [m["id"] for m in httpx.get(url + "/v1/models", headers=headers).json()["data"]]
                model = args.model if args.model in ids else ids[0]
        else:
            proc, url, _ = start_server(args)
            model = None  # the base
        # warm-up at the highest concurrency: first-time shapes (batch sizes, cache widths) are slow on a GPU
        top = max(levels)
        asyncio.run(run_level(url, headers, model, top, 2 * top, min(args.max_tokens, 16), 0.0))
        rows = []
        for n in levels:
            samples, wall = asyncio.run(run_level(url, headers, model, n, n * args.rounds, args.max_tokens,
                                                  args.temperature))
            rows.append(summarize(n, samples, wall))
            print(f"N={n}: {rows[-1]['requests']} requests in {wall:.1f}s", file=sys.stderr)
            for e in rows[-1]["errors"]:
                print(f"  error: {e}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    env = environment(args)
    print(f"\nmodel {args.model}, device {args.device}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
          f"batch size {args.batch_size}, max_tokens {args.max_tokens}, temperature {args.temperature}, "
          f"{args.rounds} requests per client; torch {env['torch']}, {env['cores']} CPU cores")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "environment": env, "results": rows}, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
