"""Shared pieces of the Triton kernels: interpreter switch, exact casts, small helpers.

Interpreter mode
----------------
A kernel runs under Triton's interpreter (`TRITON_INTERPRET=1` semantics: numpy on the CPU) when the
environment asks for it **or** when no CUDA device exists: a CPU-only process has no other way to run
a Triton kernel, and deciding here (not through the process-global environment variable at the moment
some other module first imported triton) keeps a full `pytest tests/` run working whatever the import
order. On a machine with a GPU and without `TRITON_INTERPRET=1`, `jit` is plain `triton.jit`.

Exact casts
-----------
Triton 3.6's interpreter converts fp32 → fp8/bf16 with a buggy rounding (ties and mantissa carries
are wrong, fp8 subnormals flush). The contract (`fineserve_core.quant.formats`) rounds to nearest-even,
as the GPU's `cvt.rn(.satfinite)` does. `to_fp8` / `to_bf16` therefore first round in fp32 arithmetic
onto the target grid when `EMULATE_CASTS` is set (interpreter), so the final cast is exact in both
modes; on the GPU they are the native casts. `rint` is round-half-to-even via the 1.5·2^23 trick (no
libdevice, which the interpreter lacks); valid for |x| < 2^22, which every caller guarantees by
clamping first.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: KERNELS_COMPILE_ONLY=1 (`python -m kernels.compile_check`): compile for sm_90 on a machine without a
#: GPU, launching nothing (a fake driver; see compile_check.py).
COMPILE_ONLY: bool = os.environ.get("KERNELS_COMPILE_ONLY", "0") == "1"
INTERPRET: bool = not COMPILE_ONLY and (os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available())
EMULATE_CASTS = tl.constexpr(INTERPRET)


def _interpretify_triton_language() -> None:
    """Make triton.language's own @jit helpers (tl.max, tl.sum, tl.sigmoid, ...) interpretable.

    They are decorated when triton is first imported; if that happened before TRITON_INTERPRET was
    set (another module imported triton first), they are compiled-mode JITFunctions that refuse to
    run under the interpreter. Only done in interpreter mode (no usable GPU), where compiled mode
    cannot run anyway; the environment variable is set too so later `triton.jit`s agree.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    import triton.language.random as _random
    import triton.language.standard as _standard
    for mod in (_standard, _random):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                new = InterpretedFunction(obj.fn)
                setattr(mod, name, new)
                if getattr(tl, name, None) is obj:
                    setattr(tl, name, new)


if INTERPRET:
    _interpretify_triton_language()

FP8_MAX = 448.0
SCALE_MIN = 2.0 ** -9


def jit(fn=None, **kwargs):
    """`triton.jit`, or an interpreted function when INTERPRET (see the module doc)."""
    def deco(f):
        if INTERPRET:
            from triton.runtime.interpreter import InterpretedFunction
            return InterpretedFunction(f, **kwargs)
        return triton.jit(f, **kwargs)
    return deco(fn) if fn is not None else deco


class JitLog:
    """Triton kernels compiled (or loaded from the disk cache) in this process while active: the stalls
    of a step whose arguments give a kernel a specialization it has not seen (an int argument that is
    1 or a multiple of 16, a pointer's alignment)."""

    def __enter__(self):
        self.names: list[str] = []
        self._prev = triton.knobs.runtime.jit_post_compile_hook
        triton.knobs.runtime.jit_post_compile_hook = lambda *, fn, **_: self.names.append(fn.name)
        return self

    def __exit__(self, *exc):
        triton.knobs.runtime.jit_post_compile_hook = self._prev

    def take(self) -> dict[str, int]:
        out = {n: self.names.count(n) for n in sorted(set(self.names))}
        self.names.clear()
        return out


def on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda and not INTERPRET


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@jit
def rint(x):
    """Round half to even, fp32, |x| < 2^22."""
    return (x + 12582912.0) - 12582912.0


@jit
def _round_fp8_grid(x):
    """fp32 x (|x| ≤ 448) → the nearest float8_e4m3fn value, ties to even, still fp32 (sign kept, −0 too)."""
    b = x.to(tl.uint32, bitcast=True)
    sign = b & 0x80000000
    ab = b & 0x7FFFFFFF
    ax = ab.to(tl.float32, bitcast=True)
    # normal range (|x| ≥ 2^-6): keep 3 mantissa bits, RNE on the bit pattern
    n = (ab + 0x7FFFF + ((ab >> 20) & 1)) & 0xFFF00000
    # subnormal range: multiples of 2^-9
    sub = (rint(ax * 512.0) * 0.001953125).to(tl.uint32, bitcast=True)
    r = tl.where(ax >= 0.015625, n, sub) | sign
    return r.to(tl.float32, bitcast=True)


@jit
def to_fp8(x):
    """fp32 → float8_e4m3fn: clamp to ±448 then round to nearest-even (formats.py's `_to_fp8`)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMULATE_CASTS:
        x = _round_fp8_grid(x)
    return x.to(tl.float8e4nv)


@jit
def to_bf16(x):
    """fp32 → bfloat16, round to nearest-even (finite inputs)."""
    if EMULATE_CASTS:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@jit
def to_out(x, OUT_BF16: tl.constexpr):
    """fp32 → the output dtype (bf16 exact-rounded, or fp32 unchanged)."""
    if OUT_BF16:
        y = to_bf16(x)
    else:
        y = x
    return y


@jit
def int4_scale(absmax):
    """FireQ INT4 scale: max(fp8_e4m3(absmax / 7), 2^-9), returned as fp32 (an fp8 value)."""
    s = to_fp8(tl.math.div_rn(absmax, tl.full(absmax.shape, 7.0, tl.float32))).to(tl.float32)
    return tl.maximum(s, 0.001953125)


@jit
def quant_int4(x, s):
    """clamp(round(x / s), -8, 7) as int32 (x, s fp32; division exact-rounded)."""
    v = tl.math.div_rn(x, s)
    v = tl.minimum(tl.maximum(v, -8.0), 7.0)
    return rint(v).to(tl.int32)


@jit
def nib_lo(b):
    """uint8 [..] → fp32 value of the low nibble (two's complement, −8..7)."""
    return (((b & 0xF) ^ 8).to(tl.int32) - 8).to(tl.float32)


@jit
def nib_hi(b):
    """uint8 [..] → fp32 value of the high nibble (two's complement, −8..7)."""
    return (((b >> 4) ^ 8).to(tl.int32) - 8).to(tl.float32)


@jit
def nib_lo_f16(b):
    """uint8 → fp16 value of the low nibble, by the 0x6400 magic number (no int→float convert)."""
    u = ((b ^ 0x8) & 0xF).to(tl.uint16) | 0x6400
    return u.to(tl.float16, bitcast=True) - 1032.0


@jit
def nib_hi_f16(b):
    """uint8 → fp16 value of the high nibble, by the 0x6400 magic number."""
    u = ((b ^ 0x80) >> 4).to(tl.uint16) | 0x6400
    return u.to(tl.float16, bitcast=True) - 1032.0


@jit
def to_f16(x):
    """fp32 → fp16 on the GPU. The interpreter's fp16 rounding is wrong, so there the value stays fp32
    (slightly more accurate than the GPU; `mma` accepts either)."""
    if EMULATE_CASTS:
        y = x
    else:
        y = x.to(tl.float16)
    return y


@jit
def mma(a, b, acc, MAX_IMPRECISE: tl.constexpr = None):
    """tl.dot(a, b, acc). Under the interpreter, operands are upcast to fp32 first: its dot multiplies
    bf16 operands as raw uint16 bit patterns (fp8/fp16 → fp32 upcasts are exact). MAX_IMPRECISE: FP8
    products summed in the wgmma's reduced-precision accumulator before a full-FP32 add (Triton's
    default on sm_90 is unlimited; 32 = promote after every wgmma k-step)."""
    if EMULATE_CASTS:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        r = tl.dot(a, b, acc, max_num_imprecise_acc=MAX_IMPRECISE)
    return r


#: Tests set this: every output and workspace a wrapper allocates is then filled with NaN (floats;
#: 0x7F, e4m3's NaN, for fp8) or 0xFF bytes (integers), so an element a kernel fails to write shows.
POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).fill_(0x7F)
        elif dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.fill_(-1 if dtype.is_signed else (1 << (8 * t.element_size())) - 1)
    return t


def check_out(out: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A caller's output buffer: the wrapper's shape and dtype, unit stride in the last dimension."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {dtype} {list(shape)} with unit last stride, got {out.dtype} "
                         f"{list(out.shape)} strides {out.stride()}")
    if POISON:
        out.fill_(float("nan"))
    return out


# INT4 → FP8 for 4 packed bytes (8 nibbles) per instance, on packed 32-bit registers: flip the nibbles'
# sign bits (u = n ^ 8 = v + 8), spread two bytes into the low halves of an f16x2 pair (prmt), OR the
# nibble into 1024.0's mantissa (lop3), then (1024 + u) − 1032 = v for low nibbles and
# (1024 + 16u)/16 − 72 = v for high nibbles (exact f16x2 arithmetic), then cvt.rn.satfinite.e4m3x2
# (exact: −8..7 are e4m3 values). ≈ 2 instructions per value instead of ≈ 6 for the scalar path.
# Outputs are per input byte: $0 byte i = e4m3(low nibble of byte i), $1 byte i = e4m3(high nibble).
_INT4_FP8_ASM = tl.constexpr("""
{
.reg .b32 x, t01, t23, a, b, c, d, k1, k2, k3;
.reg .b16 l01, l23, h01, h23;
xor.b32 x, $2, 0x88888888;
prmt.b32 t01, x, 0, 0x4140;
prmt.b32 t23, x, 0, 0x4342;
lop3.b32 a, t01, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b, t23, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 c, t01, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 d, t23, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 k1, 0x64086408;
mov.b32 k2, 0x2C002C00;
mov.b32 k3, 0xD480D480;
sub.f16x2 a, a, k1;
sub.f16x2 b, b, k1;
fma.rn.f16x2 c, c, k2, k3;
fma.rn.f16x2 d, d, k2, k3;
cvt.rn.satfinite.e4m3x2.f16x2 l01, a;
cvt.rn.satfinite.e4m3x2.f16x2 l23, b;
cvt.rn.satfinite.e4m3x2.f16x2 h01, c;
cvt.rn.satfinite.e4m3x2.f16x2 h23, d;
mov.b32 $0, {l01, l23};
mov.b32 $1, {h01, h23};
}
""")


# INT4 → FP8 *codes of v · 2^-9* (exact, 9 integer instructions per 8 values, no conversion unit, no
# table): e4m3's subnormals are m · 2^-9 (m = 1..7) and 0x08 is 2^-6 = 8 · 2^-9, so sign | magnitude of v
# in the low 4 bits is the e4m3 code of v · 2^-9 for every v in −8..7. Two's complement → magnitude per
# nibble: negative nibbles (bit 3) get xor 0xF and +1 (never carries out: magnitudes ≤ 8), then the sign
# bits move to bit 7 of each output byte. The caller multiplies the result by 2^9 (an exact power of two).
_INT4_FP8_SUB_ASM = tl.constexpr("""
{
.reg .b32 s, sm, fl, mag, s4, mh;
and.b32 s, $2, 0x88888888;
shr.u32 sm, s, 3;
mul.lo.u32 fl, sm, 15;
xor.b32 mag, $2, fl;
add.u32 mag, mag, sm;
shl.b32 s4, s, 4;
lop3.b32 $0, mag, s4, 0x0F0F0F0F, 0xE4;
shr.u32 mh, mag, 4;
lop3.b32 $1, mh, s, 0x0F0F0F0F, 0xE4;
}
""")


@jit
def _bytes_to_fp8(b, CODE: tl.constexpr):
    """Run one of the INT4 → FP8 PTX snippets above on packed bytes: (low-nibble, high-nibble) e4m3."""
    lo, hi = tl.inline_asm_elementwise(CODE, "=r,=r,r", [b], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
    return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)


@jit
def int4_to_fp8(b, ASM: tl.constexpr):
    """uint8 tensor → (e4m3 of the low nibbles, e4m3 of the high nibbles), exact. Inline PTX on the GPU:
    ASM 1 the f16x2 arithmetic, 2 the subnormal codes (values × 2^-9); ASM 0 their pure-Triton twin
    (interpreter, reference on the GPU)."""
    if ASM == 2:
        lo, hi = _bytes_to_fp8(b, _INT4_FP8_SUB_ASM)
    elif ASM:
        lo, hi = _bytes_to_fp8(b, _INT4_FP8_ASM)
    else:
        lo = nib_lo_f16(b).to(tl.float8e4nv)
        hi = nib_hi_f16(b).to(tl.float8e4nv)
    return lo, hi


# The same as _INT4_FP8_ASM without the final cvt: FP16 outputs, two f16x2 registers per output
# (elements 0,1 and 2,3 of the 4 input bytes), ≈1.5 instructions per value.
_INT4_F16_ASM = tl.constexpr("""
{
.reg .b32 x, t01, t23, k1, k2, k3;
xor.b32 x, $4, 0x88888888;
prmt.b32 t01, x, 0, 0x4140;
prmt.b32 t23, x, 0, 0x4342;
lop3.b32 $0, t01, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, t23, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $2, t01, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $3, t23, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 k1, 0x64086408;
mov.b32 k2, 0x2C002C00;
mov.b32 k3, 0xD480D480;
sub.f16x2 $0, $0, k1;
sub.f16x2 $1, $1, k1;
fma.rn.f16x2 $2, $2, k2, k3;
fma.rn.f16x2 $3, $3, k2, k3;
}
""")


@jit
def int4_to_f16(b, ASM: tl.constexpr):
    """uint8 tensor → (fp16 of the low nibbles, fp16 of the high nibbles), exact; ASM as in int4_to_fp8."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(_INT4_F16_ASM, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
    else:
        lo = nib_lo_f16(b)
        hi = nib_hi_f16(b)
    return lo, hi
