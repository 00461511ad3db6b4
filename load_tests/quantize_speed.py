"""FireQ quantization time and peak memory of one model (issue 3): `fineserve quantize`'s work, timed,
written to load_tests/results/quantize-<device>.json.

    python -m load_tests.quantize_speed --model llama-3-8b-shape --precision w4a8kv4 --out /tmp/q8b --device cuda
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b-shape")
    p.add_argument("--precision", default="w4a8kv4", choices=["w4a8kv4", "fp8"])
    p.add_argument("--out", required=True, help="checkpoint directory (replaced)")
    p.add_argument("--device", default="auto")
    p.add_argument("--result", help="results JSON path (default load_tests/results/quantize-<device>.json)")
    args = p.parse_args(argv)
    from fineserve_core.model_source import resolve_model
    from fineserve_core.quant.checkpoint import save_quantized
    from fineserve_core.quant.fireq import FireQConfig, quantize_model
    from fineserve_core.results import write_result
    source = resolve_model(args.model)
    q = FireQConfig.for_precision(args.precision)
    t0 = time.perf_counter()
    tensors, qc = quantize_model(source, q, device=args.device, progress=False)
    t_quant = time.perf_counter() - t0
    out = save_quantized(args.out, source, tensors, qc)
    secs = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    cuda_peak = qc["stats"].get("cuda_peak_bytes")
    payload = {"model": args.model, "precision": args.precision, "fireq_config": qc["fireq"],
               "seconds_total": round(secs, 2), "seconds_quantize": round(t_quant, 2),
               "seconds_save": round(secs - t_quant, 2), "quant_device": qc["stats"]["device"],
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "cuda_peak_gib": round(cuda_peak / 2**30, 3) if cuda_peak else None,
               "checkpoint_bytes": size, "calibration": qc["calibration"]}
    path = write_result("quantize", payload, args.result)
    print(payload, f"\n[wrote {path}]")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
