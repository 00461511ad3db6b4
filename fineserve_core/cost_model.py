"""Cost model: how long a prefill and a decode step take, per model x precision x TP (x MPS share).

A **cost table** (versioned JSON, `fineserve_core/cost_tables/*.json`) holds entries keyed by
(model, precision, tp, mps). Each entry is a grid, as FineServe's profiler (`apex-cost.csv`):

    batch_sizes   [1, 2, 4, ...]
    input_lens    [256, 512]
    prefill_time  [b][l]  seconds to prefill b requests of input_lens[l] tokens together (the TTFT of
                          that batch on an idle engine)
    decode_step   [b]     seconds per decode step with b sequences at about `decode_ctx` tokens of
                          context each
    estimate      true for roofline-derived entries (never mistaken for a measurement)

Interpolation is FineServe's (`placement/utils.linear_interp`): piecewise linear between the two
bracketing grid points, linear extrapolation from the end segments. From the grid, as FineServe's
estimator (papers.md 1.5 Step B):

    prefill_per_token(b) = mean over input_lens of prefill_time[b][l] / input_lens[l]
    ttft_est(b, L)       = prefill_per_token(b) * L
    decode_step(b)       = interp of decode_step over b
    throughput(b, I, O)  = b / (ttft_est(b, I) + decode_step(b) * O)          (requests/s)
    ttft_per_token       = prefill_per_token(1)     (SAAB's linear TTFT model)

A **roofline model** fills entries we cannot measure on one H100 (TP > 1, weights beyond its memory):
per step `t = overhead + bytes / (HBM_BW * bw_eff) + flops / (peak[precision] * compute_eff) + TP
all-reduces`, with bytes = weights read (bf16 2 B/param, fp8 1, w4a8kv4 0.53 on the decoder's linear
layers; embedding and lm_head stay bf16 as in our engine) + KV read/written (KVFormat bytes per token),
flops = 2 * linear params per token + attention; H100 ceilings from DESIGN.md (3.0 TB/s copy, 722 TF/s
bf16, 1281 TF/s fp8; w4a8kv4 runs its GEMMs on FP8 tensor cores). The overhead and the two
efficiencies are fitted per precision and per phase (prefill, decode) to our engine's measured H100
table (`cost_tables/h100-measured.json`, non-negative least squares on relative errors), so they are
fit parameters, not physical efficiencies (a decode "compute_eff" > 1 absorbs per-sequence costs the
flop count does not hold). `roofline_validation()` fits each precision to all but one of its measured
shapes and reports the error on the one left out. The all-reduce latency (one GPU cannot measure it) is fitted
to FineServe's published Llama-3.1-70B TP4 bf16 TPOT at batch 1 (vLLM on H100s). Every roofline entry
says so and is labelled `estimate: true`.

`profile(engine_factory, batch_grid, input_lens)` measures an entry with our real Engine (used by
`fineserve profile`, see `add_cli`). Shipped: `cost_tables/h100-measured.json` (our engine on one H100 at
TP 1: 7B/8B/13B and 30B/32B shapes in each precision, 65B/70B in w4a8kv4), `h100-measured-mps.json` (the
8B shape at 50 % and 25 % MPS shares), `h100-roofline.json` (estimates; measured entries win over them)
and `cpu-smollm2-135m.json` (measured on CPU).

No Ray, no GPU needed.
"""
from __future__ import annotations

import argparse
import bisect
import datetime as _dt
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from fineserve_core.config import PRECISIONS, LlamaConfig
from fineserve_core.kv_format import KVFormat
from fineserve_core.model_source import PRESETS

TABLE_FORMAT = "fineserve-cost-table"
TABLE_VERSION = 1
TABLES_DIR = Path(__file__).resolve().parent / "cost_tables"
GiB = 1 << 30

# FineServe's sizing lengths (papers.md 1.5): LMSYS-Chat p95s x 0.8 headroom.
P95_INPUT, P95_OUTPUT = 903, 631
AVG_INPUT_LEN, AVG_OUTPUT_LEN = P95_INPUT * 0.8, P95_OUTPUT * 0.8


# ---------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------

SHAPES: dict[str, LlamaConfig] = PRESETS
#: A real model and the shape preset with its exact dimensions share cost entries.
ALIASES = {"smollm2-135m": "smollm2-135m-shape", "smollm2-135m-shape": "smollm2-135m"}


def resolve_shape(shape: str | LlamaConfig) -> LlamaConfig:
    if isinstance(shape, LlamaConfig):
        return shape
    if shape in SHAPES:
        return SHAPES[shape]
    if shape in ALIASES and ALIASES[shape] in SHAPES:
        return SHAPES[ALIASES[shape]]
    raise KeyError(f"unknown model shape {shape!r}; known: {sorted(SHAPES)}")


def linear_params(cfg: LlamaConfig) -> int:
    """Parameters of the decoder layers' linear projections (q, k, v, o, gate, up, down)."""
    h, qd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = h * qd + 2 * h * kvd + qd * h + 3 * h * cfg.intermediate_size
    return cfg.num_layers * per_layer


def param_count(cfg: LlamaConfig) -> int:
    emb = cfg.vocab_size * cfg.hidden_size
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    return linear_params(cfg) + emb * (1 if cfg.tie_word_embeddings else 2) + norms


#: Bytes per linear-layer parameter (FineServe: model size = params * w_bits / 8). w4a8kv4 = INT4 +
#: one FP8 scale per group of 128 + per-channel extras, ~0.53 (brief/DESIGN.md).
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "w4a8kv4": 0.53}
#: Activation bytes (FineServe's placement memory: 3 GB * act_bits / 8 of activation workspace).
ACT_BYTES = {"bf16": 2, "fp8": 1, "w4a8kv4": 1}


def weight_bytes(cfg: LlamaConfig, precision: str, dense_bytes: float = 2.0) -> float:
    """Weight memory of the whole model: quantized linear layers, embedding/lm_head/norms (and bf16
    linears) at `dense_bytes` per parameter (2: bf16; the engine passes its compute dtype's)."""
    lin, rest = linear_params(cfg), param_count(cfg) - linear_params(cfg)
    return lin * (dense_bytes if precision == "bf16" else WEIGHT_BYTES[precision]) + rest * dense_bytes


def kv_format(cfg: LlamaConfig, precision: str, tp: int = 1) -> KVFormat:
    """The KV block format one GPU of a TP-`tp` replica holds (its share of the KV heads; bf16 KV in bf16)."""
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(f"{cfg.num_kv_heads} KV heads do not split over TP {tp}")
    return KVFormat.for_model(precision, max(1, cfg.num_kv_heads // tp), cfg.head_dim, torch.bfloat16)


def kv_bytes_per_token(cfg: LlamaConfig, precision: str, tp: int = 1) -> float:
    """KV bytes per token (all layers, K and V) on ONE GPU of a TP-`tp` replica, scales included."""
    f = kv_format(cfg, precision, tp)
    return 2 * cfg.num_layers * f.block_bytes / f.tokens_per_block


# ---------------------------------------------------------------------------------------------------
# Interpolation (FineServe's linear_interp)
# ---------------------------------------------------------------------------------------------------

def linear_interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """y at x, piecewise linear through (xs, ys) (xs increasing), extrapolating the end segments.

    One point: y0 / x0 * x (proportional), as FineServe."""
    if not len(xs) or len(xs) != len(ys):
        raise ValueError("linear_interp needs equally long, non-empty xs and ys")
    if len(xs) == 1:
        return ys[0] / xs[0] * x
    last = len(xs) - 1
    i = 1 if x <= xs[0] else last if x >= xs[last] else bisect.bisect_left(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    if x1 == x0:
        return float(y1)
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _increasing(xs: Sequence[float]) -> list[float]:
    """Make a curve strictly increasing (cumulative max + a tiny ramp) so it can be inverted."""
    out, prev = [], -math.inf
    for x in xs:
        x = max(float(x), prev * (1 + 1e-9) + 1e-12 if prev > -math.inf else float(x))
        out.append(x)
        prev = x
    return out


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------

@dataclass
class CostEntry:
    model: str
    precision: str
    tp: int
    batch_sizes: list[int]
    input_lens: list[int]
    prefill_time: list[list[float]]        # [batch][input_len] seconds
    decode_step: list[float]               # [batch] seconds per decode step
    output_len: int = 256
    decode_ctx: float = 512.0              # mean context (tokens) of the decode steps
    mps: int = 100
    estimate: bool = False
    device: str = ""
    source: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        nb, nl = len(self.batch_sizes), len(self.input_lens)
        if not nb or not nl:
            raise ValueError(f"{self.key}: empty batch or input-length grid")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or list(self.input_lens) != sorted(set(self.input_lens)):
            raise ValueError(f"{self.key}: batch_sizes and input_lens must be strictly increasing")
        if len(self.prefill_time) != nb or any(len(r) != nl for r in self.prefill_time) or len(self.decode_step) != nb:
            raise ValueError(f"{self.key}: prefill_time must be [{nb}][{nl}] and decode_step [{nb}]")
        if any(t <= 0 for r in self.prefill_time for t in r) or any(t <= 0 for t in self.decode_step):
            raise ValueError(f"{self.key}: times must be > 0")

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.model, self.precision, int(self.tp), int(self.mps))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostEntry":
        return cls(**d)


@dataclass
class CostTable:
    entries: list[CostEntry]
    device: str = ""
    created: str = ""
    generator: str = ""
    notes: str = ""

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "device": self.device, "created": self.created,
                "generator": self.generator, "notes": self.notes,
                "entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        if d.get("format") != TABLE_FORMAT:
            raise ValueError(f"not a {TABLE_FORMAT} (format={d.get('format')!r})")
        if d.get("version") != TABLE_VERSION:
            raise ValueError(f"cost table version {d.get('version')!r} is not supported (want {TABLE_VERSION})")
        return cls([CostEntry.from_dict(e) for e in d["entries"]], d.get("device", ""), d.get("created", ""),
                   d.get("generator", ""), d.get("notes", ""))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        path = Path(path)
        if path.suffix == ".csv":
            return load_fineserve_csv(path)
        return cls.from_dict(json.loads(path.read_text()))

    def merged(self, other: "CostTable") -> "CostTable":
        """This table with `other`'s entries added (same key: other's wins)."""
        by = {e.key: e for e in self.entries}
        by.update({e.key: e for e in other.entries})
        return replace(self, entries=list(by.values()))


# FineServe CSV (apex-cost.csv) columns; its qformats map onto our precisions where one matches.
FINESERVE_CSV_COLUMNS = ("model", "qformat", "tp", "mps_percentage", "batch_size", "input_len", "output_len",
                         "seq_len", "prefill_time", "decode_time", "ttft", "tpot", "e2e")
QFORMAT_TO_PRECISION = {"org": "bf16", "fp8_kv8": "fp8", "qoq": "w4a8kv4"}
PRECISION_TO_QFORMAT = {v: k for k, v in QFORMAT_TO_PRECISION.items()}


def load_fineserve_csv(path: str | Path, device: str = "") -> CostTable:
    """Read a FineServe profile CSV. TTFT is `ttft` (or prefill_time), the decode step is
    decode_time / output_len. qformats without a counterpart here (awq, fp8) keep their own name."""
    import csv
    rows: dict[tuple, dict] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            prec = QFORMAT_TO_PRECISION.get(r["qformat"], r["qformat"])
            key = (r["model"], prec, int(r["tp"]), int(float(r["mps_percentage"])))
            d = rows.setdefault(key, {"pre": {}, "dec": {}, "out": int(r["output_len"])})
            b, L = int(r["batch_size"]), int(r["input_len"])
            ttft = float(r.get("ttft") or r["prefill_time"])
            d["pre"].setdefault((b, L), []).append(ttft)
            d["dec"].setdefault(b, []).append(float(r["decode_time"]) / int(r["output_len"]))
    entries = []
    for (m, p, tp, mps), d in rows.items():
        bs = sorted({b for b, _ in d["pre"]} & set(d["dec"]))
        ls = sorted({L for _, L in d["pre"]})
        bs = [b for b in bs if all((b, L) in d["pre"] for L in ls)]
        if not bs:
            continue
        entries.append(CostEntry(m, p, tp, bs, ls, [[statistics.mean(d["pre"][(b, L)]) for L in ls] for b in bs],
                                 [statistics.mean(d["dec"][b]) for b in bs], d["out"],
                                 statistics.mean(ls) + d["out"] / 2, mps, False, device,
                                 f"FineServe CSV {Path(path).name}"))
    return CostTable(entries, device, generator=f"load_fineserve_csv({Path(path).name})")


def to_fineserve_csv(table: CostTable, path: str | Path) -> Path:
    """Write FineServe's CSV columns (decode_time = decode_step * output_len)."""
    import csv
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FINESERVE_CSV_COLUMNS)
        for e in table.entries:
            q = PRECISION_TO_QFORMAT.get(e.precision, e.precision)
            for bi, b in enumerate(e.batch_sizes):
                for li, L in enumerate(e.input_lens):
                    pre, dec = e.prefill_time[bi][li], e.decode_step[bi] * e.output_len
                    w.writerow([e.model, q, e.tp, e.mps, b, L, e.output_len, L + e.output_len, pre, dec, pre,
                                e.decode_step[bi], pre + dec])
    return path


# ---------------------------------------------------------------------------------------------------
# One (model, precision, tp, mps): the functions placement and the simulator use
# ---------------------------------------------------------------------------------------------------

class CostProfile:
    """Interpolated costs of one cost entry."""

    def __init__(self, entry: CostEntry):
        self.entry = e = entry
        self.batches = [float(b) for b in e.batch_sizes]
        self._pre_tok = [statistics.mean(t / L for t, L in zip(row, e.input_lens)) for row in e.prefill_time]
        self._dec = [float(t) for t in e.decode_step]
        pts: dict[int, list[float]] = {}
        for b, row in zip(e.batch_sizes, e.prefill_time):
            for L, t in zip(e.input_lens, row):
                pts.setdefault(b * L, []).append(t)
        self._tok_x = sorted(pts)
        self._tok_y = [statistics.mean(pts[n]) for n in self._tok_x]
        self._dec1 = self.decode_step(1)

    @property
    def estimate(self) -> bool:
        return self.entry.estimate

    @property
    def tp(self) -> int:
        return self.entry.tp

    def prefill_per_token(self, batch: float = 1) -> float:
        return linear_interp(batch, self.batches, self._pre_tok)

    @property
    def ttft_per_token(self) -> float:
        """SAAB's linear TTFT model: seconds of prefill per batched token, at batch 1."""
        return self.prefill_per_token(1)

    def ttft_est(self, batch: float, input_len: float) -> float:
        return self.prefill_per_token(batch) * input_len

    def decode_step(self, batch: float) -> float:
        return max(1e-9, linear_interp(batch, self.batches, self._dec))

    def decode_time(self, batch: float, output_len: float) -> float:
        return self.decode_step(batch) * output_len

    def throughput(self, batch: float, input_len: float = AVG_INPUT_LEN, output_len: float = AVG_OUTPUT_LEN) -> float:
        """Requests/s one replica completes at this batch size (FineServe's thr(b))."""
        return batch / (self.ttft_est(batch, input_len) + self.decode_time(batch, output_len))

    def max_batch_for_ttft(self, slo: float, input_len: float = AVG_INPUT_LEN) -> int:
        """FineServe's slo_max_bs: floor of the batch whose estimated TTFT equals the SLO."""
        ys = _increasing([self.ttft_est(b, input_len) for b in self.batches])
        return int(math.floor(linear_interp(slo, ys, self.batches)))

    def min_batch_for_rate(self, rate: float, input_len: float = AVG_INPUT_LEN,
                           output_len: float = AVG_OUTPUT_LEN) -> int:
        """FineServe's rate_min_bs: ceil of the batch whose throughput equals the rate."""
        ys = _increasing([self.throughput(b, input_len, output_len) for b in self.batches])
        return int(math.ceil(linear_interp(rate, ys, self.batches) - 1e-9))

    def prefill_tokens_time(self, num_tokens: float) -> float:
        """A forward pass over `num_tokens` tokens (any mix of requests), from the grid's (b * L, time)
        points; never below one decode step (a pass reads every weight once)."""
        return max(self._dec1, linear_interp(num_tokens, self._tok_x, self._tok_y))

    def step_time(self, prefill_tokens: int, num_decode: int) -> float:
        """One engine step (the simulator's cost): decodes only -> decode_step(n); with prefill tokens
        -> max(the forward pass over all tokens, the decode step of the decoding sequences), i.e. the
        step is bound by compute (tokens) or by memory (weights + KV of the decodes), not their sum."""
        if prefill_tokens <= 0:
            return self.decode_step(num_decode) if num_decode > 0 else 0.0
        t = self.prefill_tokens_time(prefill_tokens + num_decode)
        return max(t, self.decode_step(num_decode)) if num_decode > 0 else t


class CostModel:
    """All entries of one or more tables; measured entries win over estimates with the same key."""

    def __init__(self, tables: CostTable | Iterable[CostTable] = ()):
        tables = [tables] if isinstance(tables, CostTable) else list(tables)
        self.tables = tables
        self._entries: dict[tuple, CostEntry] = {}
        for t in tables:
            for e in t.entries:
                old = self._entries.get(e.key)
                if old is None or (old.estimate and not e.estimate) or old.estimate == e.estimate:
                    self._entries[e.key] = e
        self._profiles: dict[tuple, CostProfile] = {}

    @classmethod
    def load(cls, *paths: str | Path) -> "CostModel":
        return cls([CostTable.load(p) for p in paths])

    @classmethod
    def default(cls, device: str = "h100") -> "CostModel":
        """Every shipped table for a device tag (`h100`: the roofline estimates + any measured
        `h100-*.json`; `cpu`: the measured SmolLM2 table)."""
        paths = sorted(TABLES_DIR.glob(f"{device}-*.json"))
        if not paths:
            raise FileNotFoundError(f"no cost tables for device {device!r} in {TABLES_DIR}")
        return cls.load(*paths)

    def _key(self, model: str, precision: str, tp: int, mps: int) -> tuple | None:
        for m in (model, ALIASES.get(model)):
            if m is not None and (m, precision, int(tp), int(mps)) in self._entries:
                return (m, precision, int(tp), int(mps))
        return None

    def has(self, model: str, precision: str, tp: int = 1, mps: int = 100) -> bool:
        return self._key(model, precision, tp, mps) is not None

    def entry(self, model: str, precision: str, tp: int = 1, mps: int = 100) -> CostEntry:
        k = self._key(model, precision, tp, mps)
        if k is None:
            have = sorted({(m, p, t) for (m, p, t, _) in self._entries if m in (model, ALIASES.get(model))})
            raise KeyError(f"no cost entry for {model} {precision} tp={tp} mps={mps}; have {have}")
        return self._entries[k]

    def profile(self, model: str, precision: str, tp: int = 1, mps: int = 100) -> CostProfile:
        e = self.entry(model, precision, tp, mps)
        p = self._profiles.get(e.key)
        if p is None:
            p = self._profiles[e.key] = CostProfile(e)
        return p

    def tps(self, model: str, precision: str, mps: int = 100) -> list[int]:
        names = {model, ALIASES.get(model)}
        return sorted({t for (m, p, t, s) in self._entries if m in names and p == precision and s == mps})

    def entries(self) -> list[CostEntry]:
        return list(self._entries.values())

    def describe(self) -> list[dict]:
        """One line per entry for results JSONs: key, estimate flag, source, bs1 numbers."""
        out = []
        for e in self._entries.values():
            p = self.profile(e.model, e.precision, e.tp, e.mps)
            out.append({"model": e.model, "precision": e.precision, "tp": e.tp, "mps": e.mps,
                        "estimate": e.estimate, "device": e.device, "source": e.source,
                        "ttft_per_token_s": p.ttft_per_token, "decode_step_bs1_s": p.decode_step(1),
                        "decode_step_bs32_s": p.decode_step(32)})
        return out


# ---------------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """Ceilings (DESIGN.md, measured on the lent H100). TP links: NVLink ring all-reduce bus bandwidth
    (assumed 350 GB/s) plus a per-all-reduce latency fitted below."""
    name: str = "H100-SXM-80GB"
    memory_bytes: float = 80 * GiB
    hbm_bytes_per_s: float = 3.0e12
    peak_flops: dict = field(default_factory=lambda: {"bf16": 722e12, "fp8": 1281e12, "w4a8kv4": 1281e12})
    link_bytes_per_s: float = 350e9


H100 = Hardware()


@dataclass(frozen=True)
class PhaseFit:
    """One phase (prefill or decode) of one precision: t = overhead + bytes / (BW * bw_eff) + flops /
    (peak * compute_eff)."""
    overhead_s: float
    bw_eff: float
    compute_eff: float

    def time(self, nbytes: float, flops: float, precision: str, hw: Hardware) -> float:
        return self.overhead_s + nbytes / (hw.hbm_bytes_per_s * self.bw_eff) + flops / (hw.peak_flops[precision] * self.compute_eff)


@dataclass(frozen=True)
class Calibration:
    prefill: PhaseFit
    decode: PhaseFit
    source: str = ""


#: The measured table of our engine on the lent H100 that the roofline is calibrated on.
MEASURED_TABLE = TABLES_DIR / "h100-measured.json"

# FineServe's apex-cost.csv at MPS 100 %, input 512, output 256 (papers.md 1.9; vLLM 0.9.1 / QServe on
# H100): (shape, our precision, tp, TTFT bs1, TTFT bs32, TPOT bs1, TPOT bs32), seconds. Only its 70B TP4
# bf16 TPOT at batch 1 is used (the all-reduce latency, which one GPU cannot measure); the others are
# compared with our engine in `roofline_validation` (vLLM/QServe, not ours).
APEX_REFERENCE = (
    ("llama-3-8b-shape", "bf16", 1, 0.016, 0.378, 0.0080, 0.0096),     # llama-3.1-8b org
    ("llama-3-8b-shape", "fp8", 1, 0.013, 0.299, 0.0102, 0.0111),      # llama-3.1-8b fp8_kv8
    ("llama-3-8b-shape", "w4a8kv4", 1, 0.042, 0.511, 0.0082, 0.0112),  # llama-3-8b qoq
    ("qwen3-32b-shape", "bf16", 2, 0.050, 0.852, 0.0201, 0.0226),
    ("qwen3-32b-shape", "fp8", 2, 0.042, 0.689, 0.0246, 0.0274),
    ("llama-3-70b-shape", "bf16", 4, 0.054, 1.110, 0.0225, 0.0245),
    ("llama-3-70b-shape", "fp8", 4, 0.046, 0.814, 0.0272, 0.0290),
)
APEX_INPUT, APEX_OUTPUT = 512, 256


def _step_counts(cfg: LlamaConfig, precision: str, tp: int, prefill: bool, batch: int, tokens: int,
                 ctx: float) -> tuple[float, float, float]:
    """(bytes, flops, all-reduce bytes) of one step on one GPU of the replica.

    prefill: `batch` requests of `tokens` tokens each (causal attention, logits for the last token
    of each); decode: `batch` sequences, one token each, `ctx` tokens of context."""
    lin = linear_params(cfg)
    head = cfg.vocab_size * cfg.hidden_size
    w = (lin * WEIGHT_BYTES[precision] + head * 2.0) / tp
    kvt = kv_bytes_per_token(cfg, precision, tp)
    att = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim / tp          # flops per (query, key) pair
    if prefill:
        n = batch * tokens
        flops = 2 * lin / tp * n + 2 * head / tp * batch + att * batch * tokens * (tokens + 1) / 2
        nbytes = w + kvt * n + 2 * n * cfg.hidden_size * 2 * cfg.num_layers / 64   # weights, KV write, ~activations
    else:
        n = batch
        flops = 2 * (lin + head) / tp * n + att * n * ctx
        nbytes = w + kvt * n * (ctx + 1)
    return nbytes, flops, (n * cfg.hidden_size * 2 if tp > 1 else 0.0)


def roofline_time(cfg: LlamaConfig, precision: str, tp: int, prefill: bool, batch: int, tokens: int = 1,
                  ctx: float = 0.0, cal: Calibration | None = None, hw: Hardware = H100,
                  allreduce_latency_s: float | None = None) -> float:
    cal = cal or CALIBRATION[precision]
    lat = ALLREDUCE_LATENCY_S if allreduce_latency_s is None else allreduce_latency_s
    nbytes, flops, ar = _step_counts(cfg, precision, tp, prefill, batch, tokens, ctx)
    t = (cal.prefill if prefill else cal.decode).time(nbytes, flops, precision, hw)
    if tp > 1:                     # two all-reduces per layer (attention out, MLP out), ring algorithm
        t += 2 * cfg.num_layers * (lat + 2 * (tp - 1) / tp * ar / hw.link_bytes_per_s)
    return t


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 (tiny active-set loop; 3 unknowns)."""
    free = list(range(A.shape[1]))
    x = np.zeros(A.shape[1])
    while free:
        sol, *_ = np.linalg.lstsq(A[:, free], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[free] = sol
            return x
        free.pop(int(np.argmin(sol)))
    return x


def _measured_points(e: CostEntry, prefill: bool) -> list[tuple[float, float, float]]:
    """(bytes, flops, seconds) of every grid point of a measured TP-1 entry, for one phase."""
    cfg = resolve_shape(e.model)
    if prefill:
        return [(*_step_counts(cfg, e.precision, 1, True, b, L, 0.0)[:2], e.prefill_time[i][j])
                for i, b in enumerate(e.batch_sizes) for j, L in enumerate(e.input_lens)]
    return [(*_step_counts(cfg, e.precision, 1, False, b, 1, e.decode_ctx)[:2], e.decode_step[i])
            for i, b in enumerate(e.batch_sizes)]


def _fit_phase(points: Sequence[tuple[float, float, float]], precision: str, hw: Hardware) -> PhaseFit:
    """Non-negative least squares of t = o + a·bytes + c·flops on relative residuals (every grid
    point weighs the same, from a batch-1 step of a few ms to a 2 s prefill)."""
    A = np.array([[1.0 / t, nb / t, fl / t] for nb, fl, t in points])
    o, a, c = _nnls(A, np.ones(len(points)))
    bw = 1.0 / (a * hw.hbm_bytes_per_s) if a > 0 else math.inf       # inf: that term is not needed
    ce = 1.0 / (c * hw.peak_flops[precision]) if c > 0 else math.inf
    return PhaseFit(round(float(o), 7), round(float(bw), 4), round(float(ce), 4))


def fit_calibration(entries: Sequence[CostEntry], precision: str, hw: Hardware = H100) -> Calibration:
    """Fit one precision's prefill and decode to measured TP-1 entries of our engine (every shape given)."""
    es = [e for e in entries if e.precision == precision and e.tp == 1 and not e.estimate]
    if not es:
        raise ValueError(f"no measured TP-1 entries for {precision}")
    pts = {ph: [p for e in es for p in _measured_points(e, ph)] for ph in (True, False)}
    return Calibration(_fit_phase(pts[True], precision, hw), _fit_phase(pts[False], precision, hw),
                       f"fitted to our engine on the H100 ({', '.join(sorted(e.model for e in es))}; "
                       f"{MEASURED_TABLE.name})")


def _fit() -> tuple[dict[str, Calibration], float]:
    measured = CostTable.load(MEASURED_TABLE).entries
    cal = {p: fit_calibration(measured, p) for p in PRECISIONS}
    # all-reduce latency from FineServe's 70B bf16 TP4 TPOT at batch 1 (no multi-GPU machine here)
    shape, prec, tp, _, _, d1, _ = next(r for r in APEX_REFERENCE if r[0] == "llama-3-70b-shape" and r[1] == "bf16")
    cfg = resolve_shape(shape)
    base = roofline_time(cfg, prec, tp, False, 1, ctx=APEX_INPUT + APEX_OUTPUT / 2, cal=cal[prec],
                         allreduce_latency_s=0.0)
    return cal, round(float(max(0.0, (d1 - base) / (2 * cfg.num_layers))), 8)


#: Per precision, fitted to our engine's measured H100 table (`h100-measured.json`); the roofline
#: fills what one H100 cannot measure (TP > 1, weights beyond its memory) from these.
CALIBRATION, ALLREDUCE_LATENCY_S = _fit()


def _entry_error(e: CostEntry, cal: Calibration) -> dict:
    """Relative errors of the roofline with `cal` against a measured entry's grid."""
    cfg = resolve_shape(e.model)
    pre = [roofline_time(cfg, e.precision, 1, True, b, L, cal=cal) / e.prefill_time[i][j] - 1
           for i, b in enumerate(e.batch_sizes) for j, L in enumerate(e.input_lens)]
    dec = [roofline_time(cfg, e.precision, 1, False, b, ctx=e.decode_ctx, cal=cal) / e.decode_step[i] - 1
           for i, b in enumerate(e.batch_sizes)]
    return {"prefill_max_abs_rel_error": round(max(map(abs, pre)), 3),
            "prefill_mean_abs_rel_error": round(statistics.mean(map(abs, pre)), 3),
            "decode_max_abs_rel_error": round(max(map(abs, dec)), 3),
            "decode_mean_abs_rel_error": round(statistics.mean(map(abs, dec)), 3)}


def roofline_validation() -> list[dict]:
    """Leave one shape out: for each measured entry, the roofline fitted to the OTHER shapes of its
    precision against its grid (how well the fit carries to a shape it has not seen, as it must for
    what one H100 cannot measure). Then FineServe's apex rows (vLLM/QServe on an H100, not our engine) for comparison."""
    measured = CostTable.load(MEASURED_TABLE).entries
    out = []
    for e in measured:
        others = [o for o in measured if o.precision == e.precision and o.model != e.model]
        out.append({"shape": e.model, "precision": e.precision, "tp": 1, "fitted_on": sorted(o.model for o in others),
                    **_entry_error(e, fit_calibration(others, e.precision))})
    for shape, prec, tp, t1, t32, d1, d32 in APEX_REFERENCE:
        cfg, ctx = resolve_shape(shape), APEX_INPUT + APEX_OUTPUT / 2
        pred = (roofline_time(cfg, prec, tp, True, 1, APEX_INPUT), roofline_time(cfg, prec, tp, True, 32, APEX_INPUT),
                roofline_time(cfg, prec, tp, False, 1, ctx=ctx), roofline_time(cfg, prec, tp, False, 32, ctx=ctx))
        out.append({"shape": shape, "precision": prec, "tp": tp,
                    "apex": "FineServe apex-cost.csv (vLLM/QServe)" + (", TPOT bs1 fitted (all-reduce latency)"
                                                                      if (shape, prec) == ("llama-3-70b-shape", "bf16") else ""),
                    **{f"{k}_apex": m for k, m in zip(("ttft_bs1", "ttft_bs32", "tpot_bs1", "tpot_bs32"), (t1, t32, d1, d32))},
                    **{f"{k}_roofline": round(p, 5) for k, p in zip(("ttft_bs1", "ttft_bs32", "tpot_bs1", "tpot_bs32"), pred)}})
    return out


ROOFLINE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROOFLINE_INPUT_LENS = (256, 512)
ROOFLINE_OUTPUT_LEN = 256


def roofline_entry(model: str, precision: str, tp: int, *, hw: Hardware = H100,
                   batches: Sequence[int] = ROOFLINE_BATCHES, input_lens: Sequence[int] = ROOFLINE_INPUT_LENS,
                   output_len: int = ROOFLINE_OUTPUT_LEN, cfg: LlamaConfig | None = None) -> CostEntry:
    cfg = cfg or resolve_shape(model)
    ctx = statistics.mean(input_lens) + output_len / 2
    pre = [[roofline_time(cfg, precision, tp, True, b, L, hw=hw) for L in input_lens] for b in batches]
    dec = [roofline_time(cfg, precision, tp, False, b, ctx=ctx, hw=hw) for b in batches]
    c = CALIBRATION[precision]
    return CostEntry(model, precision, tp, list(batches), list(input_lens), pre, dec, output_len, ctx, 100, True,
                     hw.name, "roofline",
                     f"ESTIMATE (roofline): {c.source}; prefill {asdict(c.prefill)}, decode {asdict(c.decode)}; "
                     f"all-reduce {ALLREDUCE_LATENCY_S * 1e6:.1f} us (fitted to FineServe's apex 70B TP4)",
                     {"weight_bytes_per_gpu": weight_bytes(cfg, precision) / tp,
                      "kv_bytes_per_token_per_gpu": kv_bytes_per_token(cfg, precision, tp)})


ROOFLINE_SHAPES = ("llama-2-7b-shape", "llama-3-8b-shape", "llama-2-13b-shape", "llama-30b-shape",
                   "llama-65b-shape", "llama-3-70b-shape", "qwen3-32b-shape")


def build_roofline_table(shapes: Sequence[str] = ROOFLINE_SHAPES, precisions: Sequence[str] = PRECISIONS,
                         tps: Sequence[int] = (1, 2, 4, 8), hw: Hardware = H100) -> CostTable:
    entries = []
    for s in shapes:
        cfg = resolve_shape(s)
        for p in precisions:
            for tp in tps:
                if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
                    continue
                entries.append(roofline_entry(s, p, tp, hw=hw, cfg=cfg))
    return CostTable(entries, hw.name, _dt.date.today().isoformat(), "fineserve_core.cost_model.build_roofline_table",
                     "ALL ENTRIES ARE ESTIMATES (roofline calibrated on FineServe's published H100 profile), "
                     "not measurements of our engine. Validation: roofline_validation().")


# ---------------------------------------------------------------------------------------------------
# Profiler (real engine)
# ---------------------------------------------------------------------------------------------------

def profile(engine_factory: Callable[[], "object"], batch_grid: Sequence[int], input_lens: Sequence[int],
            output_len: int = 8, *, model: str | None = None, precision: str | None = None, tp: int = 1,
            mps: int = 100, repeats: int = 1, seed: int = 0, warmup: bool = True,
            progress: Callable[[str], None] | None = None) -> CostEntry:
    """Measure one cost entry with the real Engine (`engine_factory()` builds it once).

    For each batch size b and input length L: b requests of L random tokens (greedy, ignore_eos,
    `output_len` tokens) are added together; prefill_time = wall time until every one has its first
    token (the scheduler's limits are raised so that is one step), decode_step = mean wall time of the
    following steps (median over `repeats`). The entry is `estimate: false`."""
    from fineserve_core.results import device_name
    from fineserve_core.sampling import SamplingParams
    batch_grid, input_lens = sorted(set(batch_grid)), sorted(set(input_lens))
    if output_len < 2:
        raise ValueError("output_len must be >= 2 (at least one decode step)")
    eng = engine_factory()
    sch = eng.scheduler
    sch.max_num_seqs = max(sch.max_num_seqs, max(batch_grid))
    sch.max_num_batched_tokens = max(sch.max_num_batched_tokens, max(batch_grid) * (max(input_lens) + 1))
    vocab = eng.source.config.vocab_size
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    counter = [0]

    def once(b: int, L: int) -> tuple[float, float]:
        seqs = []
        for _ in range(b):
            counter[0] += 1
            seqs.append(eng.add_request(f"__profile_{counter[0]}", [rng.randrange(vocab) for _ in range(L)], params))
        sync()
        t0 = time.perf_counter()
        while any(s.first_token_time is None for s in seqs):
            eng.step()
        sync()
        pre = time.perf_counter() - t0
        steps = []
        while any(not s.finished for s in seqs):
            t = time.perf_counter()
            eng.step()
            sync()
            steps.append(time.perf_counter() - t)
        return pre, statistics.mean(steps)

    if warmup:
        once(1, min(input_lens))
        once(min(2, max(batch_grid)), min(input_lens))
    pre_t: list[list[float]] = []
    dec_t: list[float] = []
    for b in batch_grid:
        row, decs = [], []
        for L in input_lens:
            runs = [once(b, L) for _ in range(repeats)]
            row.append(statistics.median(r[0] for r in runs))
            decs.append(statistics.median(r[1] for r in runs))
            if progress:
                progress(f"b={b} L={L}: prefill {row[-1] * 1e3:.1f} ms, decode step {decs[-1] * 1e3:.2f} ms")
        pre_t.append(row)
        dec_t.append(statistics.mean(decs))
    name = model or eng.cfg.model
    return CostEntry(name, precision or eng.cfg.precision, tp, list(batch_grid), list(input_lens), pre_t, dec_t,
                     output_len, statistics.mean(input_lens) + output_len / 2, mps, False, device_name(),
                     "measured: fineserve_core.cost_model.profile",
                     f"dtype {eng.dtype}, repeats {repeats}, torch {torch.__version__}")


def profile_table(entries: Sequence[CostEntry], notes: str = "") -> CostTable:
    from fineserve_core.results import device_name
    return CostTable(list(entries), device_name(), _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "fineserve profile", notes)


def mps_share(percent: int) -> None:
    """Run this process's CUDA work as an MPS client limited to `percent` of the SMs (FineServe profiles
    shares of 20-100 %). Needs a running MPS control daemon, and must come before CUDA starts here."""
    import os
    if not 1 <= percent <= 100:
        raise ValueError(f"an MPS share is 1-100 %, not {percent}")
    if percent == 100:
        return
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if not (pipe / "control").exists():
        raise RuntimeError(f"--mps {percent}: no MPS control daemon at {pipe} (start `nvidia-cuda-mps-control -d`, "
                           "or set CUDA_MPS_PIPE_DIRECTORY to its pipe directory)")
    if torch.cuda.is_initialized():
        raise RuntimeError("--mps must be set before this process starts CUDA")
    os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(percent)


def cmd_profile(args) -> int:
    from fineserve_core.config import EngineConfig
    from fineserve_core.engine import Engine
    from fineserve_core.model_source import resolve_model
    from fineserve_core.results import device_tag
    mps_share(args.mps)
    max_tokens = max(args.batch) * (max(args.input_len) + args.output_len + 1)
    if args.kv_cache_mib:
        kv_bytes = args.kv_cache_mib << 20
    else:   # what the grid's largest batch holds, not the engine's default (90 % of the GPU), which
        # leaves a one-step prefill of max(batch) x max(input) tokens no room for its activations
        kv_bytes = int(1.25 * max_tokens * kv_bytes_per_token(resolve_model(args.model).config, args.precision)) + (256 << 20)

    def factory():
        return Engine(EngineConfig(model=args.model, precision=args.precision, dtype=args.dtype, device=args.device,
                                   max_num_seqs=max(args.batch), kv_cache_bytes=kv_bytes,
                                   max_num_batched_tokens=max(2048, max(args.batch) * (max(args.input_len) + 1))))

    t0 = time.perf_counter()
    entry = profile(factory, args.batch, args.input_len, args.output_len, model=args.name or args.model,
                    precision=args.precision, mps=args.mps, repeats=args.repeats,
                    progress=None if args.quiet else (lambda s: print(s, file=sys.stderr)))
    out = Path(args.out) if args.out else TABLES_DIR / f"{device_tag()}-{Path(str(args.model)).name}.json"
    table = profile_table([entry])
    if out.exists() and not args.replace:
        table = CostTable.load(out).merged(table)
    table.save(out)
    print(f"[profiled {entry.model} {entry.precision} in {time.perf_counter() - t0:.1f}s: TTFT/token "
          f"{CostProfile(entry).ttft_per_token * 1e3:.3f} ms, decode step bs1 {entry.decode_step[0] * 1e3:.2f} ms]\n{out}",
          file=sys.stderr)
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `fineserve profile` on a `fineserve` argparse subparsers object (one line in cli.py:
    `from fineserve_core.cost_model import add_cli as add_profile_cli; add_profile_cli(sub)`)."""
    p = subparsers.add_parser("profile", help="measure a cost table (prefill/decode time over a batch grid) "
                                              "with the real engine")
    p.add_argument("--model", default="smollm2-135m", help="known name, shape preset or model directory")
    p.add_argument("--name", help="model name in the table (default: --model)")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--input-len", type=int, nargs="+", default=[256, 512])
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--mps", type=int, default=100, help="SM share in %% as an MPS client (needs an MPS daemon; "
                                                        "the entry is keyed by it, as FineServe's profiles)")
    p.add_argument("--kv-cache-mib", type=int, help="private KV buffer size (default: 1.25 x what the largest "
                   "batch of the grid holds)")
    p.add_argument("--out", help="table path (default: fineserve_core/cost_tables/<device>-<model>.json; "
                                 "entries are merged into an existing file)")
    p.add_argument("--replace", action="store_true", help="overwrite --out instead of merging")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_profile)
    return p


def _main(argv: list[str] | None = None) -> int:
    """`python -m fineserve_core.cost_model roofline|validate|profile ...` until the CLI is wired."""
    ap = argparse.ArgumentParser(prog="python -m fineserve_core.cost_model")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("roofline", help="write the roofline estimate table")
    r.add_argument("--out", default=str(TABLES_DIR / "h100-roofline.json"))
    sub.add_parser("validate", help="print roofline vs FineServe's published H100 numbers")
    add_cli(sub)
    args = ap.parse_args(argv)
    if args.cmd == "roofline":
        print(build_roofline_table().save(args.out))
        return 0
    if args.cmd == "validate":
        print(json.dumps({"calibration": {p: asdict(c) for p, c in CALIBRATION.items()},
                          "allreduce_latency_s": ALLREDUCE_LATENCY_S, "rows": roofline_validation()}, indent=1))
        return 0
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(_main())
