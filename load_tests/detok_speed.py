"""Host cost of detokenizing a decode step: the whole output again per token vs `sequence.new_text`.

    python -m load_tests.detok_speed [--batch 64] [--tokens 512]

`--batch` sequences of `--tokens` real SmolLM2 tokens each (consecutive slices of the Britannica eval
text), fed one token per step to both: (a) `tokenizer.decode(all output ids)` per sequence per step, what
the engine did before, and (b) `sequence.new_text` (a window from the last complete text). Both must
produce the same text. Prints and writes ms per step (mean over the steps, and over the last 10) to
load_tests/results/detok-speed-<device>.json.
"""
from __future__ import annotations

import argparse
import time

from fineserve_core.results import write_result
from fineserve_core.sampling import SamplingParams
from fineserve_core.sequence import Sequence, new_text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from fineserve_core.eval_ppl import text_token_ids
    from fineserve_core.model_source import load_tokenizer, resolve_model
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    ids = text_token_ids(tok, "shakespeare")
    outs = [ids[i * args.tokens:(i + 1) * args.tokens] for i in range(args.batch)]

    def whole(ids_so_far: list[int], _seq) -> str:
        return tok.decode(ids_so_far, skip_special_tokens=True)

    rows, texts = {}, {}
    for name in ("whole_output", "new_text"):
        seqs = [Sequence(f"r{i}", [1], SamplingParams()) for i in range(args.batch)]
        step_s = []
        for t in range(args.tokens):
            t0 = time.perf_counter()
            for s, out in zip(seqs, outs):
                s.output_ids.append(out[t])
                if name == "whole_output":
                    s.text = whole(s.output_ids, s)
                else:
                    s.text += new_text(tok, s, final=t == args.tokens - 1)
            step_s.append(time.perf_counter() - t0)
        texts[name] = [s.text for s in seqs]
        rows[name] = {"ms_per_step_mean": sum(step_s) / len(step_s) * 1e3,
                      "ms_per_step_last10": sum(step_s[-10:]) / 10 * 1e3}
        print(f"{name:13s} {rows[name]['ms_per_step_mean']:7.2f} ms/step mean, "
              f"{rows[name]['ms_per_step_last10']:7.2f} ms/step over the last 10 (batch {args.batch})", flush=True)
    if texts["whole_output"] != texts["new_text"]:
        raise SystemExit("the two detokenizations differ")
    path = write_result("detok-speed", {"batch": args.batch, "tokens": args.tokens, "tokenizer": "smollm2-135m",
                                        "text": "consecutive slices of the Britannica eval text", "rows": rows},
                        args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
