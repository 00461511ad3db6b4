"""KV Slab allocator, static-partition baseline, engine block cache, fragmentation metric."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fineserve_core.config import PRECISIONS
from fineserve_core.kv_format import KVFormat
from fineserve_core.kv_slab import (SLAB_POLICIES, BlockCache, KVAllocator, KVOutOfMemory, KVSlabManager,
                                    KVSlabTable, ModelKVSpec, SlabPolicy, StaticPartitionAllocator, fragmentation)
from fineserve_core.kv_trace import _replay_trace_stepwise, piecewise_trace, replay_trace

# SmolLM2-135M KV shapes: 3 KV heads, head_dim 64 -> blocks of 12288 (bf16), 6144 (fp8), 6336 (w4a8kv4) B.
FMTS = {p: KVFormat.for_model(p, 3, 64, torch.bfloat16) for p in PRECISIONS}
SLAB = 2 * math.lcm(*(f.block_bytes for f in FMTS.values()))          # 811008 B
BB = {p: f.block_bytes for p, f in FMTS.items()}


def smol_specs(num_layers: int = 30, prefix: str = "smol", precisions=PRECISIONS, **kw) -> list[ModelKVSpec]:
    return [ModelKVSpec.from_format(f"{prefix}-{p}", FMTS[p], num_layers, **kw) for p in precisions]


def units(n: int, device: str = "meta", extra: int = 0) -> torch.Tensor:
    """A buffer of n slab units (one layer's K + V slab each); meta needs no memory but has addresses."""
    return torch.empty(n * 2 * SLAB + extra, dtype=torch.uint8, device=device)


def two_pool_specs() -> list[ModelKVSpec]:
    return smol_specs() + smol_specs(24, prefix="deep", precisions=("bf16",))


def state(a: KVAllocator) -> str:
    return json.dumps(a.stats(), sort_keys=True)


# ---------------------------------------------------------------------------------------------------
# invariants shared by the stateful tests
# ---------------------------------------------------------------------------------------------------

def check_no_overlap(a: KVAllocator, owned: dict[str, list[int]]) -> None:
    """No byte of any layer's K or V belongs to two live blocks.

    Models whose kv_region views coincide (one pool) share a layout, so comparing the blocks' byte
    ranges in layer 0's K is exact; distinct regions must not intersect at all.
    """
    groups: dict[tuple, list[str]] = {}
    slab = isinstance(a, KVSlabManager)
    bb = {m: a.table_format(m) if slab else a.spec(m).block_bytes for m in a.model_ids}   # bytes in the region
    scale_spans = set()
    for m in a.model_ids:
        t = a.kv_region(m)
        assert t.dtype == torch.uint8 and t.dim() == 3 and t.shape[1] == 2
        assert t.shape[0] == a.spec(m).num_layers
        groups.setdefault((t.data_ptr(), tuple(t.shape)), []).append(m)
        sr = a.kv_scale_region(m)
        assert (sr is not None) == (slab and bb[m] != a.spec(m).block_bytes)   # split scales: own region
        if sr is not None:
            assert sr.shape == (a.spec(m).num_layers, 2, a.pool_table(a.spec(m).num_layers).num_ids(bb[m])
                                * a.spec(m).scale_bytes)
            scale_spans.add((sr.data_ptr(), sr.data_ptr() + sr.numel()))
    spans = sorted([(ptr, ptr + math.prod(shape)) for ptr, shape in groups] + list(scale_spans))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "two pools/regions overlap"
    lo = a.buffer.data_ptr()
    assert all(lo <= x and y <= lo + a.buffer_bytes for x, y in spans), "a region lies outside the buffer"
    for (ptr, shape), models in groups.items():
        iv = sorted((b * bb[m], (b + 1) * bb[m], m, b) for m in models for b in owned[m])
        for x, y in zip(iv, iv[1:]):
            assert x[1] <= y[0], f"block {x[3]} of {x[2]} overlaps block {y[3]} of {y[2]}"
        if iv:
            assert iv[-1][1] <= shape[2]


def check_slab_tables(a: KVSlabManager, owned: dict[str, list[int]]) -> None:
    for m in a.model_ids:                    # a block never straddles a slab edge (padded slabs)
        bb, S = a.table_format(m), a.slab_size
        for b in owned[m]:
            assert b * bb // S == ((b + 1) * bb - 1) // S, f"block {b} of {m} straddles a slab edge"
    for L, t in a.pools.items():
        free = list(t.free_slabs)
        partial = [s for v in t.partial_slabs.values() for s in v]
        full = [s for v in t.full_slabs.values() for s in v]
        assert sorted(free + partial + full) == list(range(t.num_slabs)), "a slab is lost or filed twice"
        for s in free:
            assert t.slabs[s].block_bytes == 0
        for bb in t.formats:
            for s in t.partial_slabs[bb]:
                slab = t.slabs[s]
                assert slab.block_bytes == bb and not slab.is_full() and not slab.is_empty(), \
                    "an empty slab was not returned to the free list"
            for s in t.full_slabs[bb]:
                assert t.slabs[s].block_bytes == bb and t.slabs[s].is_full()
            n_alloc = sum(t.slabs[s].num_allocated for s in (*t.partial_slabs[bb], *t.full_slabs[bb]))
            n_owned = sum(len(owned[m]) for m in a.model_ids
                          if a.spec(m).num_layers == L and a.table_format(m) == bb)
            assert n_alloc == n_owned, "blocks leaked or double-counted"
            assert t.partial_free_blocks(bb) == sum(t.slabs[s].num_free for s in t.partial_slabs[bb])
            assert t.num_free_blocks(bb) == sum(t.slab_capacity(bb, s) for s in free) + t.partial_free_blocks(bb)
        assert t.carved_padding == sum(t.slab_size - t.slabs[s].num_blocks * t.slabs[s].block_bytes
                                       for s in range(t.num_slabs) if t.slabs[s].block_bytes)


def check_fragmentation_books(a: KVAllocator, held: dict[str, list[int]]) -> None:
    """Every buffer byte is accounted once: allocated + free usable by the failing model + unusable +
    unformatted + overhead == buffer, for each model as the failing one."""
    if not isinstance(a, KVSlabManager):
        return
    live = {m: len(held[m]) * a.spec(m).tokens_per_block for m in a.model_ids}
    for m in a.model_ids:
        r = a.fragmentation(live, m)
        total = r.allocated_bytes + a.usable_free_bytes(m) + r.unusable_free_bytes + \
            r.unusable_unformatted_bytes + r.overhead_bytes
        assert total == a.buffer_bytes, f"{m}: books off by {total - a.buffer_bytes} B"
        assert r.overhead_bytes >= 0 and r.unusable_free_bytes >= 0


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free/bad-free sequences against one allocator (or block caches on top of it)."""
    make = None           # () -> KVAllocator
    use_cache = False

    def __init__(self):
        super().__init__()
        self.a = type(self).make()
        self.models = list(self.a.model_ids)
        self.caches = {m: BlockCache(self.a, m) for m in self.models} if self.use_cache else None
        self.owned: dict[str, list[int]] = {m: [] for m in self.models}    # held by the "engine"
        self.freed: dict[str, list[int]] = {m: [] for m in self.models}
        self.start = {m: self.a.num_free_blocks(m) for m in self.models}

    def _free_count(self, m: str) -> int:
        return self.caches[m].num_free_blocks() if self.caches else self.a.num_free_blocks(m)

    def _snapshot(self):
        return state(self.a), {m: len(c._local) for m, c in (self.caches or {}).items()}

    def _all_allocated(self) -> dict[str, list[int]]:
        if not self.caches:
            return self.owned
        return {m: self.owned[m] + list(self.caches[m]._local) for m in self.models}

    @rule(i=st.integers(0, 9), n=st.integers(0, 150), data=st.data())
    def alloc(self, i, n, data):
        m = self.models[i % len(self.models)]
        before, snap = self._free_count(m), self._snapshot()
        # a slab hint (used by the affinity policy): one of the model's blocks, or nothing
        near = data.draw(st.sampled_from(self.owned[m])) if self.owned[m] and data.draw(st.booleans()) else None
        try:
            ids = self.caches[m].alloc(n) if self.caches else self.a.alloc(m, n, near=near)
        except KVOutOfMemory as e:
            assert n > before, f"{n} blocks refused with {before} free"
            assert m in str(e)
            assert self._snapshot() == snap, "a failed alloc changed the state"
            return
        assert n <= before and len(ids) == n == len(set(ids))
        assert self._free_count(m) == before - n
        self.owned[m] += ids

    @rule(i=st.integers(0, 9), data=st.data())
    def free(self, i, data):
        m = self.models[i % len(self.models)]
        if not self.owned[m]:
            return
        ids = data.draw(st.lists(st.sampled_from(self.owned[m]), unique=True, max_size=80))
        before = self._free_count(m)
        self.caches[m].free(ids) if self.caches else self.a.free(m, ids)
        assert self._free_count(m) == before + len(ids)
        gone = set(ids)
        self.owned[m] = [b for b in self.owned[m] if b not in gone]
        self.freed[m] = (self.freed[m] + ids)[-50:]

    @rule(i=st.integers(0, 9), j=st.integers(0, 9), data=st.data())
    def bad_free(self, i, j, data):
        """Double free, another model's block or an out-of-range id: ValueError, nothing changes."""
        m, other = self.models[i % len(self.models)], self.models[j % len(self.models)]
        candidates = [b for b in self.freed[m] if b not in self.owned[m]]
        candidates += [b for b in self.owned[other] if b not in self.owned[m]]
        candidates += [10**9, -1]
        bad = data.draw(st.sampled_from(candidates))
        good = self.owned[m][:3]                      # a bad id among good ones frees none of them
        snap = self._snapshot()
        with pytest.raises(ValueError):
            self.caches[m].free(good + [bad]) if self.caches else self.a.free(m, good + [bad])
        assert self._snapshot() == snap

    @invariant()
    def no_two_owners(self):
        check_no_overlap(self.a, self._all_allocated())

    @invariant()
    def books_balance(self):
        held = self._all_allocated()
        for m in self.models:
            assert self.a.num_allocated_blocks(m) == len(held[m])
            if isinstance(self.a, StaticPartitionAllocator):
                assert self.a.num_free_blocks(m) + len(held[m]) == self.a.num_blocks(m)
            if self.caches:
                c = self.caches[m]
                assert c.num_free_blocks() == self.a.num_free_blocks(m) + c.num_cached
                assert c.num_cached <= max(c.high_watermark, c.refill)
        if isinstance(self.a, KVSlabManager):
            check_slab_tables(self.a, held)
            check_fragmentation_books(self.a, held)

    def teardown(self):
        for m in self.models:
            if self.caches:
                self.caches[m].free(self.owned[m])
                self.caches[m].release_all()
            else:
                self.a.free(m, self.owned[m])
        for m in self.models:
            assert self.a.num_allocated_blocks(m) == 0
            assert self.a.num_free_blocks(m) == self.start[m], "blocks leaked"
        if isinstance(self.a, KVSlabManager):
            for t in self.a.pools.values():
                assert len(t.free_slabs) == t.num_slabs, "a slab did not come back after freeing everything"


def machine_test(make, use_cache=False, max_examples=30):
    name = f"Machine_{make.__name__}_{'cache' if use_cache else 'direct'}"
    cls = type(name, (AllocatorMachine,), {"make": staticmethod(make), "use_cache": use_cache})
    cls.TestCase.settings = settings(max_examples=max_examples, stateful_step_count=30, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
    return cls.TestCase


def slab_one_pool():
    return KVSlabManager(units(5 * 30), smol_specs())                   # 3 reserved + 2 shared slabs


def slab_two_pools():
    return KVSlabManager(units(4 * 30 + 2 * 24, extra=12345), two_pool_specs())


def static_partition():
    return StaticPartitionAllocator(units(5 * 30), smol_specs())


TestSlabOnePool = machine_test(slab_one_pool)
TestSlabTwoPools = machine_test(slab_two_pools)
TestStaticPartition = machine_test(static_partition)
TestCacheOnSlab = machine_test(slab_one_pool, use_cache=True)
TestCacheOnSlabTwoPools = machine_test(slab_two_pools, use_cache=True)
TestCacheOnStatic = machine_test(static_partition, use_cache=True)


def _policy_maker(policy: str):
    def make():                      # a small buffer: ~9 faithful slabs' worth, many slabs when fine
        return KVSlabManager(units(3 * 30 + 6 * 30), smol_specs(), policy=policy)
    make.__name__ = f"slab_{policy}"
    return make


# Every non-default slab policy through the same random alloc/free/bad-free sequences.
for _p in SLAB_POLICIES:
    if _p != "faithful":
        globals()[f"TestSlabPolicy_{_p}"] = machine_test(_policy_maker(_p), max_examples=12)


# ---------------------------------------------------------------------------------------------------
# layout, sizing, bytes
# ---------------------------------------------------------------------------------------------------

def test_slab_size_and_capacity():
    a = slab_one_pool()
    assert a.slab_size == SLAB == 811008
    assert {p: a.num_blocks(f"smol-{p}") for p in PRECISIONS} == {"bf16": 5 * 66, "fp8": 5 * 132,
                                                                   "w4a8kv4": 5 * 128}
    assert a.kv_region("smol-fp8").shape == (30, 2, 5 * SLAB)
    assert isinstance(a, KVAllocator) and isinstance(static_partition(), KVAllocator)


def test_pool_sizing_follows_fineserve():
    specs = smol_specs(rate=1.0) + smol_specs(24, prefix="deep", precisions=("bf16",), rate=2.0)
    total = 300
    a = KVSlabManager(units(total, extra=SLAB), specs)             # a tail smaller than a unit is unused
    minimum = {30: 3 * 30, 24: 1 * 24}                             # one slab each holds 2048 tokens
    remaining = total - sum(minimum.values())
    demand = {30: 3 * 30, 24: 2.0 * 24}
    expect = {L: minimum[L] + int(remaining * demand[L] / sum(demand.values())) // L * L for L in (30, 24)}
    left = total - sum(expect.values())
    for L in (30, 24):                                             # leftover layer-multiples, by demand
        expect[L] += left // L * L
        left -= left // L * L
    assert {L: t.num_slabs for L, t in a.pools.items()} == {L: expect[L] // L for L in (30, 24)}
    r30, r24 = a.kv_region("smol-bf16"), a.kv_region("deep-bf16")
    assert r30.data_ptr() == a.buffer.data_ptr()                   # pools are contiguous, in spec order
    assert r24.data_ptr() == r30.data_ptr() + r30.numel()
    assert r24.data_ptr() + r24.numel() <= a.buffer.data_ptr() + a.buffer_bytes


def test_kv_region_aliases_buffer_and_blocks_do_not_overlap():
    buf = units(3 * 30, device="cpu")
    buf.zero_()
    specs = smol_specs()
    for cls in (KVSlabManager, StaticPartitionAllocator):
        a = cls(buf, specs)
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
        for m in a.model_ids:
            r = a.kv_region(m)
            assert r.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert lo <= r.data_ptr() and r.data_ptr() + r.numel() <= hi
            # KVFormat's typed views see exactly num_blocks blocks per layer.
            data, _ = FMTS[a.spec(m).precision].views(r[7, 1])
            assert data.shape[0] == a.num_blocks(m)
        # Two models of different formats (one pool for the slab manager), interleaved allocations.
        m1, m2 = "smol-bf16", "smol-w4a8kv4"
        live: dict[str, dict[int, int]] = {m1: {}, m2: {}}
        tag = iter(range(1, 10**6))

        def write(m, ids):
            bb = a.spec(m).block_bytes
            blocks = a.kv_region(m).view(30, 2, -1, bb)
            for b in ids:
                live[m][b] = next(tag) % 251 + 1
                blocks[:, :, b] = live[m][b]

        for k in range(6):
            write(m1, a.alloc(m1, 7 + k))
            write(m2, a.alloc(m2, 3 + k))
            if k % 2:                                              # free some (zeroed first); slabs re-carve
                gone = list(live[m1])[::2]
                blocks = a.kv_region(m1).view(30, 2, -1, BB["bf16"])
                for b in gone:
                    blocks[:, :, b] = 0
                    del live[m1][b]
                a.free(m1, gone)
        for m in (m1, m2):
            bb = a.spec(m).block_bytes
            blocks = a.kv_region(m).view(30, 2, -1, bb)
            for b, v in live[m].items():
                assert bool((blocks[:, :, b] == v).all()), f"{cls.__name__}: block {b} of {m} was overwritten"
        # Nothing was written outside the live blocks: the non-zero bytes are exactly theirs.
        expected = sum(len(v) * a.spec(m).bytes_per_block for m, v in live.items())
        assert buf.count_nonzero().item() == expected
        for m in (m1, m2):
            a.free(m, list(live[m]))
        buf.zero_()


def test_block_view_writes_land_at_block_offset():
    buf = units(3 * 30, device="cpu")
    buf.zero_()
    a = KVSlabManager(buf, smol_specs())
    m = "smol-w4a8kv4"
    (b,) = a.alloc(m, 1)
    data, scale = FMTS["w4a8kv4"].views(a.kv_region(m)[3, 1])
    data[b].fill_(0xAB)
    nz = buf.nonzero().flatten()
    region = a.kv_region(m)
    start = region[3, 1].data_ptr() - buf.data_ptr() + b * BB["w4a8kv4"]
    assert nz.min().item() == start and nz.max().item() == start + FMTS["w4a8kv4"].data_bytes - 1


def test_recarve_slab_for_another_format():
    a = KVSlabManager(units(3 * 30), smol_specs())                 # exactly 3 slabs
    t = a.pool_table(30)
    fp8 = a.alloc("smol-fp8", 2 * 132)                             # two slabs, full
    bf16 = a.alloc("smol-bf16", 66)                                # the last slab
    (sid,) = {b // 66 for b in bf16}
    assert t.slabs[sid].block_bytes == BB["bf16"] and not t.free_slabs
    with pytest.raises(KVOutOfMemory):
        a.alloc("smol-w4a8kv4", 1)
    a.free("smol-bf16", bf16)
    assert list(t.free_slabs) == [sid] and t.slabs[sid].block_bytes == 0
    w4 = a.alloc("smol-w4a8kv4", 128)
    assert {b // 128 for b in w4} == {sid} and t.slabs[sid].block_bytes == BB["w4a8kv4"]
    assert a.num_free_blocks("smol-bf16") == 0 and a.num_free_blocks("smol-w4a8kv4") == 0
    a.free("smol-fp8", fp8)
    a.free("smol-w4a8kv4", w4)
    assert len(t.free_slabs) == 3


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------

def test_buffer_too_small():
    with pytest.raises(ValueError, match="too small"):
        KVSlabManager(units(3 * 30 - 1), smol_specs())             # needs 3 slabs of 30 layers
    with pytest.raises(ValueError, match="too small"):
        KVSlabManager(units(3 * 30 + 23), two_pool_specs())        # the 24-layer pool needs 24 more
    KVSlabManager(units(3 * 30 + 24), two_pool_specs())
    with pytest.raises(ValueError, match="too small"):
        StaticPartitionAllocator(units(1), smol_specs())
    with pytest.raises(ValueError):
        KVSlabManager(torch.empty(10, dtype=torch.float32), smol_specs())


def test_unknown_model():
    for a in (slab_one_pool(), static_partition()):
        for call in (lambda: a.kv_region("nope"), lambda: a.alloc("nope", 1), lambda: a.free("nope", [0]),
                     lambda: a.num_free_blocks("nope"), lambda: a.num_blocks("nope"),
                     lambda: BlockCache(a, "nope"), lambda: a.fragmentation({"nope": 1})):
            with pytest.raises(KeyError, match="nope"):
                call()


def test_double_free_and_foreign_free():
    for a in (slab_one_pool(), static_partition()):
        ids = a.alloc("smol-bf16", 5)
        a.free("smol-bf16", ids[:2])
        before = state(a)
        with pytest.raises(ValueError, match=f"block {ids[0]}"):
            a.free("smol-bf16", [ids[0]])
        with pytest.raises(ValueError, match="twice"):
            a.free("smol-bf16", [ids[3], ids[3]])
        with pytest.raises(ValueError, match=f"block {ids[2]}"):
            a.free("smol-fp8", [ids[2]])                          # another model's block
        assert state(a) == before
        a.free("smol-bf16", ids[2:])
    # The table alone (no ownership book) catches wrong-format and out-of-range ids too.
    t = slab_one_pool().pool_table(30)
    ids = t.alloc(BB["bf16"], 3)
    with pytest.raises(ValueError, match="not allocated"):
        t.free(BB["fp8"], [ids[0] * 2])
    with pytest.raises(ValueError, match="out of range"):
        t.free(BB["bf16"], [10**6])
    with pytest.raises(ValueError, match="not registered"):
        t.alloc(999, 1)


def test_alloc_beyond_capacity_changes_nothing():
    for a in (slab_one_pool(), static_partition()):
        held = a.alloc("smol-fp8", 10)
        before = state(a)
        cap = a.num_blocks("smol-bf16")
        with pytest.raises(KVOutOfMemory) as e:
            a.alloc("smol-bf16", cap + 1)
        assert isinstance(e.value, MemoryError)
        msg = str(e.value)
        assert "smol-bf16" in msg and "bf16" in msg and str(cap + 1) in msg and \
            str(a.num_free_blocks("smol-bf16")) in msg
        assert state(a) == before
        with pytest.raises(ValueError):
            a.alloc("smol-bf16", -1)
        assert a.alloc("smol-bf16", 0) == []
        a.free("smol-fp8", held)


def test_stats_are_json():
    a = KVSlabManager(units(4 * 30 + 2 * 24), two_pool_specs())
    a.alloc("smol-bf16", 70)
    a.alloc("smol-w4a8kv4", 3)
    s = json.loads(json.dumps(a.stats()))
    p = s["pools"]["30"]
    assert (p["free_slabs"], p["partial_slabs"], p["full_slabs"]) == (
        1, {"bf16": 1, "fp8": 0, "w4a8kv4": 1}, {"bf16": 1, "fp8": 0, "w4a8kv4": 0})
    assert s["models"]["smol-bf16"]["allocated_blocks"] == 70
    assert s["precisions"]["bf16"] == {"partial_slabs": 1, "full_slabs": 1, "free_blocks_in_partial": 62}
    sp = StaticPartitionAllocator(units(4 * 30), smol_specs())
    sp.alloc("smol-fp8", 4)
    assert json.loads(json.dumps(sp.stats()))["precisions"]["fp8"]["allocated_blocks"] == 4


def test_thread_safety():
    a = KVSlabManager(units(6 * 30), smol_specs())
    got: dict[str, list[int]] = {m: [] for m in a.model_ids}
    lock = threading.Lock()

    def worker(m, seed):
        import random
        rng, mine = random.Random(seed), []
        for _ in range(300):
            if mine and rng.random() < 0.45:
                k = rng.randint(1, len(mine))
                a.free(m, mine[:k])
                del mine[:k]
            else:
                try:
                    mine += a.alloc(m, rng.randint(1, 9))
                except KVOutOfMemory:
                    pass
        with lock:
            got[m] += mine

    threads = [threading.Thread(target=worker, args=(m, i)) for i, m in enumerate(a.model_ids * 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    check_no_overlap(a, got)
    check_slab_tables(a, got)


# ---------------------------------------------------------------------------------------------------
# block cache
# ---------------------------------------------------------------------------------------------------

def test_block_cache_refill_return_and_failure():
    a = KVSlabManager(units(3 * 30), smol_specs())                 # bf16: 3 slabs * 66 = 198 blocks
    c = BlockCache(a, "smol-bf16")
    x = c.alloc(1)                                                 # empty cache: fetch max(1, 32)
    assert a.num_allocated_blocks("smol-bf16") == 32 and c.num_cached == 31
    assert c.num_free_blocks() == a.num_free_blocks("smol-bf16") + 31 == 197
    y = c.alloc(40)                                                # short by 9: fetch max(9, 32)
    assert a.num_allocated_blocks("smol-bf16") == 64 and c.num_cached == 23
    c.free(x + y)                                                  # 64 cached: at the watermark, kept
    assert c.num_cached == 64 and a.num_allocated_blocks("smol-bf16") == 64
    z = c.alloc(65)                                                # short by 1: fetch 32
    assert a.num_allocated_blocks("smol-bf16") == 96 and c.num_cached == 31
    c.free(z[:34])                                                 # 65 > 64: give 16 back
    assert c.num_cached == 49 and a.num_allocated_blocks("smol-bf16") == 80
    c.free(z[34:])                                                 # 80: give 16 back
    assert c.num_cached == 64 and a.num_allocated_blocks("smol-bf16") == 64
    # Fallback: the allocator cannot give `refill` more, but can give the shortfall of 5.
    other = a.alloc("smol-bf16", a.num_free_blocks("smol-bf16") - 5)
    more = c.alloc(64 + 5)
    assert c.num_cached == 0 and a.num_free_blocks("smol-bf16") == 0 and c.num_free_blocks() == 0
    before = (state(a), c.num_cached, c.num_in_use)
    with pytest.raises(KVOutOfMemory):
        c.alloc(1)
    assert (state(a), c.num_cached, c.num_in_use) == before
    with pytest.raises(ValueError):
        c.free([other[0]])                                         # not from this cache
    with pytest.raises(ValueError):
        c.free(more[:1] * 2)
    assert (state(a), c.num_cached, c.num_in_use) == before
    c.free(more)
    assert c.num_cached == 53
    c.release_all()
    a.free("smol-bf16", other)
    assert c.num_cached == 0 and a.num_allocated_blocks("smol-bf16") == 0
    assert len(a.pool_table(30).free_slabs) == 3


# ---------------------------------------------------------------------------------------------------
# fragmentation
# ---------------------------------------------------------------------------------------------------

def test_fragmentation_by_hand():
    specs = smol_specs()
    bpb = {s.model_id: s.bytes_per_block for s in specs}
    a = KVSlabManager(units(4 * 30, extra=1000), specs)
    a.alloc("smol-bf16", 2)
    a.alloc("smol-fp8", 1)
    live = {"smol-bf16": 40, "smol-fp8": 32}
    r = fragmentation(a, live, "smol-bf16")
    slack = (2 * 32 - 40) * 2 * 30 * BB["bf16"] / 32
    assert r.slack_bytes == pytest.approx(slack)
    assert r.unusable_free_bytes == 131 * bpb["smol-fp8"]          # fp8's partial slab
    assert r.unusable_unformatted_bytes == 1000                    # the tail no pool covers
    assert r.wasted_fraction == pytest.approx((slack + 131 * bpb["smol-fp8"] + 1000) / a.buffer_bytes)
    assert r.kv_efficiency == pytest.approx((40 * bpb["smol-bf16"] / 32 + 32 * bpb["smol-fp8"] / 32)
                                            / a.buffer_bytes)
    assert r.per_precision["fp8"]["unusable_free_bytes"] == 131 * bpb["smol-fp8"]
    assert r.per_precision["bf16"]["slack_bytes"] == pytest.approx(slack)
    assert json.loads(json.dumps(r.to_dict()))["failing_model"] == "smol-bf16"
    # bf16's own partial slab is usable by bf16: failing fp8 sees bf16's 64 free blocks as waste.
    assert a.fragmentation(live, "smol-fp8").unusable_free_bytes == 64 * bpb["smol-bf16"]
    assert a.fragmentation(live).unusable_free_bytes == 0
    with pytest.raises(ValueError, match="do not fit"):
        a.fragmentation({"smol-fp8": 33})

    sp = StaticPartitionAllocator(units(4 * 30), specs)
    sp.alloc("smol-bf16", 2)
    r = sp.fragmentation({"smol-bf16": 40}, "smol-bf16")
    others = sum(sp.num_free_blocks(m) * bpb[m] for m in ("smol-fp8", "smol-w4a8kv4"))
    tail = sp.buffer_bytes - sum(sp.num_blocks(m) * bpb[m] for m in sp.model_ids)
    assert r.unusable_free_bytes == others and r.unusable_unformatted_bytes == tail
    assert r.slack_bytes == pytest.approx(slack)
    assert r.per_precision["w4a8kv4"]["unusable_free_bytes"] == sp.num_blocks("smol-w4a8kv4") * bpb["smol-w4a8kv4"]


def test_static_shares_follow_rate_times_bytes_per_token():
    specs = smol_specs()
    specs[0] = ModelKVSpec.from_format("smol-bf16", FMTS["bf16"], 30, rate=3.0)
    sp = StaticPartitionAllocator(units(20 * 30), specs)
    w = {s.model_id: s.rate * s.bytes_per_token for s in specs}
    for s in specs:
        share = sp.num_blocks(s.model_id) * s.bytes_per_block / sp.buffer_bytes
        assert share == pytest.approx(w[s.model_id] / sum(w.values()), abs=0.01)


# ---------------------------------------------------------------------------------------------------
# slab policies, the event-driven replay, the benchmark
# ---------------------------------------------------------------------------------------------------

def test_policy_lookup_and_default():
    assert KVSlabManager(units(3 * 30), smol_specs()).policy == SLAB_POLICIES["faithful"] == SlabPolicy()
    with pytest.raises(ValueError, match="unknown slab policy"):
        KVSlabManager(units(3 * 30), smol_specs(), policy="nope")
    with pytest.raises(ValueError):
        SlabPolicy("x", partial_choice="random")
    with pytest.raises(ValueError, match="does not divide"):
        KVSlabTable(2, 1000, [300])                                  # padding="none" needs a divisor


def test_padded_slab_keeps_block_offsets():
    """padding="edge": slab = 3 bf16 blocks (the smallest multiple of 12288 holding 4 w4a8kv4 blocks of
    6336 B is 36864); a w4a8kv4 block id still means bytes [b * 6336, (b + 1) * 6336) of the region, so
    KVFormat.views works unchanged, and ids crossing a slab edge are never used."""
    specs = smol_specs(max_num_batched_tokens=64)                # one slab of minimum reservation each
    a = KVSlabManager(torch.empty(4 * 30 * 2 * 36864, dtype=torch.uint8, device="meta"), specs, policy="padded")
    assert a.slab_size == 36864 and a.pool_table(30).num_slabs == 4
    t, m = a.pool_table(30), "smol-w4a8kv4"
    caps = [t.slab_capacity(BB["w4a8kv4"], s) for s in range(4)]
    assert caps == [5, 5, 5, 5] and t.num_ids(BB["w4a8kv4"]) == 4 * 36864 // 6336    # 23 ids, 20 usable
    ids = a.alloc(m, a.num_free_blocks(m))
    assert len(ids) == a.num_blocks(m) and 5 not in ids                    # block 5 spans bytes 31680..38016
    data, _ = FMTS["w4a8kv4"].views(a.kv_region(m)[0, 0])
    assert data.shape[0] == 23
    r = a.fragmentation({m: 0}, m)
    assert r.overhead_bytes == t.carved_padding * 2 * 30 > 0
    a.free(m, ids)
    assert t.carved_padding == 0 and len(t.free_slabs) == t.num_slabs


def test_split_scale_layout():
    """split_scale: w4a8kv4 blocks hold their data only (6144 B, fp8's format), their FP8 scales sit in a
    slot per block id of a region of their own; views, the paged cache's write and gather see the same
    values as with scales inside the blocks, and a write touches exactly the block and its slot."""
    from fineserve_core.paged_kv import PagedKVCache
    buf = units(3 * 30, device="cpu")
    buf.zero_()
    a = KVSlabManager(buf, smol_specs(), policy="split_scale")
    m, fmt = "smol-w4a8kv4", FMTS["w4a8kv4"]
    assert a.table_format(m) == fmt.data_bytes == BB["fp8"]               # shares fp8's 6144 B format
    assert a.slab_size == 2 * 12288 and a.kv_scale_region("smol-bf16") is None
    sr = a.kv_scale_region(m)
    n_ids = a.pool_table(30).num_ids(6144)
    assert sr.shape == (30, 2, n_ids * fmt.scale_bytes)
    kv = PagedKVCache(fmt, a.kv_region(m), sr)
    assert kv.k[0][0].shape[0] == kv.k[0][1].shape[0] == n_ids
    ids = a.alloc(m, 3)
    torch.manual_seed(0)
    k, v = torch.randn(2, 5, 3, 64).unbind(0)
    slots = torch.tensor([ids[1] * 64 + t for t in (0, 1, 2, 63)] + [ids[2] * 64 + 5])
    kv.write(4, slots, k, v)
    written = buf.nonzero().flatten()
    base = buf.data_ptr()
    allowed = set()
    for r, size in ((a.kv_region(m)[4], fmt.data_bytes), (sr[4], fmt.scale_bytes)):
        for kv_i in (0, 1):
            for b in ids[1:]:
                start = r[kv_i].data_ptr() - base + b * size
                allowed.update(range(start, start + size))
    assert written.numel() > 0 and set(written.tolist()) <= allowed
    inline_region = torch.zeros(30, 2, n_ids * fmt.block_bytes, dtype=torch.uint8)
    inline = PagedKVCache(fmt, inline_region)
    inline.write(4, slots, k, v)
    for x, y in zip(kv.gather(4, ids, 3 * 64), inline.gather(4, ids, 3 * 64)):
        assert torch.equal(x, y)
    blocks = inline_region.view(30, 2, n_ids, fmt.block_bytes)[4, :, :, fmt.data_bytes:]
    slots_bytes = sr[4].view(2, n_ids, fmt.scale_bytes)
    assert slots_bytes[:, ids[1:]].count_nonzero() > 0 and torch.equal(slots_bytes, blocks)
    # reserved scale slots not backing an allocated w4a8kv4 block are overhead
    a.free(m, ids)
    ids = a.alloc(m, 10)
    a.alloc("smol-fp8", 3)
    r = a.fragmentation({m: 640}, "smol-bf16")
    assert r.overhead_bytes == (n_ids - 10) * 2 * 30 * 192
    assert a.fragmentation({m: 640}, m).overhead_bytes == (n_ids - 10 - a.num_free_blocks(m)) * 2 * 30 * 192
    a.free(m, ids)


def test_whole_slabs_first_and_bestfit():
    t = KVSlabTable(4, 1024, [128], whole_slabs_first=True)     # 8 blocks per slab
    t.alloc(128, 3)                                             # slab 0 partial (5 free)
    ids = t.alloc(128, 11)                                      # one whole free slab, then 3 into slab 0
    assert sorted({b // 8 for b in ids}) == [0, 1] and sum(b // 8 == 1 for b in ids) == 8
    bf = KVSlabTable(4, 1024, [128], partial_choice="fullest")
    got = bf.alloc(128, 32)
    bf.free(128, got[0:6])                                      # slab 0: 6 free
    bf.free(128, got[8:10])                                     # slab 1: 2 free
    assert bf.alloc(128, 1)[0] // 8 == 1                        # best fit: the fullest partial slab
    lo = KVSlabTable(4, 1024, [128])
    got = lo.alloc(128, 32)
    lo.free(128, got[0:6])
    lo.free(128, got[8:10])
    assert lo.alloc(128, 1)[0] // 8 == 0                        # FineServe-faithful: lowest slab id
    aff = KVSlabManager(units(3 * 30), smol_specs(), policy="affinity")
    x = aff.alloc("smol-bf16", 70)                              # slab 0 full, slab 1 holds 4
    aff.free("smol-bf16", x[:2])                                # slab 0 has 2 free
    assert aff.alloc("smol-bf16", 1, near=x[-1])[0] // 66 == 1 # stays with its sequence's slab
    assert aff.alloc("smol-bf16", 1)[0] // 66 == 0


def test_event_replay_matches_stepwise():
    specs = smol_specs()
    ids = [s.model_id for s in specs]
    trace = piecewise_trace(ids, [(300, {ids[0]: 0.3, ids[1]: 0.05}), (300, {ids[2]: 0.3, ids[1]: 0.1})], seed=3,
                            input_mean=200, output_mean=150)
    for make, cache in ((lambda: KVSlabManager(units(3 * 30 + 30), specs), False),
                        (lambda: KVSlabManager(units(3 * 30 + 30), specs, policy="padded_wholeslab"), False),
                        (lambda: KVSlabManager(units(3 * 30 + 30), specs, policy="affinity"), False),
                        (lambda: StaticPartitionAllocator(units(3 * 30 + 30), specs), True)):
        for kw in ({"max_num_seqs": 256}, {"max_num_seqs": 8, "max_steps": 400}):
            fast = replay_trace(make(), trace, use_block_cache=cache, **kw)
            slow = _replay_trace_stepwise(make(), trace, use_block_cache=cache, **kw)
            assert fast.to_dict() == slow.to_dict()
            assert fast.failures > 0 or kw["max_num_seqs"] == 8


def _benchmark():
    try:
        from load_tests import kv_fragmentation
    except ImportError:                                        # pytest run without the repo root on sys.path
        import sys
        from pathlib import Path
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from load_tests import kv_fragmentation
    return kv_fragmentation


# DESIGN.md target: KV bytes wasted with 3 precisions co-located, KV Slab <= 3 %, static partition >= 25 %.
# What the benchmark's quick mode (SmolLM2 shape, ShareGPT-like lengths, buffer = mean demand, seed 0)
# honestly shows, and what this test asserts:
#   * the "ideal" pool (any free byte usable by any model) wastes only the last block's slack, ~3 %:
#     no block allocator at 32/64-token blocks can get below it, so <= 3 % is out of reach;
#   * static partition with equal shares wastes the most, more than static sized by demand;
#   * FineServe's KV Slab vs static(demand) depends on the load: on this seed it wins on the stationary
#     trace and loses on the rotating one (its 811 KB slabs, 8 in the buffer, get pinned by the model
#     that was hot); over 3 seeds and at GPU scale the two are within a few points (see
#     load_tests/results/kv-fragmentation-cpu.json). Printed, not asserted.
#   * finer slabs fix that: padded_wholeslab (no layout change) and split_scale_fine (layout change)
#     waste less than faithful on the rotating trace and generate more tokens on both.
def test_fragmentation_benchmark_quick(capsys):
    kf = _benchmark()
    payload = kf.run_benchmark(quick=True, jobs=1)
    res = payload["results"]
    lines = []
    for sc, d in res.items():
        for r in payload["runs"]:
            if r["scenario"] == sc:
                assert r["completed"] > 0 and r["failures"] > 0, f"{sc}/{r['allocator']}: the buffer never ran out"
                assert 0.015 < r["mean_slack_fraction"] < 0.12, f"{sc}/{r['allocator']}: slack {r['mean_slack_fraction']:.2%}"
        w = {a: v["mean_wasted_fraction"] for a, v in d.items()}
        tok = {a: v["generated_tokens"] for a, v in d.items()}
        msg = (f"{sc}: wasted at OOM " + ", ".join(f"{a} {x:.2%}" for a, x in w.items())
               + f"; tokens faithful {tok['faithful']:.0f}, padded_wholeslab {tok['padded_wholeslab']:.0f}, "
                 f"split_scale_fine {tok['split_scale_fine']:.0f}, static_demand {tok['static_demand']:.0f}")
        lines.append(msg)
        floor = d["ideal"]
        assert floor["mean_unusable_fraction"] == 0 and floor["mean_overhead_fraction"] == 0, msg
        assert all(w["ideal"] <= x + 1e-9 for x in w.values()), msg
        assert w["ideal"] > 0.025, f"slack floor {w['ideal']:.2%} vs the 3 % target; {msg}"
        assert w["static_equal"] > w["static_demand"], msg
        for better in ("padded_wholeslab", "split_scale_fine"):
            assert tok[better] > tok["faithful"], msg
    rot = res["smol-rotate"]
    msg = lines[-1]
    assert rot["padded_wholeslab"]["mean_wasted_fraction"] < rot["faithful"]["mean_wasted_fraction"], msg
    assert rot["split_scale_fine"]["mean_wasted_fraction"] < rot["faithful"]["mean_wasted_fraction"], msg
    with capsys.disabled():
        print("\n[kv fragmentation, quick] " + "\n[kv fragmentation, quick] ".join(lines))
