"""lfm2's C++ kernels (`qgemv.cpp`, `kquant.cpp`, `attention.cpp`, `shortconv.cpp`, `norm.cpp`,
`swiglu.cpp`, `moe.cpp`, and `step.cpp`, a decode step through them all), compiled on first use and cached.

PyTorch has no fast weight-only int8/int4 matrix-vector product on AVX2 CPUs (its built-in ones
run at 0.4-1.2 GB/s of weights, against 20+ GB/s of memory bandwidth, as we measured them on
2-core AVX2 and AVX-512 machines), so the quantized layers of `lfm2.quant` call a small kernel of our
own; the model's wide float32 layers use its float32 GEMV at decode (`lfm2.models.lfm2.Linear`),
its attention layers a decode attention that reads the KV cache once (`attention.cpp`), and its
conv layers, norms and SwiGLU gates one pass each (`shortconv.cpp`, `norm.cpp`, `swiglu.cpp`) where
PyTorch makes several.
It is built with `torch.utils.cpp_extension` the first time it is needed (about a minute)
into `$LFM2_KERNEL_DIR`, default `~/.cache/lfm2/kernels`, in a directory named after the source,
the torch version and the compiler flags, so a changed source or a new torch never loads a stale
library. With AVX2, FMA and F16C the SIMD code is compiled in; otherwise the same file builds as
portable scalar C++.

Nothing here is required: without a compiler, or with `LFM2_NO_KERNELS=1`, `ops()` returns None
and `lfm2.quant` falls back to pure PyTorch (dequantize, then `F.linear`), which gives the same
results more slowly. A failed build warns once and is not retried in the same process.

The operators are registered with the dispatcher as `torch.ops.lfm2_quant.*`, with shape-only
("fake") implementations, so `torch.compile` can trace through the quantized layers.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("qgemv.cpp")
SOURCES = tuple(Path(__file__).with_name(f)
                for f in ("qgemv.cpp", "kquant.cpp", "attention.cpp", "shortconv.cpp", "norm.cpp", "swiglu.cpp",
                          "moe.cpp", "step.cpp"))
# included by the sources: part of the build's key
HEADERS = tuple(Path(__file__).with_name(f) for f in ("simd.h", "activations.h", "moe_slots.h", "q4_tiles.h"))
DISABLE_ENV = "LFM2_NO_KERNELS"
DIR_ENV = "LFM2_KERNEL_DIR"
# "avx2": the kernels run their AVX2 code even on an AVX-512 CPU (no AVX-512, no VNNI GEMMs), to test and
# measure on one machine what a CPU with AVX2 only runs; "avx2-128": the same, with the choices made for CPUs
# that run 256-bit operations as two 128-bit halves (AMD Zen 1, detected: `simd.h`'s avx2_halved). Read by
# `simd.h` once per process.
ISA_ENV = "LFM2_KERNEL_ISA"
_SIMD_FLAGS = ("avx2", "fma", "f16c")

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops": the loaded namespace or None once decided; "error": why not
_UNSET = object()


def disabled() -> bool:
    """True when the user asked for the pure-PyTorch path with `LFM2_NO_KERNELS=1`."""
    flag = os.environ.get(DISABLE_ENV)
    return bool(flag) and flag.strip().lower() in ("1", "true", "yes", "on")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where it cannot be read."""
    if "flags" not in _state:
        _state["flags"] = None
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("flags"):
                        _state["flags"] = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
    return _state["flags"]


def cpu_has_simd() -> bool:
    """Whether this CPU runs the AVX2 + FMA + F16C code (read from /proc/cpuinfo, else from torch)."""
    flags = cpu_flags()
    if flags is not None:
        return all(flag in flags for flag in _SIMD_FLAGS)
    # torch reports the widest vector ISA it dispatches to; AVX2 and AVX512 both imply FMA and F16C.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in AMX tiles (torch's oneDNN uses them): a
    bfloat16 GEMM was 4-6x faster than a float32 one on such a CPU (1024x1024 by 1024x512, 2 threads)."""
    return "amx_bf16" in (cpu_flags() or set())


def build_flags(simd: bool) -> tuple[list[str], list[str]]:
    """Compiler and linker flags: OpenMP so that `at::parallel_for` uses torch's threads."""
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cflags = ["-O3", *openmp, *(["-mavx2", "-mfma", "-mf16c"] if simd else [])]
    return cflags, openmp


def cache_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or Path.home() / ".cache" / "lfm2" / "kernels").expanduser()


def build_key() -> str:
    """The kernels' build, named by their sources, the torch version and the compiler flags: a changed source
    builds into a new directory, and `lfm2.compile` keys inductor's cache by it (a graph compiled against
    other kernels may call them with arguments they no longer take)."""
    if "key" not in _state:
        cflags, _ = build_flags(cpu_has_simd())
        code = b"".join(src.read_bytes() for src in (*SOURCES, *HEADERS))
        _state["key"] = hashlib.sha256(code + f"{torch.__version__} {cflags}".encode()).hexdigest()[:12]
    return _state["key"]


def _build() -> Any:
    from torch.utils.cpp_extension import load

    simd = cpu_has_simd()
    cflags, ldflags = build_flags(simd)
    name = f"lfm2_quant_{'avx2' if simd else 'generic'}_{build_key()}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").is_file():
        print(f"lfm2: compiling the matmul kernels into {build_dir} (once, about a minute) ...",
              file=sys.stderr, flush=True)
    load(name=name, sources=[str(src) for src in SOURCES], extra_cflags=cflags, extra_ldflags=ldflags,
         build_directory=str(build_dir), is_python_module=False, verbose=False)
    ops = torch.ops.lfm2_quant
    _register_fakes()
    return ops


def _register_fakes() -> None:
    """Shapes of the operators' outputs, for `torch.compile` and meta tensors."""

    @torch.library.register_fake("lfm2_quant::qgemv")
    def _(x, qweight, scales, bits, group_size, int8_activations, x16=False):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @torch.library.register_fake("lfm2_quant::fgemv")
    def _(x, weight):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("lfm2_quant::qgemm")
    def _(x, qweight, scales, bits, group_size, x16=False):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @torch.library.register_fake("lfm2_quant::qunpack")
    def _(qweight, scales):
        return torch.empty_like(qweight), torch.empty_like(scales)

    @torch.library.register_fake("lfm2_quant::kgemv")
    def _(x, blocks, type, k):
        return x.new_empty(*x.shape[:-1], blocks.shape[0])

    @torch.library.register_fake("lfm2_quant::kgemm")
    def _(x, blocks, type, k):
        return x.new_empty(*x.shape[:-1], blocks.shape[0])

    @torch.library.register_fake("lfm2_quant::kunpack")
    def _(blocks, type, k):
        return torch.empty_like(blocks)

    @torch.library.register_fake("lfm2_quant::kdequantize")
    def _(blocks, type, k, bf16=False):
        return blocks.new_empty(blocks.shape[0], k, dtype=torch.bfloat16 if bf16 else torch.float32)

    @torch.library.register_fake("lfm2_quant::short_conv")
    def _(bch, state, weight, bias):
        return bch.new_empty(*bch.shape[:-1], bch.shape[-1] // 3)

    @torch.library.register_fake("lfm2_quant::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("lfm2_quant::swiglu_")
    def _(gate, up):
        return gate

    @torch.library.register_fake("lfm2_quant::decode_attention")
    def _(q, k, v, scale, valid=None):
        return q.new_empty(q.shape)

    @torch.library.register_fake("lfm2_quant::moe_experts")
    def _(x, chosen, weights, w1, s1, w3, s3, w2, s2, bits, group_size, x16=False):
        return x.new_empty(x.shape)

    @torch.library.register_fake("lfm2_quant::kmoe_experts")
    def _(x, chosen, weights, w1, w3, w2, t1, t3, t2):
        return x.new_empty(x.shape)

    @torch.library.register_fake("lfm2_quant::dequantize")
    def _(qweight, scales, bits, group_size):
        k = qweight.shape[1] * (8 // bits)
        return qweight.new_empty(qweight.shape[0], k, dtype=torch.float32)


def ops() -> Any | None:
    """`torch.ops.lfm2_quant` (building it on first use), or None: disabled, or the build failed.

    Cheap after the first call (every quantized layer asks, every forward), and it reads
    `LFM2_NO_KERNELS` each time, so setting it takes effect at once.
    """
    if disabled():
        return None
    loaded = _state.get("ops", _UNSET)
    if loaded is not _UNSET:
        return loaded
    with _lock:
        if "ops" not in _state:
            isa = os.environ.get(ISA_ENV, "")
            if isa and isa not in ("avx2", "AVX2", "avx2-128", "AVX2-128"):  # as simd.h reads it
                warnings.warn(f"lfm2: {ISA_ENV}={isa!r} is not a setting the kernels know (only 'avx2' or "
                              "'avx2-128', to run their AVX2 code on an AVX-512 CPU); ignored", RuntimeWarning,
                              stacklevel=2)
            try:
                loaded = _build()
                # Asked here, outside any trace: `torch.compile` cannot call an operator that returns a bool,
                # and a first `has_vnni()` inside the traced decode step broke its graph in pieces (the
                # server's warm-up on a Q8_0 file, where nothing asked before: 13.7 ms a token against 10).
                _state["vnni"], _state["int8_gemm"] = bool(loaded.vnni()), bool(loaded.simd())
                _state["ops"] = loaded
            except Exception as e:  # a missing compiler or ninja raises anything from OSError to RuntimeError
                detail = " ".join(str(e).split())[-600:]
                _state["ops"], _state["error"] = None, f"{type(e).__name__}: {detail}"
                warnings.warn(
                    f"lfm2: could not build the matmul kernels ({_state['error']}); quantized layers "
                    f"use the pure-PyTorch path (dequantize, then matmul), which gives the same results but "
                    f"decodes slower than float32: quantization then only saves memory; float32 layers use "
                    f"F.linear (slower decode on wide models). Install a C++ compiler "
                    f"and ninja, or set {DISABLE_ENV}=1 to silence this warning.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _state["ops"]


def has_int8_gemm() -> bool:
    """Whether `ops().qgemm` and `ops().kgemm` (the integer GEMMs of prefill) run here: with AVX-512 VNNI, or
    their AVX2 code (three instructions where VNNI has one, still ahead of dequantizing to float32 for torch's
    GEMM: docs/benchmarks.md). Asked once, then cached."""
    if "int8_gemm" not in _state:
        loaded = ops()
        _state["int8_gemm"] = loaded is not None and bool(loaded.simd())
    return _state["int8_gemm"] and not disabled()


def has_vnni() -> bool:
    """Whether the kernels use AVX-512 VNNI here (the 16-row int4 tiles need it); asked once, then
    cached. False under `LFM2_KERNEL_ISA=avx2`."""
    if "vnni" not in _state:
        loaded = ops()
        _state["vnni"] = loaded is not None and bool(loaded.vnni())
    return _state["vnni"] and not disabled()


def build_error() -> str | None:
    """Why the last build attempt failed, or None."""
    return _state.get("error")


__all__ = ["ops", "disabled", "cpu_has_simd", "cpu_flags", "has_amx_bf16", "has_int8_gemm", "has_vnni",
           "build_error", "cache_dir", "SOURCE", "SOURCES"]
