"""Seeded multi-model workloads: arrivals, popularity and request lengths (shared by the simulator and the
load-test runner).

Arrivals (per model, independent streams):
  * Poisson at the model's rate, or a Gamma renewal process with coefficient of variation `cv`
    (cv = 1 is Poisson, cv > 1 bursty), as AlpaServe/MuxServe/FineServe's `workload_utils`:
    gaps ~ Gamma(shape = 1/cv^2, scale = cv^2/rate).
Popularity:
  * power law `rate_i ∝ (i+1)^-alpha` over the models in list order (MuxServe's `gen_power_law_dis`);
    `power_law_rates(n, alpha, max_rate=...)` scales so model 0 gets `max_rate` (MuxServe's
    `get_real_rate`: max rate 40 req/s x rate scale), `total_rate=...` so the rates sum to it.
  * rotating (`generate(..., rotate=P)`): every P seconds the rates move one model down the list (model
    i takes model i-1's rate, the first the last's), so the popular model changes while the total stays:
    the load shift a partition sized for the mean rates cannot follow.
Lengths:
  * "sharegpt": ShareGPT/LMSYS-like, lognormal input and output lengths, sigma 1.0, fitted so the 95th
    percentiles are FineServe's LMSYS-Chat p95s (903 input / 631 output tokens, the numbers its placement
    code sizes with). That gives medians ~174 / ~122 and means ~287 / ~201 tokens. Then ShareGPT's
    filter as FineServe/vLLM apply it (`sample_requests`): at least 4 tokens each, input <= 2048,
    input + output <= 4096 (a sample outside is redrawn). The same fit as `kv_trace.SHAREGPT_LENGTHS`
    (shared constants). No dataset is downloaded: this is a synthetic sampler; sigma = 1.0 is our
    assumption (the p95s are published, the spread is not).
  * "fixed": every request has the same input/output length (microbenchmarks).

Everything is seeded: the same (seed, models, rates, duration) gives the same requests, and each model
draws from its own stream (`numpy.random.default_rng([seed, model_index])`), so adding a model does
not change the other models' requests.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fineserve_core.kv_trace import SHAREGPT_P95, SHAREGPT_SIGMA

Z95 = 1.6448536269514722          # standard normal 95th percentile


@dataclass(frozen=True, slots=True)
class Request:
    rid: int                      # index in arrival order
    model: str
    arrival: float                # seconds from the start
    input_len: int
    output_len: int


@dataclass(frozen=True, slots=True)
class LengthSampler:
    """Request lengths: kind "sharegpt" (lognormal, p95 fitted) or "fixed"."""
    kind: str = "sharegpt"
    input_p95: float = SHAREGPT_P95[0]
    output_p95: float = SHAREGPT_P95[1]
    sigma: float = SHAREGPT_SIGMA
    min_len: int = 4
    max_input: int = 2048
    max_total: int = 4096
    fixed_input: int = 512
    fixed_output: int = 256

    def __post_init__(self):
        if self.kind not in ("sharegpt", "fixed"):
            raise ValueError(f"unknown length distribution {self.kind!r} (sharegpt or fixed)")

    @classmethod
    def fixed(cls, input_len: int, output_len: int) -> "LengthSampler":
        return cls("fixed", fixed_input=input_len, fixed_output=output_len)

    @property
    def mu_in(self) -> float:
        return math.log(self.input_p95) - Z95 * self.sigma

    @property
    def mu_out(self) -> float:
        return math.log(self.output_p95) - Z95 * self.sigma

    def mean(self) -> tuple[float, float]:
        """Means before filtering (lognormal: exp(mu + sigma^2/2))."""
        if self.kind == "fixed":
            return float(self.fixed_input), float(self.fixed_output)
        s2 = self.sigma ** 2 / 2
        return math.exp(self.mu_in + s2), math.exp(self.mu_out + s2)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "fixed":
            return np.full(n, self.fixed_input, dtype=np.int64), np.full(n, self.fixed_output, dtype=np.int64)
        ins, outs = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        while len(ins) < n:
            k = max(16, int((n - len(ins)) * 1.1) + 8)
            a = np.rint(rng.lognormal(self.mu_in, self.sigma, k)).astype(np.int64)
            b = np.rint(rng.lognormal(self.mu_out, self.sigma, k)).astype(np.int64)
            ok = (a >= self.min_len) & (b >= self.min_len) & (a <= self.max_input) & (a + b <= self.max_total)
            ins, outs = np.concatenate([ins, a[ok]]), np.concatenate([outs, b[ok]])
        return ins[:n], outs[:n]

    def describe(self) -> dict:
        d = {"kind": self.kind}
        if self.kind == "fixed":
            d.update(input_len=self.fixed_input, output_len=self.fixed_output)
        else:
            mi, mo = self.mean()
            d.update(distribution="lognormal", sigma=self.sigma, input_p95=self.input_p95,
                     output_p95=self.output_p95, input_median=round(math.exp(self.mu_in), 1),
                     output_median=round(math.exp(self.mu_out), 1), input_mean_unfiltered=round(mi, 1),
                     output_mean_unfiltered=round(mo, 1), min_len=self.min_len, max_input=self.max_input,
                     max_total=self.max_total,
                     source="FineServe's LMSYS-Chat p95s (903/631); sigma 1.0 assumed")
        return d


def power_law_weights(n: int, alpha: float) -> list[float]:
    """(i+1)^-alpha for i < n, normalized to sum 1 (MuxServe's gen_power_law_dis)."""
    w = [(i + 1) ** (-alpha) for i in range(n)]
    s = sum(w)
    return [x / s for x in w]


def power_law_rates(n: int, alpha: float, *, max_rate: float | None = None,
                    total_rate: float | None = None) -> list[float]:
    """Per-model rates ∝ (i+1)^-alpha: model 0 gets `max_rate`, or the rates sum to `total_rate`."""
    if (max_rate is None) == (total_rate is None):
        raise ValueError("give exactly one of max_rate and total_rate")
    w = power_law_weights(n, alpha)
    if max_rate is not None:
        return [max_rate * x / w[0] for x in w]
    return [total_rate * x for x in w]


def arrival_times(rng: np.random.Generator, rate: float, duration: float, cv: float = 1.0,
                  start: float = 0.0) -> np.ndarray:
    """Gamma renewal arrivals in [start, start + duration): mean gap 1/rate, gap CV `cv` (1 = Poisson)."""
    if rate <= 0 or duration <= 0:
        return np.empty(0)
    if cv <= 0:
        return start + np.arange(1, int(rate * duration) + 1) / rate
    shape, scale = 1.0 / (cv * cv), cv * cv / rate
    out, t = [], start
    while True:
        k = max(16, int(rate * (start + duration - t) * 1.2) + 16)
        gaps = rng.gamma(shape, scale, k)
        ts = t + np.cumsum(gaps)
        out.append(ts[ts < start + duration])
        if ts[-1] >= start + duration:
            break
        t = ts[-1]
    return np.concatenate(out)


def rotate_period(s: str) -> float:
    """argparse type of `--rotate`: seconds > 0 (the load test and the simulator refuse others before
    anything starts)."""
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {s!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {s!r}")
    return x


def generate(rates: Mapping[str, float], duration: float, *, seed: int = 0, cv: float | Mapping[str, float] = 1.0,
             lengths: LengthSampler | Mapping[str, LengthSampler] = LengthSampler(),
             rotate: float | None = None) -> list[Request]:
    """All models' requests over `duration` seconds, sorted by arrival (ties by model order). `rotate`:
    seconds between rotations of the rates over the models (module doc); None keeps them fixed."""
    if rotate is not None and rotate <= 0:
        raise ValueError(f"rotate must be > 0 seconds, got {rotate}")
    values = list(rates.values())
    n = len(values)
    period = rotate or duration
    events: list[tuple[float, int, int, int, str]] = []
    for mi, m in enumerate(rates):
        rng = np.random.default_rng([seed, mi])
        c = cv[m] if isinstance(cv, Mapping) else cv
        ts = np.concatenate([np.empty(0)] + [
            arrival_times(rng, values[(mi - k) % n], min(period, duration - k * period), c, start=k * period)
            for k in range(math.ceil(duration / period))])
        ls = lengths[m] if isinstance(lengths, Mapping) else lengths
        ins, outs = ls.sample(rng, len(ts))
        events += [(float(t), mi, int(a), int(b), m) for t, a, b in zip(ts, ins, outs)]
    events.sort(key=lambda e: (e[0], e[1]))
    return [Request(i, m, t, a, b) for i, (t, _, a, b, m) in enumerate(events)]


def summarize(requests: Sequence[Request], duration: float) -> dict:
    """Per-model count, observed rate, mean lengths (for the results JSON)."""
    per: dict[str, dict] = {}
    for r in requests:
        d = per.setdefault(r.model, {"requests": 0, "input_tokens": 0, "output_tokens": 0})
        d["requests"] += 1
        d["input_tokens"] += r.input_len
        d["output_tokens"] += r.output_len
    for d in per.values():
        d["rate"] = round(d["requests"] / duration, 4)
        d["mean_input"] = round(d.pop("input_tokens") / d["requests"], 1)
        d["mean_output"] = round(d.pop("output_tokens") / d["requests"], 1)
    return per
