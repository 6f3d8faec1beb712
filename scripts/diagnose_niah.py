"""Why dense misses the single noise needle at 128K (issue 23): the same faithful needles, dense
only, one variable changed at a time.

Variants (``--variants``, comma-separated ``TEMPLATE-DTYPE``):
- TEMPLATE ``chat``: the model's chat template, then RULER's answer prefix after the assistant
  header (what ``eval`` does); ``base``: RULER's ``base`` template, the task text with the answer
  prefix straight after the question, no chat template (what RULER runs for models it has no
  template for, Qwen among them); ``noprefix``: the chat template without the answer prefix.
- DTYPE: ``bfloat16`` (what ``eval`` loads on CUDA), ``float16``, ``float32`` (at 128K SDPA has no fused
  float32 kernel that takes this mask, and the math kernel needs ~0.9 TB: a variant that runs out of
  memory is dropped with a line).

For each: the score, and how the misses look (a correct prefix of the number then a stop, a digit
dropped, another text). Rows go to ``--out`` as they come (one per sample and variant), so a run cut
short still says something.

    python scripts/diagnose_niah.py --model M --rope-scaling yarn:4:32768 --lengths 128k --samples 20
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections import Counter

FIELDS = ["length", "sample", "variant", "n_tokens", "score", "answer", "kind", "prefill_s", "prediction"]


def miss_kind(answer: str, prediction: str) -> str:
    digits = "".join(re.findall(r"\d", prediction))
    if answer in prediction:
        return "right"
    if digits and answer.startswith(digits):
        return f"prefix of {len(digits)} digits, then a stop"
    if len(digits) == len(answer) - 1:
        return "one digit dropped"
    return "other"


def encode(tok, sample, template: str):
    from trimix_probe.models import encode_prompt

    if template == "chat":
        return encode_prompt(tok, sample.prompt, answer_prefix=sample.answer_prefix)
    if template == "noprefix":
        return encode_prompt(tok, sample.prompt)
    if template == "base":
        return encode_prompt(tok, sample.prompt + sample.answer_prefix, chat=False)
    raise SystemExit(f"--variants: template {template!r} is not one of chat, base, noprefix")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rope-scaling", default=None)
    ap.add_argument("--lengths", default="128k")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--fp32-samples", type=int, default=10)
    ap.add_argument("--variants", default="chat-bfloat16,base-bfloat16,chat-float16,noprefix-bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="diagnose-niah.csv")
    args = ap.parse_args()

    import torch

    from trimix_probe.models import load_model
    from trimix_probe.runner import generate_batch
    from trimix_probe.tasks import make_samples, parse_lengths, score

    variants = [tuple(v.split("-", 1)) for v in args.variants.split(",")]
    lengths = parse_lengths(args.lengths)
    models = {}
    for dtype in dict.fromkeys(d for _, d in variants):
        models[dtype] = load_model(args.model, rope_scaling=args.rope_scaling, max_tokens=max(lengths), dtype=dtype)
    tok, name = next(iter(models.values()))[1:]
    rows, dropped = [], set()
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for length in lengths:
            samples = make_samples(tok, "niah_single_noise", length, args.samples, seed=args.seed)
            for i, s in enumerate(samples):
                for template, dtype in variants:
                    if (dtype == "float32" and i >= args.fp32_samples) or (template, dtype) in dropped:
                        continue
                    lm = models[dtype][0]
                    ids = encode(tok, s, template).to(lm.device)
                    t0 = time.perf_counter()
                    try:
                        gen = generate_batch(lm, tok, [ids], args.max_new_tokens)[0]
                    except torch.OutOfMemoryError:  # e.g. float32 SDPA at 128K falls back to the math kernel
                        print(f"{template}-{dtype}: out of memory at {ids.shape[1]} tokens; dropped", file=sys.stderr)
                        dropped.add((template, dtype))
                        torch.cuda.empty_cache()
                        continue
                    row = {"length": length, "sample": i, "variant": f"{template}-{dtype}", "n_tokens": ids.shape[1],
                           "score": score(s.task, gen.text, s.answers), "answer": s.answers[0],
                           "kind": miss_kind(s.answers[0], gen.text), "prefill_s": round(gen.prefill_s, 3),
                           "prediction": gen.text}
                    rows.append(row)
                    writer.writerow(row)
                    fh.flush()
                    print(f"{length} {i} {row['variant']}: {row['kind']}: {gen.text[:60]!r} "
                          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    print(f"# {name}, dense, niah_single_noise")
    for length in lengths:
        for template, dtype in variants:
            v = f"{template}-{dtype}"
            part = [r for r in rows if r["length"] == length and r["variant"] == v]
            if not part:
                continue
            mean = sum(r["score"] for r in part) / len(part)
            kinds = Counter(r["kind"] for r in part if r["kind"] != "right")
            print(f"{length} {v:20s} {len(part):3d} samples {mean * 100:5.1f}%  misses: {dict(kinds) or 'none'}")


if __name__ == "__main__":
    main()
