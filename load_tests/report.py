"""Load-test metrics (vLLM `bench serve` names where they match), SLO attainment, plots and Markdown.

Per rate: completed, total_input_tokens, total_output_tokens, request_throughput, output_throughput,
total_token_throughput, request_goodput, {mean,median,std,p50,p90,p99}_{ttft,tpot,itl,e2el}_ms as vLLM
defines them (TPOT = (e2e - TTFT) / (output tokens - 1); ITL = gaps between chunks; duration = first send
to last answer), over completed requests; TTFT also over requests cut by a time limit after their first
token. FineServe's SLO attainment = requests with TTFT <= the model's TTFT SLO / requests
sent (every refused, failed or timed-out request is a miss); `slo_attainment_ttft_tpot` also needs
TPOT <= TPOT SLO. request_goodput = requests meeting both / duration. KV: occupancy and fragmentation
samples of every GPU's slab manager over the run (`GpuSlabManager.snapshot`).

    python -m load_tests.report combine --out load_tests/results/e2e-h100.json A.json B.json C.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Iterable, Sequence

from load_tests.client import STATUSES, Result

GiB = 1 << 30


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated quantile q in [0, 1] (numpy's default method); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _dist(name: str, xs: Sequence[float]) -> dict:
    """vLLM's {mean,median,std,p90,p99}_<name>_ms over seconds `xs` (+ p50)."""
    ms = [x * 1e3 for x in xs]
    r = lambda v: None if v is None else round(v, 3)   # noqa: E731
    return {f"mean_{name}_ms": r(statistics.fmean(ms)) if ms else None,
            f"median_{name}_ms": r(statistics.median(ms)) if ms else None,
            f"std_{name}_ms": r(statistics.pstdev(ms)) if ms else None,
            **{f"p{q}_{name}_ms": r(percentile(ms, q / 100)) for q in (50, 90, 99)}}


def meets(r: Result, slo: dict) -> tuple[bool, bool]:
    """(TTFT within SLO, TTFT and TPOT within SLO) of one request; a refused or failed one meets neither,
    a cut one (time limit after its first token) at most the TTFT SLO."""
    ttft_ok = r.ttft is not None and r.ttft <= slo["ttft_s"]
    tpot = r.tpot
    return ttft_ok, ttft_ok and r.status == "ok" and (tpot is None or tpot <= slo["tpot_s"])


def summarize(results: Sequence[Result], slos: dict[str, dict], kv: Sequence[dict]) -> dict:
    """One rate's metrics over every request sent (`results`), with each tier's SLOs and the KV samples."""
    ok = [r for r in results if r.status == "ok"]
    ends = [r.sent + r.done for r in ok]
    starts = [r.sent for r in results if r.sent is not None]
    duration = (max(ends) - min(starts)) if ends else 0.0
    per = lambda x: round(x / duration, 4) if duration > 0 else 0.0   # noqa: E731
    met = [meets(r, slos[r.model]) for r in results]
    status = {s: sum(r.status == s for r in results) for s in STATUSES}
    codes: dict[str, int] = {}
    for r in results:
        if r.status in ("http_4xx", "http_5xx"):
            codes[str(r.code)] = codes.get(str(r.code), 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    n = len(results)
    s = {"sent": n, "completed": len(ok), "status": status, "http_codes": codes,
         "accounted": sum(status.values()) == n,
         "duration": round(duration, 3), "total_input_tokens": sum(r.input_len for r in ok),
         "total_output_tokens": out_tokens,
         "request_throughput": per(len(ok)), "output_throughput": per(out_tokens),
         "total_token_throughput": per(out_tokens + sum(r.input_len for r in ok)),
         "slo_attainment": round(sum(a for a, _ in met) / n, 4) if n else None,
         "slo_attainment_ttft_tpot": round(sum(b for _, b in met) / n, 4) if n else None,
         "request_goodput": per(sum(b for _, b in met)),
         **_dist("ttft", [r.ttft for r in results if r.ttft is not None]),
         **_dist("tpot", [r.tpot for r in ok if r.tpot is not None]),
         **_dist("itl", [x for r in ok for x in r.itl]),
         **_dist("e2el", [r.e2e for r in ok if r.e2e is not None])}
    s["per_model"] = {}
    for m in slos:
        rs = [(r, mt) for r, mt in zip(results, met) if r.model == m]
        if not rs:
            continue
        okm = [r for r, _ in rs if r.status == "ok"]
        s["per_model"][m] = {
            "sent": len(rs), "completed": len(okm),
            "refused_429": sum(r.code == 429 for r, _ in rs if r.status == "http_4xx"),
            "slo_attainment": round(sum(a for _, (a, _) in rs) / len(rs), 4),
            "slo_attainment_ttft_tpot": round(sum(b for _, (_, b) in rs) / len(rs), 4),
            "output_throughput": per(sum(r.output_tokens for r in okm)),
            "p50_ttft_ms": _ms(percentile([r.ttft for r in okm], 0.5)), "p99_ttft_ms": _ms(percentile([r.ttft for r in okm], 0.99)),
            "p50_tpot_ms": _ms(percentile([r.tpot for r in okm if r.tpot is not None], 0.5))}
    s["kv"] = kv_summary(kv)
    return s


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1e3, 3)


def kv_summary(samples: Sequence[dict]) -> dict:
    """Mean/max occupancy and waste over the samples (fractions of the KV buffer, summed over GPUs)."""
    if not samples:
        return {"samples": 0}
    by_t: dict[float, list[dict]] = {}
    for x in samples:
        by_t.setdefault(x["t"], []).append(x)
    rows = []
    for xs in by_t.values():
        buf = sum(x["buffer_bytes"] for x in xs)
        rows.append({k: sum(x[k] for x in xs) / buf for k in ("allocated_bytes", "live_bytes", "wasted_bytes",
                                                              "worst_wasted_bytes")})
    agg = lambda k, f: round(f(r[k] for r in rows), 4)   # noqa: E731
    return {"samples": len(rows), "buffer_bytes": sum(x["buffer_bytes"] for x in next(iter(by_t.values()))),
            "mean_allocated_fraction": agg("allocated_bytes", statistics.fmean),
            "max_allocated_fraction": agg("allocated_bytes", max),
            "mean_live_fraction": agg("live_bytes", statistics.fmean),
            "mean_wasted_fraction": agg("wasted_bytes", statistics.fmean),
            "max_wasted_fraction": agg("wasted_bytes", max),
            "mean_worst_wasted_fraction": agg("worst_wasted_bytes", statistics.fmean),
            "mean_wasted_gib": round(statistics.fmean(r["wasted_bytes"] for r in rows)
                                     * sum(x["buffer_bytes"] for x in next(iter(by_t.values()))) / GiB, 4)}


# ---------------------------------------------------------------------------------------------------
# one sweep (one policy): plots and Markdown
# ---------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_sweep(payload: dict, results: dict[float, Sequence[Result]], kv: Sequence[dict], stem: Path) -> list[Path]:
    """<stem>-attainment.png, <stem>-latency-cdf.png, <stem>-kv.png."""
    plt = _plt()
    rows, paths = payload["rates"], []
    label = f"{payload['config']} ({payload['policy']})"
    x = [r["rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(x, [r["slo_attainment"] for r in rows], "o-", label="TTFT SLO")
    ax.plot(x, [r["slo_attainment_ttft_tpot"] for r in rows], "s--", label="TTFT + TPOT SLO")
    ax.set(xlabel="request rate (req/s, all models)", ylabel="SLO attainment", ylim=(-0.02, 1.02), title=label)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, stem, "attainment"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for rate, rs in results.items():
        for ax, key in zip(axes, ("ttft", "tpot")):
            xs = sorted(getattr(r, key) * 1e3 for r in rs if getattr(r, key) is not None)
            if xs:
                ax.plot(xs, [(i + 1) / len(rs) for i in range(len(xs))], label=f"{rate:g} req/s")
    for ax, key in zip(axes, ("TTFT", "TPOT")):
        ax.set(xscale="log", xlabel=f"{key} (ms)", ylabel="fraction of requests sent", ylim=(0, 1.02),
               title=f"{key} CDF, {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(_save(fig, stem, "latency-cdf"))

    fig, ax = plt.subplots(figsize=(10, 3.8))
    if kv:
        for gpu in sorted({s["gpu"] for s in kv}):
            ss = [s for s in kv if s["gpu"] == gpu]
            t = [s["t"] for s in ss]
            for key, style in (("allocated_bytes", "-"), ("live_bytes", "-"), ("wasted_bytes", "--"),
                               ("worst_wasted_bytes", ":")):
                ax.plot(t, [s[key] / s["buffer_bytes"] for s in ss], style,
                        label=f"gpu{gpu} {key.replace('_bytes', '')}")
        for r in rows:
            ax.axvspan(r["t_start"], r["t_end"], alpha=0.07, color="C0")
            ax.text(r["t_start"], 1.0, f"{r['rate']:g}/s", fontsize=8, va="top")
    else:
        ax.text(0.5, 0.5, "no KV samples (app not launched by this run)", ha="center", transform=ax.transAxes)
    ax.set(xlabel="time (s)", ylabel="fraction of KV buffer", ylim=(0, 1.05), title=f"KV occupancy, {label}")
    ax.grid(alpha=0.3)
    if kv:
        ax.legend(fontsize=8, loc="upper right")
    paths.append(_save(fig, stem, "kv"))
    return paths


def _save(fig, stem: Path, what: str) -> Path:
    p = stem.with_name(f"{stem.name}-{what}.png")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    _plt().close(fig)
    return p


def _f(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown_sweep(payload: dict) -> str:
    rows = payload["rates"]
    out = [f"# Load test: {payload['config']}, policy {payload['policy']}", "",
           f"{payload['device']}; {payload['date']}; `{payload['command']}`", "",
           f"Workload: {payload['workload']['lengths']['kind']} lengths, arrivals CV {payload['workload']['cv']}, "
           f"{payload['workload']['duration_s']} s per rate, seed {payload['workload']['seed']}. SLOs: "
           + ", ".join(f"{m} TTFT {s['ttft_s'] * 1e3:.0f} ms / TPOT {s['tpot_s'] * 1e3:.0f} ms ({s['source']})"
                       for m, s in payload["slos"].items()), "",
           "| rate (req/s) | sent | ok | 429 | other 4xx | 5xx | timeout | cut | error | SLO att. | TTFT+TPOT att. "
           "| goodput (req/s) | output tok/s | p50 / p99 TTFT (ms) | p50 / p99 TPOT (ms) | KV alloc. mean | KV wasted mean |",
           "|" + "---|" * 17]
    for r in rows:
        st, c = r["status"], r["http_codes"]
        kv = r["kv"]
        out.append(f"| {r['rate']:g} | {r['sent']} | {st['ok']} | {c.get('429', 0)} | "
                   f"{st['http_4xx'] - c.get('429', 0)} | {st['http_5xx']} | {st['timeout']} | {st['cut']} | "
                   f"{st['error']} | "
                   f"{_f(r['slo_attainment'], '{:.1%}')} | {_f(r['slo_attainment_ttft_tpot'], '{:.1%}')} | "
                   f"{r['request_goodput']:.2f} | {r['output_throughput']:.1f} | "
                   f"{_f(r['p50_ttft_ms'])} / {_f(r['p99_ttft_ms'])} | {_f(r['p50_tpot_ms'])} / {_f(r['p99_tpot_ms'])} | "
                   f"{_f(kv.get('mean_allocated_fraction'), '{:.1%}')} | {_f(kv.get('mean_wasted_fraction'), '{:.1%}')} |")
    out += ["", "Every request is accounted for: " + ("yes" if all(r["accounted"] for r in rows) else "NO")]
    if payload.get("skipped_rates"):
        out.append(f"Skipped for the time limit: {payload['skipped_rates']} req/s")
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# several policies on the same workload
# ---------------------------------------------------------------------------------------------------

POLICY_ORDER = ("fineserve", "static", "prism")
ROW_KEYS = ("rate", "sent", "completed", "status", "http_codes", "slo_attainment", "slo_attainment_ttft_tpot",
            "request_goodput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms")
KV_KEYS = ("mean_wasted_fraction", "mean_wasted_gib", "mean_worst_wasted_fraction", "mean_allocated_fraction")


def rate_at(points: Iterable[tuple[float, float]], target: float = 0.5) -> float | None:
    """The rate (linearly interpolated) at which attainment first falls below `target`, going up the
    swept (rate, attainment) points; None if it never drops below the target in the swept range."""
    pts = sorted(points)
    for (s0, a0), (s1, a1) in zip(pts, pts[1:]):
        if a0 >= target > a1:
            return s0 + (s1 - s0) * (a0 - target) / (a0 - a1)
    if pts and pts[-1][1] >= target:
        return None
    return pts[0][0] if pts else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def combine(payloads: Sequence[dict]) -> dict:
    """Side-by-side table of several sweeps of the same config and rates, and FineServe vs static at the
    rate where static's attainment is nearest 50% (FineServe's headline comparison). A policy may come in
    several sweeps (e.g. a rate that did not fit one device call, run in the next); `runs` keeps each."""
    runs = sorted(payloads, key=lambda p: POLICY_ORDER.index(p["policy"]) if p["policy"] in POLICY_ORDER else 9)
    table = [{"policy": p["policy"], **{k: r[k] for k in ROW_KEYS}, **{f"kv_{k}": r["kv"].get(k) for k in KV_KEYS}}
             for p in runs for r in p["rates"]]
    seen = [(t["policy"], t["rate"]) for t in table]
    if len(set(seen)) != len(seen):
        raise ValueError(f"a policy has the same rate in two sweeps: {sorted({x for x in seen if seen.count(x) > 1})}")
    by_policy: dict[str, list[dict]] = {}
    for p in runs:
        by_policy.setdefault(p["policy"], []).append({k: v for k, v in p.items() if k not in ("requests", "kv_samples")})
    out = {"config": runs[0]["config"], "policies": list(by_policy), "table": table, "runs": by_policy}
    static = [t for t in table if t["policy"] == "static" and t["slo_attainment"] is not None]
    if static and "fineserve" in out["policies"]:
        ref = min(static, key=lambda t: abs(t["slo_attainment"] - 0.5))
        fs = next((t for t in table if t["policy"] == "fineserve" and t["rate"] == ref["rate"]), {})
        out["headline"] = {
            "rate": ref["rate"], "static_attainment": ref["slo_attainment"],
            "fineserve_attainment": fs.get("slo_attainment"),
            "static_near_50": abs(ref["slo_attainment"] - 0.5) <= 0.15,
            "attainment_ratio": _ratio(fs.get("slo_attainment"), ref["slo_attainment"]),
            "throughput_ratio": _ratio(fs.get("output_throughput"), ref["output_throughput"]),
            "note": "at the swept rate where static partition's attainment is nearest 50% (targets: >= 2.5x "
                    "attainment, >= 2x token throughput; FineServe reports 2.2x and 1.8x)"}
        # the simulator's figure too: the rate at which each policy falls to 50 % attainment, over static's
        r50 = {p: rate_at((t["rate"], t["slo_attainment"]) for t in table
                          if t["policy"] == p and t["slo_attainment"] is not None) for p in out["policies"]}
        out["rate_at_50pct"] = {p: None if v is None else round(v, 2) for p, v in r50.items()}
        st50, fs50 = r50.get("static"), r50.get("fineserve")
        if st50 and fs50:
            out["headline"]["rate_ratio_at_50pct"] = round(fs50 / st50, 2)
        elif st50:      # FineServe never fell to 50 %: its largest swept rate bounds the ratio from below
            top = max((t["rate"] for t in table if t["policy"] == "fineserve" and t["slo_attainment"] is not None),
                      default=None)
            if top is not None:
                out["headline"]["rate_ratio_at_50pct_at_least"] = round(top / st50, 2)
    return out


def plot_combined(c: dict, stem: Path) -> list[Path]:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, pol in enumerate(c["policies"]):
        rows, col = [t for t in c["table"] if t["policy"] == pol], f"C{i}"
        x = [t["rate"] for t in rows]
        axes[0].plot(x, [t["slo_attainment"] for t in rows], "o-", color=col, label=pol)
        axes[1].plot(x, [t["output_throughput"] for t in rows], "o-", color=col, label=pol)
        axes[2].plot(x, [t["kv_mean_wasted_fraction"] for t in rows], "o-", color=col, label=f"{pol} (any model)")
        axes[2].plot(x, [t["kv_mean_worst_wasted_fraction"] for t in rows], "x:", color=col,
                     label=f"{pol} (model that runs out)")
    for ax, yl in zip(axes, ("SLO attainment (TTFT)", "output tokens/s", "KV bytes wasted / buffer (mean)")):
        ax.set(xlabel="request rate (req/s, all models)", ylabel=yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.02, 1.02)
    fig.suptitle(f"{c['config']}: FineServe vs static partition vs Prism (same engine)")
    return [_save(fig, stem, "policies")]


def markdown_combined(c: dict) -> str:
    out = [f"# {c['config']}: policies compared", "",
           "| policy | rate (req/s) | sent | ok | 429 | SLO att. | TTFT+TPOT att. | output tok/s | p99 TTFT (ms) "
           "| KV wasted mean (any / model that runs out) | KV wasted GiB |", "|" + "---|" * 10]
    for t in c["table"]:
        out.append(f"| {t['policy']} | {t['rate']:g} | {t['sent']} | {t['completed']} | {t['http_codes'].get('429', 0)} | "
                   f"{_f(t['slo_attainment'], '{:.1%}')} | {_f(t['slo_attainment_ttft_tpot'], '{:.1%}')} | "
                   f"{t['output_throughput']:.1f} | {_f(t['p99_ttft_ms'])} | "
                   f"{_f(t['kv_mean_wasted_fraction'], '{:.1%}')} / {_f(t['kv_mean_worst_wasted_fraction'], '{:.1%}')} | "
                   f"{_f(t['kv_mean_wasted_gib'], '{:.2f}')} |")
    h = c.get("headline")
    if h:
        out += ["", f"At {h['rate']:g} req/s (static partition attainment {h['static_attainment']:.1%}): FineServe "
                    f"{_f(h['fineserve_attainment'], '{:.1%}')}, attainment x{_f(h['attainment_ratio'], '{:.2f}')}, "
                    f"token throughput x{_f(h['throughput_ratio'], '{:.2f}')} ({h['note']})."]
        if "rate_ratio_at_50pct" in h:
            out.append(f"Rate at which each policy falls to 50% attainment: FineServe x{h['rate_ratio_at_50pct']:.2f} "
                       f"static partition's.")
        elif "rate_ratio_at_50pct_at_least" in h:
            out.append(f"FineServe stays above 50% attainment at every swept rate: at least "
                       f"x{h['rate_ratio_at_50pct_at_least']:.2f} the rate at which static partition falls to 50%.")
        if not h["static_near_50"]:
            out.append("No swept rate brings static partition near 50% attainment (within 15 points): the "
                       "ratios above are not the headline comparison; sweep other rates.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("combine", help="compare load-test results of several policies")
    c.add_argument("results", nargs="+", help="results JSONs of `fineserve load-test`")
    c.add_argument("--out", required=True, help="combined JSON; .md and -policies.png go next to it")
    args = ap.parse_args(argv)
    from fineserve_core.results import write_result
    payloads = [json.loads(Path(p).read_text()) for p in args.results]
    combined = combine(payloads)
    out = write_result("load-test-combined", combined, args.out)
    plot_combined(combined, out.with_suffix(""))
    md = out.with_suffix(".md")
    md.write_text(markdown_combined(combined))
    print(md.read_text())
    print(f"[wrote {out}, {md}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
