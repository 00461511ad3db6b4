"""Benchmark results: every JSON under load_tests/results/ carries its command, device, versions and date."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent.parent / "load_tests" / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_tag() -> str:
    """Short file-name tag: h100, h200, cpu."""
    name = device_name().lower()
    m = re.search(r"\b([ahlb]\d{2,3})\b", name)
    return m.group(1) if m else ("cpu" if name.startswith("cpu") else re.sub(r"\W+", "-", name)[:16])


def run_info(argv: list[str] | None = None) -> dict:
    """Command, device, versions and date for a results JSON (`argv`: the `fineserve` subcommand's
    arguments when the CLI runs in-process, e.g. `cli.main([...])`; default: `sys.argv`)."""
    import transformers
    argv0 = Path(sys.argv[0]).name
    if argv is not None:
        command = " ".join(["fineserve", *argv])
    else:
        command = " ".join(["fineserve", *sys.argv[1:]]) if argv0 == "fineserve" else " ".join(sys.argv)
    info = {"command": command,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": device_name(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__}}
    for mod in ("triton", "ray"):
        try:
            info["versions"][mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
        if rev:
            info["versions"]["fineserve_git"] = rev
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_result(name: str, payload: dict, path: str | Path | None = None, *, argv: list[str] | None = None) -> Path:
    """Write {run info, payload} to `path` or load_tests/results/<name>-<device tag>.json."""
    out = Path(path) if path else RESULTS_DIR / f"{name}-{device_tag()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**run_info(argv), **payload}, indent=2) + "\n")
    return out
