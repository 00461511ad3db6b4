"""Check FireQ's constants on held-out calibration text (never on the evaluation article).

    python -m load_tests.tune_fireq [--set beta=4 beta=16 top_k=4 ...]

Quantizes `smollm2-135m` to full FireQ w4a8kv4 once per setting (one constant changed from FireQ's
defaults, the rest kept), with statistics from the "calib" plays as `fineserve quantize` does, and measures
perplexity on the "tune" plays (`quant.data.calibration_token_ids(split="tune")`: the odd-indexed plays,
disjoint from both the statistics and the Britannica article that `eval-ppl` reports). Also the bf16
model on the same text, for reference. Writes load_tests/results/fireq-tune-smollm2.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from fineserve_core.eval_ppl import build_rung, perplexity, private_kv
from fineserve_core.quant.fireq import FireQConfig, default_calibration
from fineserve_core.results import write_result

DEFAULT_SETS = ["beta=4", "beta=16", "top_k=4", "top_k=16", "c_ug=0.05", "v_mul=2.0", "alpha=2", "w4_scale=signed"]


def parse(spec: str) -> dict:
    name, _, value = spec.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(FireQConfig)}
    if name not in fields or not value:
        raise SystemExit(f"--set {spec!r}: expected CONSTANT=VALUE with CONSTANT one of {sorted(fields)}")
    typ = fields[name]
    return {name: int(value) if typ in (int, "int") else value if typ in (str, "str") else float(value)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--set", nargs="+", default=DEFAULT_SETS, help="settings, one constant each (CONSTANT=VALUE)")
    ap.add_argument("--tune-seqs", type=int, default=4)
    ap.add_argument("--tune-len", type=int, default=2048)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from fineserve_core.model_source import load_tokenizer, resolve_model
    from fineserve_core.quant.data import calibration_token_ids
    source = resolve_model(args.model)
    tok = load_tokenizer(source)
    seqs, names = calibration_token_ids(tok, args.tune_seqs, args.tune_len, split="tune")
    ids = [t for s in seqs for t in s]
    rows = []
    for label, rung, change in [("bf16", "bf16", {}), ("FireQ defaults", "+post-rope", {})] + \
            [(s, "+post-rope", parse(s)) for s in args.set]:
        base = FireQConfig(**{**FireQConfig().to_dict(), **change})
        calib_ids, calib_info = default_calibration(source, base, tok)
        t0 = time.perf_counter()
        model, kvp, _ = build_rung(source, rung, base, calib_ids, calib_info)
        r = perplexity(model, private_kv(model, kvp, args.window), ids, args.window, None, False, label)
        rows.append({"setting": label, "change": change, "ppl": round(r.ppl, 3), "tokens": r.tokens,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{label:16s} tune PPL {r.ppl:8.3f}", flush=True)
        del model
    path = write_result("fireq-tune", {"model": args.model, "window": args.window,
                                       "tune_text": {"split": "tune (odd-indexed plays)", "files": names,
                                                     "tokens": len(ids)},
                                       "defaults": FireQConfig().to_dict(), "rows": rows},
                        args.out or f"load_tests/results/fireq-tune-{args.model}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
