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
- optional flags after the dtype, each changing the arithmetic of the attention only:
  ``rope32``: the rotary embedding applied in float32 and q, k rounded once to DTYPE (transformers
  rounds cos, sin, both products and their sum to DTYPE); ``attn32``: the attention itself in
  float32 (q, k, v upcast, K/V repeated for GQA so that SDPA's memory-efficient kernel takes it), its
  output rounded to DTYPE.
  E.g. ``chat-bfloat16-rope32``, ``chat-bfloat16-rope32-attn32``.

For each: the score, and how the misses look (a correct prefix of the number then a stop, a digit
dropped, another text). Rows go to ``--out`` as they come (one per sample and variant), so a run cut
short still says something.

    python scripts/diagnose_niah.py --model M --rope-scaling yarn:4:32768 --lengths 128k --samples 20
    # the arithmetic instead of the prompt, on the needles dense missed at 130944 (and three it found)
    python scripts/diagnose_niah.py --model M --rope-scaling yarn:4:32768 --lengths 130944 --samples 20 \
        --only 0,1,2,3,7,9,12,19 --variants chat-bfloat16,chat-bfloat16-rope32,chat-bfloat16-rope32-attn32
"""

from __future__ import annotations

import argparse
import contextlib
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


@contextlib.contextmanager
def precision(lm, flags: tuple[str, ...]):
    """``rope32`` / ``attn32`` (module docstring) for the duration of one generation; nothing else."""
    from transformers import AttentionInterface

    unknown = set(flags) - {"rope32", "attn32"}
    if unknown:
        raise SystemExit(f"--variants: flags {sorted(unknown)} are not among rope32, attn32")
    undo = []
    if "rope32" in flags:
        rotary = lm.model.rotary_emb
        rotary_forward = rotary.forward
        rotary.forward = lambda x, position_ids: rotary_forward(x.float(), position_ids)  # float32 cos, sin
        undo.append(lambda: delattr(rotary, "forward"))
        modeling = sys.modules[type(lm.model.layers[0].self_attn).__module__]
        apply = modeling.apply_rotary_pos_emb

        def apply32(q, k, cos, sin, *args, **kwargs):
            q32, k32 = apply(q.float(), k.float(), cos.float(), sin.float(), *args, **kwargs)
            return q32.to(q.dtype), k32.to(k.dtype)

        modeling.apply_rotary_pos_emb = apply32
        undo.append(lambda: setattr(modeling, "apply_rotary_pos_emb", apply))
    if "attn32" in flags:
        sdpa = AttentionInterface._global_mapping["sdpa"]

        def sdpa32(module, query, key, value, attention_mask, **kwargs):
            group = query.shape[1] // key.shape[1]
            key, value = (t.repeat_interleave(group, dim=1) for t in (key, value))
            out, weights = sdpa(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
            return out.to(query.dtype), weights

        AttentionInterface.register("sdpa", sdpa32)
        undo.append(lambda: AttentionInterface.register("sdpa", sdpa))
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


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
    ap.add_argument("--only", default="", help="comma list of sample indices to run (e.g. the ones dense missed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="diagnose-niah.csv")
    args = ap.parse_args()

    import torch

    from trimix_probe.models import load_model
    from trimix_probe.runner import generate_batch
    from trimix_probe.tasks import make_samples, parse_lengths, score

    def parse(v: str):  # TEMPLATE-DTYPE[-FLAG...] -> (the name as given, template, dtype, flags)
        parts = v.split("-")
        if len(parts) < 2:
            raise SystemExit(f"--variants: {v!r} is not TEMPLATE-DTYPE[-FLAG...]")
        return v, parts[0], parts[1], tuple(parts[2:])

    variants = [parse(v) for v in args.variants.split(",")]
    only = {int(x) for x in args.only.split(",") if x}
    lengths = parse_lengths(args.lengths)
    models = {}
    for dtype in dict.fromkeys(d for _, _, d, _ in variants):
        models[dtype] = load_model(args.model, rope_scaling=args.rope_scaling, max_tokens=max(lengths), dtype=dtype)
    tok, name = next(iter(models.values()))[1:]
    rows, dropped = [], set()
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for length in lengths:
            samples = make_samples(tok, "niah_single_noise", length, args.samples, seed=args.seed)
            for i, s in enumerate(samples):
                if only and i not in only:
                    continue
                for name_v, template, dtype, flags in variants:
                    if (dtype == "float32" and i >= args.fp32_samples) or name_v in dropped:
                        continue
                    lm = models[dtype][0]
                    ids = encode(tok, s, template).to(lm.device)
                    t0 = time.perf_counter()
                    try:
                        with precision(lm, flags):
                            gen = generate_batch(lm, tok, [ids], args.max_new_tokens)[0]
                    except torch.OutOfMemoryError:  # e.g. float32 SDPA at 128K falls back to the math kernel
                        print(f"{name_v}: out of memory at {ids.shape[1]} tokens; dropped", file=sys.stderr)
                        dropped.add(name_v)
                        torch.cuda.empty_cache()
                        continue
                    row = {"length": length, "sample": i, "variant": name_v, "n_tokens": ids.shape[1],
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
        for v, *_ in variants:
            part = [r for r in rows if r["length"] == length and r["variant"] == v]
            if not part:
                continue
            mean = sum(r["score"] for r in part) / len(part)
            kinds = Counter(r["kind"] for r in part if r["kind"] != "right")
            print(f"{length} {v:20s} {len(part):3d} samples {mean * 100:5.1f}%  misses: {dict(kinds) or 'none'}")


if __name__ == "__main__":
    main()
