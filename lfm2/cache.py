"""Inference caches, passed explicitly into the model.

LFM2 has two kinds of state:
- attention blocks keep K (after RoPE) and V per kv head for every position: a KV cache that
  grows with the sequence, here allocated once at `max_len` slots;
- convolution blocks keep only the last L-1 inputs `u = B*x` of their depthwise convolution: a
  few numbers per channel, constant in sequence length (the family's edge on devices).

A batch holds rows of different lengths with LEFT padding, so all rows write the same slot at
each step. Three small tensors make rows independent of each other:
- `valid` (B, max_len) marks which slots hold a real token; attention masks the rest;
- `positions` (B,) is each row's next RoPE position, counting its real tokens only, so a row's
  phases never depend on how long its neighbours are (as transformers' `generate` does);
- the conv state of a row is built from that row's real tokens only (pads are zeroed first).

`snapshot()` / `restore()` copy the small state (conv states, positions, slot count): enough to
roll back speculative tokens or reuse a prefix, since KV slots past `length` are simply ignored.

`marks` asks a multi-token forward pass for the conv states after some of its tokens as well as
after the last (`marked`): a convolution's state after token j of a chunk is its inputs j-L+2..j,
which the pass has at hand, so the prefix cache can keep states inside a chunk (the end of a chat
turn a few tokens before the prompt's end) without splitting the chunk into more forward passes.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from lfm2.config import ModelConfig


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros whose memory becomes resident only where written, on the CPU: an anonymous map is zero already, where
    `torch.zeros` writes every byte. The server's KV cache is `max_batch x max_len` slots (16 x 4096: 1.5 GiB for
    LFM2-350M in float32) and its first request made all of it resident; this way a cache costs the slots its
    rows use. Its pages stay 4 KiB (MADV_NOHUGEPAGE): a row's kv head spans 1 MiB of slots, and 2 MiB pages
    made six short requests resident in 600 MiB. Elsewhere (small tensors, GPUs) `torch.zeros`."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < LAZY_ZEROS_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    block = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        block.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(block, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps `block` alive


LAZY_ZEROS_BYTES = 1 << 20  # smaller tensors: a map of their own would not pay


@dataclass
class CacheSnapshot:
    length: int
    positions: torch.Tensor
    valid: torch.Tensor
    conv: dict[int, torch.Tensor]
    dense: bool = False


class Cache:
    """KV cache for attention layers and conv state for convolution layers, for B rows."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # slots filled so far (the same for every row)
        kv_shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == "full_attention":
                self.keys[i] = lazy_zeros(kv_shape, dtype, device)
                self.values[i] = lazy_zeros(kv_shape, dtype, device)
            else:
                shape = (batch_size, config.hidden_size, config.conv_L_cache - 1)
                self.conv[i] = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Every filled slot of every row is valid (no padding, no row surgery): a single-token
        # decode step can then attend to all filled slots without building a mask.
        self.dense = True
        self.marks: tuple[int, ...] = ()  # tokens into the next prefill call after which to keep conv states
        self.marked: dict[int, list[torch.Tensor]] = {}  # layer -> (B, hidden, L-1) per mark, filled by that call

    def reserve(self, mask: torch.Tensor, all_real: bool | None = None) -> tuple[int, torch.Tensor]:
        """Claim the next T slots for a step whose real tokens are `mask` (B, T) bool.

        Returns the first slot and the RoPE positions (B, T) of the new tokens. Pads get the
        position of the next real token; their outputs are never used. `all_real` says the
        mask has no pad, when the caller knows (it saves a device sync).
        """
        if all_real is None:
            all_real = bool(mask.all())
        self.dense = self.dense and all_real
        batch, steps = mask.shape
        if batch != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows, the input has {batch}")
        start = self.length
        if start + steps > self.max_len:
            raise ValueError(
                f"cache is full: {start} of {self.max_len} slots used, {steps} more requested; "
                "allocate a larger cache (max_len)"
            )
        self.valid[:, start : start + steps] = mask
        positions = self.positions[:, None] + torch.cumsum(mask, dim=1) - mask.long()
        self.positions += mask.sum(dim=1)
        self.length = start + steps
        return start, positions

    def update_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write K, V (B, kv_heads, T, hd) at slots start.. and return all filled slots."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(
            self.length,
            self.positions.clone(),
            self.valid.clone(),
            {i: s.clone() for i, s in self.conv.items()},
            self.dense,
        )

    def restore(self, snap: CacheSnapshot) -> None:
        """Roll back to a snapshot: later KV slots are ignored, conv states are copied back."""
        self.length = snap.length
        self.dense = snap.dense
        self.positions.copy_(snap.positions)
        self.valid.copy_(snap.valid)
        for i, s in snap.conv.items():
            self.conv[i].copy_(s)

    # -- row management, for a scheduler that lets sequences join and leave a running batch ------

    def narrow(self, rows: int) -> Cache:
        """A cache over the first `rows` rows that shares this one's storage (no copy).

        A continuous-batching scheduler keeps its active rows packed at the top of one large
        cache and runs the model on this view, so a step costs the active rows only. The view has
        its own `length`: after a forward on it, copy it back (`cache.length = view.length`).
        """
        if not 1 <= rows <= self.batch_size:
            raise ValueError(f"narrow: rows={rows} must be in [1, {self.batch_size}]")
        view = object.__new__(Cache)
        view.batch_size, view.max_len, view.length = rows, self.max_len, self.length
        view.keys = {i: t[:rows] for i, t in self.keys.items()}
        view.values = {i: t[:rows] for i, t in self.values.items()}
        view.conv = {i: t[:rows] for i, t in self.conv.items()}
        view.valid, view.positions = self.valid[:rows], self.positions[:rows]
        view.dense = False  # the scheduler moves rows around: always use the mask
        view.marks, view.marked = (), {}
        return view

    def put_row(self, row: int, src: Cache, src_row: int) -> None:
        """Copy row `src_row` of `src` into row `row` of this cache, right-aligned to `self.length`.

        Every row writes the same slot at each step, so a sequence prefilled on its own (src
        slots [0, src.length)) joins a running batch by landing in slots
        [self.length - src.length, self.length); the row's earlier slots are marked empty.
        `src` may be this cache (moving a row), in which case the alignment is the identity.
        """
        self.dense = False
        n = src.length
        if n > self.length:
            raise ValueError(
                f"put_row: the source holds {n} slots but this cache has only {self.length} filled; "
                f"shift(+{n - self.length}) first"
            )
        start = self.length - n
        for i in self.keys:
            self.keys[i][row, :, start : self.length] = src.keys[i][src_row, :, :n]
            self.values[i][row, :, start : self.length] = src.values[i][src_row, :, :n]
        for i in self.conv:
            self.conv[i][row] = src.conv[i][src_row]
        valid = src.valid[src_row, :n].clone()
        self.valid[row] = False
        self.valid[row, start : self.length] = valid
        self.positions[row] = src.positions[src_row]

    def clear_row(self, row: int) -> None:
        """Empty one row: no valid slots, position 0, zero conv state (its stale K/V are never seen)."""
        self.dense = False
        self.valid[row] = False
        self.positions[row] = 0
        for state in self.conv.values():
            state[row] = 0

    def leading_free_slots(self) -> int:
        """How many slots at the start are empty in every row: what `shift` can reclaim."""
        used = self.valid[:, : self.length].any(dim=0)
        return int(used.to(torch.int8).argmax()) if bool(used.any()) else self.length

    def shift(self, delta: int) -> None:
        """Move every row's filled slots by `delta` (left when negative), changing `length` by `delta`.

        Attention depends only on which slots are valid and in what order, and RoPE positions are
        per row, so a shift changes no row's output beyond float rounding. Shifting left reclaims
        slots that every row has left (`leading_free_slots`), for a batch that outlives `max_len`;
        shifting right makes room in front for a newcomer whose prompt is longer than `length`.
        """
        self.dense = False
        if delta == 0:
            return
        n = self.length
        if delta < 0 and -delta > self.leading_free_slots():
            raise ValueError(f"shift({delta}): only {self.leading_free_slots()} leading slots are free in every row")
        if delta > 0 and n + delta > self.max_len:
            raise ValueError(f"shift(+{delta}): {n} + {delta} slots exceed max_len={self.max_len}")
        lo = max(0, -delta)  # source slots [lo, n) go to [lo + delta, n + delta)
        for store in (self.keys, self.values):
            for t in store.values():
                t[:, :, lo + delta : n + delta] = t[:, :, lo:n].clone()
        self.valid[:, lo + delta : n + delta] = self.valid[:, lo:n].clone()
        if delta > 0:
            self.valid[:, :delta] = False
        self.length = n + delta
        self.valid[:, self.length :] = False
