"""Exact prefix reuse on LFM2's hybrid cache: the state after a prefix, kept at chosen boundaries.

An attention layer's cache for a prefix is the first n slots of its K/V, so a transformer can
resume from any prefix by slicing. A convolution layer keeps only the state after the *whole*
sequence it has read (its last L-1 inputs), which cannot be rewound to an earlier position. So
the state is stored at boundaries chosen while the prompt is prefilled (the end of each chat
turn, the end of the prompt, every chunk of a long prompt, the end of a generation): the conv
states there, plus the K/V of the slots since the previous stored boundary of the same sequence.
A new request resumes from the longest stored boundary that prefixes it and prefills only the
rest; the result equals a full prefill within float rounding (same operations, other chunking).
llama.cpp's server does the same for hybrid models with "context checkpoints".

Entries form a tree: an entry holds its own K/V segment and points to the entry its prefix
continues, so a conversation that grows turn by turn stores each token's K/V once, not once per
turn. Memory is bounded in bytes; the least recently used leaf goes first (an inner entry is
needed by its children, and using an entry uses its ancestors). The end of a prompt also keeps
the next-token logits, so an identical prompt (the `n` choices of one request, a retried
request) needs no forward pass at all.

The cache knows token ids only, and is used from the engine's thread (and from a synchronous
`LLM` call): a lock makes it safe to share between both.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lfm2.cache import Cache

DEFAULT_PREFIX_CACHE_BYTES = 1 << 30  # 1 GiB: ~43k tokens of LFM2-350M's float32 K/V (6 attention layers)


@dataclass(eq=False)
class Entry:
    """The state after `key` (token ids): conv states, and the K/V of slots [start, len(key))."""

    key: tuple[int, ...]
    parent: Entry | None
    keys: dict[int, torch.Tensor]  # layer -> (kv_heads, len(key) - start, head_dim)
    values: dict[int, torch.Tensor]
    conv: dict[int, torch.Tensor]  # layer -> (hidden, L - 1)
    logits: torch.Tensor | None = None  # (vocab,) after the last token, where the prompt ended here
    children: int = 0
    nbytes: int = field(default=0)

    @property
    def start(self) -> int:
        return 0 if self.parent is None else len(self.parent.key)

    def chain(self) -> list[Entry]:
        """This entry and its ancestors, root first."""
        out, e = [], self
        while e is not None:
            out.append(e)
            e = e.parent
        return out[::-1]


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PrefixCache:
    """Stored states by token-id prefix, bounded by `max_bytes` (0 turns the cache off; it may be
    changed at any time, and a smaller bound takes effect at the next store)."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"prefix cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()  # least recently used first
        self._lengths: dict[int, int] = {}  # stored key length -> how many entries have it
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0  # lookups that resumed from a stored prefix
        self.misses = 0
        self.hit_tokens = 0  # prompt tokens not prefilled thanks to a hit
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "hit_tokens": self.hit_tokens, "evictions": self.evictions}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self.bytes = 0

    # -- lookup and resume ----------------------------------------------------------------------

    def lookup(self, prompt: Sequence[int]) -> Entry | None:
        """The entry for the longest stored prefix of `prompt` that leaves a token to prefill (or,
        for the whole prompt, one that kept its logits); counts a hit or a miss. None while the
        cache is off (`max_bytes` 0)."""
        if self.max_bytes == 0:
            return None
        with self._lock:
            found = self._find(prompt)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self.hit_tokens += len(found.key)
            for e in found.chain():  # resuming uses every ancestor's segment
                self._entries.move_to_end(e.key)
            return found

    def longest(self, prompt: Sequence[int]) -> Entry | None:
        """The longest stored proper-or-whole prefix of `prompt`, without counting or touching it."""
        with self._lock:
            return self._find(prompt, need_logits=False)

    def _find(self, prompt: Sequence[int], need_logits: bool = True) -> Entry | None:
        n_prompt = len(prompt)
        for n in sorted(self._lengths, reverse=True):
            if n > n_prompt:
                continue
            e = self._entries.get(tuple(prompt[:n]))
            if e is None or (need_logits and n == n_prompt and e.logits is None):
                continue
            return e
        return None

    @staticmethod
    def restore(entry: Entry, cache: Cache, row: int = 0) -> None:
        """Write `entry`'s state into row `row` of an empty `cache` (slots [0, n), position n)."""
        n = len(entry.key)
        for e in entry.chain():
            for i in cache.keys:
                cache.keys[i][row, :, e.start : len(e.key)] = e.keys[i]
                cache.values[i][row, :, e.start : len(e.key)] = e.values[i]
        for i in cache.conv:
            cache.conv[i][row] = entry.conv[i]
        cache.valid[row, :n] = True
        cache.positions[row] = n
        cache.length = n

    # -- store ----------------------------------------------------------------------------------

    def store(self, key: Sequence[int], cache: Cache, row: int = 0, end: int | None = None,
              logits: torch.Tensor | None = None, conv: dict[int, torch.Tensor] | None = None) -> Entry | None:
        """Keep the state of `cache` row `row`, which has read `key`, its tokens in slots
        [end - len(key), end) (`end` defaults to `cache.length`). `conv` (layer -> (hidden, L-1)):
        the conv states after `key` where the cache has read further (`Cache.marked`); by default
        the cache's own. Returns the entry (None when the cache is off or the entry alone would
        not fit)."""
        if self.max_bytes == 0 or not key:
            return None
        key = tuple(key)
        end = cache.length if end is None else end
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                if logits is not None and old.logits is None:
                    old.logits = logits.detach().clone()
                    old.nbytes += _nbytes([old.logits])
                    self.bytes += _nbytes([old.logits])
                self._entries.move_to_end(key)
                return old
            parent = self._find(key[:-1], need_logits=False) if len(key) > 1 else None
            start = 0 if parent is None else len(parent.key)
            first = end - len(key)  # the slot of the key's first token
            keys = {i: t[row, :, first + start : end].clone() for i, t in cache.keys.items()}
            values = {i: t[row, :, first + start : end].clone() for i, t in cache.values.items()}
            conv = {i: t.clone() for i, t in conv.items()} if conv is not None else \
                {i: t[row].clone() for i, t in cache.conv.items()}
            kept = None if logits is None else logits.detach().reshape(-1).clone()
            entry = Entry(key, parent, keys, values, conv, kept)
            entry.nbytes = _nbytes([*keys.values(), *values.values(), *conv.values()] +
                                   ([] if kept is None else [kept])) + 8 * len(key)
            if entry.nbytes > self.max_bytes:
                return None
            if parent is not None:
                parent.children += 1
            self._entries[key] = entry
            self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
            self.bytes += entry.nbytes
            self._evict(keep=entry)
            return entry if key in self._entries else None

    def _evict(self, keep: Entry) -> None:
        """Drop least recently used leaves until the bytes fit (never `keep` or its ancestors)."""
        protected = {id(e) for e in keep.chain()}
        while self.bytes > self.max_bytes:
            victim = next((e for e in self._entries.values() if e.children == 0 and id(e) not in protected), None)
            if victim is None:
                return
            self._drop(victim)

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry.key]
        n = len(entry.key)
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]
        self.bytes -= entry.nbytes
        self.evictions += 1
        if entry.parent is not None:
            entry.parent.children -= 1
