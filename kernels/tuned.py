"""Committed dispatch tables: which path and tile each kernel uses, by problem size.

Filled from the H100 measurements in `load_tests/results/kernels-h100.json` (see kernels/NOTES.md for
the runs that chose them), so the engine never autotunes at run time. Under the interpreter (CPU) the
same tables apply; tests pass small explicit configs instead.
"""
from __future__ import annotations

from kernels.gemm_w4a8 import GemmConfig

# W4A8 GEMM: (max M, config) for plain / +residual epilogues, first match wins. Run 3 (2026-11-24,
# `bench-kernels --sweep --select`, gemm_selected): swapped tiles (weights as wgmma's 64-row side) with the
# inline-PTX unpack win at every M <= 64; two-step (unpack + cuBLAS FP8) from M = 256 on.
GEMM_TABLE: list[tuple[int, GemmConfig]] = [
    (1, GemmConfig("triton", BM=16, BN=64, SPLIT_K=4, SWAP_AB=True, num_warps=4, num_stages=4, asm=True)),
    (16, GemmConfig("triton", BM=16, BN=64, SPLIT_K=8, SWAP_AB=True, num_warps=4, num_stages=4, asm=True)),
    (64, GemmConfig("triton", BM=64, BN=64, SPLIT_K=4, SWAP_AB=True, num_warps=4, num_stages=4, asm=True)),
    (1 << 62, GemmConfig("two_step")),
]

# Gate+up with the SiLU·mul epilogue (two accumulators). Run 3's gate_up sweep (M = 16, Llama-3-8B):
# split-K 2, swapped, asm; M <= 64 takes the GEMM's M = 64 tile with split-K 2 (not swept).
GATE_UP_TABLE: list[tuple[int, GemmConfig]] = [
    (16, GemmConfig("triton", BM=16, BN=64, SPLIT_K=2, SWAP_AB=True, num_warps=4, num_stages=4, asm=True)),
    (64, GemmConfig("triton", BM=64, BN=64, SPLIT_K=2, SWAP_AB=True, num_warps=4, num_stages=4, asm=True)),
    (1 << 62, GemmConfig("two_step")),
]


def gemm_config(M: int, N: int, K: int, epi: int) -> GemmConfig:
    table = GATE_UP_TABLE if epi == 2 else GEMM_TABLE
    for max_m, cfg in table:
        if M <= max_m:
            return cfg
    return table[-1][1]
