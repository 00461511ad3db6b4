"""Llama-family decoder over a flat batch of tokens (mixed prefill chunks and decodes) with a paged KV cache.

The precision seams are explicit: every projection is built by `linear.make_linear(precision, ...)`, and
attention reads and writes KV through `PagedKVCache`, whose block format follows the precision.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fineserve_core.attention import AttnBatch, paged_attention
from fineserve_core.config import LlamaConfig
from fineserve_core.linear import make_linear
from fineserve_core.paged_kv import PagedKVCache


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as transformers does, so float32 runs match it bit for bit in spirit
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype)[:, None, :], emb.sin().to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, w: dict, precision: str, dtype, rotary: Rotary):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = make_linear(precision, torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]]), dtype)
        self.o_proj = make_linear(precision, w["o_proj"], dtype)
        self.rotary = rotary

    def forward(self, x, positions, batch: AttnBatch, kv: PagedKVCache):
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q, k = self.rotary(positions, q.view(-1, self.nh, self.hd), k.view(-1, self.nkv, self.hd))
        v = v.view(-1, self.nkv, self.hd)
        kv.write(self.layer, batch.slot_mapping, k, v)
        o = paged_attention(q, kv, self.layer, batch)
        return self.o_proj(o.reshape(-1, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, w: dict, precision: str, dtype):
        super().__init__()
        self.inter = w["gate_proj"].shape[0]
        self.gate_up_proj = make_linear(precision, torch.cat([w["gate_proj"], w["up_proj"]]), dtype)
        self.down_proj = make_linear(precision, w["down_proj"], dtype)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer, w, precision, dtype, rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(w["input_layernorm"], cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, w, precision, dtype, rotary)
        self.post_attention_layernorm = RMSNorm(w["post_attention_layernorm"], cfg.rms_norm_eps)
        self.mlp = MLP(w, precision, dtype)

    def forward(self, x, positions, batch, kv):
        x = x + self.self_attn(self.input_layernorm(x), positions, batch, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, weights, precision: str = "bf16", dtype=torch.bfloat16, device="cpu"):
        """`weights` yields (hf_name, tensor); layers are built as their tensors arrive, so peak memory
        stays near one copy of the model (quantized precisions convert layer by layer)."""
        super().__init__()
        self.cfg, self.precision, self.dtype, self.device = cfg, precision, dtype, torch.device(device)
        self.rotary = Rotary(cfg, self.device)
        per_layer: dict[int, dict] = {}
        top: dict[str, torch.Tensor] = {}
        layers: dict[int, DecoderLayer] = {}
        for name, t in weights:
            t = t.to(self.device, dtype)
            if name.startswith("model.layers."):
                i, rest = name[len("model.layers."):].split(".", 1)
                i = int(i)
                per_layer.setdefault(i, {})[rest.split(".")[-2]] = t
                if len(per_layer[i]) == 9:  # q k v o gate up down + 2 norms: build and drop the raw tensors
                    layers[i] = DecoderLayer(cfg, i, per_layer.pop(i), precision, dtype, self.rotary)
            else:
                top[name] = t
        missing = [i for i in range(cfg.num_layers) if i not in layers]
        if missing or per_layer:
            raise ValueError(f"checkpoint is missing tensors of layers {sorted(set(missing) | set(per_layer))}")
        self.layers = nn.ModuleList(layers[i] for i in range(cfg.num_layers))
        self.embed_tokens = top["model.embed_tokens.weight"]
        self.norm = RMSNorm(top["model.norm.weight"], cfg.rms_norm_eps)
        # the LM head stays in the model dtype for every precision (FireQ quantizes the decoder layers only)
        self.lm_head = top["model.embed_tokens.weight"] if cfg.tie_word_embeddings else top["lm_head.weight"]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch, kv: PagedKVCache):
        x = F.embedding(input_ids, self.embed_tokens)
        for layer in self.layers:
            x = layer(x, positions, batch, kv)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
