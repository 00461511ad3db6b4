"""The linear-layer seam: one factory builds every projection for a precision.

Precisions (`DESIGN.md`, numerics in `fineserve_core.quant.formats`):

* ``bf16``    — `DenseLinear`: W16A16 in the model dtype.
* ``fp8``     — `FP8Linear`: FP8 E4M3 weights per output channel, FP8 per-token dynamic activations.
* ``w4a8kv4`` — `W4A8Linear`: INT4 weights (group 128 along K, 64 where 128 does not divide K) with
  FP8 E4M3 group scales and a per-tensor power of two, FP8 per-token dynamic activations.

The packed tensors (`W4Weight` / `FP8Weight`) are the source of truth and are what a checkpoint
stores. On the CPU the forward is the torch reference (`w4a8_linear_ref` / `fp8_linear_ref`) with
the dequantized weight cached once per layer (float32: q·s and FP8 values are exact in it, so the
result is the reference's), because dequantizing on every call makes CPU inference painfully slow.
A W4A8 call of more than `formats.W4_EXACT_MAX_ROWS` rows uses fp8(q·s) instead, as the CUDA GEMM does
for such calls (a second cache, built on first use).

CUDA hook: on a CUDA tensor the forward dispatches to ``kernels.w4a8_gemm(x, w, out_dtype)`` /
``kernels.fp8_gemm(x, w, out_dtype)`` when the `kernels` package provides them (same signature as
the references: `DESIGN.md`'s rule), else it falls back to the reference with a cached bf16 weight
(q·s and FP8 values are exact in bf16 too). See `_cuda_kernel`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fineserve_core.quant.formats import (
    W4_EXACT_MAX_ROWS, FP8Weight, W4Weight, _to_fp8, dequantize_w4_unscaled, quantize_fp8_per_token,
    quantize_fp8_weight, quantize_w4,
)

__all__ = ["DenseLinear", "FP8Act", "FP8Linear", "W4A8Linear", "act_group", "make_linear", "linear_from_tensors",
           "LINEAR_TENSORS"]


@dataclass(slots=True)
class FP8Act:
    """Activations already FP8-quantized per token by a fused producer kernel (`llama.DecoderLayer.fused`):
    x8 [M, K] float8_e4m3fn — in the W4A8 GEMM's dK order with group `act_group(proj)` for a W4A8Linear —,
    scale [M] float32, and the model dtype the projection returns."""
    x8: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def act_group(proj: nn.Module) -> int | None:
    """The dK group a quantizer must write for `proj`'s GEMM (None: plain K order)."""
    return proj.group_size if isinstance(proj, W4A8Linear) else None


def _cuda_kernel(name: str):
    """The Triton kernel `kernels.<name>` if the kernels package provides it, else None.

    This is where the kernels issue plugs in: `kernels.w4a8_gemm(x, w: W4Weight, out_dtype)` and
    `kernels.fp8_gemm(x, w: FP8Weight, out_dtype)`, with the signatures and numerics of
    `formats.w4a8_linear_ref` / `formats.fp8_linear_ref`.
    """
    try:
        import kernels
    except ImportError:
        return None
    return getattr(kernels, name, None)


class DenseLinear(nn.Module):
    """bf16 precision (W16A16): weights in the model dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _QuantLinear(nn.Module):
    """Shared parts: a lazily built dequantized-weight cache (never saved, never the source of truth)."""

    act_quant: bool = True

    def __init__(self):
        super().__init__()
        self._wcache: torch.Tensor | None = None
        self._wcache_fp8: torch.Tensor | None = None

    def _dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def cached_weight(self) -> torch.Tensor:
        if self._wcache is None:
            w = self._dequantized()
            self._wcache = w if w.device.type == "cpu" else w.to(torch.bfloat16)
        return self._wcache

    def drop_cache(self) -> None:
        self._wcache = self._wcache_fp8 = None

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        return self.cached_weight()

    def _matmul(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 acc = x̂ @ Wᵀ and the per-token activation scale (None when activations are not quantized)."""
        w = self._weight_for(x)
        if self.act_quant:
            x_fp8, x_scale = quantize_fp8_per_token(x)
            return torch.matmul(x_fp8.to(w.dtype), w.t()).float(), x_scale
        return torch.matmul(x.to(w.dtype), w.t()).float(), None


class W4A8Linear(_QuantLinear):
    """FireQ W4A8: y = (fp8(x) @ (q·s)ᵀ) · x_scale / pow2 (`formats.w4a8_linear_ref`).

    Buffers (what a checkpoint stores): ``qweight`` uint8 [N, K/2] (`pack_int4` layout), ``scales``
    float8_e4m3fn [N, K/group], ``pow2`` float32 scalar. ``act_quant=False`` keeps activations in
    float (the "W4 only" rung of the ablation ladder; not a serving precision).
    """

    def __init__(self, w: W4Weight, act_quant: bool = True):
        super().__init__()
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("scales", w.scales)
        self.register_buffer("pow2", torch.tensor(float(w.pow2), dtype=torch.float32, device=w.qweight.device))
        self.group_size = int(w.group_size)
        self.pow2_value = float(w.pow2)
        self.act_quant = act_quant

    @property
    def w4(self) -> W4Weight:
        return W4Weight(self.qweight, self.scales, self.group_size, self.pow2_value)

    def _dequantized(self) -> torch.Tensor:
        return dequantize_w4_unscaled(self.w4)          # q·s, float32, exact

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quant or x.numel() // x.shape[-1] <= W4_EXACT_MAX_ROWS:
            return self.cached_weight()
        if self._wcache_fp8 is None:                    # the large-M CUDA path's fp8(q·s), exact in float32
            self._wcache_fp8 = _to_fp8(self.cached_weight().float()).to(self.cached_weight().dtype)
        return self._wcache_fp8

    def forward(self, x: torch.Tensor | FP8Act) -> torch.Tensor:
        if isinstance(x, FP8Act):
            import kernels
            return kernels.w4a8_gemm_fp8(x.x8, x.scale, self.w4, x.dtype)
        if x.is_cuda and self.act_quant:
            kernel = _cuda_kernel("w4a8_gemm")
            if kernel is not None:                       # the Triton kernel (kernels issue)
                return kernel(x, self.w4, x.dtype)
        acc, x_scale = self._matmul(x)
        if x_scale is not None:
            acc = acc * x_scale
        return (acc / self.pow2_value).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"out={self.qweight.shape[0]}, in={self.qweight.shape[1] * 2}, group={self.group_size}, "
                f"pow2={self.pow2_value:g}, act_quant={self.act_quant}")


class FP8Linear(_QuantLinear):
    """W8A8 FP8: y = (fp8(x) @ W_fp8ᵀ) · x_scale · w_scale (`formats.fp8_linear_ref`).

    Buffers: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` float32 [N].
    """

    def __init__(self, w: FP8Weight, act_quant: bool = True):
        super().__init__()
        self.register_buffer("weight", w.weight)
        self.register_buffer("weight_scale", w.scale.float())
        self.act_quant = act_quant

    @property
    def fp8(self) -> FP8Weight:
        return FP8Weight(self.weight, self.weight_scale)

    def _dequantized(self) -> torch.Tensor:
        return self.weight.float()                      # FP8 values, exact in float32 and bf16

    def forward(self, x: torch.Tensor | FP8Act) -> torch.Tensor:
        if isinstance(x, FP8Act):
            import kernels
            return kernels.fp8_gemm_fp8(x.x8, x.scale, self.fp8, x.dtype)
        if x.is_cuda and self.act_quant:
            kernel = _cuda_kernel("fp8_gemm")
            if kernel is not None:
                return kernel(x, self.fp8, x.dtype)
        acc, x_scale = self._matmul(x)
        if x_scale is not None:
            acc = acc * x_scale
        return (acc * self.weight_scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"out={self.weight.shape[0]}, in={self.weight.shape[1]}, act_quant={self.act_quant}"


def make_linear(precision: str, weight: torch.Tensor, dtype: torch.dtype, *, pow2: bool = True,
                act_quant: bool = True) -> nn.Module:
    """A projection from a float weight [N, K], quantized round-to-nearest for the precision.

    ``pow2=False`` fixes the W4 per-tensor power of two at 1 and ``act_quant=False`` keeps float
    activations: ablation switches, not serving precisions.
    """
    if precision == "bf16":
        return DenseLinear(weight, dtype)
    if precision == "fp8":
        return FP8Linear(quantize_fp8_weight(weight), act_quant=act_quant)
    if precision == "w4a8kv4":
        return W4A8Linear(quantize_w4(weight, pow2=None if pow2 else 1.0), act_quant=act_quant)
    raise ValueError(f"precision {precision!r} has no linear layer")


#: Tensor suffixes a quantized checkpoint stores per linear layer, by precision.
LINEAR_TENSORS = {"w4a8kv4": ("qweight", "scales", "pow2"), "fp8": ("weight", "weight_scale")}


def linear_from_tensors(precision: str, tensors: dict[str, torch.Tensor], *, act_quant: bool = True) -> nn.Module:
    """A quantized projection from its stored tensors (`LINEAR_TENSORS[precision]` → tensor).

    Shapes and dtypes are checked by the caller (`llama.LlamaModel`), which knows the tensor names.
    """
    if precision == "w4a8kv4":
        q, s = tensors["qweight"], tensors["scales"]
        g = (q.shape[1] * 2) // s.shape[1]
        return W4A8Linear(W4Weight(q, s, g, float(tensors["pow2"].float().reshape(()))), act_quant=act_quant)
    if precision == "fp8":
        return FP8Linear(FP8Weight(tensors["weight"], tensors["weight_scale"].float()), act_quant=act_quant)
    raise ValueError(f"precision {precision!r} has no quantized linear layer")


def quantized_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for a projection (inverse of `linear_from_tensors`)."""
    if isinstance(module, W4A8Linear):
        return {"qweight": module.qweight, "scales": module.scales, "pow2": module.pow2}
    if isinstance(module, FP8Linear):
        return {"weight": module.weight, "weight_scale": module.weight_scale}
    raise TypeError(f"{type(module).__name__} is not a quantized linear layer")
