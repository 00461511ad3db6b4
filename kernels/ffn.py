"""The w4a8kv4 FFN block from the normalized activation, with the fused kernels, and its torch reference.

    y = residual + down( SiLU(gate(x)) · up(x) )        gate/up = one fused W4 weight [2I, K] (gate rows first)

Per M regime (`kernels.tuned`):
* Triton gate+up (one launch, SiLU·mul epilogue → h bf16) → FP8 quant of h → Triton down (+residual epilogue);
* two-step: gate_up via unpack + cuBLAS FP8 → SiLU·mul fused with the FP8 quant → down via unpack +
  cuBLAS FP8, + residual.
x is quantized here (in the engine that quant is fused into the RMSNorm before: `rmsnorm_quant_fp8`).
"""
from __future__ import annotations

import torch

from fineserve_core.quant.formats import W4Weight
from kernels.fp8_quant import quant_fp8, silu_mul_quant_fp8
from kernels.gemm_w4a8 import GemmConfig, w4a8_gate_up_silu, w4a8_gemm_fp8, w4a8_gemm_ref

__all__ = ["w4a8_ffn", "w4a8_ffn_ref"]


def w4a8_ffn(x: torch.Tensor, w_gate_up: W4Weight, w_down: W4Weight, residual: torch.Tensor | None = None,
             x8: tuple[torch.Tensor, torch.Tensor] | None = None, gate_up_config: GemmConfig | None = None,
             down_config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] bf16 (or its FP8 (x8, scale) in w_gate_up's dK order) → [M, K] bf16."""
    from kernels.tuned import gemm_config
    M = x.shape[0]
    inter = w_gate_up.out_features // 2
    if x8 is None:
        x8 = quant_fp8(x, group=w_gate_up.group_size)
    cfg = gate_up_config or gemm_config(M, inter, w_gate_up.in_features, 2)
    if cfg.path == "two_step":
        gu = w4a8_gemm_fp8(x8[0], x8[1], w_gate_up, torch.bfloat16, config=cfg)
        h8, hs = silu_mul_quant_fp8(gu, group=w_down.group_size)
    else:
        h = w4a8_gate_up_silu(x8[0], x8[1], w_gate_up, torch.bfloat16, config=cfg)
        h8, hs = quant_fp8(h, group=w_down.group_size)
    return w4a8_gemm_fp8(h8, hs, w_down, torch.bfloat16, residual=residual, config=down_config)


def w4a8_ffn_ref(x, w_gate_up, w_down, residual=None, **_unused) -> torch.Tensor:
    """Torch reference with the same roundings as the llama MLP on W4A8Linear layers (bf16 between ops)."""
    gu = w4a8_gemm_ref(x, w_gate_up, torch.bfloat16)
    g, u = gu.chunk(2, dim=-1)
    h = torch.nn.functional.silu(g) * u
    return w4a8_gemm_ref(h, w_down, torch.bfloat16, residual=residual)
