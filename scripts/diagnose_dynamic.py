"""Issue 24, part 1: is the dynamic (vertical-slash) shallow layers' loss at long context a defect or the budget?

On needle prompts (``trimix_probe.tasks.make_samples``, default ``niah_single_noise``), per length and sample:

1. answers, greedy: dense; the config; the config with the estimate as before
   this session's fixes (``pre-fix``: bf16 scores, columns on keys only dense rows see); the config
   with the needle's rows recomputed dense in the dynamic layers (``needle-dense``: does the loss live
   in the needle's own rows?); the config dynamic in the first / second half of its dynamic layers only
   (the rest dense); the config with each ``--budget`` instead of its own;
2. on the dense forward, per dynamic layer and head: the recall of dense attention mass (share of a
   row's dense softmax on the keys the pattern keeps; ``trimix_probe.recall.row_recall``) at the
   needle's value tokens, the whole needle sentence, the last ``last_q`` rows (the pattern alone: the
   config computes its last ``dense_last`` rows dense) and rows spread over the prompt, for the config's
   budget (and its pre-fix estimate) and each ``--budget``; and the vertical columns a budget spends on
   keys only dense rows can see (``wasted_columns``);
3. in the config's run: each dynamic layer's sparse output at the value and spread rows against an exact
   fp32 softmax over the same kept set (the kernel's error) and against dense (what the sparsity
   changes), and every dynamic-attention call generate() makes (decode steps must not reach it).

Writes answers.csv, recall.csv, kernel.csv, calls.csv and summary.txt (the printed tables) to --out
(default $OUT). On one H200, Qwen2.5-Coder-0.5B at 128K + 64K, 3 samples each: see the lead's run; a
--max-seconds guard stops starting new samples. On CPU at 2K with SmolLM2 (the embedded default):

    TRIMIX_DYNAMIC_DENSE_ABOVE=inf python scripts/diagnose_dynamic.py --lengths 2k --samples 1 \\
        --budget vs:64/256+dense64 --config-budget vs:32/128+dense64 --starting-layer 20 --out /tmp/diag
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from trimix_probe import dynamic as D
from trimix_probe import tasks as T
from trimix_probe.config import ModelIdentity, TriMixConfig
from trimix_probe.models import encode_prompt, load_model
from trimix_probe.patch import patch_model, unpatch_model
from trimix_probe.recall import budget_name, measuring, parse_budget, row_recall


# ------------------------------------------------------------------------------------------- inputs
def scaled_budget(text: str, length: int, block_size: int, last_q: int):
    """``vs:V/S[+denseN][@REF]``: parse_budget's syntax; ``@32k`` scales V and S by length / 32k."""
    base, _, ref = text.partition("@")
    spec = parse_budget(base, block_size=block_size, last_q=last_q)
    if ref:
        f = length / T.parse_length(ref)
        spec = replace(spec, vertical=max(1, round(spec.vertical * f)), slash=max(1, round(spec.slash * f)))
    return spec


def needle_rows(tokenizer, prompt: str, ids: torch.Tensor, value: str) -> tuple[list[int], list[int]]:
    """Token positions of ``value`` (its last occurrence before the question) and of its needle sentence."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False) if getattr(tokenizer, "chat_template", None) else prompt
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != ids[0].tolist():  # BOS etc.: align on the tail
        shift = ids.shape[1] - len(enc["input_ids"])
    else:
        shift = 0
    lo = text.find(value)
    if lo < 0:
        raise SystemExit(f"value {value!r} not found in the prompt")
    start = text.rfind("One of the special magic", 0, lo)
    start = lo - 60 if start < 0 or lo - start > 400 else start
    hi = lo + len(value)
    val, sent = [], []
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > lo and a < hi:
            val.append(t + shift)
        if b > start and a < hi + 1:
            sent.append(t + shift)
    return val, sent


def exact_rows(q, k, v, rows, scale):
    """Causal attention of ``rows`` over all their keys, fp32. q: [1, H, seq, d] -> [1, H, len(rows), d]."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] <= rows[:, None]
    return F.scaled_dot_product_attention(q[:, :, rows].float(), kk, vv, attn_mask=mask, scale=scale)


def kept_rows(q, k, v, rows, sel, spec, scale):
    """Attention of ``rows`` over the kept set of ``sel`` (dense for rows in the last dense_last), fp32."""
    seq, group = q.shape[2], q.shape[1] // k.shape[1]
    out = []
    for h in range(q.shape[1]):
        m = D.vertical_slash_mask_fn(sel, 0, h, seq)(rows[:, None], torch.arange(seq, device=q.device)[None, :])
        m |= (rows[:, None] >= seq - spec.dense_last) & (torch.arange(seq, device=q.device)[None, :] <= rows[:, None])
        s = (q[0, h, rows].float() @ k[0, h // group].float().T) * scale
        out.append(s.masked_fill(~m, float("-inf")).softmax(-1) @ v[0, h // group].float())
    return torch.stack(out)[None]


@contextlib.contextmanager
def bf16_estimate():
    """The estimate as before the fixes: scores in the inputs' dtype (bf16 on the GPU) before the softmax."""
    new = D._last_q_probs

    def old(q, k, heads, last_q, scale, softcap=None):
        batch, n_heads, seq, d = q.shape
        group, (h0, h1) = n_heads // k.shape[1], (heads.start, heads.stop)
        ql = q[:, h0:h1, seq - last_q:].reshape(batch, (h1 - h0) // group, group * last_q, d)
        dt = q.dtype if q.is_cuda else torch.float32
        s = (torch.matmul(ql.to(dt), k[:, h0 // group:h1 // group].to(dt).transpose(-1, -2)).float() * scale)
        s = s.view(batch, h1 - h0, last_q, seq)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        pos = torch.arange(seq - last_q, seq, device=q.device)[:, None]
        return s.masked_fill(torch.arange(seq, device=q.device)[None, :] > pos, float("-inf")).softmax(-1)

    # and the column rule before the fix: columns could go to keys only the dense_last rows see
    rule = "    col_score[..., max(seq - spec.dense_last, n_sink):] = -1.0\n"
    src = inspect.getsource(D.select_vertical_slash)
    assert rule in src, "select_vertical_slash changed: update bf16_estimate"
    scope = dict(vars(D))
    scope["_kernels_apply"] = lambda *a: False  # the copy estimates through the torch path, where old applies
    exec(src.replace(rule, ""), scope)
    select = D.select_vertical_slash
    D._last_q_probs, D.select_vertical_slash = old, scope["select_vertical_slash"]
    scope["_last_q_probs"] = old
    try:
        yield
    finally:
        D._last_q_probs, D.select_vertical_slash = new, select


@contextlib.contextmanager
def wrapped_dynamic(on_call):
    """Every dynamic_attention call goes through ``on_call(orig, q, k, v, spec, **kw)`` (patch.py looks it
    up in trimix_probe.dynamic at call time)."""
    orig = D.dynamic_attention
    D.dynamic_attention = lambda q, k, v, spec, **kw: on_call(orig, q, k, v, spec, **kw)
    try:
        yield
    finally:
        D.dynamic_attention = orig


# ------------------------------------------------------------------------------------------- one sample
def generate(lm, tok, ids, n_new: int) -> str:
    with torch.inference_mode():
        out = lm.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id or 0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def variants(cfg: TriMixConfig, budgets: dict) -> dict:
    dyn = [i for i, kind in enumerate(cfg.layers) if kind == "dynamic"]
    half = dyn[:len(dyn) // 2], dyn[len(dyn) // 2:]
    out = {"config": cfg, "pre-fix": cfg, "needle-dense": cfg,
           f"dyn{half[0][0]}-{half[0][-1]}": cfg.with_budgets({i: None for i in half[1]}),
           f"dyn{half[1][0]}-{half[1][-1]}": cfg.with_budgets({i: None for i in half[0]})}
    for name, spec in budgets.items():
        out[name] = replace(cfg, dynamic=spec, dynamic_layers={})
    return out


def run_sample(lm, tok, cfg, budgets, sample, length, idx, records, args):
    ids = encode_prompt(tok, sample.prompt, chat=True).to(lm.device)
    seq, value = ids.shape[1], sample.answers[0]
    val, sent = needle_rows(tok, sample.prompt, ids, value)
    spec = cfg.dynamic
    dyn_layers = [i for i, kind in enumerate(cfg.layers) if kind == "dynamic"]
    n_new = T.MAX_NEW_TOKENS.get(sample.task, 24)
    dev = ids.device
    groups = {"value": torch.tensor(val, device=dev), "needle": torch.tensor(sent, device=dev),
              "last": torch.arange(seq - min(spec.last_q, seq), seq, device=dev),
              "spread": torch.linspace(0, max(seq - spec.dense_last - 1, 0), args.spread_rows, device=dev).long()}
    print(f"\n[{length} #{idx}] {seq} tokens, value {value} at tokens {val[0]}-{val[-1]} "
          f"(depth {val[0] / seq:.0%})", flush=True)

    # 1. answers
    for name, plan in variants(cfg, budgets).items():
        t0 = time.perf_counter()
        calls = []

        def on_call(orig, q, k, v, sp, **kw):
            calls.append((q.shape[2], k.shape[2]))
            out = orig(q, k, v, sp, **kw)
            if name == "needle-dense":
                out[:, :, groups["needle"]] = exact_rows(q, k, v, groups["needle"], kw.get("scale")).to(out.dtype)
            if name == "config" and len(calls) <= len(dyn_layers):
                kernel_check(q, k, v, sp, kw.get("scale"), out, groups, len(calls) - 1)
            return out

        def kernel_check(q, k, v, sp, scale, out, groups, nth):
            scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
            if D.work_share(sp, q.shape[2]) > D.dense_above_limit():
                return
            sel = D.select_vertical_slash(q, k, sp, scale)
            for g in ("value", "spread"):
                rows = groups[g]
                got, ref = out[:, :, rows].float(), kept_rows(q, k, v, rows, sel, sp, scale)
                dense = exact_rows(q, k, v, rows, scale)
                for h in range(q.shape[1]):
                    records["kernel"].append(dict(
                        length=length, sample=idx, layer=dyn_layers[nth], head=h, rows=g,
                        kernel_vs_kept=((got[0, h] - ref[0, h]).norm() / ref[0, h].norm()).item(),
                        sparse_vs_dense=((got[0, h] - dense[0, h]).norm() / dense[0, h].norm()).item()))

        with contextlib.ExitStack() as stack:
            if name == "pre-fix":
                stack.enter_context(bf16_estimate())
            stack.enter_context(wrapped_dynamic(on_call))
            patch_model(lm, plan)
            try:
                ans = generate(lm, tok, ids, n_new)
            finally:
                unpatch_model(lm)
        prefill = [c for c in calls if c[0] == seq and c[1] == seq]
        records["calls"].append(dict(length=length, sample=idx, variant=name, calls=len(calls),
                                     prefill_calls=len(prefill), other=str(sorted(set(calls) - {(seq, seq)}))))
        records["answers"].append(dict(length=length, sample=idx, variant=name, gold=value, answer=ans,
                                       score=T.score(sample.task, ans, sample.answers),
                                       seconds=round(time.perf_counter() - t0, 2)))
    t0 = time.perf_counter()
    ans = generate(lm, tok, ids, n_new)
    records["answers"].append(dict(length=length, sample=idx, variant="dense", gold=value, answer=ans,
                                   score=T.score(sample.task, ans, sample.answers),
                                   seconds=round(time.perf_counter() - t0, 2)))
    for r in records["answers"][-len(variants(cfg, budgets)) - 1:]:
        print(f"  {r['variant']:>22}: {r['score']:.0f}  {r['answer'][:60]!r}", flush=True)

    # 2. recall on the dense forward: the runtime's selections, measured on every row (dense_last stripped
    # from the measure only, so 'last' shows the pattern there too)
    real = {budget_name(spec): spec} | budgets
    measured = {n: replace(s, dense_last=0) for n, s in real.items()}
    old_name = f"{budget_name(spec)}@pre-fix"
    measured[old_name] = measured[budget_name(spec)]
    rows_all = torch.cat(list(groups.values()))

    def measure(layer, query, key, scaling):
        sels = {n: D.select_vertical_slash(query, key, s, scaling) for n, s in real.items()}
        with bf16_estimate():
            sels[old_name] = D.select_vertical_slash(query, key, spec, scaling)
        res = row_recall(query, key, measured, rows_all, scale=scaling, selections=sels)
        out, o = [], 0
        for g, rows in groups.items():
            for name, r in res.items():
                part = r[:, o:o + len(rows)]
                for h in range(part.shape[0]):
                    out.append(dict(layer=layer, head=h, budget=name, rows=g, recall_mean=part[h].mean().item(),
                                    recall_min=part[h].min().item()))
            o += len(rows)
        for name, sel in sels.items():
            cols = sel.columns[0]
            for h in range(cols.shape[0]):
                out.append(dict(layer=layer, head=h, budget=name, rows="-",
                                wasted_columns=int((cols[h] >= seq - spec.dense_last).sum())))
        return out

    with measuring(lm, {}, dyn_layers, measure=measure) as rows, torch.inference_mode():
        lm(ids, logits_to_keep=1, use_cache=False)
    records["recall"] += [dict(length=length, sample=idx, **r) for r in rows]


# ------------------------------------------------------------------------------------------- report
def summarize(records, out: Path) -> str:
    import pandas as pd

    lines = []
    ans = pd.DataFrame(records["answers"])
    lines += ["== answers (correct / samples)", ans.pivot_table(index="variant", columns="length", values="score",
                                                               aggfunc=lambda s: f"{s.sum():.0f}/{len(s)}").to_string()]
    wrong = ans[ans.score < 1]
    if len(wrong):
        lines += ["", "wrong answers:", wrong[["length", "sample", "variant", "gold", "answer"]].to_string(index=False)]
    calls = pd.DataFrame(records["calls"])
    lines += ["", "== dynamic_attention calls in generate() (expect: one prefill call per dynamic layer, none else)",
              calls.groupby(["length", "variant"])[["calls", "prefill_calls"]].max().to_string(),
              f"other shapes seen: {sorted(set(calls.other))}"]
    rec = pd.DataFrame(records["recall"])
    r = rec[rec.rows != "-"]
    agg = r.groupby(["length", "budget", "rows"]).agg(mean=("recall_mean", "mean"), worst_head=("recall_min", "min"))
    lines += ["", "== recall of dense attention mass (mean over layers, heads, samples; worst_head: min over rows, heads)",
              agg.unstack("rows").round(3).to_string()]
    cfg_budget = sorted(r.budget.unique(), key=len)[0]
    per_layer = r[(r.rows == "value")].groupby(["length", "budget", "layer"])["recall_mean"].agg(["mean", "min"])
    lines += ["", "== recall at the value tokens per layer (mean and min over heads and samples)",
              per_layer.unstack("budget").round(3).to_string()]
    w = rec[rec.rows == "-"].groupby(["length", "budget"])["wasted_columns"].mean()
    lines += ["", "== vertical columns spent on keys only the dense last rows see (mean per head)", w.round(1).to_string()]
    if records["kernel"]:
        k = pd.DataFrame(records["kernel"])
        lines += ["", "== config's sparse output vs exact fp32 over the same kept set (kernel) and vs dense (sparsity)",
                  k.groupby(["length", "rows"])[["kernel_vs_kept", "sparse_vs_dense"]].agg(["mean", "max"]).to_string(),
                  "", "sparse_vs_dense at the value rows per layer (mean over heads, samples)",
                  k[k.rows == "value"].groupby(["length", "layer"])["sparse_vs_dense"].mean().unstack("length").round(3)
                  .to_string()]
    for name, part in (("answers", ans), ("recall", rec), ("calls", calls)) + (
            (("kernel", pd.DataFrame(records["kernel"])),) if records["kernel"] else ()):
        part.to_csv(out / f"{name}.csv", index=False)
    text = "\n".join(lines) + f"\n(config budget: {cfg_budget})\n"
    (out / "summary.txt").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="GGUF or HF folder (default: embedded SmolLM2)")
    ap.add_argument("--rope-scaling", default=None, help="e.g. yarn:4:32768")
    ap.add_argument("--config", default=None, help="TriMix config with dynamic layers (default: built here)")
    ap.add_argument("--config-budget", default="vs:1000/6096+dense128", help="budget of the config built here")
    ap.add_argument("--starting-layer", type=int, default=None, help="triangle from here in the config built here")
    ap.add_argument("--budget", action="append", default=None,
                    help="more budgets (repeatable): vs:V/S[+denseN][@REFLEN]; default vs:2000/16384+dense128 and "
                         "vs:1000/6096+dense128@32k (scaled from 32K to the length)")
    ap.add_argument("--lengths", default="128k,64k")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="niah_single_noise")
    ap.add_argument("--spread-rows", type=int, default=256)
    ap.add_argument("--max-seconds", type=float, default=225, help="start no new sample after this")
    ap.add_argument("--out", default=os.environ.get("OUT", "diagnose-out"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = T.parse_lengths(args.lengths)
    lm, tok, name = load_model(args.model, device=args.device, rope_scaling=args.rope_scaling,
                               max_tokens=max(lengths))
    identity = ModelIdentity.from_hf_config(lm.config, name=name)
    if args.config:
        cfg = TriMixConfig.load(args.config)
    else:
        base = parse_budget(args.config_budget)
        cfg = TriMixConfig.triangle_from(identity, args.starting_layer or identity.num_layers * 2 // 3,
                                         shallow="dynamic", dynamic=base)
    task = args.task if args.task in T.TASKS else next(t for t in T.TASKS if "single" in t)
    print(f"{name} on {lm.device} ({lm.dtype}); task {task}; config dynamic {budget_name(cfg.dynamic)} in "
          f"layers {[i for i, k in enumerate(cfg.layers) if k == 'dynamic']}; dense fallback above "
          f"{D.dense_above_limit():.0%} of dense work", flush=True)
    records = {"answers": [], "recall": [], "kernel": [], "calls": []}
    for length in lengths:
        spec = cfg.dynamic
        budgets = {}
        for text in args.budget or ["vs:2000/16384+dense128", "vs:1000/6096+dense128@32k"]:
            s = scaled_budget(text, length, spec.block_size, spec.last_q)
            budgets[budget_name(s)] = s
        print(f"\n== {length}: work share of the config's budget {D.work_share(spec, length):.0%}; budgets "
              + ", ".join(f"{n} ({D.work_share(s, length):.0%})" for n, s in budgets.items()), flush=True)
        for idx, sample in enumerate(T.make_samples(tok, task, length, args.samples, seed=args.seed)):
            if time.perf_counter() - t_start > args.max_seconds:
                print(f"-- {args.max_seconds:.0f} s passed: no more samples", flush=True)
                break
            run_sample(lm, tok, cfg, budgets, sample, length, idx, records, args)
            print(f"  ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    print("\n" + summarize(records, out))
    print(f"wrote {out}/ (answers.csv, recall.csv, kernel.csv, calls.csv, summary.txt) in "
          f"{time.perf_counter() - t_start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
