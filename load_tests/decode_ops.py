"""aten ops per decode step through the real `Engine` (issue 4: decode is launch/Python bound on the GPU).

Counts every aten op dispatched during `Engine.step` (TorchDispatchMode: what a GPU would launch,
minus views, plus the CPU-only reference paths) for a random-weight shape preset, per precision, at
a decode batch of `--batch` sequences after one prefill step. On the CPU the attention, KV write and
quantized linears are torch references (on CUDA one or two Triton/cuBLAS launches each), so a second
step is counted as the CUDA path runs it (`cuda_path`: the fused quantizers on for fp8/w4a8kv4, those
device-specific calls counted as regions, not ops): its `glue_kernel_ops_per_layer` are the torch ops
that are each a kernel launch on any device. Writes load_tests/results/decode-ops-<device>.json.

    python -m load_tests.decode_ops [--model smollm2-135m-shape] [--batch 4] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# metadata-only ops: no kernel on any device
_VIEWS = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "unsqueeze", "squeeze", "select",
          "slice", "split", "split_with_sizes", "chunk", "unbind", "as_strided", "permute", "alias", "detach",
          "_reshape_alias", "unflatten", "flatten", "narrow", "view_as", "expand_as", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.regions: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = func.overloadpacket.__name__
        # `x.to(x.dtype)` and friends return their input: no kernel either
        noop = name in ("to", "contiguous", "type_as") and out is args[0]
        self.ops["noop_" + name if noop else name] += 1
        return out


@contextmanager
def device_regions(counter: OpCounter):
    """Count calls of the code that is one kernel (or two) on CUDA but a torch reference on the CPU —
    paged attention, KV write, quantized linears, the fused norm/SiLU·mul quantizers — as regions, and
    pause op counting inside them: what stays is the device-independent torch glue of a layer."""
    import kernels
    from fineserve_core import linear, llama
    from fineserve_core.paged_kv import PagedKVCache
    fp8_act = getattr(linear, "FP8Act", None)

    def region(name, fn):
        def run(*a, **kw):
            counter.regions[name(*a, **kw) if callable(name) else name] += 1
            paused, counter.paused = counter.paused, True
            try:
                return fn(*a, **kw)
            finally:
                counter.paused = paused
        return run

    def lin_forward(cls):
        fwd = cls.forward

        def forward(self, x):
            if fp8_act is not None and isinstance(x, fp8_act):   # from the fused quantizers below (plain K order)
                return fwd(self, (x.x8.float() * x.scale.reshape(-1, 1)).to(x.dtype))
            return fwd(self, x)
        return forward

    patches = [(llama, "paged_attention", region("paged_attention", llama.paged_attention)),
               (PagedKVCache, "write", region("kv_write", PagedKVCache.write))]
    for cls in (linear.W4A8Linear, linear.FP8Linear):
        patches.append((cls, "forward", region(
            lambda self, x: "linear(fp8 act)" if fp8_act is not None and isinstance(x, fp8_act) else "linear(float)",
            lin_forward(cls))))
    # the fused kernels' torch references (group None: the linear above dequantizes in plain K order)
    patches += [(kernels, "rmsnorm_quant_fp8", region("rmsnorm_quant_fp8",
                 lambda x, w, eps, residual=None, group=None: kernels.rmsnorm_quant_fp8_ref(x, w, eps, residual))),
                (kernels, "silu_mul_quant_fp8", region("silu_mul_quant_fp8",
                 lambda gu, group=None: kernels.silu_mul_quant_fp8_ref(gu)))]
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patches]
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    try:
        yield
    finally:
        for obj, name, old in saved:
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def count_decode_step(model: str, precision: str, batch: int, dtype: str, prompt_len: int) -> dict:
    from fineserve_core.config import EngineConfig
    from fineserve_core.engine import Engine
    from fineserve_core.sampling import SamplingParams
    eng = Engine(EngineConfig(model=model, precision=precision, dtype=dtype, device="cpu",
                              kv_cache_bytes=64 << 20))
    gen = torch.Generator().manual_seed(0)
    vocab = eng.source.config.vocab_size
    for i in range(batch):
        eng.add_request(f"r{i}", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(),
                        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    eng.step()                      # prefill of all prompts
    eng.step()                      # first decode (warm caches: dequantized weights, per-step metadata)
    with OpCounter() as c:
        eng.step()
    # the same step shape again, as the CUDA path runs it (fused quantizers on for fp8/w4a8kv4 where the
    # engine has them), the device-specific code counted as regions
    fused = precision != "bf16" and hasattr(eng.model, "set_fused")
    if fused:
        eng.model.set_fused(True)
    with OpCounter() as g, device_regions(g):
        eng.step()
    eng.close()
    layers = eng.source.config.num_layers
    total = sum(c.ops.values())
    non_view = _kernel_ops(c.ops)
    glue = _kernel_ops(g.ops)
    return {"precision": precision, "layers": layers, "ops_per_step": total, "kernel_ops_per_step": non_view,
            "ops_per_layer": round(total / layers, 2), "kernel_ops_per_layer": round(non_view / layers, 2),
            "cuda_path": {"fused_quantizers": fused, "glue_kernel_ops_per_step": glue,
                          "glue_kernel_ops_per_layer": round(glue / layers, 2),
                          "region_calls_per_step": dict(g.regions), "glue_by_op": dict(g.ops.most_common())},
            "by_op": dict(c.ops.most_common())}


def _kernel_ops(ops: Counter) -> int:
    return sum(n for k, n in ops.items() if k not in _VIEWS and not k.startswith("noop_"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-shape")
    ap.add_argument("--precisions", default="bf16,fp8,w4a8kv4")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16: as on the GPU)")
    ap.add_argument("--tag", default="", help="suffix of the results file name (e.g. -before)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from fineserve_core.results import write_result
    rows = []
    for p in a.precisions.split(","):
        r = count_decode_step(a.model, p, a.batch, a.dtype, a.prompt_len)
        cp = r["cuda_path"]
        print(f"{p:8s} {r['ops_per_step']:6d} aten ops/step ({r['kernel_ops_per_step']} non-view), "
              f"{r['ops_per_layer']:.1f}/layer ({r['kernel_ops_per_layer']:.1f} non-view); CUDA path: "
              f"{cp['glue_kernel_ops_per_layer']:.1f} torch glue ops/layer + regions {cp['region_calls_per_step']}",
              flush=True)
        rows.append(r)
    out = write_result(f"decode-ops{a.tag}", {"model": a.model, "config": vars(a), "precisions": rows}, a.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
