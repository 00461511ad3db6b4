"""Runner pieces against transformers' own definitions."""
import random

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from fineserve_core.llama import rope_inv_freq
from fineserve_core.model_source import resolve_model


def test_llama3_rope_scaling_matches_transformers():
    cfg = resolve_model("llama-3-8b-shape").config
    hf = HFLlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, head_dim=cfg.head_dim,
                       rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling),
                       max_position_embeddings=cfg.max_position_embeddings)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    torch.testing.assert_close(rope_inv_freq(cfg), ref.float(), rtol=1e-6, atol=0)
    plain = resolve_model("llama-2-7b-shape").config
    assert torch.allclose(rope_inv_freq(plain), 1.0 / 10000 ** (torch.arange(0, 128, 2).float() / 128))


@pytest.mark.parametrize("precision", ["fp8", "w4a8kv4"])
def test_fused_norm_quant_path_matches_torch_path(precision):
    """`LlamaModel.set_fused` (CUDA default for fp8/w4a8kv4): add+RMSNorm+FP8 quant and SiLU·mul+FP8 quant
    kernels feeding the GEMMs on pre-quantized activations (Triton's interpreter on the CPU) give the torch
    path's hidden states, prefill and decode, up to FP8 codes flipped by last-bit differences."""
    from fineserve_core.attention import AttnBatch
    from fineserve_core.config import LlamaConfig
    from fineserve_core.kv_format import KVFormat
    from fineserve_core.llama import LlamaModel
    from fineserve_core.paged_kv import PagedKVCache
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=384, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64)
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(1 << 31))
    w = {"model.embed_tokens.weight": torch.randn(300, 256, generator=gen),
         "model.norm.weight": 1 + 0.1 * torch.randn(256, generator=gen),
         "lm_head.weight": torch.randn(300, 256, generator=gen) * 0.05}
    shapes = {"input_layernorm.weight": (256,), "post_attention_layernorm.weight": (256,),
              "self_attn.q_proj.weight": (256, 256), "self_attn.k_proj.weight": (128, 256),
              "self_attn.v_proj.weight": (128, 256), "self_attn.o_proj.weight": (256, 256),
              "mlp.gate_proj.weight": (384, 256), "mlp.up_proj.weight": (384, 256), "mlp.down_proj.weight": (256, 384)}
    for i in range(cfg.num_layers):
        for name, shape in shapes.items():
            t = 1 + 0.1 * torch.randn(shape, generator=gen) if len(shape) == 1 else torch.randn(shape, generator=gen)
            w[f"model.layers.{i}.{name}"] = t if len(shape) == 1 else t * 0.06
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaModel(cfg, list(w.items()), precision, torch.bfloat16, dev)
    fmt = KVFormat.for_model(precision, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, 16)
    n = 21
    ids = torch.randint(0, 300, (n + 1,), generator=gen).to(dev)
    out = {}
    for fused in (False, True):
        model.set_fused(fused)
        kv = PagedKVCache(fmt, torch.zeros(cfg.num_layers, 2, 2 * fmt.block_bytes, dtype=torch.uint8, device=dev))
        pos = torch.arange(n + 1, device=dev)
        pre = model(ids[:n], pos[:n], AttnBatch([n], [n], [[0, 1]], pos[:n]), kv)
        dec = model(ids[n:], pos[n:], AttnBatch([1], [n + 1], [[0, 1]], pos[n:]), kv)
        out[fused] = torch.cat([pre, dec]).double().cpu()
    err = ((out[True] - out[False]).norm(dim=-1) / out[False].norm(dim=-1)).max().item()
    assert err < 2e-2, f"fused vs torch path: max row relerr {err}, seed {gen.initial_seed()}"
    with pytest.raises(ValueError, match="act_fp8"):
        LlamaModel(cfg, list(w.items()), "bf16", torch.bfloat16, "cpu").set_fused(True)
