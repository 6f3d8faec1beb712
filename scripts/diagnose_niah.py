"""Why dense missed the single noise needle at 64K-128K in the old harness (issue 23): the same
needles, dense only, four prompt layouts, one variable changed at a time.

- ``ruler``: the faithful task (noise unit once a line, needle on its own line, RULER's question
  and its answer prefix after the assistant header);
- ``no-prefix``: the same prompt without the answer prefix (the model starts its reply itself);
- ``one-line``: the faithful question and prefix, but the haystack as the old harness built it:
  one noise sentence after another on a single line, the needle inline;
- ``old``: the old harness's prompt: one line, its head ("Some special magic numbers are ...") and
  question ("... Answer with the number only."), no prefix.

For each: the score, and how the misses look (a correct prefix of the number then a stop, a digit
dropped, another text), counted. The old harness's misses were all the first kind (docs/accuracy.md).

    python scripts/diagnose_niah.py --model M --rope-scaling yarn:4:32768 --lengths 64k,128k --samples 20

Writes ``--out`` (default diagnose-niah.csv): one row per sample and layout, with the prediction.
Not run by the author (no GPU here); an H200 takes a few minutes for 2 lengths x 20 samples x 4 layouts.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter


OLD_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.")


def layouts(sample) -> dict[str, tuple[str, str]]:
    """Layout name -> (user message, answer prefix) for one faithful ``niah_single_noise`` sample."""
    prompt, prefix = sample.prompt, sample.answer_prefix
    head, body = prompt.split("\n", 1)
    context, question = body.rsplit("\n", 1)
    one_line = head + "\n" + context.replace("\n", " ") + "\n\n" + question
    key = re.search(r"for (\S+) mentioned", question).group(1)
    old_q = f"What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
    return {"ruler": (prompt, prefix), "no-prefix": (prompt, ""), "one-line": (one_line, prefix),
            "old": (OLD_HEAD + "\n" + context.replace("\n", " ") + "\n\n" + old_q, "")}


def miss_kind(answer: str, prediction: str) -> str:
    digits = "".join(re.findall(r"\d", prediction))
    if answer in prediction:
        return "right"
    if digits and answer.startswith(digits):
        return f"prefix of {len(digits)} digits, then a stop"
    if len(digits) == len(answer) - 1:
        return "one digit dropped"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rope-scaling", default=None)
    ap.add_argument("--lengths", default="64k,128k")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="diagnose-niah.csv")
    args = ap.parse_args()

    from trimix_probe.models import encode_prompt, load_model
    from trimix_probe.runner import generate_batch
    from trimix_probe.tasks import make_samples, parse_lengths, score

    lengths = parse_lengths(args.lengths)
    lm, tok, name = load_model(args.model, rope_scaling=args.rope_scaling, max_tokens=max(lengths))
    rows = []
    for length in lengths:
        for i, s in enumerate(make_samples(tok, "niah_single_noise", length, args.samples, seed=args.seed)):
            for layout, (text, prefix) in layouts(s).items():
                ids = encode_prompt(tok, text, answer_prefix=prefix).to(lm.device)
                gen = generate_batch(lm, tok, [ids], args.max_new_tokens)[0]
                rows.append({"length": length, "sample": i, "layout": layout, "n_tokens": ids.shape[1],
                             "score": score(s.task, gen.text, s.answers), "answer": s.answers[0],
                             "kind": miss_kind(s.answers[0], gen.text), "prediction": gen.text})
                print(f"{length} {i} {layout}: {rows[-1]['kind']}: {gen.text[:60]!r}", file=sys.stderr)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"# {name}, dense, niah_single_noise, {args.samples} samples a length")
    for length in lengths:
        for layout in ("ruler", "no-prefix", "one-line", "old"):
            part = [r for r in rows if r["length"] == length and r["layout"] == layout]
            mean = sum(r["score"] for r in part) / len(part)
            kinds = Counter(r["kind"] for r in part if r["kind"] != "right")
            print(f"{length} {layout:9s} {mean * 100:5.1f}%  misses: {dict(kinds) or 'none'}")


if __name__ == "__main__":
    main()
