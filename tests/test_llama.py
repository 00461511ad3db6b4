"""Runner pieces against transformers' own definitions."""
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
