"""Piecewise step graphs (`fineserve_core.step_graphs`): the pieces, padded to a token bucket, with attention
between them, compute what the model's forward computes. On the CPU the pieces run as plain calls (the
padding, the static buffers and the piece order are what is tested); the CUDA test replays the graphs."""
import pytest
import torch

from fineserve_core.attention import AttnBatch
from fineserve_core.config import EngineConfig
from fineserve_core.engine import Engine
from fineserve_core.sampling import SamplingParams
from fineserve_core.step_graphs import StepGraphs

CUDA = torch.cuda.is_available()


def _mixed_step(eng: Engine, prompt_len: int):
    """Three running decodes (one of them crossing into a new block) and a new prompt: the step's inputs."""
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    T = eng.fmt.tokens_per_block
    seqs = [eng.add_request(f"d{i}", list(range(100 + i, 100 + i + n)), sp) for i, n in enumerate((5, T, 37))]
    while any(not s.output_ids for s in seqs):
        eng.step()
    seqs.append(eng.add_request("new", list(range(900, 900 + prompt_len)), sp))
    batch = eng.scheduler.schedule()
    assert [n for _, n in batch] == [1, 1, 1, prompt_len]
    ids, pos, slots = [], [], []
    for s, n in batch:
        p = list(range(s.num_computed, s.num_computed + n))
        ids += s.token_ids[p[0]:p[-1] + 1]
        pos += p
        slots += [s.block_ids[i // T] * T + i % T for i in p]
    return batch, ids, pos, slots


@pytest.mark.parametrize("precision", ["bf16", "w4a8kv4"])
def test_pieces_padded_to_a_bucket_equal_the_forward(precision):
    eng = Engine(EngineConfig(model="smollm2-135m-shape", precision=precision, device="cpu", dtype="float32",
                              max_model_len=256, max_num_batched_tokens=64))
    pad = eng.blocks.alloc(2)[1]                  # not block 0: a padding row must not write slot 0 either
    g = StepGraphs(eng.model, eng.kv, 64, pad)
    g.capture_all()
    assert g.buckets == [16, 32, 64] and sorted(g.pieces) == g.buckets
    assert all(len(p) == eng.source.config.num_layers + 1 for p in g.pieces.values())
    batch, ids, pos, slots = _mixed_step(eng, 19)                 # 22 tokens: bucket 32, 10 padding rows
    q_lens, kv_lens = [n for _, n in batch], [s.num_computed + n for s, n in batch]
    tables = [s.block_ids for s, _ in batch]
    attn = AttnBatch(q_lens, kv_lens, tables, torch.tensor(slots))
    eager = eng.model(torch.tensor(ids), torch.tensor(pos), attn, eng.kv)
    # the padding rows write their KV into the scratch block only: every other block is as before
    # (compared as bytes: the KV buffer is uninitialised memory, and a NaN there never equals itself)
    blocks = eng.kv.k[0][0]
    before = blocks.contiguous().view(torch.uint8).clone()
    pieces = g.run(ids, pos, slots, q_lens, kv_lens, tables)
    changed = (blocks.contiguous().view(torch.uint8) != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {pad}, changed
    assert pieces.shape == eager.shape
    from fineserve_core.attention import _joint
    assert _joint(g.q[:22], g.k[:22]) is not None          # on CUDA one FP8 quantization serves q and k
    torch.testing.assert_close(pieces, eager, rtol=1e-4, atol=1e-4)
    # stale rows from a longer earlier step never reach a shorter one
    out = g.run(ids[:3], pos[:3], slots[:3], [1, 1, 1], kv_lens[:3], tables[:3])
    ref = eng.model(torch.tensor(ids[:3]), torch.tensor(pos[:3]),
                    AttnBatch([1, 1, 1], kv_lens[:3], tables[:3], torch.tensor(slots[:3])), eng.kv)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    eng.close()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs exist on CUDA only")
@pytest.mark.parametrize("precision", ["bf16", "fp8", "w4a8kv4"])
def test_step_graph_replay_equals_the_eager_forward(precision):
    """A mixed step whose token count is a bucket replays the same kernels the eager forward launches
    (same M everywhere): bit-identical. The engine's own steps then run through the graphs."""
    eng = Engine(EngineConfig(model="llama-2-7b-shape", precision=precision, device="cuda", max_num_seqs=8,
                              max_model_len=512, max_num_batched_tokens=256, kv_cache_bytes=1536 << 20))
    g = eng.step_graphs
    assert g is not None and sorted(g.pieces) == g.buckets
    batch, ids, pos, slots = _mixed_step(eng, 125)                # 128 tokens: a bucket, no padding
    q_lens, kv_lens = [n for _, n in batch], [s.num_computed + n for s, n in batch]
    tables = [s.block_ids for s, _ in batch]
    replayed = g.run(ids, pos, slots, q_lens, kv_lens, tables).clone()
    attn = AttnBatch(q_lens, kv_lens, tables, torch.tensor(slots, device="cuda"))
    eager = eng.model(torch.tensor(ids, device="cuda"), torch.tensor(pos, device="cuda"), attn, eng.kv)
    assert torch.equal(replayed, eager), (replayed.float() - eager.float()).abs().max()
    while eng.has_unfinished():                                 # the engine redoes this step, then goes on
        eng.step()
    assert all(len(s.output_ids) == 16 for s, _ in batch)
    eng.close()


@pytest.mark.skipif(not CUDA, reason="Triton compiles kernels on CUDA only")
@pytest.mark.parametrize("precision", ["bf16", "fp8", "w4a8kv4"])
def test_no_kernel_is_compiled_after_load(precision):
    """The engine's load warms every kernel variant up: steps with changing batch sizes, prompt lengths
    and contexts (prompts beside decodes, one-block and multi-block contexts, a chunked prompt) then
    compile no Triton kernel, so no live step stalls on a JIT compile."""
    from kernels._common import JitLog
    eng = Engine(EngineConfig(model="llama-2-7b-shape", precision=precision, device="cuda", max_num_seqs=16,
                              max_model_len=1024, max_num_batched_tokens=256, kv_cache_bytes=1536 << 20))
    with JitLog() as jit:
        for i, n in enumerate((1, 7, 64, 65, 130, 300, 17, 900, 2, 33, 128, 500)):
            eng.add_request(f"r{i}", list(range(10, 10 + n)),
                            SamplingParams(max_tokens=5 + 7 * i, temperature=0.0, ignore_eos=True))
            for _ in range(1 + i % 3):
                eng.step()
        while eng.has_unfinished():
            eng.step()
        assert jit.take() == {}
    eng.close()
