"""`fineserve load-test`: drive the real HTTP endpoints of the app with a seeded multi-model workload.

    fineserve load-test --config serve_configs/dev.yaml --rate 0.5,1,2 --duration 30
    fineserve load-test --config serve_configs/e2e-h100.yaml --policy static --rate-scale 1,2,4 --duration 40
    fineserve load-test --config serve_configs/dev.yaml --url http://127.0.0.1:18000 --rate 1 --duration 20

Without --url it starts the config's app on a private Ray cluster on 127.0.0.1 (app/launch.py; free
ports, its own temp dir) and stops it at the end; with --url it drives an app already running on this
machine (loopback only). Each tier of the config (`name:precision`, sent as `model`) gets its own arrival
stream (load_tests/workload.py): --rate R is the total req/s split in proportion to the config's `rate`s
(or a power law over the tiers with --alpha), --rate-scale S multiplies each tier's `rate`. Requests send
random token-id prompts of the sampled input length with max_tokens = the sampled output length and
ignore_eos, stream, and are timed per chunk. Bounded: --max-requests per rate, --request-timeout per
request, and everything still open --drain seconds after the last arrival is cut (counted as timeout).

SLOs per tier: the worker's own TTFT SLO (what SAAB schedules against; config `slo`), TPOT SLO from the
config or 5 x the single-request TPOT that a warm-up probe measures (FineServe's placement default).
With --url the TTFT SLO is the config's ttft_ms or ttft_scale x the probe's TTFT per prompt token x 903.
Results: load_tests/results/load-test-<config>-<policy>-<device>.json (or --out), next to it a Markdown
summary and PNG plots (attainment vs rate, latency CDFs, KV occupancy over time).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import get_args

import numpy as np

from app.config import LocalQueue

from load_tests.client import Result, check_loopback, send
from load_tests.report import markdown_sweep, plot_sweep, summarize
from load_tests.workload import LengthSampler, generate, power_law_weights, rotate_period
from load_tests.workload import summarize as workload_summary

SLO_LEN = 903            # the worker's TTFT SLO reference length (app/worker.py)
TPOT_SCALE = 5.0         # TPOT SLO = 5 x single-request TPOT (fineserve_core/placement.py's default)
PROBE_IN, PROBE_OUT = 128, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _floats(s: str) -> list[float]:
    try:
        xs = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not xs or any(x <= 0 for x in xs):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {s!r}")
    return xs


# ---------------------------------------------------------------------------------------------------
# the app under test
# ---------------------------------------------------------------------------------------------------

class App:
    """The app's config, and (unless --url) its private cluster, up for the whole sweep."""

    def __init__(self, args):
        from app.config import AppConfig
        from app.launch import load_serve_config
        self.raw = load_serve_config(args.config)
        spec = self.raw["applications"][0]
        app_args = dict(spec.get("args") or {})
        if args.policy:
            app_args["policy"] = args.policy
        if args.slab_policy:
            app_args["slab_policy"] = args.slab_policy
        if args.scheduler:
            app_args["models"] = [{**m, "scheduler": args.scheduler} for m in app_args.get("models", [])]
        if args.kv_cache_gib:
            app_args["kv_cache_bytes"] = int(args.kv_cache_gib * (1 << 30))
        spec["args"] = app_args
        self.cfg = AppConfig(**app_args)
        self.name = spec.get("name", "default")
        self.local = args.url is None
        if self.local:
            http = dict(self.raw.get("http_options") or {})
            http.update(host="127.0.0.1", port=args.port or free_port())
            self.raw["http_options"] = http
            self.url = f"http://127.0.0.1:{http['port']}{spec.get('route_prefix', '/').rstrip('/')}"
        else:
            self.url = check_loopback(args.url)

    def start(self) -> None:
        if not self.local:
            return
        from app.launch import deploy, start_cluster
        t0 = time.perf_counter()
        start_cluster(self.cfg.num_gpus, temp_dir=tempfile.mkdtemp(prefix="fineserve-lt-ray-"),
                      metrics_port=free_port(), include_dashboard=False)
        # quiet replicas: no access log line per request
        deploy(self.raw, blocking=False, logging_config={"enable_access_log": False, "log_level": "WARNING"})
        self.startup_s = round(time.perf_counter() - t0, 1)

    def stop(self) -> None:
        if self.local:
            import ray
            from ray import serve
            try:
                serve.shutdown()
            finally:
                ray.shutdown()

    def worker_info(self, m) -> dict | None:
        if not self.local:
            return None
        from ray import serve
        return serve.get_deployment_handle(m.deployment_name, self.name).info.remote().result(timeout_s=120)

    def slab_managers(self) -> dict:
        if not self.local:
            return {}
        import ray
        from app.worker import slab_manager_name
        out = {}
        for g in range(self.cfg.num_gpus):
            try:
                out[g] = ray.get_actor(slab_manager_name(g), namespace=self.cfg.namespace)
            except ValueError:
                pass
        return out


class KVPoller(threading.Thread):
    """Samples every slab manager's `snapshot()` each `interval` seconds (t: seconds from `t0`)."""

    def __init__(self, managers: dict, interval: float, t0: float):
        super().__init__(name="kv-poller", daemon=True)
        self.managers, self.interval, self.t0 = managers, interval, t0
        self.samples: list[dict] = []
        self.errors = 0
        self._stop_ev = threading.Event()

    def run(self) -> None:
        import ray
        while not self._stop_ev.is_set():
            t = round(time.time() - self.t0, 3)
            try:
                snaps = ray.get([h.snapshot.remote() for h in self.managers.values()], timeout=10)
                self.samples += [{**s, "t": t} for s in snaps]
            except Exception:          # a slow or restarting manager: skip the sample, count it
                self.errors += 1
            self._stop_ev.wait(self.interval)

    def stop(self) -> list[dict]:
        self._stop_ev.set()
        self.join(timeout=15)
        return self.samples


# ---------------------------------------------------------------------------------------------------
# workload and driving
# ---------------------------------------------------------------------------------------------------

def tier_rates(cfg, rate: float | None, scale: float | None, alpha: float | None) -> dict[str, float]:
    tiers = [m.tier for m in cfg.models]
    if scale is not None:
        return {m.tier: m.rate * scale for m in cfg.models}
    w = power_law_weights(len(tiers), alpha) if alpha is not None else [m.rate for m in cfg.models]
    if sum(w) <= 0:
        raise ValueError("every model has rate 0 in the config: give --alpha or set `rate`")
    return {t: rate * x / sum(w) for t, x in zip(tiers, w)}


def prompt_ids(seed: int, rid: int, n: int, vocab: int) -> list[int]:
    """Random token ids (no tokenizer needed; random-weight models have none)."""
    return np.random.default_rng([seed, 7, rid]).integers(10, min(vocab, 32000), n).tolist()


async def drive(url: str, requests, vocab: dict[str, int], seed: int, timeout_s: float, cut_at: float,
                t0: float, progress) -> list[Result]:
    """Send every request at its arrival time; whatever is open at `cut_at` (seconds from t0) is cut."""
    import httpx
    results = [Result(q.rid, q.model, q.arrival, q.input_len, q.output_len) for q in requests]
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False) as client:
        tasks = []
        for q, r in zip(requests, results):
            delay = q.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(send(client, url, r, prompt_ids(seed, q.rid, q.input_len, vocab[q.model]),
                                         t0, timeout_s))
            t.add_done_callback(lambda _: progress.update(1))
            tasks.append(t)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, cut_at - (time.perf_counter() - t0)))
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return results


async def probe(url: str, tier: str, vocab: int) -> Result:
    """A warm-up request, then one timed alone: single-request TTFT and TPOT of this tier."""
    import httpx
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), trust_env=False) as client:
        for i in range(2):
            r = Result(-1 - i, tier, 0.0, PROBE_IN, PROBE_OUT)
            await send(client, url, r, prompt_ids(0, 10**6 + i, PROBE_IN, vocab), time.perf_counter(), 600)
            if r.status != "ok":
                raise RuntimeError(f"probe request to {tier} failed: {r.status} {r.code} {r.error}")
    return r


def slos_for(app: App, probes: dict[str, Result]) -> dict[str, dict]:
    out = {}
    for m in app.cfg.models:
        info, pr = app.worker_info(m), probes[m.tier]
        if info is not None:
            ttft, src = info["ttft_slo_s"], "worker"
        elif m.slo.ttft_ms:
            ttft, src = m.slo.ttft_ms / 1e3, "config"
        else:
            ttft = m.slo.ttft_scale * pr.ttft / PROBE_IN * SLO_LEN
            src = f"{m.slo.ttft_scale:g} x probe TTFT/token x {SLO_LEN}"
        if m.slo.tpot_ms:
            tpot, tsrc = m.slo.tpot_ms / 1e3, "config"
        else:
            tpot, tsrc = TPOT_SCALE * pr.tpot, f"{TPOT_SCALE:g} x probe TPOT"
        out[m.tier] = {"ttft_s": ttft, "tpot_s": tpot, "source": f"TTFT: {src}; TPOT: {tsrc}",
                       "probe_ttft_s": pr.ttft, "probe_tpot_s": pr.tpot}
    return out


def run(args) -> Path:
    from tqdm import tqdm

    from fineserve_core.model_source import resolve_model
    from fineserve_core.results import write_result
    app = App(args)
    vocab = {m.tier: resolve_model(m.source or m.name).config.vocab_size for m in app.cfg.models}
    lengths = (LengthSampler.fixed(args.input_len, args.output_len) if args.lengths == "fixed" else
               LengthSampler(max_input=args.max_input, max_total=args.max_total))
    levels = [("rate", r) for r in args.rate] if args.rate else [("scale", s) for s in args.rate_scale]
    began = time.perf_counter()
    app.start()
    try:
        probes = {m.tier: asyncio.run(probe(app.url, m.tier, vocab[m.tier])) for m in app.cfg.models}
        slos = slos_for(app, probes)
        wall0 = time.time()
        poller = KVPoller(app.slab_managers(), args.kv_interval, wall0)
        poller.start()
        rows, by_rate, skipped = [], {}, []
        for kind, level in levels:
            rates = tier_rates(app.cfg, level if kind == "rate" else None, level if kind == "scale" else None, args.alpha)
            left = args.time_limit - (time.perf_counter() - began) if args.time_limit else float("inf")
            if left < args.duration + min(args.drain, 5.0):      # --time-limit: skip, never overrun
                skipped.append(round(sum(rates.values()), 4))
                continue
            reqs = generate(rates, args.duration, seed=args.seed, cv=args.cv, lengths=lengths, rotate=args.rotate)
            if args.max_requests and len(reqs) > args.max_requests:
                reqs = reqs[:args.max_requests]
            total = sum(rates.values())
            t_start = time.time() - wall0
            with tqdm(total=len(reqs), desc=f"{total:g} req/s", unit="req", disable=args.quiet) as bar:
                res = asyncio.run(drive(app.url, reqs, vocab, args.seed, args.request_timeout,
                                        min(args.duration + args.drain, left), time.perf_counter(), bar))
            t_end = time.time() - wall0
            kv = [s for s in poller.samples if t_start <= s["t"] <= t_end]
            row = {"rate": round(total, 4), "rate_scale": level if kind == "scale" else None,
                   "tier_rates": {t: round(r, 4) for t, r in rates.items()},
                   "workload": workload_summary(reqs, args.duration), "t_start": round(t_start, 3),
                   "t_end": round(t_end, 3), **summarize(res, slos, kv)}
            rows.append(row)
            by_rate[row["rate"]] = res
            if not args.quiet:
                print(f"[{total:g} req/s: {row['sent']} sent, {row['status']}, attainment {row['slo_attainment']}, "
                      f"{row['output_throughput']:.1f} output tok/s]", flush=True)
        kv_all = poller.stop()
    finally:
        app.stop()
    payload = {"config": Path(args.config).stem, "policy": app.cfg.policy, "slab_policy": app.cfg.slab_policy,
               "url": app.url, "launched": app.local, "startup_s": getattr(app, "startup_s", None),
               "mps_pipe_dir": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),      # set: the app ran under MPS
               "models": [{"tier": m.tier, "source": m.source or m.name, "precision": m.precision,
                           "rate": m.rate, "scheduler": app.cfg.scheduler_of(m)} for m in app.cfg.models],
               "workload": {"duration_s": args.duration, "cv": args.cv, "alpha": args.alpha, "rotate_s": args.rotate,
                            "seed": args.seed,
                            "lengths": lengths.describe(), "max_requests": args.max_requests,
                            "request_timeout_s": args.request_timeout, "drain_s": args.drain},
               "slos": slos, "rates": rows, "skipped_rates": skipped, "kv_samples": kv_all,
               "kv_poll_errors": poller.errors,
               "requests": {str(rate): [r.to_dict() for r in rs] for rate, rs in by_rate.items()}}
    name = f"load-test-{payload['config']}-{payload['policy']}"
    out = write_result(name, payload, args.out)
    payload = json.loads(out.read_text())              # with run info (command, device, date)
    stem = out.with_suffix("")
    if not args.no_plots:
        plot_sweep(payload, by_rate, kv_all, stem)
    out.with_suffix(".md").write_text(markdown_sweep(payload))
    print(f"[wrote {out} and {out.with_suffix('.md').name}" + ("" if args.no_plots else " + plots") + "]", flush=True)
    return out


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `fineserve load-test` (one line in fineserve_core/cli.py)."""
    p = subparsers.add_parser("load-test", help="drive the app's HTTP endpoints with a multi-model workload "
                                                "and report latency, SLO attainment, throughput and KV use")
    p.add_argument("--config", required=True, help="serve config, e.g. serve_configs/dev.yaml")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rate", type=_floats, help="total req/s over all tiers, comma-separated for a sweep")
    g.add_argument("--rate-scale", type=_floats, help="multipliers of each tier's config `rate`, comma-separated")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    p.add_argument("--policy", choices=["fineserve", "static", "prism"], help="override the config's `policy`")
    p.add_argument("--slab-policy", help="override the config's `slab_policy` (KV Slab variant of policy fineserve)")
    p.add_argument("--scheduler", choices=get_args(LocalQueue),
                   help="override every model's `scheduler` (the local queue of policy fineserve)")
    p.add_argument("--url", help="drive an app already running here (loopback) instead of starting one")
    p.add_argument("--port", type=int, help="HTTP port of the app this run starts (default: a free one)")
    p.add_argument("--alpha", type=float, help="power-law popularity over the tiers (rate_i ∝ (i+1)^-alpha)")
    p.add_argument("--cv", type=float, default=1.0, help="arrival gap CV (1: Poisson, >1: bursty Gamma)")
    p.add_argument("--rotate", type=rotate_period, help="seconds between rotations of the tiers' rates (the popular "
                                                "model changes, the total stays; load_tests/workload.py)")
    p.add_argument("--lengths", choices=["sharegpt", "fixed"], default="sharegpt")
    p.add_argument("--input-len", type=int, default=128, help="fixed lengths: prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="fixed lengths: output tokens")
    p.add_argument("--max-input", type=int, default=2048, help="sharegpt lengths: longest prompt")
    p.add_argument("--max-total", type=int, default=4096, help="sharegpt lengths: longest prompt + output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, help="at most this many requests per rate (the earliest)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds one request may take")
    p.add_argument("--drain", type=float, default=30.0, help="seconds after the last arrival before open "
                                                             "requests are cut (timeouts)")
    p.add_argument("--kv-interval", type=float, default=0.5, help="seconds between KV samples")
    p.add_argument("--time-limit", type=float, help="seconds for the whole run, startup included: a rate "
                                                    "that would not fit is skipped (recorded)")
    p.add_argument("--kv-cache-gib", type=float, help="override the config's kv_cache_bytes (GiB per GPU)")
    p.add_argument("--out", help="results JSON (default: load_tests/results/load-test-<config>-<policy>-<dev>.json)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_load_test)
    return p


def cmd_load_test(args) -> int:
    for k in ("duration", "request_timeout", "kv_interval", "time_limit", "kv_cache_gib"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be > 0")
    if args.drain < 0 or (args.max_requests is not None and args.max_requests < 1):
        raise ValueError("--drain must be >= 0 and --max-requests >= 1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run(args)
    return 0
