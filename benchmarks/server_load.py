"""Load test of `lfm2 serve`: aggregate generated tokens/s and time to first token at 1, 4 and 16 clients.

    python benchmarks/server_load.py --preset LFM2-350M            # a random checkpoint, written once
    python benchmarks/server_load.py --model DIR_OR_HUB_ID          # a real one
    python benchmarks/server_load.py --url http://host:8000 --model-name M   # a server already running

Unless `--url` is given, the server runs in a child process (so that the load generator does not
share its GIL) with `--max-batch` rows. Each client streams `--requests` completions one after the
other: a prompt of about `--prompt-words` tokens, `--max-tokens` new tokens with `ignore_eos`
(so every request generates exactly that many) and greedy sampling. Aggregate throughput is all
clients' completion tokens (from `usage`) over the wall time of the level; time to first token
is measured by each client, from sending the request to the first streamed text. A first row,
"1, no server", is `llm.generate` in this process on the same requests one at a time: the
server's overhead at one client is the gap between it and the 1-client row.

A random checkpoint gets a small trained byte-level BPE padded with plain added tokens up to the
preset's vocabulary, so the model has its released shape and every id it samples decodes to text.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORDS, random_checkpoint  # noqa: E402  (benchmarks/ is not a package)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, name: str, max_batch: int, max_len: int, threads: int | None) -> tuple:
    port = free_port()
    code = ("import sys, torch\n"
            f"{f'torch.set_num_threads({threads})' if threads else ''}\n"
            "from lfm2.server import serve\n"
            f"serve({model!r}, port={port}, max_batch={max_batch}, max_queue=256, max_len={max_len}, "
            f"model_name={name!r}, log_level='warning')\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.5)


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """Stream one completion; return (time to first text, completion tokens)."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and any(c["text"] for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else time.perf_counter() - start, tokens


async def level(url: str, name: str, clients: int, requests: int, prompt_words: int, max_tokens: int) -> dict:
    async def client_loop(c: int, http: httpx.AsyncClient) -> list[tuple[float, int]]:
        out = []
        for r in range(requests):
            words = [WORDS[(c * 31 + r * 7 + j) % len(WORDS)] for j in range(prompt_words)]
            body = {"model": name, "prompt": f"Client {c} request {r}: " + " ".join(words), "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            out.append(await one_request(http, url, body))
        return out

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    samples = [s for client in per_client for s in client]
    ttfts = sorted(s[0] for s in samples)
    tokens = sum(s[1] for s in samples)
    p99 = ttfts[round(0.99 * (len(ttfts) - 1))]
    return {"clients": clients, "requests": len(samples), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p99": p99}


def in_process_baseline(model: str, prompt_words: int, max_tokens: int, requests: int, threads: int | None) -> dict:
    """`llm.generate` on one prompt at a time, no server: what a lone client could get at best."""
    import gc

    import torch

    import lfm2

    if threads:
        torch.set_num_threads(threads)
    llm = lfm2.load(model)
    llm.generate("warm up", temperature=0, max_new_tokens=4, ignore_eos=True)
    ttfts, tokens, start = [], 0, time.perf_counter()
    for r in range(requests):
        words = [WORDS[(r * 7 + j) % len(WORDS)] for j in range(prompt_words)]
        llm.generate(f"Client 0 request {r}: " + " ".join(words), temperature=0, max_new_tokens=max_tokens,
                     ignore_eos=True)
        ttfts.append(llm.last_stats[0].time_to_first_token_s)
        tokens += llm.last_stats[0].completion_tokens
    wall = time.perf_counter() - start
    del llm
    gc.collect()
    return {"clients": "1, no server", "requests": requests, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p99": max(ttfts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="LFM2-350M", help="random checkpoint of this size (default)")
    src.add_argument("--model", help="checkpoint directory or hub id to serve")
    src.add_argument("--url", help="an lfm2 server already running")
    ap.add_argument("--model-name", default="bench", help="the served model id (with --url: the server's)")
    ap.add_argument("--dir", type=Path, default=None, help="where the random checkpoint goes")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    args = ap.parse_args()

    proc, baseline = None, None
    if args.url:
        url, name = args.url.rstrip("/"), args.model_name
    else:
        out = args.dir or Path("/tmp") / f"lfm2-serve-{args.preset}"
        model = args.model or str(random_checkpoint(args.preset, out))
        name = args.model_name
        baseline = in_process_baseline(model, args.prompt_words, args.max_tokens, args.requests, args.threads)
        proc, url = start_server(model, name, args.max_batch, args.max_len, args.threads)
    try:
        asyncio.run(level(url, name, 1, 1, 8, 4))  # warm-up
        rows = [asyncio.run(level(url, name, c, args.requests, args.prompt_words, args.max_tokens))
                for c in args.clients]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    what = args.url or args.model or f"random {args.preset}"
    print(f"\n{what}: {args.prompt_words}-word prompts, {args.max_tokens} new tokens each, "
          f"{args.requests} requests per client, max_batch {args.max_batch}, cpu_count {os.cpu_count()}\n")
    print("| clients | requests | generated tokens | wall | aggregate tokens/s | vs 1 client | TTFT p50 | TTFT p99 |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0]["tok_s"]
    for r in ([baseline] if baseline else []) + rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} s | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base:.2f}x | {r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p99'] * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
