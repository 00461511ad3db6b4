"""Compile every kernel variant the tests and the benchmark use for sm_90, on a machine without a GPU.

    KERNELS_COMPILE_ONLY=1 python -m kernels.compile_check      (sets the variable itself if missing)

Triton compiles through its bundled ptxas for an H100 target (GPUTarget cuda 90) behind a fake driver
that reports that target; launches are turned into warm-ups (compile, no run). This catches front-end
errors (types, constexpr control flow), MMA shape limits and PTX errors in the inline assembly before
any device time is spent. The wrappers run on CPU tensors; nothing they return is meaningful.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

os.environ["KERNELS_COMPILE_ONLY"] = "1"
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise AttributeError(f"fake driver has no {name}")


_driver.set_active(_FakeDriver())
_orig_run = JITFunction.run


def _run_compile_only(self, *args, grid, warmup, **kwargs):
    return _orig_run(self, *args, grid=grid, warmup=True, **kwargs)


JITFunction.run = _run_compile_only


def main() -> int:
    from fineserve_core.kv_format import KVFormat
    from fineserve_core.quant.formats import W4Weight
    from kernels import attn_decode as da, attn_prefill as pa, fp8_quant as fq, gemm_w4a8 as wg, kv_store as kw
    from kernels.bench import gemm_candidates
    from kernels.ffn import w4a8_ffn
    failures = []
    n = 0
    t0 = time.time()

    def chk(name, fn):
        nonlocal n
        n += 1
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[-1500:]}")
            if os.environ.get("VERBOSE"):
                traceback.print_exc()

    bf = torch.bfloat16
    for K in (128, 256, 4096):
        x = torch.randn(8, K, dtype=bf)
        for g in (None, 128, 64):
            chk(f"quant K={K} g={g}", lambda: fq.quant_fp8(x, group=g))
        chk(f"rmsnorm K={K}", lambda: fq.rmsnorm_quant_fp8(x, torch.ones(K, dtype=bf), 1e-5, residual=x, group=128))
        chk(f"rmsnorm nores K={K}", lambda: fq.rmsnorm_quant_fp8(x, torch.ones(K, dtype=bf), 1e-5, group=64))
        chk(f"silu_mul_quant K={K}", lambda: fq.silu_mul_quant_fp8(x, group=64))
        chk(f"silu_mul K={K}", lambda: fq.silu_mul(x))
    # GEMM: the tests' configs + the benchmark's candidates, all epilogues, both group sizes
    C = wg.GemmConfig
    cfgs = {c.key(): c for c in [C(BM=16, BN=32), C(BM=16, BN=32, SPLIT_K=3), C(BM=16, BN=32, SWAP_AB=True),
                                 C(BM=32, BN=16, SWAP_AB=True, SPLIT_K=2), C(BM=16, BN=64, SPLIT_K=2, asm=True),
                                 C(BM=16, BN=64, SWAP_AB=True, asm=True), C(BM=16, BN=32, SPLIT_K=2, f16=True),
                                 C(BM=16, BN=32, f16=True, GPI=2), C(BM=16, BN=64, SWAP_AB=True, asm=True, f16=True, GPI=2)]}
    for M in (1, 16, 32, 64, 4096):
        for epi in (0, 2):
            for c in gemm_candidates(M, epi):
                if c.path != "two_step":
                    cfgs[c.key() + f"/epi{epi}"] = (c, epi)
    from kernels.tuned import GATE_UP_TABLE, GEMM_TABLE
    for _, c, *_ in GEMM_TABLE:
        cfgs[c.key() + "/table"] = (c, 0)
    for _, c in GATE_UP_TABLE:
        cfgs[c.key() + "/table2"] = (c, 2)
    for name, item in cfgs.items():
        c, epi = item if isinstance(item, tuple) else (item, None)
        if c.path == "two_step":
            continue
        for g, K in ((128, 256), (64, 192)):
            if epi not in (None, 0) and g == 64:
                continue
            w = W4Weight(torch.randint(0, 256, (64, K // 2), dtype=torch.uint8),
                         torch.rand(64, K // g).to(torch.float8_e4m3fn), g, 2.0)
            x8 = torch.randn(5, K).to(torch.float8_e4m3fn)
            xs = torch.rand(5)
            for out_dtype in ((bf, torch.float32) if epi is None else (bf,)):
                if epi in (None, 0):
                    chk(f"gemm {name} g{g} {out_dtype}", lambda: wg.w4a8_gemm_fp8(x8, xs, w, out_dtype, config=c))
                    chk(f"gemm+res {name} g{g}", lambda: wg.w4a8_gemm_fp8(x8, xs, w, bf, config=c,
                                                                       residual=torch.randn(5, 64, dtype=bf)))
                if epi in (None, 2):
                    chk(f"gate_up {name} g{g}", lambda: wg.w4a8_gate_up_silu(x8, xs, w, bf, config=c))
    w = W4Weight(torch.randint(0, 256, (64, 128), dtype=torch.uint8), torch.rand(64, 2).to(torch.float8_e4m3fn), 128, 1.0)
    chk("unpack", lambda: wg.unpack_w4_fp8(w))
    wgu = W4Weight(torch.randint(0, 256, (128, 128), dtype=torch.uint8), torch.rand(128, 2).to(torch.float8_e4m3fn),
                   128, 1.0)
    wd = W4Weight(torch.randint(0, 256, (256, 32), dtype=torch.uint8), torch.rand(256, 1).to(torch.float8_e4m3fn),
                  64, 1.0)
    for c in (C(BM=16, BN=32, SPLIT_K=2), C("two_step")):
        chk(f"ffn {c.key()}", lambda: w4a8_ffn(torch.randn(3, 256, dtype=bf), wgu, wd, residual=torch.randn(3, 256, dtype=bf),
                                               gate_up_config=c, down_config=c))
    # KV write, decode attention (test and bench shapes), prefill attention
    for prec in ("w4a8kv4", "fp8", "bf16"):
        for (H, D, T) in ((3, 64, 16), (8, 128, None), (2, 64, None)):
            fmt = KVFormat.for_model(prec, H, D, bf, T)
            region = torch.zeros((2, 4 * fmt.block_bytes), dtype=torch.uint8)
            kc, vc = fmt.views(region[0]), fmt.views(region[1])
            k = torch.randn(5, H, D, dtype=bf)
            chk(f"kv_write {prec} H{H} D{D}", lambda: kw.kv_write(k, k, torch.arange(5), kc, vc, prec))
            q = torch.randn(2, 4 * H, D, dtype=bf)
            q8, qs = q.to(torch.float8_e4m3fn), torch.rand(2, 4 * H)
            bt = torch.zeros(2, 2, dtype=torch.int32)
            lens = torch.ones(2, dtype=torch.int32)
            for splits in (1, 3):
                for asm in (True, False):
                    for nw, ns in ((4, 2), (4, 3), (4, 4), (8, 3)):
                        kwargs = dict(splits=splits, asm=asm, num_warps=nw, num_stages=ns)
                        if prec != "bf16":
                            chk(f"decode {prec} q8 H{H} D{D} {kwargs}",
                                lambda: da.paged_decode_attention(q8, kc, vc, bt, lens, prec, q_scale=qs, **kwargs))
                        chk(f"decode {prec} bf16q H{H} D{D} {kwargs}",
                            lambda: da.paged_decode_attention(q, kc, vc, bt, lens, prec, **kwargs))
    for HQ, HKV, D in ((4, 2, 64), (32, 8, 128)):
        T = 96
        q, k = torch.randn(T, HQ, D, dtype=bf), torch.randn(T, HKV, D, dtype=bf)
        cu = torch.tensor([0, 40, 96], dtype=torch.int32)
        q8, qs = pa.quant_qk_fp8(q)
        k8, ks = pa.quant_qk_fp8(k)
        starts, t_pad = pa.v_layout([40, 56])
        vst = torch.tensor(starts, dtype=torch.int32)
        v8, vs = pa.quant_v_fp8_t(k, cu, vst, t_pad, 56)
        for c in (dict(BM=32, BN=32, num_warps=4, num_stages=2), dict(BM=128, BN=64, num_warps=8, num_stages=3),
                  dict(BM=128, BN=128, num_warps=8, num_stages=3), dict(BM=128, BN=128, num_warps=8, num_stages=2),
                  dict(BM=64, BN=128, num_warps=4, num_stages=2), dict(BM=64, BN=64, num_warps=4, num_stages=3)):
            chk(f"prefill fp8 {HQ}/{HKV}/{D} {c}",
                lambda: pa.prefill_attention(q8, k8, v8, cu, 56, q_scale=qs, k_scale=ks.t().contiguous().t(),
                                             v_scale=vs, v_starts=vst, **c))
            chk(f"prefill fp8 plain-v {HQ}/{HKV}/{D} {c}",
                lambda: pa.prefill_attention(q8, k8, k8, cu, 56, q_scale=qs, k_scale=ks, v_scale=vs, **c))
            chk(f"prefill bf16 {HQ}/{HKV}/{D} {c}", lambda: pa.prefill_attention(q, k, k, cu, 56, **c))
    print(f"compile_check: {n - len(failures)}/{n} ok in {time.time() - t0:.0f}s")
    for f in failures:
        print("  failed:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
