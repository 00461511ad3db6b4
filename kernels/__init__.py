"""Triton kernels for FineServe's precisions (bf16 | fp8 | w4a8kv4) on Hopper, each beside its torch reference.

Modules (wrapper `name`, reference `name_ref`, same signature):
  gemm_w4a8          W4A8 GEMM (Triton INT4→FP8 `tl.dot` kernel with split-K and fused epilogues, or
                     the two-step unpack → cuBLAS FP8 path), dispatched by M (`kernels.tuned`); fp8_gemm
  fp8_quant          FP8 per-token activation quant, fused with RMSNorm(+residual) or SiLU·mul
  kv_store           KV write into KV-Slab blocks for bf16 / fp8 / INT4 (w4a8kv4)
  attn_decode        paged decode attention over the block tables, INT4/FP8/bf16 KV, FP8 Q, split-K
  attn_prefill       causal GQA varlen prefill attention, FP8 Q/K/V or bf16
  bench              `python -m kernels.bench` / `fineserve bench-kernels`: H100 timings vs baselines

On a machine without CUDA (or with TRITON_INTERPRET=1) the kernels run under Triton's interpreter
(`kernels._common`); the engine uses the references on the CPU. `fineserve_core.linear` calls
`kernels.w4a8_gemm(x, w, out_dtype)` and `kernels.fp8_gemm(x, w, out_dtype)` on CUDA tensors.
"""
_EXPORTS = {
    "kernels.attn_decode": ("paged_decode_attention", "paged_decode_attention_ref"),
    "kernels.fp8_quant": ("quant_fp8", "quant_fp8_ref", "rmsnorm_quant_fp8", "rmsnorm_quant_fp8_ref", "silu_mul",
                          "silu_mul_quant_fp8", "silu_mul_quant_fp8_ref"),
    "kernels.kv_store": ("kv_write", "kv_write_ref"),
    "kernels.attn_prefill": ("prefill_attention", "prefill_attention_ref", "quant_qk_fp8", "quant_v_fp8_t"),
    "kernels.gemm_w4a8": ("GemmConfig", "fp8_gemm", "fp8_gemm_fp8", "fp8_gemm_ref", "unpack_w4_fp8", "w4a8_gate_up_silu",
                          "w4a8_gate_up_silu_ref", "w4a8_gemm", "w4a8_gemm_fp8", "w4a8_gemm_ref"),
    "kernels.ffn": ("w4a8_ffn", "w4a8_ffn_ref"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Lazy exports: `import kernels` stays cheap (no triton) until a kernel is asked for."""
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
