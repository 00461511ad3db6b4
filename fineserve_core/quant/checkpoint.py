"""Quantized checkpoints: a directory the engine loads by path (`Engine(EngineConfig(model=DIR, precision=P))`).

Layout (safetensors only, never pickle):

* ``config.json``: the source's HF config plus a ``quantization_config`` block (precision, group sizes,
  pow2 per linear, smoothing constants, pre/post-RoPE settings, calibration text and token count).
* tokenizer and generation files copied from the source directory.
* ``model.safetensors``: top-level tensors as in HF (embeddings/LM head in bf16, final norm float32);
  per layer ``model.layers.N.``:
    - ``input_layernorm.weight``, ``post_attention_layernorm.weight``   float32 [H] (γ with smoothing folded in)
    - w4a8kv4, for proj in self_attn.qkv_proj, self_attn.o_proj, mlp.gate_up_proj, mlp.down_proj (the
      runner's fused projections, rows q|k|v and gate|up):
        ``<proj>.qweight`` uint8 [N, K/2] (formats.pack_int4), ``<proj>.scales`` float8_e4m3fn [N, K/g],
        ``<proj>.pow2`` float32 [] (W ≈ q·s/pow2)
      and, with post-RoPE scaling, ``self_attn.k_post_scale`` float32 [Hkv, D]
    - fp8: ``<proj>.weight`` float8_e4m3fn [N, K], ``<proj>.weight_scale`` float32 [N]
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fineserve_core.config import LlamaConfig

__all__ = ["save_quantized", "hf_config_dict", "validate_quantized", "COPY_FILES"]

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json", "added_tokens.json")


def hf_config_dict(cfg: LlamaConfig) -> dict:
    """An HF LlamaForCausalLM config.json for a config without a source file (shape presets)."""
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
    }
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    return d


def save_quantized(out_dir: str | os.PathLike, source, tensors: dict[str, torch.Tensor], qconfig: dict) -> Path:
    """Write the checkpoint directory (atomically: into a temp dir beside it, then renamed)."""
    from safetensors.torch import save_file

    from fineserve_core.model_source import _publishable_modes
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if source.path is not None:
            raw = json.loads((Path(source.path) / "config.json").read_text())
            for f in COPY_FILES:
                if (Path(source.path) / f).is_file():
                    shutil.copy2(Path(source.path) / f, tmp / f)
        else:
            raw = hf_config_dict(source.config)
        raw.pop("quantization_config", None)
        raw["quantization_config"] = {**qconfig, "source_model": source.name}
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "quant_method": "fireq", "precision": qconfig["precision"]})
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "old")
            shutil.rmtree(old, ignore_errors=True)
        _publishable_modes(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def validate_quantized(path: str | os.PathLike, precision: str) -> dict:
    """Check a quantized checkpoint against a requested precision and its config, reading headers only.

    Returns its ``quantization_config``. Raises `model_source.CheckpointError` naming config.json or
    the tensor (missing, wrong shape or dtype, unexpected) — the same checks the runner makes on load.
    """
    from fineserve_core.llama import K_POST_SCALE, quantized_layer_spec
    from fineserve_core.model_source import (
        CheckpointError, _read_safetensors_header, _weight_files, load_llama_config, read_quantization_config,
    )
    root = Path(path).expanduser()
    qc = read_quantization_config(root)
    if qc is None:
        raise CheckpointError(f"{root / 'config.json'}: no quantization_config block (not a quantized checkpoint)")
    if qc.get("precision") != precision:
        raise CheckpointError(f"{root / 'config.json'}: quantization_config precision {qc.get('precision')!r} "
                              f"does not match the requested precision {precision!r}")
    cfg = load_llama_config(root)
    where = _weight_files(root)
    headers = {f: _read_safetensors_header(f) for f in set(where.values())}
    st = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
          "F8_E4M3": torch.float8_e4m3fn}
    post = bool(qc.get("post_rope", {}).get("enabled"))
    expected: dict[str, tuple] = {}
    for i in range(cfg.num_layers):
        for k, v in quantized_layer_spec(cfg, precision, post).items():
            expected[f"model.layers.{i}.{k}"] = v
    floats = (torch.float32, torch.bfloat16, torch.float16)
    expected["model.embed_tokens.weight"] = ((cfg.vocab_size, cfg.hidden_size), floats)
    expected["model.norm.weight"] = ((cfg.hidden_size,), floats)
    if not cfg.tie_word_embeddings:
        expected["lm_head.weight"] = ((cfg.vocab_size, cfg.hidden_size), floats)
    for name, (shape, dtypes) in expected.items():
        if name not in where:
            raise CheckpointError(f"{root / 'model.safetensors'}: missing tensor {name!r} (expected shape "
                                  f"{list(shape)}, precision {precision})")
        info = headers[where[name]][name]
        if tuple(info["shape"]) != shape and not (name.endswith(".pow2") and info["shape"] in ([], [1])):
            raise CheckpointError(f"{where[name]}: tensor {name!r} has shape {info['shape']}, expected {list(shape)}")
        if st.get(info["dtype"]) not in dtypes:
            raise CheckpointError(f"{where[name]}: tensor {name!r} has dtype {info['dtype']}, expected {dtypes[0]}")
    extra = sorted(set(where) - set(expected))
    if extra:
        hint = " (post-RoPE scales in a checkpoint whose config says post_rope is off)" if extra[0].endswith(K_POST_SCALE) else ""
        raise CheckpointError(f"{where[extra[0]]}: unexpected tensor {extra[0]!r}{hint}")
    return qc
