"""`lfm2 serve` beside llama.cpp's `llama-server` on the same GGUF file: concurrent streaming clients,
and a multi-turn conversation with and without prefix reuse.

    python benchmarks/server_vs_llama.py --llama-server PATH/TO/llama-server [--preset LFM2-350M]
        [--types q8_0 q4_0] [--clients 1 4 16]

For each GGUF type, a random checkpoint of the preset is converted once (`lfm2 convert --to gguf
--type T`), and both servers serve that one file: lfm2 with no flag (a Q8_0 / Q4_0 file runs in its
own format, int8 / int4) and llama-server with `-np` slots (continuous batching, its prompt cache
on). Both run at once, idle in turn: each level runs on lfm2, then on llama-server, so slow drifts
of the machine hit both. Requests go through the official `openai` client's wire format (streamed
`/v1/completions`, `ignore_eos` so every request generates exactly `--max-tokens`), the same token
ids to both servers. Reported per level: aggregate generated tokens/s over the level's wall time,
and time to first token p50 / p99 as the clients measure it. Requests decode greedily, or with
`--sampling card` the LFM2 model card's settings (what `lfm2 chat` uses), the same fields to both.

Multi-turn: a prompt of `--turn-tokens` token ids (a long conversation so far), a reply of 32
tokens, then the prompt plus the reply (as our tokenizer reads its text) plus a short new turn. The
second request's time to first token is compared with the first's, with reuse (lfm2's prefix cache;
llama-server's `cache_prompt`) and without (`--prefix-cache-bytes 0`; `cache_prompt: false`).
A first row, "LLM.generate", is the library on the same file in this process: the server at one
client should decode within 5% of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_load import free_port  # noqa: E402  (benchmarks/ is not a package)

from lfm2.bench import random_checkpoint  # noqa: E402
from lfm2.random_checkpoint import WORDS  # noqa: E402

NAME = "bench"


def wait_up(proc: subprocess.Popen, url: str, what: str) -> None:
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        time.sleep(0.5)
    raise SystemExit(f"{what} did not start")


def start_lfm2(gguf: Path, slots: int, ctx: int, prefix_bytes: int | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ["lfm2", "serve", "-m", str(gguf), "--port", str(port), "--served-model-name", NAME,
           "--max-batch", str(slots), "--max-queue", "256", "--max-model-len", str(ctx), "--log-level", "warning"]
    if prefix_bytes is not None:
        cmd += ["--prefix-cache-bytes", str(prefix_bytes)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    wait_up(proc, url, "lfm2 serve")
    return proc, url


def start_llama(binary: str, gguf: Path, slots: int, ctx: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--port", str(port), "-np", str(slots), "-c", str(slots * ctx),
           "-t", str(threads), "-tb", str(threads), "--alias", NAME, "--log-disable", "-cb"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_up(proc, url, "llama-server")
    return proc, url


async def stream_one(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """One streamed completion: (time to first text, completion tokens from the usage, else chunks)."""
    start = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), usage if usage is not None else chunks


def prompt_ids(tokenizer, seed: int, words: int) -> list[int]:
    text = " ".join(WORDS[(seed * 31 + j * 7) % len(WORDS)] for j in range(words))
    return tokenizer.encode(f"Request {seed}: {text}", add_special_tokens=True)


# `--sampling`: the request's sampling fields, the same to both servers (each ignores the other's spelling
# of the repetition penalty). "card" is the LFM2 model card's settings, what `lfm2 chat` uses; each server
# fills the fields a request leaves out with its own defaults (llama-server: top_k 40, top_p 0.95).
SAMPLING = {"greedy": {"temperature": 0},
            "card": {"temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05, "repeat_penalty": 1.05}}


async def level(url: str, prompts: list[list[list[int]]], max_tokens: int, sampling: str = "greedy") -> dict:
    """Every client streams its prompts one after the other; all clients at once.

    Each client has a connection of its own, as separate users would, and each request opens a
    new one (no keep-alive; a localhost connect costs well under a millisecond, the same to both
    servers). Reused connections failed now and then with "Server disconnected without sending a
    response": first a shared pool that handed a client's request to a connection idle past both
    servers' 5 s keep-alive (uvicorn's `timeout_keep_alive`, cpp-httplib's
    `CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND`), then, once in each of two runs, a client's own
    connection, reused right after a streamed response (llama-server at 1 client on 2026-12-04,
    a server not recorded on 2026-12-03).
    """
    async def client(mine: list[list[int]]) -> list[tuple[float, int]]:
        out = []
        async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            for ids in mine:
                body = {"model": NAME, "prompt": ids, "max_tokens": max_tokens, **SAMPLING[sampling],
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                out.append(await stream_one(http, url, body))
        return out

    start = time.perf_counter()
    results = await asyncio.gather(*(client(p) for p in prompts))
    wall = time.perf_counter() - start
    samples = [s for r in results for s in r]
    ttfts = sorted(s[0] for s in samples)
    tokens = sum(s[1] for s in samples)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall": wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[round(0.99 * (len(ttfts) - 1))]}


def run_level(name: str, proc: subprocess.Popen, url: str, prompts: list[list[list[int]]], max_tokens: int,
              sampling: str = "greedy") -> dict:
    """`level`, or an exit that says which server failed and whether its process is still alive."""
    try:
        return asyncio.run(level(url, prompts, max_tokens, sampling))
    except httpx.HTTPError as exc:
        state = "still running" if proc.poll() is None else f"exited with {proc.returncode}"
        raise SystemExit(f"{name} at {len(prompts)} clients: {exc!r}; its process {state}") from exc


async def multi_turn(url: str, tokenizer, first: list[int], cache_prompt: bool) -> tuple[float, float]:
    """(first turn's time to first token, the follow-up's)."""
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        body = {"model": NAME, "prompt": first, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
                "cache_prompt": cache_prompt}
        t = time.perf_counter()
        r = await http.post(url + "/v1/completions", json={**body, "max_tokens": 1})
        r.raise_for_status()
        ttft1 = time.perf_counter() - t
        reply = (await http.post(url + "/v1/completions", json=body)).json()["choices"][0]["text"]
        follow = first + tokenizer.encode(reply + " And now a short new question?", add_special_tokens=False)
        t = time.perf_counter()
        r = await http.post(url + "/v1/completions", json={**body, "prompt": follow, "max_tokens": 1})
        r.raise_for_status()
        return ttft1, time.perf_counter() - t


def library_row(gguf: Path, prompts: list[list[int]], max_tokens: int, sampling: str = "greedy") -> dict:
    """`LLM.generate`-equivalent (the engine, one request at a time) on the same file, in this process."""
    import lfm2

    llm = lfm2.load(str(gguf))
    llm.prefix_cache.max_bytes = 0
    params = llm.sampling_params(**{k: v for k, v in SAMPLING[sampling].items() if k != "repeat_penalty"})
    engine = llm.engine(1, max(map(len, prompts)) + max_tokens)
    list(engine.generate([prompts[0][:8]], params, 2, ignore_eos=True))
    ttfts, tokens, start = [], 0, time.perf_counter()
    for ids in prompts:
        t, first = time.perf_counter(), None
        for _ in engine.generate([ids], params, max_tokens, ignore_eos=True):
            first = first or time.perf_counter() - t
            tokens += 1
        ttfts.append(first)
    wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "tokens": tokens, "wall": wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": max(ttfts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", required=True, help="the llama-server binary")
    ap.add_argument("--preset", default="LFM2-350M")
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0"], choices=["q8_0", "q4_0"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--turn-tokens", type=int, default=2000)
    ap.add_argument("--ctx", type=int, default=2304, help="slots per request (both servers)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy",
                    help="greedy, or the model card's temperature 0.3, min_p 0.15, repetition penalty 1.05")
    ap.add_argument("--no-turns", action="store_true", help="skip the multi-turn prefix-reuse rows")
    args = ap.parse_args()

    from lfm2.tokenizer import Tokenizer

    ckpt = random_checkpoint(args.preset, args.dir / f"lfm2-{args.preset}")
    tokenizer = Tokenizer.from_dir(ckpt)
    slots = max(args.clients)
    lines = [f"{args.preset} (random weights), {args.prompt_words}-word prompts, {args.max_tokens} new tokens, "
             f"{args.requests} requests per client, sampling {args.sampling}; "
             f"{platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores; llama-server -np {slots} -t {args.threads}", "",
             "| file | engine | clients | aggregate tok/s | lfm2 / llama | TTFT p50 | TTFT p99 |",
             "|---|---|---|---|---|---|---|"]
    turns = ["", "| file | engine | reuse | first turn TTFT | follow-up TTFT | follow-up / first |",
             "|---|---|---|---|---|---|"]
    for kind in args.types:
        gguf = args.dir / f"lfm2-{args.preset}-{kind}.gguf"
        if not gguf.is_file():
            subprocess.run(["lfm2", "convert", str(ckpt), "--to", "gguf", "--type", kind, "-o", str(gguf), "-q"],
                           check=True)
        lib = library_row(gguf, [prompt_ids(tokenizer, r, args.prompt_words) for r in range(args.requests)],
                          args.max_tokens, args.sampling)
        lines.append(f"| {kind} | LLM.generate | 1 | {lib['tok_s']:.1f} | | {lib['ttft_p50'] * 1000:.0f} ms | "
                     f"{lib['ttft_p99'] * 1000:.0f} ms |")
        servers = {"lfm2": start_lfm2(gguf, slots, args.ctx),
                   "llama": start_llama(args.llama_server, gguf, slots, args.ctx, args.threads)}
        try:
            for url in (u for _, u in servers.values()):
                asyncio.run(level(url, [[prompt_ids(tokenizer, 999, 8)]], 4))  # warm-up
            for clients in args.clients:
                prompts = [[prompt_ids(tokenizer, c * 100 + r, args.prompt_words) for r in range(args.requests)]
                           for c in range(clients)]
                rows = {name: run_level(name, proc, url, prompts, args.max_tokens, args.sampling)
                        for name, (proc, url) in servers.items()}
                for name, row in rows.items():
                    ratio = f"{rows['lfm2']['tok_s'] / rows['llama']['tok_s']:.2f}x" if name == "lfm2" else ""
                    lines.append(f"| {kind} | {name} | {clients} | {row['tok_s']:.1f} | {ratio} | "
                                 f"{row['ttft_p50'] * 1000:.0f} ms | {row['ttft_p99'] * 1000:.0f} ms |")
                print("\n".join(lines), flush=True)
            if args.no_turns:
                continue
            first = tokenizer.encode(" ".join(WORDS[(j * 13) % len(WORDS)] for j in range(args.turn_tokens)),
                                     add_special_tokens=True)[: args.turn_tokens]
            for name, (_, url) in servers.items():
                a, b = asyncio.run(multi_turn(url, tokenizer, first, True))
                turns.append(f"| {kind} | {name} | on | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {b / a:.1%} |")
            for name, (_, url) in servers.items():
                if name == "lfm2":  # the prefix cache off: a server of its own
                    proc, off = start_lfm2(gguf, 1, args.ctx, prefix_bytes=0)
                    try:
                        a, b = asyncio.run(multi_turn(off, tokenizer, first[:-1], True))
                    finally:
                        proc.terminate()
                        proc.wait()
                else:
                    a, b = asyncio.run(multi_turn(url, tokenizer, first[:-2], False))
                turns.append(f"| {kind} | {name} | off | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {b / a:.1%} |")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
    print("\n".join(lines + turns))


if __name__ == "__main__":
    main()
