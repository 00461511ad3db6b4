"""Committed dispatch tables: which path and tile each kernel uses, by problem size.

Filled from the H100 measurements in `load_tests/results/kernels-h100*.json` (kernels/NOTES.md names
the runs that chose them), so the engine never autotunes at run time. Under the interpreter (CPU) the
same tables apply; tests pass small explicit configs instead.
"""
from __future__ import annotations

from dataclasses import replace

from fineserve_core.quant.formats import W4_EXACT_MAX_ROWS
from kernels.gemm_w4a8 import GemmConfig

# W4A8 GEMM for plain / +residual epilogues, by M (first row whose max M fits). Run 3 (2026-11-24,
# `bench-kernels --sweep --select`, gemm_selected): swapped tiles (weights as wgmma's 64-row side) with the
# inline-PTX unpack win at every M <= 64; two-step (unpack + cuBLAS FP8) from M = 256 on. Session 3's
# sweep at M = 32 and 64 (kernels-h100-gemm-sweep-m32-m64.json, the decode buckets 24..64): a 32-row
# activation tile wins every Llama-3-8B projection at M = 32 (qkv 12.9 vs 15.8 us), 3 stages at M = 64.
# Session 4 (kernels-h100-gemm-sweep-decode.json, M = 1/16/32/64): two groups of K per iteration win at
# M = 64; the FP16-MMA variant with folded scales (`f16`) loses everywhere by 5-15 %.
# Split-K also depends on the projection (same sweep, per shape): (max M, config, split for a wide output
# N >= 16384 — gate_up, 448 tiles of 64 rows fill the GPU with less split: 39 vs 45 us at M = 16, 63 vs
# 74 at M = 64 — , split for a long K >= 8192 — down: 22.5 vs 26.0 us at M = 32).
# Session 5 (kernels-h100-gemm-sweep-mid.json, M = 128..1024, the token counts of steps carrying short
# prompts): at M = 128 a 64-token x 128-row swapped tile beats the two-step path on qkv, gate_up and
# down and ties on o (qkv 26.2 vs 32.2 us, o 25.6 vs 25.4 at split 1 / 19.0 at split 2, gate_up 101.0
# vs 130.2, down 47.9 vs 78.7 at split 2: the layer's four 201 vs 267 us, as configured here); from
# M = 256 on two-step wins or ties.
# Session 12 (kernels-h100-unpack-ab.json, same tiles): INT4→FP8 as e4m3 subnormal codes (asm=2) beats the
# f16x2 unpack at every M; FP32 promotion once per group (acc_k=0) adds to it except at M = 32 (layer sums
# vs f16x2: M = 1 1.07x, 16 1.04x, 32 1.02x with per-k-step promotion, 64 1.13x, 128 1.29x).
GEMM_TABLE: list[tuple[int, GemmConfig, int, int]] = [
    (16, GemmConfig("triton", BM=16, BN=64, SPLIT_K=8, SWAP_AB=True, num_warps=4, num_stages=4, asm=2, acc_k=0), 4, 8),
    (32, GemmConfig("triton", BM=32, BN=64, SPLIT_K=4, SWAP_AB=True, num_warps=4, num_stages=4, asm=2), 4, 8),
    (64, GemmConfig("triton", BM=64, BN=64, SPLIT_K=4, SWAP_AB=True, num_warps=4, num_stages=3, asm=2, GPI=2,
                acc_k=0), 2, 4),
    (W4_EXACT_MAX_ROWS,  # = 128; above it two_step, whose FP8 weights the CPU forward mirrors
     GemmConfig("triton", BM=64, BN=128, SPLIT_K=1, SWAP_AB=True, num_warps=8, num_stages=3, asm=2,
                acc_k=0), 1, 2),
    (1 << 62, GemmConfig("two_step"), 0, 0),
]

# Gate+up with the SiLU·mul epilogue (two accumulators). Run 3's gate_up sweep (M = 16, Llama-3-8B):
# split-K 2, swapped, asm; M <= 64 takes the GEMM's M = 64 tile with split-K 2 (not swept). Session 12:
# subnormal codes with per-group promotion, 1.08-1.12x the f16x2 unpack at M = 1 / 16 / 32 / 64.
GATE_UP_TABLE: list[tuple[int, GemmConfig]] = [
    (16, GemmConfig("triton", BM=16, BN=64, SPLIT_K=2, SWAP_AB=True, num_warps=4, num_stages=4, asm=2, acc_k=0)),
    (64, GemmConfig("triton", BM=64, BN=64, SPLIT_K=2, SWAP_AB=True, num_warps=4, num_stages=4, asm=2, acc_k=0)),
    (1 << 62, GemmConfig("two_step")),
]


def gemm_config(M: int, N: int, K: int, epi: int) -> GemmConfig:
    if epi == 2:
        return next((c for max_m, c in GATE_UP_TABLE if M <= max_m), GATE_UP_TABLE[-1][1])
    _, cfg, wide_sk, long_sk = next((row for row in GEMM_TABLE if M <= row[0]), GEMM_TABLE[-1])
    if cfg.path == "triton" and N >= 16384:
        cfg = replace(cfg, SPLIT_K=wide_sk)
    elif cfg.path == "triton" and K >= 8192:
        cfg = replace(cfg, SPLIT_K=long_sk)
    return cfg
