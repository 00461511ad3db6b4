"""The engine on the real SmolLM2-135M in float32 against transformers' generate, token for token."""
import asyncio

import pytest
import torch

from fineserve_core.async_engine import AsyncEngine
from fineserve_core.config import EngineConfig
from fineserve_core import engine as engine_mod
from fineserve_core.engine import Engine, ModelTooLargeError, RequestError
from fineserve_core.kv_format import KVFormat
from fineserve_core.kv_slab import KVSlabManager
from fineserve_core.sampling import SamplingParams

NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def hf_outputs(smollm2, prompts):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                               temperature=None, top_p=None, top_k=None, repetition_penalty=1.0)
            outs.append(y[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu"))
    yield eng
    eng.close()


def test_greedy_matches_transformers(engine, prompts, hf_outputs):
    got = [o["token_ids"] for o in engine.generate(prompts, GREEDY)]
    for i, (g, ref) in enumerate(zip(got, hf_outputs)):
        assert g == ref, f"prompt {i}: ours {g} != transformers {ref}"
    assert len(prompts) >= 10


def test_continuous_batching_with_staggered_arrivals_and_chunked_prefill(prompts, hf_outputs):
    # a small token budget forces chunked prefills that share steps with other sequences' decodes
    eng = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu", max_num_batched_tokens=16,
                              max_num_seqs=5))
    seqs, step, pending = {}, 0, list(enumerate(prompts))
    mixed_steps = 0
    while pending or any(not s.finished for s in seqs.values()):
        if pending and step % 3 == 0:                   # a new request every third step
            i, ids = pending.pop(0)
            seqs[i] = eng.add_request(f"r{i}", ids, GREEDY)
        batch_before = [(s.num_computed, len(s)) for s in eng.scheduler.running]
        eng.step()
        decodes = sum(1 for c, n in batch_before if n - c == 1)
        mixed_steps += decodes > 0 and len(batch_before) > decodes
        step += 1
    for i, ref in enumerate(hf_outputs):
        assert seqs[i].output_ids == ref, f"prompt {i}"
    assert mixed_steps > 0, "no step mixed prefill and decode"
    eng.close()


def test_preemption_under_tiny_kv_budget_keeps_outputs(smollm2, prompts, hf_outputs):
    # room for 12 blocks of 8 tokens: sequences outgrow it as they decode, so the scheduler must preempt
    cfg = smollm2.config
    fmt = KVFormat.for_model("bf16", cfg.num_kv_heads, cfg.head_dim, torch.float32, tokens_per_block=8)
    tiny = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu", max_num_seqs=16,
                               max_num_batched_tokens=64, tokens_per_block=8,
                               kv_cache_bytes=fmt.block_bytes * 2 * cfg.num_layers * 12))
    outs = tiny.generate(prompts, GREEDY)
    assert tiny.scheduler.num_preemptions > 0
    for i, (o, ref) in enumerate(zip(outs, hf_outputs)):
        assert o["token_ids"] == ref, f"prompt {i}"
    tiny.close()


def test_two_models_share_one_kv_slab_buffer(prompts, hf_outputs):
    a = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu"), allocator=None, model_id="a")
    spec_a = a.kv_spec()
    a.close()
    from dataclasses import replace
    buf = torch.empty(256 << 20, dtype=torch.uint8)
    mgr = KVSlabManager(buf, [spec_a, replace(spec_a, model_id="b")])
    ea = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu"), allocator=mgr, model_id="a")
    eb = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu"), allocator=mgr, model_id="b")
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    for e in (ea, eb):
        assert lo <= e.kv.k[0][0].data_ptr() < hi
    sa = ea.add_request("x", prompts[0], GREEDY)
    sb = eb.add_request("y", prompts[1], GREEDY)
    while not (sa.finished and sb.finished):
        ea.step()
        eb.step()
    assert sa.output_ids == hf_outputs[0] and sb.output_ids == hf_outputs[1]
    ea.close()
    eb.close()
    assert mgr.num_free_blocks("a") == mgr.num_free_blocks("b") > 0
    assert all(v == 0 for v in _allocated(mgr).values())


def test_split_scale_kv_slab_gives_the_same_tokens(prompts):
    """w4a8kv4 with its KV scales out of the blocks (slab policy split_scale, sharing the buffer with a
    bf16 model) generates what the inline block layout generates."""
    cfg = EngineConfig(model="smollm2-135m", precision="w4a8kv4", dtype="float32", device="cpu")
    inline = Engine(cfg, model_id="w4")
    want = [o["token_ids"] for o in inline.generate(prompts[:3], GREEDY)]
    spec = inline.kv_spec()
    inline.close()
    bf16 = KVFormat.for_model("bf16", 3, 64, torch.float32)
    from fineserve_core.kv_slab import ModelKVSpec
    mgr = KVSlabManager(torch.zeros(128 << 20, dtype=torch.uint8),
                        [spec, ModelKVSpec.from_format("bf16", bf16, spec.num_layers)], policy="split_scale")
    assert mgr.kv_scale_region("w4") is not None
    split = Engine(cfg, allocator=mgr, model_id="w4")
    assert [o["token_ids"] for o in split.generate(prompts[:3], GREEDY)] == want
    assert mgr.kv_scale_region("w4").count_nonzero() > 0          # the scales went to their own region
    split.close()


def _allocated(mgr) -> dict:
    return {m: mgr.num_blocks(m) - mgr.num_free_blocks(m) for m in ("a", "b")}


def test_sampling_seed_stop_and_length(engine, prompts):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    a, b = engine.generate([prompts[1], prompts[1]], p)
    assert a["token_ids"] == b["token_ids"], "same seed must give the same tokens"
    top1 = engine.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=0.7, top_k=1))[0]
    greedy = engine.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert top1["token_ids"] == greedy["token_ids"]
    assert greedy["finish_reason"] == "length" and len(greedy["token_ids"]) == 8
    full = engine.generate([prompts[1]], SamplingParams(max_tokens=20, temperature=0.0))[0]["text"]
    word = full.split()[3]
    cut = engine.generate([prompts[1]], SamplingParams(max_tokens=20, temperature=0.0, stop=[word]))[0]
    assert cut["finish_reason"] == "stop" and word not in cut["text"] and full.startswith(cut["text"])


def test_bad_requests_are_refused_clearly(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("e1", [], GREEDY)
    with pytest.raises(RequestError, match="context length"):
        engine.add_request("e2", [1] * 10, SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("e3", [10**9], GREEDY)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(bogus=1)
    engine.add_request("dup", [1, 2, 3], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("dup", [1, 2, 3], GREEDY)
    engine.abort("dup")
    assert not engine.has_unfinished()


def test_async_streaming_and_cancellation_frees_blocks(prompts, hf_outputs):
    eng = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu"))
    aeng = AsyncEngine(eng)
    free0 = eng.blocks.num_free_blocks()

    async def main():
        toks, deltas = [], []
        async for out in aeng.generate("s1", prompts[2], GREEDY):
            toks += out.new_token_ids
            deltas.append(out.delta_text)
        assert toks == hf_outputs[2]
        assert "".join(deltas) == eng.tokenizer.decode(toks, skip_special_tokens=True)
        # leave a long stream after 3 tokens: the request must be aborted and its blocks freed
        n = 0
        async for _ in aeng.generate("s2", prompts[3], SamplingParams(max_tokens=200, temperature=0.0)):
            n += 1
            if n == 3:
                break
        for _ in range(100):
            if not eng.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert not eng.has_unfinished()
        with pytest.raises(RequestError):
            async for _ in aeng.generate("s3", [], GREEDY):
                pass

    asyncio.run(main())
    aeng.shutdown()
    assert eng.blocks.num_free_blocks() == free0


def test_incremental_detokenization_streams_what_decoding_the_whole_output_gives(engine):
    """Streamed text (one window decode per token, `sequence.new_text`) concatenates to the decode of all
    output tokens, and never emits text that a later token changes — also for UTF-8 characters split
    over byte tokens, special tokens and random ids."""
    from hypothesis import given, settings, strategies as st

    from fineserve_core.sequence import Sequence, new_text
    tok = engine.tokenizer
    split = tok.encode("héllo wörld 世界 🙂👍🏽 naïve — ∑", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in split)          # the pool really splits characters
    pool = st.sampled_from(split + [tok.eos_token_id]) | st.integers(0, len(tok) - 1)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(pool, min_size=1, max_size=24))
    def check(ids):
        full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        seq = Sequence("r", [1], GREEDY)
        text = ""
        for i, t in enumerate(ids):
            seq.output_ids.append(t)
            text += new_text(tok, seq, final=i == len(ids) - 1)
            assert full.startswith(text), (ids, text, full)
        assert text == full
    check()


def test_load_warm_up_leaves_nothing_behind(engine, prompts):
    """The warm-up a CUDA engine runs at load (`Engine._warm_up`) finishes its requests and frees their
    blocks; what comes after is unchanged."""
    before = engine.generate([prompts[0]], GREEDY)[0]["token_ids"]
    engine._warm_up()
    assert not engine.has_unfinished() and not engine.seqs and engine.blocks.num_in_use == 0
    assert engine.generate([prompts[0]], GREEDY)[0]["token_ids"] == before


def test_a_model_whose_weights_cannot_fit_is_refused_before_loading(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("weights were built for a model that cannot fit")
    monkeypatch.setattr(engine_mod, "iter_weights", no_load)
    monkeypatch.setattr(engine_mod, "available_memory", lambda device: 100 << 20)
    with pytest.raises(ModelTooLargeError, match=r"smollm2-135m-shape \(bf16, float32\) needs 0\.50 GiB of "
                                                 r"weights on cpu, which has 0\.10 GiB free"):
        Engine(EngineConfig(model="smollm2-135m-shape", device="cpu"))
    # quantized linears are counted at their packed size, so the figure follows the precision
    with pytest.raises(ModelTooLargeError, match=r"\(w4a8kv4, float32\) needs 0\.16 GiB"):
        Engine(EngineConfig(model="smollm2-135m-shape", precision="w4a8kv4", device="cpu"))
