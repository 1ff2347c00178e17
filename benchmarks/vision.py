"""LFM2-VL on CPU: lfm2 beside transformers (and llama.cpp's `llama-mtmd-cli`) on the same random weights.

    python benchmarks/vision.py [--rounds 2] [--new 32] [--sizes 512x512 1024x768]
                                [--variants int4 int4+compile ...] [--skip-transformers]
                                [--llama-server PATH/llama-server --gguf TEXT.gguf --mmproj MMPROJ.gguf]

Random weights of the LFM2-VL-1.6B shape (text: LFM2-1.2B, `../shared/reference/configs/LFM2-1.2B.config.json`
when present, else the same numbers here; vision: SigLIP2 NaFlex so400m, 1152 wide, 26 layers, 16-pixel
patches; projector 2560 wide; bfloat16 on disk, float32 in memory) are written once by transformers
(`save_pretrained`) with a small BPE tokenizer holding LFM2-VL's image markers. For a 512x512 and a
1024x768 picture (random pixels: speed does not depend on them), each engine in a child process of
its own, interleaved `--rounds` times, reports:
- encode: the vision tower and projector on the preprocessed image (all its tiles), ms;
- ttft: from the request to the first generated token: for lfm2 `LLM.chat` with empty caches
  (preprocessing, encoding and prefill included); for transformers `generate(max_new_tokens=1)` on the
  tensors lfm2's preprocessing made (its own processor needs torchvision, which this machine lacks);
  for llama.cpp, its image encode + decode time plus its prompt eval time;
- decode: tokens/s over `--new` tokens after that prompt.

`--variants` adds lfm2 rows loaded otherwise: `int8` / `int4` (`quantize=`: the language model quantized,
the vision side float) and `+compile` (`compile=True`; the decode step is compiled by a short warm-up
chat before the measured one, whose caches are then emptied).

The image tokens, as `Lfm2VlProcessor`'s defaults make them: 256 for 512x512 (one tile); for 1024x768,
2 x 3 tiles of 256 and a 234-token thumbnail (1,770).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(512, 512), (1024, 768)]
VISION_16B = dict(model_type="siglip2_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, patch_size=16, num_patches=256, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=1e-6, vision_use_head=False)
IMAGE_TOKENS = ["<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"] + [
    f"<|img_row_{r}_col_{c}|>" for r in range(1, 7) for c in range(1, 7)]
TEXT_12B = dict(model_type="lfm2", vocab_size=65536, hidden_size=2048, intermediate_size=12288,
                block_auto_adjust_ff_dim=True, block_ff_dim=12288, block_ffn_dim_multiplier=1.0, block_multiple_of=256,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=128000,
                norm_eps=1e-5, conv_L_cache=3, rope_theta=1e6, full_attn_idxs=[2, 5, 8, 10, 12, 14])


def text_config() -> dict:
    """LFM2-1.2B's text config for transformers, its feed-forward width resolved by lfm2's reading
    (`lfm2.config.ModelConfig`) and given as is."""
    from lfm2.config import ModelConfig

    path = ROOT.parent / "shared" / "reference" / "configs" / "LFM2-1.2B.config.json"
    c = ModelConfig.from_dict(json.loads(path.read_text()) if path.is_file() else TEXT_12B)
    return dict(model_type="lfm2", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, block_auto_adjust_ff_dim=False,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                norm_eps=c.norm_eps, conv_L_cache=c.conv_L_cache, rope_theta=c.rope_theta, layer_types=c.layer_types)


def make_checkpoint(out: Path) -> Path:
    """A random LFM2-VL-1.6B-shaped checkpoint written by transformers, with a tokenizer and a chat template."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer

    from lfm2.bench import WORDS
    from lfm2.train.tokenizer import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(WORDS[i : i + 12]) for i in range(0, len(WORDS), 3)] * 4
    train_tokenizer(corpus, vocab_size=1024, out_dir=out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    config = transformers.Lfm2VlConfig(text_config=text_config(), vision_config=VISION_16B,
                                       image_token_id=tok.token_to_id("<image>"), projector_hidden_size=2560,
                                       downsample_factor=2)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.Lfm2VlForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)", file=sys.stderr)
    return out


def make_images(out: Path, sizes: list[tuple[int, int]] = SIZES) -> list[Path]:
    import numpy as np
    from PIL import Image

    paths = []
    rng = np.random.default_rng(0)
    for w, h in sizes:
        path = out / f"random-{w}x{h}.png"
        if not path.is_file():
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


OURS = """
import json, sys, time, torch, lfm2
from lfm2.images import FeatureCache, load_image
from lfm2.prefix_cache import PrefixCache
ckpt, image, new, variant = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
quantize = next((q for q in ("int8", "int4") if q in variant.split("+")), None)
llm = lfm2.load(ckpt, quantize=quantize, compile="compile" in variant.split("+"))
layout = llm.image_processor(load_image(image))
llm._encode_images([layout])  # warm-up
t = time.perf_counter(); llm._encode_images([layout]); encode = time.perf_counter() - t
messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "Describe this picture."}]}]
if "compile" in variant.split("+"):
    llm.chat(messages, temperature=0, max_new_tokens=4, ignore_eos=True)  # compiles the decode step
llm.image_cache, llm.prefix_cache = FeatureCache(), PrefixCache(0)
t = time.perf_counter()
llm.chat(messages, temperature=0, max_new_tokens=new, ignore_eos=True)
stats = llm.last_stats[0]
ttft = time.perf_counter() - t - (stats.total_s - stats.time_to_first_token_s)  # preprocessing included
plan = llm.chat_plan(messages)  # for transformers, whose own processor needs torchvision (image cached now)
torch.save({"ids": plan.ids, "images": plan.images}, image + ".plan.pt")
print(json.dumps({"encode_ms": encode * 1e3, "ttft_s": ttft, "decode": stats.decode_tokens_per_s,
                  "prompt_tokens": stats.prompt_tokens, "image_tokens": layout.num_tokens}))
"""

THEIRS = """
import json, sys, time, torch, transformers
from lfm2.images import batch
ckpt, image, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
plan = torch.load(image + ".plan.pt", weights_only=False)  # lfm2's prompt ids and preprocessed image
inputs = batch(plan["images"])
model = transformers.Lfm2VlForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
ids = torch.tensor([plan["ids"]])
with torch.inference_mode():
    model.model.get_image_features(**inputs)  # warm-up
    t = time.perf_counter(); model.model.get_image_features(**inputs); encode = time.perf_counter() - t
    def gen(n):
        t = time.perf_counter()
        model.generate(input_ids=ids, **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t
    first = gen(1)
    total = gen(1 + new)
print(json.dumps({"encode_ms": encode * 1e3, "ttft_s": first, "decode": new / max(total - first, 1e-9),
                  "prompt_tokens": len(plan["ids"])}))
"""


def child(code: str, *argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_server(binary: str, gguf: str, mmproj: str, new: int, log: Path) -> tuple[subprocess.Popen, str]:
    """llama.cpp's server with the mmproj file (2 threads, one slot), once it answers /health."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [binary, "-m", gguf, "--mmproj", mmproj, "-t", "2", "-np", "1", "-c", "4096", "--port", str(port),
           "--no-webui", "-lv", "4"]  # verbosity 4 logs the image's steps, which `_encode_ms` reads
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"llama-server did not start; see {log}")


def _stamp(line: str) -> float:
    """Seconds of a llama.cpp log line's timestamp (minutes.seconds.milliseconds.microseconds)."""
    m, sec, ms, us = (int(x) for x in line.split()[0].split("."))
    return m * 60 + sec + ms / 1e3 + us / 1e6


def _encode_ms(log: str) -> float:
    """The vision tower's time in a request's log: from "encoding mtmd batch" to "image decoded (...) in
    N ms" less those N ms (the language model reading the image tokens); the server logs no encode time."""
    lines = log.splitlines()
    start = next((_stamp(x) for x in lines if "encoding mtmd batch" in x), None)
    done = [(x, re.search(r"image decoded \(batch \d+/\d+\) in (\d+) ms", x)) for x in lines]
    done = [(x, m) for x, m in done if m]
    if start is None or not done:
        return float("nan")
    return (_stamp(done[-1][0]) - start) * 1e3 - sum(float(m.group(1)) for _, m in done)


def llama_run(url: str, image: Path, new: int, log: Path) -> dict:
    """One chat request with the image as a data URL, greedy, prompt cache off. TTFT: the request's wall
    time less the server's own decode time (so image decoding, preprocessing and HTTP are included,
    as lfm2's preprocessing is); encode: the tower's time from the server's log (`_encode_ms`)."""
    import base64
    import urllib.request

    data = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                                      {"type": "text", "text": "Describe this picture."}]}],
            "max_tokens": new, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    before = log.read_text(errors="replace") if log.is_file() else ""
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as r:
        out = json.loads(r.read())
    wall = time.perf_counter() - t
    time.sleep(1.0)  # the log's last lines
    added = log.read_text(errors="replace")[len(before):]
    timings = out["timings"]
    return {"encode_ms": _encode_ms(added),
            "ttft_s": wall - timings["predicted_ms"] / 1e3,
            "decode": timings["predicted_n"] / (timings["predicted_ms"] / 1e3),
            "prompt_tokens": out["usage"]["prompt_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/lfm2-vl-1.6b-random")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server (optional)")
    ap.add_argument("--gguf", default=None, help="the text model as GGUF, for llama-server")
    ap.add_argument("--mmproj", default=None, help="the vision part as an mmproj GGUF, for llama-server")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=[f"{w}x{h}" for w, h in SIZES], help="images, WIDTHxHEIGHT")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="more lfm2 rows: float32, int8, int4, each optionally +compile (e.g. int4+compile)")
    args = ap.parse_args()
    ckpt = make_checkpoint(Path(args.out))
    images = make_images(Path(args.out), [tuple(map(int, size.split("x"))) for size in args.sizes])
    engines = {"lfm2": lambda im: child(OURS, str(ckpt), str(im), str(args.new), "float32")}
    for variant in args.variants:
        engines[f"lfm2 {variant}"] = lambda im, v=variant: child(OURS, str(ckpt), str(im), str(args.new), v)
    if not args.skip_transformers:
        engines["transformers"] = lambda im: child(THEIRS, str(ckpt), str(im), str(args.new))
    server = None
    if args.llama_server:
        log = Path(args.out) / "llama-server.log"
        server, url = llama_server(args.llama_server, args.gguf, args.mmproj, args.new, log)
        engines["llama.cpp"] = lambda im: llama_run(url, im, args.new, log)
    try:
        results = rounds(engines, images, args.rounds)
    finally:
        if server is not None:
            server.kill()
    med = statistics.median
    print("| image | engine | encode ms | TTFT s | decode tok/s | prompt tokens |")
    print("|---|---|---:|---:|---:|---:|")
    for image in images:
        for name in engines:
            rows = results[(name, image.name)]
            print(f"| {image.stem.removeprefix('random-')} | {name} | {med(x['encode_ms'] for x in rows):.0f} | "
                  f"{med(x['ttft_s'] for x in rows):.2f} | {med(x['decode'] for x in rows):.1f} | "
                  f"{rows[0].get('prompt_tokens', '')} |")


def rounds(engines: dict, images: list[Path], n: int) -> dict[tuple[str, str], list[dict]]:
    """Each engine on each image, `n` times, interleaved."""
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(n):
        for image in images:
            for name, run in engines.items():
                t = time.perf_counter()
                got = run(image)
                results.setdefault((name, image.name), []).append(got)
                print(f"round {r + 1} {name} {image.name}: {json.dumps(got)} ({time.perf_counter() - t:.0f} s)",
                      file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    main()
