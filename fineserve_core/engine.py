"""The engine: one model, continuous batching over a KV region of a (possibly shared) KV Slab buffer."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fineserve_core.attention import AttnBatch
from fineserve_core.config import EngineConfig
from fineserve_core.cost_model import weight_bytes
from fineserve_core.kv_format import KVFormat
from fineserve_core.kv_slab import BlockCache, KVAllocator, KVSlabManager, ModelKVSpec
from fineserve_core.llama import LlamaModel
from fineserve_core.model_source import iter_weights, load_tokenizer, resolve_model
from fineserve_core.paged_kv import PagedKVCache
from fineserve_core.sampling import SamplingParams, sample_batch
from fineserve_core.scheduler import make_scheduler
from fineserve_core.sequence import Sequence, new_text

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CPU_KV_BYTES = 512 << 20


class RequestError(ValueError):
    """A request the engine refuses (bad prompt, too long, duplicate id): the client's fault."""


class ModelTooLargeError(ValueError):
    """The model's weights cannot fit the memory the device has free (checked before loading any)."""


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device` (None where unknown): on CUDA the driver's free
    memory plus what torch's allocator caches unused; on the CPU MemAvailable of /proc/meminfo."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_weights_fit(cfg: EngineConfig, config, dtype: torch.dtype, device: torch.device) -> int:
    """Weight bytes the model will take on `device`; raises ModelTooLargeError when they exceed what is
    free, before a 70B preset starts building tensors that could only end in an OOM kill."""
    need = int(weight_bytes(config, cfg.precision, dtype.itemsize))
    avail = available_memory(device)
    if avail is not None and need > avail:
        raise ModelTooLargeError(f"model {cfg.model} ({cfg.precision}, {str(dtype).replace('torch.', '')}) needs "
                                 f"{need / 2**30:.2f} GiB of weights on {device}, which has {avail / 2**30:.2f} "
                                 "GiB free")
    return need


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    metrics: dict | None = None            # set when finished


def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.dtype != "auto":
        return device, DTYPES[cfg.dtype]
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


class Engine:
    def __init__(self, cfg: EngineConfig, allocator: KVAllocator | None = None, model_id: str | None = None):
        self.cfg = cfg
        self.model_id = model_id or f"{cfg.model}:{cfg.precision}"
        self.source = resolve_model(cfg.model)
        mcfg = self.source.config
        self.device, self.dtype = resolve_device_dtype(cfg)
        check_weights_fit(cfg, mcfg, self.dtype, self.device)
        self.model = LlamaModel(mcfg, iter_weights(self.source, self.dtype, self.device, cfg.seed),
                                cfg.precision, self.dtype, self.device)
        if self.device.type == "cuda":
            # the load's float32 temporaries stay reserved in torch's allocator otherwise; co-located
            # models and the shared KV buffer are sized from what the GPU has actually free
            torch.cuda.empty_cache()
        self.tokenizer = load_tokenizer(self.source)
        self.eos_ids = set(mcfg.eos_token_ids)
        self.max_model_len = cfg.max_model_len or min(mcfg.max_position_embeddings, 4096)
        self.fmt = KVFormat.for_model(cfg.precision, mcfg.num_kv_heads, mcfg.head_dim, self.dtype, cfg.tokens_per_block)
        if allocator is None:
            allocator = KVSlabManager(torch.empty(self._private_kv_bytes(), dtype=torch.uint8, device=self.device),
                                      [self.kv_spec()])
        self.allocator = allocator
        self.kv = PagedKVCache(self.fmt, allocator.kv_region(self.model_id), allocator.kv_scale_region(self.model_id))
        self.blocks = BlockCache(allocator, self.model_id)
        # the pool's capacity is fixed: asked once, since every call is a Ray round trip to the GPU's
        # slab manager when the allocator is remote (it was on each request's path)
        self.kv_capacity = allocator.num_blocks(self.model_id)
        self.scheduler = make_scheduler(cfg.scheduler, self.blocks, self.fmt.tokens_per_block, cfg.max_num_seqs,
                                        cfg.max_num_batched_tokens, ttft_per_token=cfg.ttft_per_token)
        self.seqs: dict[str, Sequence] = {}
        self.graphs = self.step_graphs = None
        if self.device.type == "cuda" and cfg.cuda_graphs:
            from fineserve_core.decode_graphs import DecodeGraphs
            from fineserve_core.step_graphs import StepGraphs
            pad = self.blocks.alloc(1)[0]             # the padding rows' scratch block, held for good
            self.graphs = DecodeGraphs(self.model, self.kv, cfg.max_num_seqs,
                                       -(-self.max_model_len // self.fmt.tokens_per_block), pad)
            self.graphs.capture_all()
            if cfg.graph_max_tokens:
                self.step_graphs = StepGraphs(self.model, self.kv,
                                              min(cfg.graph_max_tokens, cfg.max_num_batched_tokens), pad)
                self.step_graphs.capture_all()
        if self.device.type == "cuda":
            self._warm_up()

    def kv_spec(self, rate: float = 1.0) -> ModelKVSpec:
        return ModelKVSpec.from_format(self.model_id, self.fmt, self.source.config.num_layers, rate,
                                       self.cfg.max_num_batched_tokens)

    def _private_kv_bytes(self) -> int:
        if self.cfg.kv_cache_bytes:
            return self.cfg.kv_cache_bytes
        if self.device.type != "cuda":
            return CPU_KV_BYTES
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = total * (1 - self.cfg.gpu_memory_utilization) + (1 << 30)   # activations + allocator slack
        return max(int(free - reserve), 64 << 20)

    # ---- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"model {self.cfg.model} has no tokenizer: send token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    deadline: float | None = None) -> Sequence:
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.source.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                               f"model's context length {self.max_model_len}")
        need = -(-(len(ids) + params.max_tokens) // self.fmt.tokens_per_block)
        if need > self.kv_capacity:
            raise RequestError(f"prompt + max_tokens needs {need} KV blocks but this model's KV pool holds "
                               f"{self.kv_capacity}")
        seq = Sequence(request_id, ids, params, deadline=deadline)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq)
            seq.finish_reason, seq.finish_time = "abort", time.monotonic()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        outputs = [self._drop(s) for s in self.scheduler.dropped]
        self.scheduler.dropped.clear()
        if not batch:
            return outputs
        t0 = time.perf_counter()
        # decodes, then prompts, then chunks continuing a prompt: each attention kernel's rows are then one
        # range of the step's tokens (slices, not gathers; `attention._cuda_attention`)
        batch.sort(key=lambda sn: 0 if sn[1] == 1 else 1 if sn[0].num_computed == 0 else 2)
        T = self.fmt.tokens_per_block
        ids, pos, slots, sample_rows, samplers = [], [], [], [], []
        for seq, n in batch:
            start = seq.num_computed
            ids += seq.token_ids[start:start + n]
            p = list(range(start, start + n))
            pos += p
            slots += [seq.block_ids[i // T] * T + i % T for i in p]
            if start + n == len(seq):
                sample_rows.append(len(ids) - 1)
                samplers.append(seq)
        dev = self.device
        kv_lens = [s.num_computed + n for s, n in batch]
        if self.graphs is not None and len(ids) == len(batch):        # decodes only: replay a graph
            hidden = self.graphs.run(ids, pos, slots, [s.block_ids for s, _ in batch], kv_lens)
        elif self.step_graphs is not None and len(ids) <= self.step_graphs.max_tokens:   # with prompt tokens
            hidden = self.step_graphs.run(ids, pos, slots, [n for _, n in batch], kv_lens,
                                          [s.block_ids for s, _ in batch])
        else:
            attn = AttnBatch([n for _, n in batch], kv_lens, [s.block_ids for s, _ in batch],
                             torch.tensor(slots, device=dev))
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), attn, self.kv)
        for seq, n in batch:
            seq.num_computed += n
        if samplers:
            rows = hidden if len(sample_rows) == hidden.shape[0] else hidden[torch.tensor(sample_rows, device=dev)]
            logits = self.model.logits(rows)
            now = time.monotonic()
            tokens = sample_batch(logits, [s.params for s in samplers], [s.generator for s in samplers])
            for seq, token in zip(samplers, tokens):
                outputs.append(self._append(seq, token, now))
        if len(ids) > len(batch):        # prompt tokens in this step: saab-online's TTFT slope
            self.scheduler.observe(len(ids), time.perf_counter() - t0)
        return outputs

    def _append(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        seq.output_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        p = seq.params
        reason = None
        if token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        text = seq.text + new_text(self.tokenizer, seq, final=reason is not None)
        if p.stop:
            hit = min((i for i in (text.find(s, max(0, len(seq.text) - len(s))) for s in p.stop) if i >= 0), default=-1)
            if hit >= 0:
                text, reason = text[:hit], "stop"
        seq.text = text
        # hold back a tail that could still become a stop string or an incomplete UTF-8 character
        hold = 0 if reason else max((len(s) - 1 for s in p.stop), default=0)
        upto = max(seq.num_emitted, len(text) - hold)
        delta, seq.num_emitted = text[seq.num_emitted:upto], upto
        metrics = None
        if reason:
            seq.finish_reason, seq.finish_time = reason, now
            self.scheduler.finish(seq)
            self.seqs.pop(seq.request_id, None)
            metrics = seq.metrics()
        return RequestOutput(seq.request_id, [token], delta, reason is not None, reason,
                             len(seq.prompt_ids), len(seq.output_ids), metrics)

    def _drop(self, seq: Sequence) -> RequestOutput:
        seq.finish_reason, seq.finish_time = "dropped", time.monotonic()
        self.seqs.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, [], "", True, "dropped", len(seq.prompt_ids), 0, seq.metrics())

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Run the step kinds a server meets once at load (a prompt alone; a prompt beside a decode over a
        one-block context, then over a multi-block one, whose decode attention splits), so that every
        Triton kernel variant is compiled, or loaded from Triton's disk cache, here and not inside a live
        request's step (≈ 1.5 s per compile on the H100, `engine_speed --mixed`'s JIT log)."""
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        T = self.fmt.tokens_per_block
        # two sequences at once in what the KV holds besides the graphs' scratch block
        longest = min(self.max_model_len, (self.kv_capacity - 2) // 2 * T) - params.max_tokens
        for n in (3, min(2 * T + 5, longest)):
            self.add_request(f"__warm-up-{n}-a", [1] * n, params)
            self.step()
            self.add_request(f"__warm-up-{n}-b", [1] * n, params)
            while self.has_unfinished():
                self.step()

    @torch.inference_mode()
    def measure_ttft_per_token(self, num_tokens: int = 256) -> float:
        """Seconds of prefill per token at batch 1 (SAAB's linear TTFT model), measured on this device."""
        ids = [t % self.source.config.vocab_size for t in range(1000, 1000 + num_tokens)]
        times = []
        for _ in range(2):                                         # the first run warms up
            self.add_request("__profile__", ids, SamplingParams(max_tokens=1, temperature=0.0))
            t0 = time.perf_counter()
            while "__profile__" in self.seqs:
                self.step()
            times.append(time.perf_counter() - t0)
        return times[-1] / num_tokens

    # ---- offline use ----------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[dict]:
        """Run prompts to completion; returns per prompt {token_ids, text, finish_reason, metrics}."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        base = f"gen-{time.monotonic_ns()}"
        seqs = [self.add_request(f"{base}-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        while any(not s.finished for s in seqs):
            self.step()
        return [{"token_ids": s.output_ids, "text": s.text, "finish_reason": s.finish_reason,
                 "metrics": s.metrics()} for s in seqs]

    def close(self) -> None:
        """Give every block (also those cached locally) back to the shared allocator."""
        for rid in list(self.seqs):
            self.abort(rid)
        self.blocks.release_all()
