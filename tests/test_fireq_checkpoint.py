"""`fineserve quantize` checkpoints: save → load round trip, the engine generating from one, clear errors
for tampered or mismatched checkpoints, and `fineserve eval-ppl` on a short text."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fineserve_core.cli import main
from fineserve_core.config import EngineConfig
from fineserve_core.engine import Engine
from fineserve_core.model_source import CheckpointError, read_quantization_config
from fineserve_core.quant.checkpoint import validate_quantized
from fineserve_core.sampling import SamplingParams

# a tiny calibration keeps this fast; the statistics path is the same as with FireQ's 10 × 2048
CALIB = ["--calib-seqs", "2", "--calib-len", "64", "--quiet"]


@pytest.fixture(scope="module")
def w4_dir(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("ckpt") / "smollm2-w4a8kv4"
    assert main(["quantize", "--model", "smollm2-135m", "--precision", "w4a8kv4", "--out", str(out), *CALIB]) == 0
    return out


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_checkpoint_contents(w4_dir, smollm2):
    files = {p.name for p in w4_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    qc = read_quantization_config(w4_dir)
    assert qc["precision"] == "w4a8kv4"
    assert qc["weights"]["group_size"] == {"self_attn.qkv_proj": 64, "self_attn.o_proj": 64,
                                           "mlp.gate_up_proj": 64, "mlp.down_proj": 128}
    assert qc["smoothing"]["enabled"] and qc["smoothing"]["c_ug"] == 0.0096 and qc["smoothing"]["c_d"] == 0.015
    assert qc["pre_rope"] == {**qc["pre_rope"], "enabled": True, "alpha": 8.0}
    assert qc["post_rope"]["enabled"] and qc["post_rope"]["top_k"] == 8 and qc["post_rope"]["beta"] == 8.0
    assert qc["calibration"]["tokens"] == 128 and qc["calibration"]["files"]
    assert qc["fireq"]["w4_scale"] == "absmax" and qc["weights"]["scale"] == "fp8(absmax/7), floor 2^-9"
    assert len(qc["pow2"]) == 4 * smollm2.config.num_layers
    assert validate_quantized(w4_dir, "w4a8kv4") == qc
    t = _tensors(w4_dir)
    assert t["model.layers.0.self_attn.qkv_proj.qweight"].dtype == torch.uint8
    assert t["model.layers.0.self_attn.qkv_proj.qweight"].shape == (15 * 64, 576 // 2)
    assert t["model.layers.0.mlp.down_proj.scales"].dtype == torch.float8_e4m3fn
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (576, 1536 // 128)
    assert t["model.layers.0.self_attn.k_post_scale"].shape == (3, 64)
    # the post-RoPE channels: top-8 per KV head plus RoPE partners scaled, the rest 1
    n_scaled = (t["model.layers.0.self_attn.k_post_scale"] != 1).sum(1)
    assert all(8 <= n <= 16 and n % 2 == 0 for n in n_scaled.tolist())


def test_round_trip_and_engine_generates(w4_dir):
    eng = Engine(EngineConfig(model=str(w4_dir), precision="w4a8kv4", device="cpu"))
    try:
        saved = _tensors(w4_dir)
        layer = eng.model.layers[3]
        # the runner holds exactly the saved packed tensors (the source of truth)
        assert torch.equal(layer.self_attn.qkv_proj.qweight, saved["model.layers.3.self_attn.qkv_proj.qweight"])
        assert torch.equal(layer.mlp.down_proj.scales.view(torch.uint8),
                           saved["model.layers.3.mlp.down_proj.scales"].view(torch.uint8))
        assert layer.mlp.gate_up_proj.pow2_value == float(saved["model.layers.3.mlp.gate_up_proj.pow2"])
        assert torch.equal(layer.self_attn.k_post_scale, saved["model.layers.3.self_attn.k_post_scale"])
        assert layer.self_attn.q_fp8 and eng.fmt.precision == "w4a8kv4"
        out = eng.generate(["The capital of France is"], SamplingParams(max_tokens=6, temperature=0.0))[0]
        assert len(out["token_ids"]) >= 1 and out["text"].strip()
    finally:
        eng.close()


def _tamper(src, dst, fn):
    shutil.copytree(src, dst)
    t = _tensors(src)
    fn(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


def test_tampered_checkpoints_name_the_tensor(w4_dir, tmp_path):
    missing = _tamper(w4_dir, tmp_path / "missing", lambda t: t.pop("model.layers.7.mlp.down_proj.scales"))
    for check in (lambda: validate_quantized(missing, "w4a8kv4"),
                  lambda: Engine(EngineConfig(model=str(missing), precision="w4a8kv4", device="cpu"))):
        with pytest.raises(CheckpointError, match=r"model\.layers\.7\.mlp\.down_proj\.scales"):
            check()

    def reshape(t):
        t["model.layers.2.self_attn.o_proj.qweight"] = t["model.layers.2.self_attn.o_proj.qweight"][:, :-2].contiguous()
    bad = _tamper(w4_dir, tmp_path / "shape", reshape)
    for check in (lambda: validate_quantized(bad, "w4a8kv4"),
                  lambda: Engine(EngineConfig(model=str(bad), precision="w4a8kv4", device="cpu"))):
        with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.o_proj\.qweight.*shape"):
            check()

    def dtype(t):
        t["model.layers.5.mlp.gate_up_proj.scales"] = t["model.layers.5.mlp.gate_up_proj.scales"].float()
    bad = _tamper(w4_dir, tmp_path / "dtype", dtype)
    with pytest.raises(CheckpointError, match=r"model\.layers\.5\.mlp\.gate_up_proj\.scales.*dtype"):
        Engine(EngineConfig(model=str(bad), precision="w4a8kv4", device="cpu"))


def test_precision_mismatch_is_refused(w4_dir, tmp_path):
    for p in ("fp8", "bf16"):
        with pytest.raises(CheckpointError, match=r"w4a8kv4.*precision='w4a8kv4'"):
            Engine(EngineConfig(model=str(w4_dir), precision=p, device="cpu"))
        with pytest.raises(CheckpointError, match="does not match the requested precision"):
            validate_quantized(w4_dir, p)
    # a config that lies about its precision
    liar = tmp_path / "liar"
    shutil.copytree(w4_dir, liar)
    raw = json.loads((liar / "config.json").read_text())
    raw["quantization_config"]["precision"] = "fp8"
    (liar / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d+\..*w4a8kv4"):
        Engine(EngineConfig(model=str(liar), precision="fp8", device="cpu"))


def test_signed_w4_scale_checkpoint_holds_exactly_that_rule(tmp_path, smollm2):
    from fineserve_core.model_source import iter_weights
    from fineserve_core.quant import quantize_w4
    out = tmp_path / "smollm2-w4-signed"
    assert main(["quantize", "--model", "smollm2-135m", "--precision", "w4a8kv4", "--out", str(out), "--w4-scale",
                 "signed", "--no-smoothing", "--no-pre-rope", "--no-post-rope", "--quiet"]) == 0
    qc = validate_quantized(out, "w4a8kv4")
    assert qc["fireq"]["w4_scale"] == "signed" and "-min(W, 0)/8" in qc["weights"]["scale"]
    w = dict(iter_weights(smollm2, torch.float32))["model.layers.3.self_attn.o_proj.weight"]
    want, fireq = quantize_w4(w, scale_rule="signed"), quantize_w4(w)
    t = _tensors(out)
    got = t["model.layers.3.self_attn.o_proj.scales"]
    assert torch.equal(got.view(torch.uint8), want.scales.view(torch.uint8))
    assert torch.equal(t["model.layers.3.self_attn.o_proj.qweight"], want.qweight)
    assert not torch.equal(got.view(torch.uint8), fireq.scales.view(torch.uint8))
    eng = Engine(EngineConfig(model=str(out), precision="w4a8kv4", device="cpu"))
    try:
        r = eng.generate([[1, 504, 3458, 282, 4649, 314]], SamplingParams(max_tokens=3, temperature=0.0))[0]
        assert len(r["token_ids"]) == 3
    finally:
        eng.close()


def test_fp8_checkpoint_round_trip(tmp_path):
    out = tmp_path / "smollm2-fp8"
    assert main(["quantize", "--model", "smollm2-135m", "--precision", "fp8", "--out", str(out), "--quiet"]) == 0
    qc = validate_quantized(out, "fp8")
    assert not qc["smoothing"]["enabled"] and qc["calibration"]["tokens"] == 0
    eng = Engine(EngineConfig(model=str(out), precision="fp8", device="cpu"))
    try:
        t = _tensors(out)
        w = eng.model.layers[0].self_attn.o_proj
        assert torch.equal(w.weight.view(torch.uint8), t["model.layers.0.self_attn.o_proj.weight"].view(torch.uint8))
        # the same as quantizing on load from the float checkpoint (fp8 is plain round to nearest)
        ref = Engine(EngineConfig(model="smollm2-135m", precision="fp8", device="cpu"))
        ids = [1, 504, 3458, 282, 4649, 314]
        p = SamplingParams(max_tokens=4, temperature=0.0)
        assert eng.generate([ids], p)[0]["token_ids"] == ref.generate([ids], p)[0]["token_ids"]
        ref.close()
    finally:
        eng.close()


def test_eval_ppl_cli_short_text(w4_dir, tmp_path, capsys):
    """`fineserve eval-ppl` on a few hundred tokens of the Britannica article, with the quantized checkpoint."""
    out = tmp_path / "ppl.json"
    assert main(["eval-ppl", "--model", str(w4_dir), "--precision", "w4a8kv4", "--text", "shakespeare",
                 "--window", "96", "--max-tokens", "300", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "PPL" in printed and "285 tokens" in printed
    res = json.loads(out.read_text())
    row = res["results"][0]
    assert row["tokens"] == 3 * 95 and row["windows"] == 3 and 1 < row["ppl"] < 1000
    assert res["precision"] == "w4a8kv4" and res["device"] and res["versions"]["torch"] and res["date"]
    assert res["command"].startswith("fineserve eval-ppl --model")
    assert res["quantization_config"]["precision"] == "w4a8kv4"
