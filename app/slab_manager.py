"""GpuSlabManager: one Ray actor per GPU owning that GPU's single KV buffer and its slab tables.

Workers on the GPU map the same buffer (a CUDA IPC handle on GPU; on CPU an unlinked /dev/shm file, opened
through the manager's descriptor) and allocate blocks through the actor behind their local BlockCache, so
the manager's bookkeeping is the only allocator state. The buffer is sized once, from the config, before
any model loads: two models starting together can never each size "free memory" that the other is about to take.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import torch

from fineserve_core.kv_slab import (SERVE_SLAB_POLICY, KVOutOfMemory, KVSlabManager, ModelKVSpec,
                                    StaticPartitionAllocator)
from fineserve_core.placement import PRISM_PAGE_BYTES     # Prism's elastic KV: one pool of 2 MiB pages

log = logging.getLogger("ray.serve")
LOAD_TIMEOUT_S = 900
REAP_PERIOD_S = 2.0      # how often the manager looks for dead replicas still holding blocks


def make_allocator(policy: str, buf: torch.Tensor, specs: list[ModelKVSpec], slab_policy: str):
    """The GPU's KV allocator under an app `policy` (AppConfig.policy): the baselines differ only here
    and in the local queue policy. `slab_policy`: the KV Slab variant of policy fineserve."""
    if policy == "fineserve":
        try:
            return KVSlabManager(buf, specs, policy=slab_policy)
        except ValueError as e:
            # 2 x lcm of several formats' block sizes can be tens of MB per layer: too coarse for a small
            # buffer. Then FineServe's sizing with padding at slab edges (as the simulator falls back)
            log.warning("fineserve KV Slab: %s; using padded slabs", e)
            return KVSlabManager(buf, specs, policy="padded")
    if policy == "static":
        return StaticPartitionAllocator(buf, specs, share="demand")
    if policy == "prism":
        # precision-unaware pages: a page holds blocks of one format, padded where 2 MiB is not a multiple
        return KVSlabManager(buf, specs, slab_size=PRISM_PAGE_BYTES, policy="padded")
    raise ValueError(f"unknown KV policy {policy!r} (fineserve, static or prism)")


class GpuSlabManager:
    """Run as a threaded actor (max_concurrency > 1): `begin_load` waits while another model loads."""

    def __init__(self, gpu: int, specs: list[ModelKVSpec], kv_bytes: int, device: str, policy: str = "fineserve",
                 slab_policy: str = SERVE_SLAB_POLICY):
        self.gpu, self.device = gpu, torch.device(device)
        self._path = None
        self._loading: tuple[str, float] | None = None
        self._load_cv = threading.Condition()
        self._live: dict[str, int] = {}
        if self.device.type == "cuda":
            buf = torch.empty(kv_bytes, dtype=torch.uint8, device=self.device)
        else:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            fd, path = tempfile.mkstemp(prefix=f"fineserve-kv-gpu{gpu}-", dir=shm)
            buf = torch.from_file(path, shared=True, size=kv_bytes, dtype=torch.uint8)
            # no name to leak: the file goes when this process and the last mapping of it are gone
            # (a killed manager never runs a destructor); workers open it through our descriptor
            os.unlink(path)
            self._fd = fd
            self._path = f"/proc/{os.getpid()}/fd/{fd}"
        self.policy = policy
        self.alloc_impl = make_allocator(policy, buf, specs, slab_policy)
        self.buffer = buf
        self._metrics = _SlabMetrics(gpu)
        # which replica holds which blocks, so a dead replica's blocks can go back to the pool
        self._owners: dict[str, tuple[str, object]] = {}      # owner (actor id) -> (model id, actor handle)
        self._owned: dict[str, set[int]] = {}                   # owner -> block ids
        self._owner_lock = threading.Lock()
        self.reclaimed: list[dict] = []
        threading.Thread(target=self._publish, name="slab-metrics", daemon=True).start()
        threading.Thread(target=self._reap_loop, name="slab-reaper", daemon=True).start()

    def begin_load(self, model_id: str) -> None:
        """Models load onto a GPU one at a time (a replica that died mid-load frees the slot after a timeout)."""
        with self._load_cv:
            while self._loading and self._loading[0] != model_id and time.monotonic() - self._loading[1] < LOAD_TIMEOUT_S:
                self._load_cv.wait(1.0)
            self._loading = (model_id, time.monotonic())

    def end_load(self, model_id: str) -> None:
        with self._load_cv:
            if self._loading and self._loading[0] == model_id:
                self._loading = None
            self._load_cv.notify_all()

    def report_live_tokens(self, model_id: str, n: int) -> None:
        self._live[model_id] = n

    def _publish(self) -> None:
        while True:
            try:
                self._metrics.update(self.alloc_impl.stats(), self.alloc_impl.fragmentation(dict(self._live)))
            except Exception:          # metrics must never take the allocator down
                pass
            time.sleep(1.0)

    def buffer_handle(self):
        """What a worker needs to map the buffer in its own process."""
        if self._path is None:
            from torch.multiprocessing.reductions import reduce_tensor
            return ("cuda", reduce_tensor(self.buffer))
        return ("file", self._path, self.buffer.numel())

    def region(self, model_id: str, scales: bool = False) -> tuple[tuple, tuple, int] | None:
        """(shape, stride, byte offset) of the model's KV region (or of its scale region: None when its
        scales live inside its blocks) inside the buffer."""
        r = (self.alloc_impl.kv_scale_region if scales else self.alloc_impl.kv_region)(model_id)
        if r is None:
            return None
        return tuple(r.shape), tuple(r.stride()), r.storage_offset() - self.buffer.storage_offset()

    def spec(self, model_id: str) -> ModelKVSpec:
        return self.alloc_impl.spec(model_id)

    def alloc(self, model_id: str, n: int, owner: str | None = None) -> list[int] | None:
        """None when memory is short (the caller raises KVOutOfMemory in its own process)."""
        try:
            ids = self.alloc_impl.alloc(model_id, n)
        except KVOutOfMemory:
            return None
        if owner is not None:
            with self._owner_lock:
                self._owned.setdefault(owner, set()).update(ids)
        return ids

    def free(self, model_id: str, ids: list[int], owner: str | None = None) -> None:
        if owner is not None:
            with self._owner_lock:
                owned = self._owned.get(owner)
                if owned is None:          # reclaimed already: the owner was taken for dead
                    return
                owned.difference_update(ids)
        self.alloc_impl.free(model_id, ids)

    # ---- replicas that die without freeing their blocks ----------------------------------------
    def register_owner(self, model_id: str, owner: str, handle) -> None:
        """A replica announces itself (its actor id and handle) before it allocates anything."""
        with self._owner_lock:
            self._owners[owner] = (model_id, handle)
            self._owned.setdefault(owner, set())

    def free_owner(self, owner: str, reason: str = "released") -> int:
        """Return every block an owner holds to the pool (it died, or left the GPU)."""
        with self._owner_lock:
            model_id, _ = self._owners.pop(owner, (None, None))
            ids = sorted(self._owned.pop(owner, set()))
        if model_id is not None and ids:
            self.alloc_impl.free(model_id, ids)
        if model_id is not None:
            self.reclaimed.append({"time": time.time(), "owner": owner, "model": model_id, "blocks": len(ids),
                                   "reason": reason})
        return len(ids)

    def reap(self, timeout_s: float = 5.0, skip: str | None = None) -> int:
        """Free the blocks of every registered owner whose actor is dead; a busy or unreachable one is
        left alone (only ActorDiedError counts). `skip`: the caller itself (still in its constructor, it
        cannot answer). Returns the number of blocks reclaimed."""
        import ray
        with self._owner_lock:
            owners = [(o, v) for o, v in self._owners.items() if o != skip]
        if not owners:
            return 0
        refs = {owner: h.__ray_ready__.remote() for owner, (_, h) in owners}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        ready, n = set(ready), 0
        for owner, ref in refs.items():
            if ref not in ready:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError:
                n += self.free_owner(owner, "owner died")
            except Exception:
                pass
        return n

    def _reap_loop(self) -> None:
        while True:
            time.sleep(REAP_PERIOD_S)
            try:
                self.reap()
            except Exception:          # never take the allocator down
                pass

    def reclaimed_blocks(self, model_id: str, since: float = 0.0) -> int:
        """Blocks of a model's owners returned to the pool since `since` (time.time())."""
        return sum(r["blocks"] for r in self.reclaimed if r["model"] == model_id and r["time"] >= since)

    def owners(self) -> dict:
        with self._owner_lock:
            return {o: {"model": m, "blocks": len(self._owned.get(o, ()))} for o, (m, _) in self._owners.items()}

    def free_all(self, model_id: str) -> int:
        """Reclaim every block a model holds (its replica died or was moved away)."""
        ids = list(self.alloc_impl.owned_blocks(model_id))
        if ids:
            self.alloc_impl.free(model_id, ids)
        return len(ids)

    def num_free_blocks(self, model_id: str) -> int:
        return self.alloc_impl.num_free_blocks(model_id)

    def num_blocks(self, model_id: str) -> int:
        return self.alloc_impl.num_blocks(model_id)

    def num_allocated_blocks(self, model_id: str) -> int:
        return self.alloc_impl.num_allocated_blocks(model_id)

    def stats(self) -> dict:
        return self.alloc_impl.stats()

    def fragmentation(self, live_tokens: dict[str, int], failing_model: str | None = None) -> dict:
        return self.alloc_impl.fragmentation(live_tokens, failing_model).to_dict()

    def snapshot(self) -> dict:
        """Occupancy and fragmentation now, with the live-token counts the workers last reported (for
        load tests). `worst_*`: the waste as seen by the model that loses most to it if it runs out now
        (free blocks it cannot use: other formats' partial slabs, other models' static regions)."""
        a, live = self.alloc_impl, dict(self._live)
        frag = a.fragmentation(live)
        worst = max((a.fragmentation(live, m) for m in a.model_ids), key=lambda r: r.wasted_bytes)
        stats = a.stats()
        return {"time": time.time(), "gpu": self.gpu, "policy": self.policy, "slab_policy": stats.get("policy"),
                "slab_size": stats.get("slab_size"), "buffer_bytes": frag.buffer_bytes,
                "live_bytes": frag.live_bytes, "allocated_bytes": frag.allocated_bytes,
                "wasted_bytes": frag.wasted_bytes, "wasted_fraction": frag.wasted_fraction,
                "kv_efficiency": frag.kv_efficiency, "worst_wasted_bytes": worst.wasted_bytes,
                "worst_wasted_fraction": worst.wasted_fraction, "worst_failing_model": worst.failing_model,
                "models": {m: {"allocated_blocks": d["allocated_blocks"], "num_blocks": d["num_blocks"]}
                           for m, d in stats["models"].items()}}


class _SlabMetrics:
    """KV Slab gauges through Ray's Prometheus export (ray_fineserve_kv_slabs, ray_fineserve_kv_fragmentation)."""

    def __init__(self, gpu: int):
        from ray.util.metrics import Gauge
        self.gpu = str(gpu)
        self.slabs = Gauge("fineserve_kv_slabs", "KV slabs per GPU by state and precision", ("gpu", "state", "precision"))
        self.frag = Gauge("fineserve_kv_fragmentation", "KV bytes wasted / buffer bytes", ("gpu",))
        self.eff = Gauge("fineserve_kv_efficiency", "live-token KV bytes / buffer bytes", ("gpu",))

    def update(self, stats: dict, report) -> None:
        free = sum(p.get("free_slabs", 0) for p in stats.get("pools", {}).values())
        self.slabs.set(free, {"gpu": self.gpu, "state": "free", "precision": "-"})
        for prec, d in stats.get("precisions", {}).items():
            self.slabs.set(d.get("partial_slabs", 0), {"gpu": self.gpu, "state": "partial", "precision": prec})
            self.slabs.set(d.get("full_slabs", 0), {"gpu": self.gpu, "state": "full", "precision": prec})
        self.frag.set(report.wasted_fraction, {"gpu": self.gpu})
        self.eff.set(report.kv_efficiency, {"gpu": self.gpu})


class RemoteAllocator:
    """The worker's side: KVAllocator over a GpuSlabManager actor, with the buffer mapped locally."""

    def __init__(self, actor, owner: str | None = None):
        import ray
        self._ray, self.actor, self.owner = ray, actor, owner
        handle = ray.get(actor.buffer_handle.remote())
        if handle[0] == "cuda":
            fn, args = handle[1]
            self.buffer = fn(*args)
        else:
            self.buffer = torch.from_file(handle[1], shared=True, size=handle[2], dtype=torch.uint8)
        self.buffer_bytes = self.buffer.numel()
        self.handle_desc = handle[1] if handle[0] == "file" else f"cuda-ipc:{self.buffer.device}"
        self._specs: dict[str, ModelKVSpec] = {}

    def _get(self, ref):
        return self._ray.get(ref)

    def spec(self, model_id: str) -> ModelKVSpec:
        if model_id not in self._specs:
            self._specs[model_id] = self._get(self.actor.spec.remote(model_id))
        return self._specs[model_id]

    def kv_region(self, model_id: str) -> torch.Tensor:
        return self._view(self._get(self.actor.region.remote(model_id)))

    def kv_scale_region(self, model_id: str) -> torch.Tensor | None:
        r = self._get(self.actor.region.remote(model_id, scales=True))
        return None if r is None else self._view(r)

    def _view(self, region: tuple[tuple, tuple, int]) -> torch.Tensor:
        shape, stride, offset = region
        return self.buffer.as_strided(shape, stride, self.buffer.storage_offset() + offset)

    def alloc(self, model_id: str, n: int) -> list[int]:
        ids = self._get(self.actor.alloc.remote(model_id, n, self.owner))
        if ids is None:
            raise KVOutOfMemory(f"GPU KV Slab has fewer than {n} free blocks for {model_id!r}")
        return ids

    def free(self, model_id: str, ids) -> None:
        self._get(self.actor.free.remote(model_id, list(ids), self.owner))

    def num_free_blocks(self, model_id: str) -> int:
        return self._get(self.actor.num_free_blocks.remote(model_id))

    def num_blocks(self, model_id: str) -> int:
        return self._get(self.actor.num_blocks.remote(model_id))

    def num_allocated_blocks(self, model_id: str) -> int:
        return self._get(self.actor.num_allocated_blocks.remote(model_id))
