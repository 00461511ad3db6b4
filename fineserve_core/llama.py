"""Llama-family decoder over a flat batch of tokens (mixed prefill chunks and decodes) with a paged KV cache.

The precision seams are explicit: every projection is built by `linear.make_linear(precision, ...)` (or,
from a quantized checkpoint, `linear.linear_from_tensors`), and attention reads and writes KV through
`PagedKVCache`, whose block format follows the precision. For w4a8kv4 the attention also applies FireQ's
post-RoPE scaling (`self_attn.k_post_scale`, when the checkpoint has it) right after RoPE and quantizes
the queries to FP8 per (token, head) in attention (`attention.paged_attention(q_fp8=True)`: the torch
reference attends over the dequantized FP8 queries; the CUDA kernels quantize q themselves).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fineserve_core.attention import AttnBatch, paged_attention
from fineserve_core.config import LlamaConfig
from fineserve_core.linear import LINEAR_TENSORS, FP8Act, act_group, linear_from_tensors, make_linear
from fineserve_core.paged_kv import PagedKVCache


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with `residual`: s = x + residual and (norm(s), s) — the residual add rides along so
        the quantized CUDA path can fuse add + norm + FP8 quant into one kernel (`DecoderLayer`)."""
        if residual is not None:
            x = x + residual
        # float32 statistics, as transformers does, so float32 runs match it bit for bit in spirit; on CUDA
        # F.rms_norm is the same formula in one kernel (the CPU keeps transformers' op chain, exact)
        xf = x.float()
        if xf.is_cuda:
            xf = F.rms_norm(xf, (xf.shape[-1],), eps=self.eps)
        else:
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(x.dtype)
        return y if residual is None else (y, x)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default and llama3 are)")
    factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    lo_wl, hi_wl = old / lo, old / hi
    scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= hi_wl) & (wavelen <= lo_wl)
    return torch.where(is_mid, mid, scaled)


class Rotary(nn.Module):
    """rotate_half RoPE: channel pairs (j, j + D/2) rotate together (FireQ's pre-RoPE scaling relies on it)."""

    def __init__(self, cfg: LlamaConfig, device):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
        h = self.inv_freq.numel()
        self.register_buffer("sign", torch.cat((-torch.ones(h), torch.ones(h))).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sign·sin) [T, 1, D] in `dtype`, once per step for all layers (transformers' values; the
        sign of rotate_half is folded into sin: (-a)·b == a·(-b) exactly)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], (emb.sin().to(dtype) * self.sign.to(dtype))[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, with rotate_half(x)·sin = roll(x, D/2)·(sign·sin): 4 ops, not 7."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


@dataclass(frozen=True, slots=True)
class QuantRuntime:
    """Switches of a quantized runner. The serving precisions use the defaults; the others exist for
    the accuracy ablation ladder (`fineserve_core.eval_ppl`) and are not serving precisions."""
    act_fp8: bool = True     # FP8 per-token activations into every quantized projection
    q_fp8: bool = True       # FP8 per-(token, head) queries before attention (w4a8kv4 only)
    pow2: bool = True        # W4 quantization on load (float checkpoints) searches the per-tensor 2^k
    # whole-prompt prefills attend over the step's fresh K/V (FP8 for the quantized precisions, FireQ's
    # prefill) or, "cache", over K/V read back from the KV cache as decodes do (the ladder's KV rungs)
    prefill_kv: Literal["fresh", "cache"] = "fresh"


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, qkv_proj: nn.Module, o_proj: nn.Module,
                 q_fp8: bool = False, k_post_scale: torch.Tensor | None = None, fresh_prefill: bool = True):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.q_fp8, self.fresh_prefill = q_fp8, fresh_prefill
        # FireQ post-RoPE scaling S (online, after RoPE): k[:, h, c] *= S[h, c]; q[:, h', c] /= S[h, c]
        # for every query head h' of KV head h's group. 1.0 outside the top-k channels. One multiply
        # over the rotated q|k heads: qk_post_scale = [1/S per query head; S per KV head].
        self.k_post_scale = self.qk_post_scale = None
        if k_post_scale is not None:
            ks = k_post_scale.reshape(self.nkv, self.hd)
            self.k_post_scale = ks
            qs = (1.0 / ks.double()).repeat_interleave(self.nh // self.nkv, 0).to(ks.dtype)
            self.qk_post_scale = torch.cat((qs, ks))

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], batch: AttnBatch, kv: PagedKVCache):
        """`rope`: `Rotary`'s (cos, signed sin) of this step's positions."""
        return self.o_proj(self.attend(*self.project(x, rope, batch.slot_mapping, kv), batch, kv))

    def project(self, x, rope: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, kv: PagedKVCache):
        """q [T, Hq, D], k, v [T, Hkv, D] of x, rotated (and post-scaled); k, v also written at `slots`.
        Row-wise, like everything but `attend`: `step_graphs` captures it per token bucket."""
        qkv = self.qkv_proj(x)
        nqk = (self.nh + self.nkv) * self.hd
        # q and k heads are adjacent in the fused projection: rotate (and post-scale) them as one tensor
        qk = apply_rotary(qkv[..., :nqk].view(-1, self.nh + self.nkv, self.hd), *rope)
        if self.qk_post_scale is not None:
            qk = qk * self.qk_post_scale
        q, k = qk[:, :self.nh], qk[:, self.nh:]
        v = qkv[..., nqk:].view(-1, self.nkv, self.hd)
        kv.write(self.layer, slots, k, v)
        return q, k, v

    def attend(self, q, k, v, batch: AttnBatch, kv: PagedKVCache, out: torch.Tensor | None = None) -> torch.Tensor:
        """[T, Hq·D]: each sequence's queries over its KV (the step's fresh K/V for whole prompts); into
        `out` [T, Hq·D] when given."""
        fresh = (k, v) if self.fresh_prefill else (None, None)
        o = None if out is None else out.view(-1, self.nh, self.hd)
        return paged_attention(q, kv, self.layer, batch, *fresh, q_fp8=self.q_fp8, out=o).reshape(-1, self.nh * self.hd)


class MLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, intermediate_size: int):
        super().__init__()
        self.inter = intermediate_size
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def forward(self, x):
        gu = self.gate_up_proj(x)
        if isinstance(x, FP8Act):     # fused path (`DecoderLayer.fused`): SiLU·mul + FP8 quant, one kernel
            import kernels
            return self.down_proj(FP8Act(*kernels.silu_mul_quant_fp8(gu, group=act_group(self.down_proj)), x.dtype))
        gate, up = gu.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """x, residual → (mlp output, residual): the residual add of each block is done by the next norm
    (`RMSNorm(x, residual)`), so with `fused` (quantized precisions on CUDA) add + RMSNorm + FP8 quant
    is one kernel (`kernels.rmsnorm_quant_fp8`) and SiLU·mul + quant another (`MLP`)."""

    def __init__(self, cfg, layer, input_norm: torch.Tensor, post_norm: torch.Tensor, attn: Attention, mlp: MLP):
        super().__init__()
        self.input_layernorm = RMSNorm(input_norm, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(post_norm, cfg.rms_norm_eps)
        self.mlp = mlp
        self.fused = False        # set by LlamaModel (CUDA, quantized activations)

    def _norm(self, norm: RMSNorm, x, residual, proj: nn.Module):
        if self.fused:
            import kernels
            g = act_group(proj)
            if residual is None:
                x8, s = kernels.rmsnorm_quant_fp8(x, norm.weight, norm.eps, group=g)
                return FP8Act(x8, s, x.dtype), x
            x8, s, residual = kernels.rmsnorm_quant_fp8(x, norm.weight, norm.eps, residual, group=g)
            return FP8Act(x8, s, x.dtype), residual
        return (norm(x), x) if residual is None else norm(x, residual)

    def forward(self, x, residual, rope, batch, kv):
        q, k, v, residual = self.pre(x, residual, rope, batch.slot_mapping, kv)
        return self.post(self.self_attn.attend(q, k, v, batch, kv), residual)

    def pre(self, x, residual, rope, slots, kv):
        """Up to attention: (q, k, v, residual)."""
        h, residual = self._norm(self.input_layernorm, x, residual, self.self_attn.qkv_proj)
        return *self.self_attn.project(h, rope, slots, kv), residual

    def post(self, o, residual):
        """From the attention output o [T, Hq·D] on: (mlp output, residual)."""
        h, residual = self._norm(self.post_attention_layernorm, self.self_attn.o_proj(o), residual,
                                 self.mlp.gate_up_proj)
        return self.mlp(h), residual


# ---- checkpoint layouts ------------------------------------------------------------------------------
# A float checkpoint (HF names) holds per layer the 9 tensors of FLOAT_LAYER; the runner fuses q/k/v
# and gate/up and quantizes them for fp8/w4a8kv4 as they arrive (round to nearest).
# A quantized checkpoint (`fineserve quantize`, `fineserve_core.quant.checkpoint`) holds the fused
# projections already quantized: per layer the two norms, `<proj>.<t>` for proj in QUANT_PROJS and t in
# `linear.LINEAR_TENSORS[precision]`, and for w4a8kv4 optionally `self_attn.k_post_scale` [Hkv, D].

FLOAT_LAYER = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
QUANT_PROJS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
K_POST_SCALE = "self_attn.k_post_scale"
_QUANT_SUFFIX_PRECISION = {".qweight": "w4a8kv4", ".scales": "w4a8kv4", ".pow2": "w4a8kv4",
                           ".weight_scale": "fp8"}


def fused_proj_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """[N, K] of the runner's fused projections."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {"self_attn.qkv_proj": ((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h),
            "self_attn.o_proj": (h, cfg.num_heads * d),
            "mlp.gate_up_proj": (2 * cfg.intermediate_size, h),
            "mlp.down_proj": (h, cfg.intermediate_size)}


def quantized_layer_spec(cfg: LlamaConfig, precision: str, post_rope: bool) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Per-layer tensor name (without `model.layers.N.`) -> (shape, allowed dtypes) of a quantized layer."""
    from fineserve_core.quant.formats import FP8_DTYPE, group_size_for
    floats = (torch.float32, torch.bfloat16, torch.float16)
    h = cfg.hidden_size
    spec: dict[str, tuple[tuple[int, ...], tuple]] = {"input_layernorm.weight": ((h,), floats),
                                                      "post_attention_layernorm.weight": ((h,), floats)}
    for proj, (n, k) in fused_proj_shapes(cfg).items():
        if precision == "w4a8kv4":
            spec[f"{proj}.qweight"] = ((n, k // 2), (torch.uint8,))
            spec[f"{proj}.scales"] = ((n, k // group_size_for(k)), (FP8_DTYPE,))
            spec[f"{proj}.pow2"] = ((), floats)
        elif precision == "fp8":
            spec[f"{proj}.weight"] = ((n, k), (FP8_DTYPE,))
            spec[f"{proj}.weight_scale"] = ((n,), floats)
        else:
            raise ValueError(f"precision {precision!r} has no quantized checkpoint layout")
    if post_rope:
        spec[K_POST_SCALE] = ((cfg.num_kv_heads, cfg.head_dim), floats)
    return spec


def _checkpoint_error(msg: str) -> Exception:
    from fineserve_core.model_source import CheckpointError
    return CheckpointError(msg)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, weights, precision: str = "bf16", dtype=torch.bfloat16, device="cpu",
                 quant: QuantRuntime | None = None, quant_config: dict | None = None):
        """`weights` yields (hf_name, tensor); layers are built as their tensors arrive, so peak memory
        stays near one copy of the model (quantized precisions convert layer by layer).

        `weights` may be a float checkpoint (HF names; fp8/w4a8kv4 are then quantized round-to-nearest
        on load) or a quantized checkpoint of `precision` (see QUANT_PROJS). A quantized tensor of
        another precision, a missing or unexpected tensor, or a wrong shape/dtype raises
        `CheckpointError` naming the tensor. `quant_config` (the checkpoint's `quantization_config`,
        when the caller has it) is checked against `precision` before any tensor is read.
        """
        super().__init__()
        self.cfg, self.precision, self.dtype, self.device = cfg, precision, dtype, torch.device(device)
        self.quant = quant or QuantRuntime()
        if quant_config is not None and quant_config.get("precision") != precision:
            raise _checkpoint_error(
                f"checkpoint quantization_config says precision {quant_config.get('precision')!r} but "
                f"precision {precision!r} was requested: load it with precision={quant_config.get('precision')!r}")
        self.rotary = Rotary(cfg, self.device)
        per_layer: dict[int, dict] = {}
        top: dict[str, torch.Tensor] = {}
        layers: dict[int, DecoderLayer] = {}
        for name, t in weights:
            if t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                t = t.to(self.device, dtype)
            else:
                t = t.to(self.device)
            for suffix, p in _QUANT_SUFFIX_PRECISION.items():
                if name.endswith(suffix) and p != precision:
                    raise _checkpoint_error(
                        f"tensor {name!r} belongs to a {p} checkpoint but precision {precision!r} was requested "
                        f"(load this checkpoint with precision={p!r})")
            if name.startswith("model.layers."):
                i, rest = name[len("model.layers."):].split(".", 1)
                i = int(i)
                if not 0 <= i < cfg.num_layers:
                    raise _checkpoint_error(f"unexpected tensor {name!r}: the model has {cfg.num_layers} layers")
                d = per_layer.setdefault(i, {})
                d[rest] = t
                if len(d) == len(FLOAT_LAYER) and all(k in d for k in FLOAT_LAYER):
                    layers[i] = self._float_layer(i, per_layer.pop(i))   # build and drop the raw tensors
            else:
                top[name] = t
        post_rope = any(K_POST_SCALE in d for d in per_layer.values())
        for i in sorted(per_layer):
            layers[i] = self._quantized_layer(i, per_layer.pop(i), post_rope)
        missing = [i for i in range(cfg.num_layers) if i not in layers]
        if missing:
            raise _checkpoint_error(f"checkpoint has no tensors for layers {missing} "
                                    f"(e.g. missing tensor 'model.layers.{missing[0]}.input_layernorm.weight')")
        self.layers = nn.ModuleList(layers[i] for i in range(cfg.num_layers))
        self.set_fused(self.device.type == "cuda" and precision != "bf16" and self.quant.act_fp8)
        want = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
        if not cfg.tie_word_embeddings:
            want["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
        for name, shape in want.items():
            if name not in top:
                raise _checkpoint_error(f"checkpoint is missing tensor {name!r} (expected shape {list(shape)})")
            if tuple(top[name].shape) != shape:
                raise _checkpoint_error(f"tensor {name!r} has shape {list(top[name].shape)}, expected {list(shape)}")
        self.embed_tokens = top["model.embed_tokens.weight"]
        self.norm = RMSNorm(top["model.norm.weight"], cfg.rms_norm_eps)
        # the LM head stays in the model dtype for every precision (FireQ quantizes the decoder layers only)
        self.lm_head = top["model.embed_tokens.weight"] if cfg.tie_word_embeddings else top["lm_head.weight"]

    def _attention(self, i, qkv, o, k_post_scale=None) -> Attention:
        q_fp8 = self.precision == "w4a8kv4" and self.quant.q_fp8
        return Attention(self.cfg, i, qkv, o, q_fp8=q_fp8, k_post_scale=k_post_scale,
                         fresh_prefill=self.quant.prefill_kv == "fresh")

    def _float_layer(self, i: int, w: dict) -> DecoderLayer:
        p, dt, cfg = self.precision, self.dtype, self.cfg
        opts = {} if p == "bf16" else {"act_quant": self.quant.act_fp8, "pow2": self.quant.pow2}
        shapes = fused_proj_shapes(cfg)
        for proj, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn.o_proj", ("o_proj",)),
                            ("mlp.gate_up_proj", ("gate_proj", "up_proj")), ("mlp.down_proj", ("down_proj",))):
            pre = proj.split(".")[0]
            n = sum(w[f"{pre}.{x}.weight"].shape[0] for x in parts)
            k = {w[f"{pre}.{x}.weight"].shape[1] for x in parts}
            if (n, *k) != shapes[proj]:
                raise _checkpoint_error(f"layer {i}: {[f'model.layers.{i}.{pre}.{x}.weight' for x in parts]} have "
                                        f"shapes {[list(w[f'{pre}.{x}.weight'].shape) for x in parts]}, "
                                        f"the config needs {list(shapes[proj])} in all")
        attn = self._attention(
            i, make_linear(p, torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"],
                                         w["self_attn.v_proj.weight"]]), dt, **opts),
            make_linear(p, w["self_attn.o_proj.weight"], dt, **opts))
        mlp = MLP(make_linear(p, torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]), dt, **opts),
                  make_linear(p, w["mlp.down_proj.weight"], dt, **opts), cfg.intermediate_size)
        return DecoderLayer(cfg, i, w["input_layernorm.weight"], w["post_attention_layernorm.weight"], attn, mlp)

    def _quantized_layer(self, i: int, w: dict, post_rope: bool) -> DecoderLayer:
        cfg, p = self.cfg, self.precision
        if p == "bf16" or not any(any(k.endswith(s) for s in _QUANT_SUFFIX_PRECISION) for k in w):
            missing = [k for k in FLOAT_LAYER if k not in w]
            raise _checkpoint_error(f"checkpoint is missing tensor 'model.layers.{i}.{missing[0]}'"
                                    + (f" (and {len(missing) - 1} more of layer {i})" if len(missing) > 1 else ""))
        spec = quantized_layer_spec(cfg, p, post_rope)
        for name, (shape, dtypes) in spec.items():
            full = f"model.layers.{i}.{name}"
            if name not in w:
                raise _checkpoint_error(f"checkpoint is missing tensor {full!r} (expected shape {list(shape)}, "
                                        f"precision {p})")
            t = w[name]
            if tuple(t.shape) != shape and not (name.endswith(".pow2") and t.numel() == 1):
                raise _checkpoint_error(f"tensor {full!r} has shape {list(t.shape)}, expected {list(shape)}")
            if t.dtype not in dtypes:
                raise _checkpoint_error(f"tensor {full!r} has dtype {t.dtype}, expected {dtypes[0]}")
        extra = sorted(set(w) - set(spec))
        if extra:
            raise _checkpoint_error(f"unexpected tensor 'model.layers.{i}.{extra[0]}' in a {p} checkpoint")
        a = self.quant.act_fp8
        lin = {proj: linear_from_tensors(p, {t: w[f"{proj}.{t}"] for t in LINEAR_TENSORS[p]}, act_quant=a)
               for proj in QUANT_PROJS}
        attn = self._attention(i, lin["self_attn.qkv_proj"], lin["self_attn.o_proj"], w.get(K_POST_SCALE))
        mlp = MLP(lin["mlp.gate_up_proj"], lin["mlp.down_proj"], cfg.intermediate_size)
        return DecoderLayer(cfg, i, w["input_layernorm.weight"], w["post_attention_layernorm.weight"], attn, mlp)

    def set_prefill_kv(self, mode: Literal["fresh", "cache"]) -> None:
        """`QuantRuntime.prefill_kv` on a built runner (`fineserve eval-ppl --prefill-kv`)."""
        from dataclasses import replace
        self.quant = replace(self.quant, prefill_kv=mode)
        for layer in self.layers:
            layer.self_attn.fresh_prefill = mode == "fresh"

    def set_fused(self, on: bool) -> None:
        """Fused RMSNorm(+residual)+FP8 quant and SiLU·mul+FP8 quant kernels feeding the quantized GEMMs
        (default on CUDA for fp8/w4a8kv4; on the CPU they run under Triton's interpreter, for tests)."""
        if on and (self.precision == "bf16" or not self.quant.act_fp8):
            raise ValueError("the fused kernels quantize activations: fp8/w4a8kv4 with act_fp8 only")
        for layer in self.layers:
            layer.fused = on

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch, kv: PagedKVCache):
        x = F.embedding(input_ids, self.embed_tokens)
        rope = self.rotary(positions, x.dtype)          # once per step, shared by all layers
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, batch, kv)
        return self.norm(x, residual)[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
