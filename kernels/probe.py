"""One kernel call at one shape, with the engine's committed configs, for a profiler to look at (ncu):

    ncu --kernel-name regex:_w4a8_kernel --launch-skip 2 --launch-count 1 python -m kernels.probe gemm 64 28672 4096
    ncu --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 1 python -m kernels.probe decode 64 1024

Four calls each: the first ones compile; skip them in the profiler.
"""
import sys

import torch

from kernels.bench import MODELS, _paged_cache, rand_w4


def gemm(M: int, N: int, K: int) -> None:
    from kernels.fp8_quant import quant_fp8
    from kernels.gemm_w4a8 import w4a8_gemm_fp8
    w = rand_w4(N, K, "cuda")
    x8, xs = quant_fp8(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), group=128)
    for _ in range(4):
        w4a8_gemm_fp8(x8, xs, w)


def decode(B: int, ctx: int) -> None:
    from fineserve_core.quant.formats import quantize_q_fp8
    from kernels.attn_decode import default_splits, paged_decode_attention
    m = MODELS["llama-3-8b"]
    hq, hkv, d = m["heads"], m["kv_heads"], m["head_dim"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    _, _, kc, vc, bt = _paged_cache("w4a8kv4", B, ctx, hkv, d, "cuda", gen)
    q8, qs = quantize_q_fp8(torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16))
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    for _ in range(4):
        paged_decode_attention(q8, kc, vc, bt, lens, "w4a8kv4", q_scale=qs.view(B, hq), num_warps=4, num_stages=3,
                               splits=default_splits(B, hkv, bt.shape[1]))


if __name__ == "__main__":
    {"gemm": gemm, "decode": decode}[sys.argv[1]](*(int(a) for a in sys.argv[2:]))
    torch.cuda.synchronize()
