"""KV Slab: one KV buffer per GPU shared by models of every precision (FineServe's `fineserve/kvslab`).

The buffer is cut into *slabs* of `slab_size = 2 * lcm(block_bytes of every model in the config)` bytes,
so a slab divides into whole blocks of any format with zero padding. A free slab is carved for one
format on demand; when its last block is freed it goes back to the free list and may be carved for
another format. Formats therefore trade memory in uniform slab units: no external fragmentation
between precisions, and internal waste is bounded by partially filled slabs.

Layout. Models with the same `num_layers` share one pool (a `KVSlabTable`). A pool with L layers and
n slabs is the byte range `[L, 2, n * slab_size]` of the buffer: layer l's K is `[l, 0]`, its V is
`[l, 1]`. A logical slab id covers the same byte range in every layer's K and V, so allocating block
`b` reserves offset `b * block_bytes` in all of them, and a paged-attention kernel sees the usual
`[num_blocks, block_bytes]` array per layer.

Slab policies (`KVSlabManager(..., policy=...)`, `SLAB_POLICIES`): "faithful" (the class default) is
FineServe's code. The others are measured alternatives (load_tests/kv_fragmentation.py): 2 lcm of
FineServe's block sizes is large (w4a8kv4 blocks carry their scales, 6336 B next to 12288 B gives an
811 KB slab per layer for SmolLM2, ~17 MB for an 8B-class GPU), every slab then holds blocks of
dozens of sequences and stays pinned to its format while any of them lives. "padded_wholeslab"
(slabs of a few blocks, w4a8kv4 blocks straddling slab edges left unused, prompts take whole slabs;
block layout unchanged) and "split_scale_fine" (w4a8kv4 scales in a region of their own, one slot per
block id, `kv_scale_region`; slabs of 1 lcm of the power-of-two data blocks; prompts take whole slabs)
cut the waste under shifting load by 2-3x. The app serves with SERVE_SLAB_POLICY.

Also here: `StaticPartitionAllocator` (the vLLM/MuxServe baseline: a fixed region per model),
`BlockCache` (the engine-side block cache, FineServe's ElasticBlockPool) and the fragmentation metric
of DESIGN.md. No Ray: this runs in any Python process.
"""
from __future__ import annotations

import heapq
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch

from fineserve_core.kv_format import KVFormat


class KVOutOfMemory(MemoryError):
    """Not enough free KV blocks for a request; the allocator's state is unchanged."""


# ---------------------------------------------------------------------------------------------------
# One slab and one pool
# ---------------------------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class KVSlab:
    slab_id: int
    slab_size: int
    block_bytes: int = 0                                      # 0 while the slab is free (not carved)
    num_blocks: int = 0
    base: int = 0                                             # global id of local block 0
    free_list: list[int] = field(default_factory=list)        # LIFO of free local block ids
    is_free: bytearray = field(default_factory=bytearray)     # local id -> 1 if free: O(1) double-free check

    def init(self, block_bytes: int, num_blocks: int | None = None, base: int | None = None) -> None:
        """Carve the slab into blocks of one format.

        Default (FineServe): slab_size // block_bytes blocks with zero padding, global ids from
        slab_id * num_blocks. A padded table passes its own count and first id.
        """
        if self.block_bytes:
            raise RuntimeError(f"slab {self.slab_id} is already carved for {self.block_bytes} B blocks")
        if num_blocks is None:
            if block_bytes <= 0 or self.slab_size % block_bytes:
                # Global ids assume zero padding: block b of any slab starts at b * block_bytes.
                raise ValueError(f"block size {block_bytes} B does not divide slab size {self.slab_size} B")
            num_blocks, base = self.slab_size // block_bytes, self.slab_id * (self.slab_size // block_bytes)
        if block_bytes <= 0 or num_blocks <= 0 or num_blocks * block_bytes > self.slab_size:
            raise ValueError(f"{num_blocks} blocks of {block_bytes} B do not fit in slab {self.slab_id}")
        self.block_bytes, self.num_blocks, self.base = block_bytes, num_blocks, base or 0
        self.free_list = list(range(self.num_blocks - 1, -1, -1))   # pop() hands out 0, 1, 2, ...
        self.is_free = bytearray(b"\x01") * self.num_blocks

    def reset(self) -> None:
        if not self.is_empty():
            raise RuntimeError(f"slab {self.slab_id} still holds {self.num_allocated} blocks")
        self.block_bytes, self.num_blocks, self.base, self.free_list, self.is_free = 0, 0, 0, [], bytearray()

    def alloc_block(self) -> int:
        local = self.free_list.pop()
        self.is_free[local] = 0
        return local

    def free_block(self, local: int) -> None:
        if not self.is_allocated(local):
            raise ValueError(f"local block {local} of slab {self.slab_id} is not allocated")
        self.is_free[local] = 1
        self.free_list.append(local)

    def is_allocated(self, local: int) -> bool:
        return 0 <= local < self.num_blocks and not self.is_free[local]

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    @property
    def num_allocated(self) -> int:
        return self.num_blocks - len(self.free_list)

    def is_full(self) -> bool:
        return self.block_bytes > 0 and not self.free_list

    def is_empty(self) -> bool:
        return len(self.free_list) == self.num_blocks            # a free (uncarved) slab is empty too


PARTIAL_CHOICES = ("lowest", "fullest")
PADDINGS = ("none", "edge")


class KVSlabTable:
    """The slabs of one pool. Formats are identified by their block size in bytes.

    alloc fills a partial slab of the format before carving a free one; which partial slab is
    `partial_choice`: "lowest" id (FineServe's code takes any; lowest packs live blocks toward the
    pool's head) or "fullest" (best fit: fill the slab with the fewest free blocks, so lightly used
    slabs drain and go back to the free list). `near` (a block id of the same format) asks for that
    block's slab first, if it has room (per-sequence affinity). `whole_slabs_first`: a request for at
    least a free slab's worth of blocks takes whole free slabs before filling partial ones (a prompt's
    blocks then share slabs, which drain when the sequence ends); the remainder fills partial slabs.

    `padding` says what happens to a format whose block size does not divide the slab size:
      * "none" (FineServe): not allowed; block b of a format is local block b % bps of slab b // bps.
      * "edge": a format's block b still starts at byte b * block_bytes of the pool (a paged kernel's
        `[num_blocks, block_bytes]` view is unchanged); a slab carved for it holds the blocks lying
        wholly inside its byte range, the bytes of blocks straddling a slab edge are padding
        (about one block per slab). Needs a slab of >= 2 blocks.

    Thread-safe: one lock (FineServe keeps one per format plus one for the free list; a single lock is
    simpler and the critical sections are a few list operations).
    """

    def __init__(self, num_slabs: int, slab_size: int, formats: Iterable[int], *, padding: str = "none",
                 partial_choice: str = "lowest", whole_slabs_first: bool = False):
        formats = sorted(set(formats))
        if partial_choice not in PARTIAL_CHOICES:
            raise ValueError(f"unknown partial_choice {partial_choice!r} (one of {PARTIAL_CHOICES})")
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r} (one of {PADDINGS})")
        for bb in formats:
            if bb <= 0 or (slab_size % bb and (padding == "none" or slab_size < 2 * bb)):
                raise ValueError(f"block size {bb} B does not divide slab size {slab_size} B"
                                 + (" (a padded slab must hold 2 blocks)" if padding != "none" else ""))
        self.slab_size, self.padding, self.partial_choice = slab_size, padding, partial_choice
        self.whole_slabs_first = whole_slabs_first
        self.slabs = [KVSlab(i, slab_size) for i in range(num_slabs)]
        self.free_slabs: deque[int] = deque(range(num_slabs))
        # Slab ids, not slab objects: int sets iterate deterministically, so runs are reproducible.
        self.partial_slabs: dict[int, set[int]] = {bb: set() for bb in formats}
        self.full_slabs: dict[int, set[int]] = {bb: set() for bb in formats}
        # Per format and slab: first global id and block count (whole blocks inside the slab).
        self._first: dict[int, list[int]] = {}
        self._count: dict[int, list[int]] = {}
        for bb in formats:
            first = [-(-s * slab_size // bb) for s in range(num_slabs + 1)]   # = s * bps unless padded
            ends = [(s + 1) * slab_size // bb for s in range(num_slabs)]
            self._first[bb] = first[:-1]
            self._count[bb] = [e - f for e, f in zip(ends, first)]
        self._capacity = {bb: sum(self._count[bb]) for bb in formats}
        self._free_cap = dict(self._capacity)                           # blocks in free slabs
        self._partial_free = {bb: 0 for bb in formats}                  # free blocks in carved slabs
        self._carved_padding = 0                                        # bytes of carved slabs no block uses
        self._heap: dict[int, list] = {bb: [] for bb in formats}       # lazy heap over partial slabs
        self._lock = threading.RLock()

    @property
    def num_slabs(self) -> int:
        return len(self.slabs)

    @property
    def formats(self) -> tuple[int, ...]:
        return tuple(self.partial_slabs)

    def _check_format(self, block_bytes: int) -> None:
        if block_bytes not in self.partial_slabs:
            raise ValueError(f"block format {block_bytes} B is not registered in this pool "
                             f"(formats: {list(self.partial_slabs)})")

    def blocks_per_slab(self, block_bytes: int) -> int:
        """Blocks of this format per slab (an "edge"-padded slab may hold one fewer, see slab_capacity)."""
        self._check_format(block_bytes)
        return self.slab_size // block_bytes

    def slab_capacity(self, block_bytes: int, slab_id: int) -> int:
        self._check_format(block_bytes)
        return self._count[block_bytes][slab_id]

    def num_blocks(self, block_bytes: int) -> int:
        """Capacity in blocks of this format if the whole pool held it."""
        self._check_format(block_bytes)
        return self._capacity[block_bytes]

    def num_ids(self, block_bytes: int) -> int:
        """Size of the format's id space: ids 0..num_ids-1 (with "edge" padding some ids straddle slab
        edges and are never handed out)."""
        self._check_format(block_bytes)
        return self.num_slabs * self.slab_size // block_bytes

    def num_free_blocks(self, block_bytes: int) -> int:
        with self._lock:
            self._check_format(block_bytes)
            return self._free_cap[block_bytes] + self._partial_free[block_bytes]

    def partial_free_blocks(self, block_bytes: int) -> int:
        with self._lock:
            self._check_format(block_bytes)
            return self._partial_free[block_bytes]

    def free_slab_padding(self, block_bytes: int) -> int:
        """Bytes of the free slabs that blocks of this format cannot use (0 unless padded)."""
        with self._lock:
            return len(self.free_slabs) * self.slab_size - self._free_cap[block_bytes] * block_bytes

    @property
    def carved_padding(self) -> int:
        """Bytes of carved slabs that no block uses (0 unless padded)."""
        return self._carved_padding

    def _file_partial(self, bb: int, sid: int) -> None:
        self.partial_slabs[bb].add(sid)
        h = self._heap[bb]
        heapq.heappush(h, (self.slabs[sid].num_free, sid) if self.partial_choice == "fullest" else sid)
        if len(h) > 4 * len(self.partial_slabs[bb]) + 64:          # drop stale entries now and then
            self._heap[bb] = h = ([(self.slabs[s].num_free, s) for s in self.partial_slabs[bb]]
                                  if self.partial_choice == "fullest" else list(self.partial_slabs[bb]))
            heapq.heapify(h)

    def _pick_partial(self, bb: int) -> int:
        partial, h = self.partial_slabs[bb], self._heap[bb]
        if self.partial_choice == "fullest":
            while h[0][1] not in partial or self.slabs[h[0][1]].num_free != h[0][0]:
                heapq.heappop(h)
            return h[0][1]
        while h[0] not in partial:
            heapq.heappop(h)
        return h[0]

    def _slab_of(self, bb: int, block_id: int) -> int:
        return block_id * bb // self.slab_size

    def alloc(self, block_bytes: int, n: int, near: int | None = None) -> list[int]:
        """n global block ids of one format; all or nothing (KVOutOfMemory changes nothing)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        with self._lock:
            self._check_format(block_bytes)
            free = self._free_cap[block_bytes] + self._partial_free[block_bytes]
            if n > free:
                raise KVOutOfMemory(f"format {block_bytes} B: requested {n} blocks, {free} free "
                                    f"({len(self.free_slabs)} free slabs of {self.num_slabs})")
            out: list[int] = []
            partial = self.partial_slabs[block_bytes]
            hint = None
            if near is not None and 0 <= near < self.num_ids(block_bytes):
                hint = self._slab_of(block_bytes, near)
                if hint not in partial:
                    hint = None
            while len(out) < n:
                if hint is not None:
                    sid, hint = hint, None
                    partial.discard(sid)
                elif (self.whole_slabs_first and self.free_slabs
                      and n - len(out) >= self._count[block_bytes][self.free_slabs[0]]):
                    sid = self.free_slabs.popleft()
                    self._carve(sid, block_bytes)
                elif partial:
                    # Fill partial slabs first so the format holds as few slabs as possible.
                    sid = self._pick_partial(block_bytes)
                    partial.discard(sid)
                else:
                    sid = self.free_slabs.popleft()
                    self._carve(sid, block_bytes)
                slab = self.slabs[sid]
                fl, is_free, base = slab.free_list, slab.is_free, slab.base
                k = min(n - len(out), len(fl))
                for _ in range(k):
                    local = fl.pop()
                    is_free[local] = 0
                    out.append(base + local)
                self._partial_free[block_bytes] -= k
                if not fl:
                    self.full_slabs[block_bytes].add(sid)
                else:
                    self._file_partial(block_bytes, sid)
            return out

    def _carve(self, sid: int, bb: int) -> None:
        c = self._count[bb][sid]
        self.slabs[sid].init(bb, c, self._first[bb][sid])
        for f in self._free_cap:
            self._free_cap[f] -= self._count[f][sid]
        self._partial_free[bb] += c
        self._carved_padding += self.slab_size - c * bb

    def free(self, block_bytes: int, ids: Iterable[int]) -> None:
        """Return blocks; a slab that becomes empty goes back to the free list (any format may take it).

        Every id is checked before anything changes, so a bad id (double free, wrong format, out of
        range) raises ValueError and frees nothing.
        """
        ids = list(ids)
        with self._lock:
            self._check_format(block_bytes)
            limit = self.num_ids(block_bytes)
            S = self.slab_size
            sids = [b * block_bytes // S if isinstance(b, int) else -1 for b in ids]
            if len(set(ids)) != len(ids):
                dup = next(b for i, b in enumerate(ids) if b in ids[:i])
                raise ValueError(f"block {dup} appears twice in one free() call")
            slabs = self.slabs
            for b, sid in zip(ids, sids):
                if not isinstance(b, int) or not 0 <= b < limit:
                    raise ValueError(f"block {b!r} is out of range for format {block_bytes} B "
                                     f"(0..{limit - 1})")
                slab = slabs[sid]
                if slab.block_bytes != block_bytes:
                    raise ValueError(f"block {b} of format {block_bytes} B is not allocated: its slab "
                                     f"{slab.slab_id} holds {slab.block_bytes or 'no'} format")
                if not slab.is_allocated(b - slab.base):
                    raise ValueError(f"block {b} of format {block_bytes} B is not allocated (double free?)")
            for b, sid in zip(ids, sids):
                slab = slabs[sid]
                local = b - slab.base
                slab.is_free[local] = 1
                slab.free_list.append(local)
            touched = set(sids)
            self._partial_free[block_bytes] += len(ids)
            for sid in touched:
                slab = self.slabs[sid]
                self.full_slabs[block_bytes].discard(sid)
                if slab.is_empty():
                    self.partial_slabs[block_bytes].discard(sid)
                    self._partial_free[block_bytes] -= slab.num_blocks
                    self._carved_padding -= self.slab_size - slab.num_blocks * block_bytes
                    slab.reset()
                    for f in self._free_cap:
                        self._free_cap[f] += self._count[f][sid]
                    self.free_slabs.appendleft(sid)   # LIFO: the slab just emptied is re-carved first
                else:
                    self._file_partial(block_bytes, sid)

    def is_allocated(self, block_bytes: int, block_id: int) -> bool:
        if block_bytes not in self.partial_slabs or not 0 <= block_id < self.num_ids(block_bytes):
            return False
        slab = self.slabs[self._slab_of(block_bytes, block_id)]
        return slab.block_bytes == block_bytes and slab.is_allocated(block_id - slab.base)


# ---------------------------------------------------------------------------------------------------
# Model specs, reports, the allocator protocol
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModelKVSpec:
    model_id: str
    num_layers: int
    block_bytes: int               # one block of one layer's K (V is the same size), see KVFormat
    tokens_per_block: int
    precision: str
    rate: float = 1.0              # expected request rate: weighs pool sizes / static shares
    max_num_batched_tokens: int = 2048
    scale_bytes: int = 0           # bytes of block_bytes that are the scale area (w4a8kv4); 0 if none

    def __post_init__(self):
        if self.num_layers <= 0 or self.block_bytes <= 0 or self.tokens_per_block <= 0:
            raise ValueError(f"{self.model_id!r}: num_layers, block_bytes and tokens_per_block must be > 0")
        if not 0 <= self.scale_bytes < self.block_bytes:
            raise ValueError(f"{self.model_id!r}: scale_bytes must be in [0, block_bytes)")
        if self.rate < 0 or self.max_num_batched_tokens < 0:
            raise ValueError(f"{self.model_id!r}: rate and max_num_batched_tokens must be >= 0")

    @classmethod
    def from_format(cls, model_id: str, fmt: KVFormat, num_layers: int, rate: float = 1.0,
                    max_num_batched_tokens: int = 2048) -> "ModelKVSpec":
        return cls(model_id, num_layers, fmt.block_bytes, fmt.tokens_per_block, fmt.precision, rate,
                   max_num_batched_tokens, fmt.scale_bytes)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id reserves: every layer, K and V."""
        return 2 * self.num_layers * self.block_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_per_block / self.tokens_per_block

    @property
    def min_blocks(self) -> int:
        """Blocks one full prefill batch needs (FineServe's minimum reservation)."""
        return self.max_num_batched_tokens // self.tokens_per_block


@dataclass(slots=True)
class FragmentationReport:
    """DESIGN.md's fragmentation at one moment (bytes across all layers, K and V).

    wasted = slack (allocated blocks not holding live tokens; blocks in engine caches count as
    allocated) + free bytes the failing model cannot use (`unusable_free_bytes`: other formats' partial
    slabs / other models' static regions; `unusable_unformatted_bytes`: free slabs of other pools and
    buffer bytes no pool or region covers) + `overhead_bytes` (only for non-default slab policies:
    padding at padded slabs' edges, reserved split-scale slots not in use).
    """
    buffer_bytes: int
    live_bytes: float
    allocated_bytes: int
    unusable_free_bytes: int
    unusable_unformatted_bytes: int
    per_precision: dict[str, dict[str, float]]     # precision -> live/allocated/slack/unusable_free bytes
    failing_model: str | None = None
    overhead_bytes: int = 0        # bytes no block can use: slab padding, unused split-scale slots

    @property
    def slack_bytes(self) -> float:
        return self.allocated_bytes - self.live_bytes

    @property
    def wasted_bytes(self) -> float:
        return self.slack_bytes + self.unusable_free_bytes + self.unusable_unformatted_bytes + self.overhead_bytes

    @property
    def wasted_fraction(self) -> float:
        return self.wasted_bytes / self.buffer_bytes

    @property
    def kv_efficiency(self) -> float:
        """Live-token KV bytes / buffer bytes."""
        return self.live_bytes / self.buffer_bytes

    def to_dict(self) -> dict:
        return {"buffer_bytes": self.buffer_bytes, "live_bytes": self.live_bytes,
                "allocated_bytes": self.allocated_bytes, "slack_bytes": self.slack_bytes,
                "unusable_free_bytes": self.unusable_free_bytes,
                "unusable_unformatted_bytes": self.unusable_unformatted_bytes,
                "overhead_bytes": self.overhead_bytes, "wasted_bytes": self.wasted_bytes, "wasted_fraction": self.wasted_fraction,
                "kv_efficiency": self.kv_efficiency, "failing_model": self.failing_model,
                "per_precision": {p: dict(d) for p, d in self.per_precision.items()}}


@runtime_checkable
class KVAllocator(Protocol):
    """What an engine needs from a KV allocator; KVSlabManager and StaticPartitionAllocator both fit."""
    buffer_bytes: int

    @property
    def model_ids(self) -> tuple[str, ...]: ...
    def spec(self, model_id: str) -> ModelKVSpec: ...
    def kv_region(self, model_id: str) -> torch.Tensor: ...
    def kv_scale_region(self, model_id: str) -> torch.Tensor | None: ...
    def alloc(self, model_id: str, n: int) -> list[int]: ...
    def free(self, model_id: str, ids: Iterable[int]) -> None: ...
    def num_free_blocks(self, model_id: str) -> int: ...
    def num_blocks(self, model_id: str) -> int: ...
    def num_allocated_blocks(self, model_id: str) -> int: ...
    def owned_blocks(self, model_id: str) -> list[int]: ...
    def stats(self) -> dict: ...
    def fragmentation(self, live_tokens: dict[str, int],
                      failing_model: str | None = None) -> FragmentationReport: ...


def fragmentation(allocator: KVAllocator, live_tokens: dict[str, int],
                  failing_model: str | None = None) -> FragmentationReport:
    return allocator.fragmentation(live_tokens, failing_model)


def _check_buffer(buffer: torch.Tensor) -> None:
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(f"KV buffer must be a contiguous 1-D uint8 tensor, got {buffer.dtype} "
                         f"shape {tuple(buffer.shape)}")


def _check_specs(specs: Sequence[ModelKVSpec]) -> dict[str, ModelKVSpec]:
    if not specs:
        raise ValueError("need at least one ModelKVSpec")
    out: dict[str, ModelKVSpec] = {}
    for s in specs:
        if s.model_id in out:
            raise ValueError(f"model id {s.model_id!r} appears twice")
        out[s.model_id] = s
    return out


class _ModelBook:
    """Per-model ownership (catches a model freeing another model's block of the same format) and the
    shared bits of both allocators' bookkeeping."""
    __slots__ = ("specs", "owned")

    def __init__(self, specs: dict[str, ModelKVSpec]):
        self.specs = specs
        self.owned: dict[str, set[int]] = {m: set() for m in specs}

    def spec(self, model_id: str) -> ModelKVSpec:
        try:
            return self.specs[model_id]
        except KeyError:
            raise KeyError(f"unknown model {model_id!r}; known: {sorted(self.specs)}") from None

    def check_free(self, model_id: str, ids: list[int]) -> None:
        owned, seen = self.owned[model_id], set()
        for b in ids:
            if b in seen:
                raise ValueError(f"block {b} appears twice in one free() call of model {model_id!r}")
            seen.add(b)
            if b not in owned:
                raise ValueError(f"block {b} is not allocated to model {model_id!r} (double free?)")

    def slack(self, live_tokens: dict[str, int]) -> tuple[float, int, dict[str, dict[str, float]]]:
        """(live bytes, allocated bytes, per-precision dict) over all models."""
        for m in live_tokens:
            self.spec(m)
        per: dict[str, dict[str, float]] = {}
        live_total, alloc_total = 0.0, 0
        for m, s in self.specs.items():
            live = live_tokens.get(m, 0) * s.bytes_per_token
            alloc = len(self.owned[m]) * s.bytes_per_block
            if live > alloc * (1 + 1e-9):
                raise ValueError(f"model {m!r}: {live_tokens.get(m, 0)} live tokens do not fit in its "
                                 f"{len(self.owned[m])} allocated blocks")
            d = per.setdefault(s.precision, {"live_bytes": 0.0, "allocated_bytes": 0, "slack_bytes": 0.0,
                                             "unusable_free_bytes": 0})
            d["live_bytes"] += live
            d["allocated_bytes"] += alloc
            d["slack_bytes"] += alloc - live
            live_total += live
            alloc_total += alloc
        return live_total, alloc_total, per


# ---------------------------------------------------------------------------------------------------
# KVSlabManager: one per GPU
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SlabPolicy:
    """How KVSlabManager sizes slabs and picks them; the default is FineServe's code ("faithful").

    slab_factor       slab = slab_factor * lcm(block sizes): FineServe uses 2.
    padding           "none" (FineServe): the slab is a multiple of every block size. "edge": the slab
                      is the smallest multiple of the lcm of the formats without a scale area
                      (bf16/fp8: zero padding there) that holds `min_blocks_per_slab` blocks of each
                      other format (w4a8kv4); those formats lose the blocks straddling slab edges
                      (~1 block per slab, counted as overhead). Block b still starts at byte
                      b * block_bytes of the pool, so block layout and kernels are unchanged.
    partial_choice    which partial slab alloc fills first: "lowest" id, or "fullest" (best fit).
    affinity          alloc(..., near=block) fills near's slab first (a sequence's blocks share slabs).
    whole_slabs_first an alloc of at least a slab's worth of blocks (a prompt) takes whole free slabs
                      before filling partial ones, so those slabs drain when the sequence ends.
    split_scales      a format's scale area (ModelKVSpec.scale_bytes) lives in a per-pool scale region
                      reserved up front (one slot per possible block id, `kv_scale_region`; the kernels
                      take data and scale views with their own strides), so slabs hold the data part
                      only (power-of-two sizes, a much smaller lcm). Reserved slots not backing an
                      allocated block count as overhead.
    """
    name: str = "faithful"
    slab_factor: int = 2
    padding: str = "none"
    min_blocks_per_slab: int = 4
    partial_choice: str = "lowest"
    affinity: bool = False
    whole_slabs_first: bool = False
    split_scales: bool = False

    def __post_init__(self):
        if self.slab_factor < 1 or self.min_blocks_per_slab < 2:
            raise ValueError("slab_factor must be >= 1 and min_blocks_per_slab >= 2")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r} (one of {PADDINGS})")
        if self.partial_choice not in PARTIAL_CHOICES:
            raise ValueError(f"unknown partial_choice {self.partial_choice!r} (one of {PARTIAL_CHOICES})")


SLAB_POLICIES: dict[str, SlabPolicy] = {p.name: p for p in (
    SlabPolicy(),                                                            # FineServe's code
    SlabPolicy("lcm1", slab_factor=1),
    SlabPolicy("bestfit", partial_choice="fullest"),
    SlabPolicy("affinity", affinity=True),
    SlabPolicy("wholeslab", whole_slabs_first=True),
    SlabPolicy("padded", padding="edge"),
    SlabPolicy("padded_wholeslab", padding="edge", whole_slabs_first=True),
    SlabPolicy("split_scale", split_scales=True),
    SlabPolicy("split_scale_fine", split_scales=True, slab_factor=1, whole_slabs_first=True),
)}


#: What the app serves with under policy fineserve (AppConfig.slab_policy): the layout that wasted least
#: on most traces of load_tests/kv_fragmentation.py.
SERVE_SLAB_POLICY = "split_scale_fine"


def padded_slab_size(formats: Sequence[int], exact: Sequence[int], min_blocks: int) -> int:
    """Slab size for padding="edge": the smallest multiple of lcm(exact) (zero padding for those
    formats) holding min_blocks blocks of every format that does not divide it."""
    base = math.lcm(*(exact or formats))
    padded = [f for f in formats if base % f]
    return base * max(1, -(-min_blocks * max(padded, default=0) // base))


def resolve_policy(policy: str | SlabPolicy) -> SlabPolicy:
    if isinstance(policy, SlabPolicy):
        return policy
    try:
        return SLAB_POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown slab policy {policy!r}; known: {sorted(SLAB_POLICIES)}") from None


@dataclass(slots=True)
class _Pool:
    num_layers: int
    offset: int                    # byte offset in the buffer
    num_slabs: int
    table: KVSlabTable
    model_ids: list[str]
    scale_slot: dict[int, int] = field(default_factory=dict)   # split scales: table format -> slot bytes
    scale_offset: int = 0          # split scales: the pool's scale region [L, 2, sum(num_ids * slot)]
    scale_nbytes: int = 0

    def nbytes(self, slab_size: int) -> int:
        return self.num_layers * 2 * self.num_slabs * slab_size


class KVSlabManager:
    """Owns ONE KV buffer for all models on a GPU; pools per num_layers, slabs shared across formats.

    Sizing (FineServe's `_calculate_engine_slab_demand` / `_assign_slab_pool`):
      * a slab unit is one layer's K slab + V slab (2 * slab_size bytes); units = buffer // unit;
      * each model reserves ceil((max_num_batched_tokens // tokens_per_block) / blocks_per_slab)
        * num_layers units (one full prefill batch), summed per pool;
      * the rest is split by demand = sum(rate) * num_layers per pool, rounded down to a multiple of
        num_layers; whole layer-multiples left over by that rounding go to the pools with the most
        demand (FineServe leaves them unused);
      * num_slabs = pool_units // num_layers; pools are contiguous in the buffer.

    `policy` (a name in SLAB_POLICIES or a SlabPolicy) selects measured alternatives to FineServe's
    slab sizing and slab choice; "faithful" (default) is FineServe's code. An explicit `slab_size`
    overrides the policy's size.
    """

    def __init__(self, buffer: torch.Tensor, specs: Sequence[ModelKVSpec], slab_size: int | None = None,
                 policy: str | SlabPolicy = "faithful"):
        _check_buffer(buffer)
        self.policy = pol = resolve_policy(policy)
        self._book = _ModelBook(_check_specs(specs))
        self.buffer = buffer
        self.buffer_bytes = buffer.numel()
        # Table format of each model: its block size, or its data part when scales are split off.
        self._fmt = {s.model_id: (s.block_bytes - s.scale_bytes if pol.split_scales and s.scale_bytes
                                  else s.block_bytes) for s in specs}
        keys = sorted(set(self._fmt.values()))
        # All models of the config, not only those placed now: a model joining later needs no re-carve.
        lcm = math.lcm(*keys)
        if slab_size is None and pol.padding != "none":
            slab_size = padded_slab_size(keys, [self._fmt[s.model_id] for s in specs if not s.scale_bytes],
                                         pol.min_blocks_per_slab)
        self.slab_size = pol.slab_factor * lcm if slab_size is None else slab_size
        if pol.padding == "none" and self.slab_size % lcm:
            raise ValueError(f"slab size {self.slab_size} B is not a multiple of every block size (lcm {lcm} B)")
        S = self.slab_size

        by_layers: dict[int, list[ModelKVSpec]] = {}
        for s in specs:
            by_layers.setdefault(s.num_layers, []).append(s)
        scale_slot: dict[int, dict[int, int]] = {L: {} for L in by_layers}
        for L, ss in by_layers.items():
            for s in ss:
                if self._fmt[s.model_id] != s.block_bytes:
                    k = self._fmt[s.model_id]
                    scale_slot[L][k] = max(scale_slot[L].get(k, 0), s.scale_bytes)
        # Scale bytes one slab needs (per layer, K or V), reserved alongside every slab of the pool.
        per_slab_scale = max((sum(-(-S * sb // k) for k, sb in d.items()) for d in scale_slot.values()),
                             default=0)
        unit = 2 * (S + per_slab_scale)
        total_units = self.buffer_bytes // unit

        def usable_per_slab(k: int) -> int:
            return max(1, S // k - (1 if S % k else 0))

        minimum = {L: sum(math.ceil(s.min_blocks / usable_per_slab(self._fmt[s.model_id])) * L for s in ss)
                   for L, ss in by_layers.items()}
        minimum = {L: max(m, L) for L, m in minimum.items()}        # every pool gets at least one slab
        remaining = total_units - sum(minimum.values())
        if remaining < 0:
            raise ValueError(
                f"KV buffer of {self.buffer_bytes} B is too small: it holds {total_units} slab units of "
                f"{unit} B (slab {S} B, K+V), the minimum reservations need "
                f"{sum(minimum.values())} (per num_layers: {minimum})")
        demand = {L: sum(s.rate for s in ss) * L for L, ss in by_layers.items()}
        total_demand = sum(demand.values())
        if total_demand <= 0:                                       # all rates 0: split by layer count
            demand = {L: float(L) for L in by_layers}
            total_demand = sum(demand.values())
        units = {L: minimum[L] + int(remaining * demand[L] / total_demand) // L * L for L in by_layers}
        left = total_units - sum(units.values())
        for L in sorted(by_layers, key=lambda L: -demand[L]):
            extra = left // L * L
            units[L] += extra
            left -= extra

        self._pools: dict[int, _Pool] = {}
        offset = 0
        for L, ss in by_layers.items():
            n = units[L] // L
            table = KVSlabTable(n, S, (self._fmt[s.model_id] for s in ss), padding=pol.padding,
                                partial_choice=pol.partial_choice, whole_slabs_first=pol.whole_slabs_first)
            pool = _Pool(L, offset, n, table, [s.model_id for s in ss], scale_slot[L])
            offset += pool.nbytes(S)
            pool.scale_offset = offset
            pool.scale_nbytes = 2 * L * sum(table.num_ids(k) * sb for k, sb in scale_slot[L].items())
            offset += pool.scale_nbytes
            self._pools[L] = pool
        assert offset <= self.buffer_bytes
        self._lock = threading.RLock()

    # --- lookup ---
    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(self._book.specs)

    def spec(self, model_id: str) -> ModelKVSpec:
        return self._book.spec(model_id)

    def _pool(self, model_id: str) -> tuple[ModelKVSpec, _Pool]:
        s = self._book.spec(model_id)
        return s, self._pools[s.num_layers]

    def table_format(self, model_id: str) -> int:
        """The block size the model's pool table knows it by (its data part when scales are split)."""
        self._book.spec(model_id)
        return self._fmt[model_id]

    def _split(self, model_id: str) -> bool:
        return self._fmt[model_id] != self._book.specs[model_id].block_bytes


    def pool_table(self, num_layers: int) -> KVSlabTable:
        return self._pools[num_layers].table

    @property
    def pools(self) -> dict[int, KVSlabTable]:
        return {L: p.table for L, p in self._pools.items()}

    # --- the engine API ---
    def kv_region(self, model_id: str) -> torch.Tensor:
        """uint8 view [num_layers, 2, num_slabs * slab_size] of the model's pool; K = [:, 0], V = [:, 1].
        Its blocks are table_format(model_id) bytes: the data part only when the scales are split off."""
        _, p = self._pool(model_id)
        return self.buffer[p.offset: p.offset + p.nbytes(self.slab_size)].view(
            p.num_layers, 2, p.num_slabs * self.slab_size)

    def kv_scale_region(self, model_id: str) -> torch.Tensor | None:
        """Split scales: uint8 view [num_layers, 2, num_ids * slot] of the model's scale slots (block b's
        at b * slot); None when its scales live inside its blocks."""
        s, p = self._pool(model_id)
        if not self._split(model_id):
            return None
        k = self._fmt[model_id]
        off = p.scale_offset
        for k2, sb in sorted(p.scale_slot.items()):
            if k2 == k:
                n = p.table.num_ids(k) * sb
                return self.buffer[off: off + 2 * p.num_layers * n].view(p.num_layers, 2, n)
            off += 2 * p.num_layers * p.table.num_ids(k2) * sb
        raise AssertionError("unreachable")

    def alloc(self, model_id: str, n: int, near: int | None = None) -> list[int]:
        """n block ids; `near` (a block the model holds) is a slab hint honoured by policy.affinity."""
        s, p = self._pool(model_id)
        with self._lock:
            try:
                ids = p.table.alloc(self._fmt[model_id], n, near if self.policy.affinity else None)
            except KVOutOfMemory as e:
                raise KVOutOfMemory(f"model {model_id!r} ({s.precision}, {s.block_bytes} B blocks, "
                                    f"{s.num_layers}-layer pool): {e}") from None
            self._book.owned[model_id].update(ids)
            return ids

    def free(self, model_id: str, ids: Iterable[int]) -> None:
        s, p = self._pool(model_id)
        ids = list(ids)
        with self._lock:
            self._book.check_free(model_id, ids)
            p.table.free(self._fmt[model_id], ids)
            self._book.owned[model_id].difference_update(ids)

    def num_free_blocks(self, model_id: str) -> int:
        s, p = self._pool(model_id)
        return p.table.num_free_blocks(self._fmt[model_id])

    def num_blocks(self, model_id: str) -> int:
        """Capacity in blocks if the model had its whole pool."""
        s, p = self._pool(model_id)
        return p.table.num_blocks(self._fmt[model_id])

    def num_allocated_blocks(self, model_id: str) -> int:
        self._book.spec(model_id)
        return len(self._book.owned[model_id])

    def owned_blocks(self, model_id: str) -> list[int]:
        """Every block the model holds (to reclaim them when its replica dies)."""
        self._book.spec(model_id)
        with self._lock:
            return sorted(self._book.owned[model_id])

    # --- metrics ---
    def _format_names(self, pool: _Pool) -> dict[int, str]:
        """table format -> precision label ("bf16"; "bf16/fp8" if two precisions share a block size)."""
        names: dict[int, set[str]] = {}
        for m in pool.model_ids:
            names.setdefault(self._fmt[m], set()).add(self._book.specs[m].precision)
        return {bb: "/".join(sorted(ps)) for bb, ps in names.items()}

    def stats(self) -> dict:
        with self._lock:
            pools, precisions = {}, {}
            for L, p in self._pools.items():
                t, names = p.table, self._format_names(p)
                with t._lock:
                    pools[str(L)] = {
                        "num_layers": L, "num_slabs": t.num_slabs, "free_slabs": len(t.free_slabs),
                        "partial_slabs": {names[bb]: len(v) for bb, v in t.partial_slabs.items()},
                        "full_slabs": {names[bb]: len(v) for bb, v in t.full_slabs.items()},
                        "bytes": p.nbytes(self.slab_size) + p.scale_nbytes}
                    for bb, name in names.items():
                        d = precisions.setdefault(name, {"partial_slabs": 0, "full_slabs": 0,
                                                         "free_blocks_in_partial": 0})
                        d["partial_slabs"] += len(t.partial_slabs[bb])
                        d["full_slabs"] += len(t.full_slabs[bb])
                        d["free_blocks_in_partial"] += t.partial_free_blocks(bb)
            models = {m: {"precision": s.precision, "allocated_blocks": len(self._book.owned[m]),
                          "free_blocks": self.num_free_blocks(m), "num_blocks": self.num_blocks(m)}
                      for m, s in self._book.specs.items()}
            return {"kind": "kv_slab", "policy": self.policy.name, "buffer_bytes": self.buffer_bytes,
                    "slab_size": self.slab_size, "pools": pools, "precisions": precisions, "models": models}

    def fragmentation(self, live_tokens: dict[str, int], failing_model: str | None = None) -> FragmentationReport:
        """DESIGN.md's metric. Overhead (wasted whatever happens): padding of padded slabs (carved ones,
        and free ones for the failing model's format) and split-scale slots not backing an allocated
        block of a scaled model (nor a free block the failing model could take)."""
        with self._lock:
            live, allocated, per = self._book.slack(live_tokens)
            unusable, unformatted, overhead, covered = 0, 0, 0, 0
            fkey, fpool = None, None
            if failing_model is not None:
                _, fpool = self._pool(failing_model)
                fkey = self._fmt[failing_model]
            for p in self._pools.values():
                covered += p.nbytes(self.slab_size) + p.scale_nbytes
                t, names, L2 = p.table, self._format_names(p), 2 * p.num_layers
                with t._lock:
                    overhead += t.carved_padding * L2 + p.scale_nbytes
                    if failing_model is None:
                        continue
                    if p is not fpool:               # another pool: none of it is usable by this model
                        unformatted += len(t.free_slabs) * L2 * self.slab_size
                    else:
                        overhead += t.free_slab_padding(fkey) * L2
                    for bb in t.formats:
                        if p is fpool and bb == fkey:
                            continue
                        b = t.partial_free_blocks(bb) * L2 * bb
                        unusable += b
                        per.setdefault(names[bb], {"live_bytes": 0.0, "allocated_bytes": 0,
                                                   "slack_bytes": 0.0, "unusable_free_bytes": 0})
                        per[names[bb]]["unusable_free_bytes"] += b
            for m, s in self._book.specs.items():             # scale slots in use are allocated bytes
                if self._split(m):
                    overhead -= len(self._book.owned[m]) * 2 * s.num_layers * s.scale_bytes
            if failing_model is not None and self._split(failing_model):
                fs = self._book.specs[failing_model]
                overhead -= fpool.table.num_free_blocks(fkey) * 2 * fs.num_layers * fs.scale_bytes
            unformatted += self.buffer_bytes - covered
            return FragmentationReport(self.buffer_bytes, live, allocated, unusable, unformatted, per,
                                       failing_model, overhead)

    def usable_free_bytes(self, model_id: str) -> int:
        """Bytes of free blocks the model could allocate now (for checking the metric's books)."""
        s, p = self._pool(model_id)
        return p.table.num_free_blocks(self._fmt[model_id]) * s.bytes_per_block


# ---------------------------------------------------------------------------------------------------
# Baseline: static partition
# ---------------------------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class _Region:
    spec: ModelKVSpec
    offset: int
    num_blocks: int
    free_list: list[int]
    is_free: bytearray

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block


class StaticPartitionAllocator:
    """The vLLM/MuxServe baseline: each model a fixed contiguous region of the buffer, its own blocks only.

    How the buffer is split (`share`):
      * "demand" (default): rate_m * bytes_per_token_m, i.e. every region holds the same number of
        tokens per unit of request rate -- the best a static split can do for a known mean load;
      * "equal": the same bytes per model, as when each vLLM instance gets an equal
        gpu_memory_utilization.
    Regions hold whole blocks; bytes left by rounding stay unused. A region must hold one full
    prefill batch (max_num_batched_tokens), else ValueError.
    """

    def __init__(self, buffer: torch.Tensor, specs: Sequence[ModelKVSpec], share: str = "demand"):
        _check_buffer(buffer)
        if share not in ("demand", "equal"):
            raise ValueError(f"unknown static share {share!r} (demand or equal)")
        self._book = _ModelBook(_check_specs(specs))
        self.buffer = buffer
        self.buffer_bytes = buffer.numel()
        weights = {s.model_id: (s.rate * s.bytes_per_token if share == "demand" else 1.0) for s in specs}
        total = sum(weights.values())
        if total <= 0:
            weights = {s.model_id: s.bytes_per_token for s in specs}
            total = sum(weights.values())
        self._regions: dict[str, _Region] = {}
        offset = 0
        for s in specs:
            n = int(self.buffer_bytes * weights[s.model_id] / total) // s.bytes_per_block
            if n < max(1, s.min_blocks):
                raise ValueError(f"KV buffer of {self.buffer_bytes} B is too small: model {s.model_id!r} "
                                 f"gets {n} blocks, needs {max(1, s.min_blocks)}")
            self._regions[s.model_id] = _Region(s, offset, n, list(range(n - 1, -1, -1)),
                                                bytearray(b"\x01") * n)
            offset += n * s.bytes_per_block
        self._lock = threading.RLock()

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(self._book.specs)

    def spec(self, model_id: str) -> ModelKVSpec:
        return self._book.spec(model_id)

    def _region(self, model_id: str) -> _Region:
        self._book.spec(model_id)
        return self._regions[model_id]

    def kv_region(self, model_id: str) -> torch.Tensor:
        r = self._region(model_id)
        s = r.spec
        return self.buffer[r.offset: r.offset + r.nbytes].view(s.num_layers, 2, r.num_blocks * s.block_bytes)

    def kv_scale_region(self, model_id: str) -> None:
        """A static region keeps every block whole, scales included (vLLM's layout)."""
        self._region(model_id)

    def alloc(self, model_id: str, n: int, near: int | None = None) -> list[int]:
        """n block ids of the model's region (`near` is accepted for KVSlabManager parity, unused)."""
        r = self._region(model_id)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        with self._lock:
            if n > len(r.free_list):
                raise KVOutOfMemory(f"model {model_id!r} ({r.spec.precision}, {r.spec.block_bytes} B blocks, "
                                    f"static region): requested {n} blocks, {len(r.free_list)} free "
                                    f"of {r.num_blocks}")
            ids = [r.free_list.pop() for _ in range(n)]
            for b in ids:
                r.is_free[b] = 0
            self._book.owned[model_id].update(ids)
            return ids

    def free(self, model_id: str, ids: Iterable[int]) -> None:
        r = self._region(model_id)
        ids = list(ids)
        with self._lock:
            self._book.check_free(model_id, ids)
            for b in ids:
                r.is_free[b] = 1
                r.free_list.append(b)
            self._book.owned[model_id].difference_update(ids)

    def num_free_blocks(self, model_id: str) -> int:
        return len(self._region(model_id).free_list)

    def num_blocks(self, model_id: str) -> int:
        return self._region(model_id).num_blocks

    def num_allocated_blocks(self, model_id: str) -> int:
        self._book.spec(model_id)
        return len(self._book.owned[model_id])

    def owned_blocks(self, model_id: str) -> list[int]:
        """Every block the model holds (to reclaim them when its replica dies)."""
        self._book.spec(model_id)
        with self._lock:
            return sorted(self._book.owned[model_id])

    def stats(self) -> dict:
        with self._lock:
            models = {m: {"precision": r.spec.precision, "allocated_blocks": len(self._book.owned[m]),
                          "free_blocks": len(r.free_list), "num_blocks": r.num_blocks, "bytes": r.nbytes}
                      for m, r in self._regions.items()}
            precisions: dict[str, dict[str, int]] = {}
            for d in models.values():
                p = precisions.setdefault(d["precision"], {"allocated_blocks": 0, "free_blocks": 0})
                p["allocated_blocks"] += d["allocated_blocks"]
                p["free_blocks"] += d["free_blocks"]
            return {"kind": "static_partition", "buffer_bytes": self.buffer_bytes, "models": models,
                    "precisions": precisions}

    def fragmentation(self, live_tokens: dict[str, int], failing_model: str | None = None) -> FragmentationReport:
        with self._lock:
            live, allocated, per = self._book.slack(live_tokens)
            unusable, unformatted = 0, 0
            if failing_model is not None:
                self._book.spec(failing_model)
                for m, r in self._regions.items():
                    if m != failing_model:   # another model's free region: never usable by the failing one
                        b = len(r.free_list) * r.spec.bytes_per_block
                        unusable += b
                        per[r.spec.precision]["unusable_free_bytes"] += b
                unformatted = self.buffer_bytes - sum(r.nbytes for r in self._regions.values())
            return FragmentationReport(self.buffer_bytes, live, allocated, unusable, unformatted, per,
                                       failing_model)


# ---------------------------------------------------------------------------------------------------
# Engine-side block cache (FineServe's ElasticBlockPool)
# ---------------------------------------------------------------------------------------------------

class BlockCache:
    """A local LIFO of free blocks in front of a KVAllocator, so most alloc/free calls skip the manager
    (a Ray actor call in production).

    alloc(n): serve from the local list; when short, fetch max(shortfall, refill) blocks. If the
    allocator cannot give `refill` but can give the exact shortfall, take the shortfall (fail only when
    memory really is short). free(ids): back to the local list; while it holds more than
    `high_watermark`, hand `return_size` of the coldest blocks back (FineServe returns once per free;
    the loop keeps a bulk free from hoarding). Blocks in the cache count as allocated for the allocator.
    """

    def __init__(self, allocator: KVAllocator, model_id: str, refill: int = 32, high_watermark: int = 64,
                 return_size: int = 16):
        allocator.spec(model_id)                                # KeyError for an unknown model
        if refill < 1 or return_size < 1 or high_watermark < 0:
            raise ValueError("refill and return_size must be >= 1, high_watermark >= 0")
        self.allocator, self.model_id = allocator, model_id
        self.refill, self.high_watermark, self.return_size = refill, high_watermark, return_size
        self._local: list[int] = []
        self._out: set[int] = set()                              # blocks handed to the engine
        self._lock = threading.RLock()

    @property
    def num_cached(self) -> int:
        return len(self._local)

    @property
    def num_in_use(self) -> int:
        return len(self._out)

    def alloc(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        with self._lock:
            short = n - len(self._local)
            if short > 0:
                try:
                    got = self.allocator.alloc(self.model_id, max(short, self.refill))
                except KVOutOfMemory:
                    if short >= self.refill:
                        raise
                    got = self.allocator.alloc(self.model_id, short)   # raises with nothing changed
                self._local.extend(reversed(got))                      # pop() yields allocator order
            out = [self._local.pop() for _ in range(n)]
            self._out.update(out)
            return out

    def free(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        with self._lock:
            seen: set[int] = set()
            for b in ids:
                if b in seen or b not in self._out:
                    raise ValueError(f"block {b} is not allocated from the cache of model {self.model_id!r}")
                seen.add(b)
            self._out.difference_update(ids)
            self._local.extend(ids)
            while len(self._local) > self.high_watermark:
                k = min(self.return_size, len(self._local))
                back = self._local[:k]                    # bottom of the LIFO: the coldest blocks
                self.allocator.free(self.model_id, back)
                del self._local[:k]

    def num_free_blocks(self) -> int:
        with self._lock:
            return self.allocator.num_free_blocks(self.model_id) + len(self._local)

    def release_all(self) -> None:
        """Give every cached block back (shutdown); blocks still in use stay with the engine."""
        with self._lock:
            if self._local:
                self.allocator.free(self.model_id, self._local)
                self._local.clear()
