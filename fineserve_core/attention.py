"""Paged attention: each sequence attends over its blocks in the KV Slab region.

One call serves a flat batch that mixes prefill chunks (many query tokens) and decodes (one token):
query token i of a sequence sits at position kv_len - q_len + i and sees keys at positions <= its own.

Decodes (q_len 1) and chunks that continue a cached prefix read K/V back from the KV Slab blocks
through the block table. Whole-prompt prefills (q_len == kv_len > 1) attend over the step's fresh K/V
instead, as FireQ's prefill does: FP8 Q/K per (token, head) and FP8 V with one scale per KV head over the
step's prefill tokens for fp8 and w4a8kv4, plain K/V for bf16. On CUDA the Triton kernels of `kernels/`
serve both (paged decode kernel, varlen causal prefill kernel) and the torch reference the rest; on the
CPU the torch reference below computes the same numbers (up to the kernel's FP8 rounding of the softmax
probabilities). Passing no fresh K/V (`QuantRuntime.prefill_kv = "cache"`) makes prefills read the cache
too: the way to see the KV format's own error in a perplexity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fineserve_core.paged_kv import PagedKVCache
from fineserve_core.quant.formats import quantize_q_fp8


@dataclass(slots=True)
class AttnBatch:
    q_lens: list[int]              # new tokens per sequence, in batch order
    kv_lens: list[int]             # tokens in the cache per sequence after this step
    block_tables: list[list[int]]  # block ids per sequence
    slot_mapping: torch.Tensor     # [num_tokens] slot = block_id * tokens_per_block + offset
    cache: dict = field(default_factory=dict, repr=False)   # per-step kernel metadata, built once for all layers


def paged_attention(q: torch.Tensor, kv: PagedKVCache, layer: int, batch: AttnBatch,
                    k: torch.Tensor | None = None, v: torch.Tensor | None = None, q_fp8: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D] in q's dtype (written into `out` when given, a contiguous
    [T, Hq, D] tensor). k, v [T, Hkv, D]: this step's new keys and values
    (already written to the cache); whole-prompt prefills attend over them (module doc), None: over the cache.
    `q_fp8`: FireQ's Q8 (w4a8kv4) — the reference attends over `fake_quant_q_fp8(q)`; the CUDA kernels
    take q unquantized and quantize it to the same FP8 codes themselves (one launch, not ~12 torch ops)."""
    if q.is_cuda:
        return _cuda_attention(q, kv, layer, batch, k, v, q_fp8, out)
    pre = [i for i, (ql, kl) in enumerate(zip(batch.q_lens, batch.kv_lens)) if ql == kl > 1] if k is not None else []
    rest = [i for i in range(len(batch.q_lens)) if i not in set(pre)]
    out = torch.empty_like(q) if out is None else out
    if pre:
        prefill_attention_ref(q, k, v, batch, pre, kv.fmt.precision != "bf16", out)
    if rest:
        paged_attention_ref(fake_quant_q_fp8(q) if q_fp8 else q, kv, layer, batch, rows=rest, out=out)
    return out


def fake_quant_q_fp8(q: torch.Tensor) -> torch.Tensor:
    """FireQ's Q8: FP8 E4M3 per (token, head), absmax/448 (`formats.quantize_q_fp8`), dequantized
    again for the torch reference attention."""
    q8, scale = quantize_q_fp8(q)
    return (q8.float() * scale).to(q.dtype)


def fake_quant_v_fp8(v: torch.Tensor) -> torch.Tensor:
    """The FP8 prefill kernel's V: one scale per KV head, absmax over all of `v`'s tokens / 448."""
    from kernels.attn_prefill import quant_v_fp8_t_ref
    v8, vs = quant_v_fp8_t_ref(v)
    return (v8.float() * vs[None, :, None]).to(v.dtype)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch, rows: list[int],
                          fp8: bool, out: torch.Tensor) -> torch.Tensor:
    """Whole-prompt prefills `rows` over their fresh K/V; `fp8`: quantized as the FP8 prefill kernel's
    inputs are (`_cuda_attention`), V's scale taken over all these rows' tokens as there."""
    starts = _starts(batch)
    tok = torch.cat([torch.arange(starts[i], starts[i] + batch.q_lens[i], device=q.device) for i in rows])
    qp, kp, vp = q[tok], k[tok], v[tok]
    if fp8:
        qp, kp, vp = fake_quant_q_fp8(qp), fake_quant_q_fp8(kp), fake_quant_v_fp8(vp)
    group = q.shape[1] // k.shape[1]
    t = 0
    for i in rows:
        n = batch.q_lens[i]
        qs = qp[t:t + n].transpose(0, 1)
        ks = kp[t:t + n].transpose(0, 1).repeat_interleave(group, 0)
        vs = vp[t:t + n].transpose(0, 1).repeat_interleave(group, 0)
        out[starts[i]:starts[i] + n] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        t += n
    return out


def paged_attention_ref(q: torch.Tensor, kv: PagedKVCache, layer: int, batch: AttnBatch,
                        rows: list[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference over the sequences `rows` (default all); writes their tokens of `out`."""
    out = torch.empty_like(q) if out is None else out
    group = q.shape[1] // kv.fmt.num_kv_heads
    starts = _starts(batch)
    for i in range(len(batch.q_lens)) if rows is None else rows:
        q_len, kv_len, blocks, start = batch.q_lens[i], batch.kv_lens[i], batch.block_tables[i], starts[i]
        k, v = kv.gather(layer, blocks, kv_len, q.dtype)             # [Hkv, kv_len, D]
        qs = q[start:start + q_len].transpose(0, 1)                  # [Hq, q_len, D]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True)
        else:
            pos_q = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
            mask = pos_q >= torch.arange(kv_len, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)
        out[start:start + q_len] = o.transpose(0, 1)
    return out


def _starts(batch: AttnBatch) -> list[int]:
    starts, t = [], 0
    for n in batch.q_lens:
        starts.append(t)
        t += n
    return starts


@dataclass(slots=True)
class _CudaMeta:
    """Which sequences each kernel serves, and its index tensors (one build per step, not per layer).
    `dec_tok` / `pre_tok` select the decode / whole-prefill rows' tokens: a slice when they are contiguous
    (the engine orders a step decodes first, then prompts), else an index tensor."""
    decode: list[int]                   # sequence rows with q_len 1
    prefill: list[int]                  # rows with q_len == kv_len > 1 (whole prompt in this step)
    other: list[int]                    # chunks continuing a cached prefix: torch reference
    dec_tok: slice | torch.Tensor = field(default_factory=lambda: slice(None))
    block_tables: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None
    pre_tok: slice | torch.Tensor = field(default_factory=lambda: slice(None))
    cu: torch.Tensor | None = None
    max_len: int = 0
    v_starts: torch.Tensor | None = None
    v_pad: int = 0


def _token_rows(starts: list[int], q_lens: list[int], rows: list[int], device) -> slice | torch.Tensor:
    tok = [t for i in rows for t in range(starts[i], starts[i] + q_lens[i])]
    if tok == list(range(tok[0], tok[-1] + 1)):
        return slice(tok[0], tok[-1] + 1)
    return torch.tensor(tok, device=device)


def _meta(batch: AttnBatch, device, have_kv: bool) -> _CudaMeta:
    key = ("cuda_meta", have_kv)
    m = batch.cache.get(key)
    if m is not None:
        return m
    dec, pre, oth = [], [], []
    for i, (ql, kl) in enumerate(zip(batch.q_lens, batch.kv_lens)):
        (dec if ql == 1 else pre if (ql == kl and have_kv) else oth).append(i)
    m = _CudaMeta(dec, pre, oth)
    starts = _starts(batch)
    if dec:
        m.dec_tok = _token_rows(starts, batch.q_lens, dec, device)
        width = max(len(batch.block_tables[i]) for i in dec)
        bt = [batch.block_tables[i] + [0] * (width - len(batch.block_tables[i])) for i in dec]
        m.block_tables = torch.tensor(bt, dtype=torch.int32, device=device)
        m.kv_lens = torch.tensor([batch.kv_lens[i] for i in dec], dtype=torch.int32, device=device)
    if pre:
        lens = [batch.q_lens[i] for i in pre]
        m.pre_tok = _token_rows(starts, batch.q_lens, pre, device)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        m.cu = torch.tensor(cu, dtype=torch.int32, device=device)
        m.max_len = max(lens)
        from kernels.attn_prefill import v_layout
        vst, m.v_pad = v_layout(lens)
        m.v_starts = torch.tensor(vst, dtype=torch.int32, device=device)
    batch.cache[key] = m
    return m


def _take(x: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def _joint(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """[T, Hq + Hkv, D] over q and k when k's heads follow q's in one buffer (the fused projection's
    layout): one FP8 quantization then serves both."""
    T, hq, d = q.shape
    if (k.stride() == q.stride() and q.stride(1) == d and q.stride(2) == 1 and q.stride(0) == (hq + k.shape[1]) * d
            and k.data_ptr() == q.data_ptr() + hq * d * q.element_size()):
        return q.as_strided((T, hq + k.shape[1], d), q.stride())
    return None


def _cuda_attention(q, kv: PagedKVCache, layer: int, batch: AttnBatch, k, v, q_fp8: bool,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    import kernels
    prec = kv.fmt.precision
    m = _meta(batch, q.device, k is not None)
    hq = q.shape[1]
    out = torch.empty_like(q) if out is None else out
    # FireQ's Q8 (w4a8kv4 decodes) and FP8 Q/K (fp8 and w4a8kv4 prompts), per (token, head): quantized once
    # for the step's rows when they are one range and q, k share a buffer, else per kernel
    T = q.shape[0]
    q8 = qs = k8 = ks = None
    need = [r for r, on in ((m.dec_tok, prec == "w4a8kv4" and m.decode), (m.pre_tok, prec != "bf16" and m.prefill))
            if on]
    qk = _joint(q, k) if need and k is not None and all(isinstance(r, slice) for r in need) else None
    if qk is not None:
        lo = min(r.indices(T)[0] for r in need)
        hi = max(r.indices(T)[1] for r in need)
        x8, sx = kernels.quant_qk_fp8(qk[lo:hi])
        q8, qs, k8, ks = x8[:, :hq], sx[:, :hq], x8[:, hq:], sx[:, hq:]

    def sub(x, sel: slice):                        # rows `sel` of the step out of the quantized range
        a, b, _ = sel.indices(T)
        return x[a - lo:b - lo]
    if m.decode:
        if prec == "w4a8kv4":
            if q8 is not None:
                qd, q_scale = sub(q8, m.dec_tok), sub(qs, m.dec_tok)
            else:
                qd, q_scale = kernels.quant_qk_fp8(_take(q, m.dec_tok))
        else:
            qd, q_scale = _take(q, m.dec_tok), None
        direct = isinstance(m.dec_tok, slice)
        od = kernels.paged_decode_attention(qd, kv.k[layer], kv.v[layer], m.block_tables, m.kv_lens, prec,
                                            q_scale=q_scale, out_dtype=q.dtype, out=out[m.dec_tok] if direct else None)
        if not direct:
            out.index_copy_(0, m.dec_tok, od)
    if m.prefill:
        direct = isinstance(m.pre_tok, slice)
        dst = out[m.pre_tok] if direct else None
        if prec == "bf16":
            op = kernels.prefill_attention(_take(q, m.pre_tok), _take(k, m.pre_tok), _take(v, m.pre_tok), m.cu,
                                           m.max_len, out_dtype=q.dtype, out=dst)
        else:
            from kernels.attn_prefill import quant_v_fp8_t
            if k8 is not None:
                qp8, qps, kp8, kps = (sub(x, m.pre_tok) for x in (q8, qs, k8, ks))
            else:
                qp8, qps = kernels.quant_qk_fp8(_take(q, m.pre_tok))
                kp8, kps = kernels.quant_qk_fp8(_take(k, m.pre_tok))
            v8, vs = quant_v_fp8_t(_take(v, m.pre_tok), m.cu, m.v_starts, m.v_pad, m.max_len)
            op = kernels.prefill_attention(qp8, kp8, v8, m.cu, m.max_len, q_scale=qps,
                                           k_scale=kps.t().contiguous().t(), v_scale=vs, v_starts=m.v_starts,
                                           out_dtype=q.dtype, out=dst)
        if not direct:
            out.index_copy_(0, m.pre_tok, op)
    if m.other:
        paged_attention_ref(fake_quant_q_fp8(q) if q_fp8 else q, kv, layer, batch, rows=m.other, out=out)
    return out
