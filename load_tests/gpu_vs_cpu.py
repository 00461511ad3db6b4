"""GPU engine (Triton kernels) vs the CPU reference runner on one seeded random-weight model, per precision.

All runners get the same weights (drawn on the CPU in float32 and rounded to bf16, so the GPU's bf16
copy and the on-load quantization see the same values) and the same token stream: two prompts (37 and
70 tokens) prefilled in one step, then 3 decode steps. Per step: the relative L2 error of the last-token
logits of the GPU runner (bf16) against the CPU reference in bf16, and — the yardstick — the same error
between the CPU reference in float32 and in bf16. A random-weight model is chaotic under re-quantization:
a last-bit difference before an FP8/INT4 quantizer flips codes, so the fp8/w4a8kv4 logits move ≈10× more
than bf16's under *any* change of rounding (run 5: CPU fp32 vs CPU bf16 gives 1.3 % for bf16, 9.9 % for
fp8). The kernels pass when they deviate from the reference no more than the reference deviates from itself.
"""
from __future__ import annotations

import torch

PROMPTS = (37, 70)
DECODE_STEPS = 3


def run_model(model, precision: str, prompts: list[list[int]], decode: list[list[int]], device) -> list[torch.Tensor]:
    """Logits [num_seqs, vocab] (float32, CPU) after the prefill and after each decode step."""
    from fineserve_core.attention import AttnBatch
    from fineserve_core.kv_format import KVFormat
    from fineserve_core.paged_kv import PagedKVCache
    cfg = model.cfg
    fmt = KVFormat.for_model(precision, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    T = fmt.tokens_per_block
    per_seq = -(-(max(map(len, prompts)) + len(decode)) // T)
    region = torch.zeros((cfg.num_layers, 2, len(prompts) * per_seq * fmt.block_bytes), dtype=torch.uint8,
                         device=device)
    kv = PagedKVCache(fmt, region)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    lens = [0] * len(prompts)
    out = []
    for step in [prompts] + [[[t] for t in row] for row in decode]:
        ids, pos, slots, last = [], [], [], []
        for i, new in enumerate(step):
            p = list(range(lens[i], lens[i] + len(new)))
            ids += new
            pos += p
            slots += [tables[i][j // T] * T + j % T for j in p]
            last.append(len(ids) - 1)
        q_lens = [len(x) for x in step]
        lens = [n + q for n, q in zip(lens, q_lens)]
        batch = AttnBatch(q_lens, list(lens), tables, torch.tensor(slots, device=device))
        h = model(torch.tensor(ids, device=device), torch.tensor(pos, device=device), batch, kv)
        out.append(model.logits(h[torch.tensor(last, device=device)]).float().cpu())
    return out


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def compare(precision: str, model_name: str = "smollm2-135m-shape", seed: int = 0) -> list[dict]:
    """Per step: relerr (GPU bf16 vs CPU bf16), floor (CPU fp32 vs CPU bf16), argmax agreement of GPU vs CPU."""
    from fineserve_core.llama import LlamaModel
    from fineserve_core.model_source import iter_weights, resolve_model
    src = resolve_model(model_name)
    weights = [(n, t.to(torch.bfloat16).float()) for n, t in iter_weights(src, torch.float32, "cpu", seed)]
    g = torch.Generator().manual_seed(seed)
    V = src.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in PROMPTS]
    decode = [torch.randint(0, V, (len(PROMPTS),), generator=g).tolist() for _ in range(DECODE_STEPS)]
    logits = {}
    for name, dtype, dev in (("cpu_bf16", torch.bfloat16, "cpu"), ("cpu_fp32", torch.float32, "cpu"),
                             ("gpu", torch.bfloat16, "cuda")):
        model = LlamaModel(src.config, iter(weights), precision, dtype, dev)
        logits[name] = run_model(model, precision, prompts, decode, dev)
        del model
    rows = []
    for step, (a, b, c) in enumerate(zip(logits["gpu"], logits["cpu_bf16"], logits["cpu_fp32"])):
        rows.append({"step": "prefill" if step == 0 else f"decode{step}", "relerr": _relerr(a, b),
                     "floor": _relerr(c, b), "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())})
    return rows
