"""The verification curve of the embedded SmolLM2-135M-Instruct on CPU: the answer log-likelihood
drop and the changed greedy answers against dense, for several starting layers, on the built-in
tasks (docs/verify-smollm2-cpu.md). Also times the gradient probe on the first samples, for the
cost comparison.

    python docs/raw/verify_curve.py --length 2048 --samples 2 --seed 1 --layers 0,6,10,12,14,16,18,20,22,25,28 \
        --out docs/raw/verify-smollm2-cpu-2k.json
"""

import argparse
import json
import sys
import time

import torch

from trimix_probe.config import ModelIdentity, TriMixConfig
from trimix_probe.models import encode_prompt, load_model
from trimix_probe.tasks import TASKS, sample_grid
from trimix_probe.verify import check_layer, dense_references


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--layers", default="0,6,10,12,14,16,18,20,22,25,28")
    ap.add_argument("--probe-samples", type=int, default=2, help="samples the gradient probe is timed on")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    lm, tok, name = load_model(None, device="cpu")
    identity = ModelIdentity.from_hf_config(lm.config, name=name)
    data = sample_grid(tok, [args.length], list(TASKS), args.samples, seed=args.seed)
    samples = []
    for s in data:
        prompt = encode_prompt(tok, s.prompt)
        answer = tok(s.answer_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        samples.append((torch.cat([prompt, answer], 1), prompt.shape[1]))
    result = {"model": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "length": args.length,
              "samples_per_task": args.samples, "seed": args.seed, "tasks": [s.task for s in data],
              "prompt_tokens": [n for _, n in samples], "answer_tokens": [ids.shape[1] - n for ids, n in samples]}
    t0 = time.perf_counter()
    refs = dense_references(lm, samples)
    result["dense_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"dense reference: {result['dense_seconds']} s for {len(refs)} samples", file=sys.stderr, flush=True)
    result["dense_logp"] = [round(r.logp, 4) for r in refs]
    result["checks"] = []
    for layer in map(int, args.layers.split(",")):
        check = check_layer(lm, refs, TriMixConfig.triangle_from(identity, layer))
        row = {"layer": layer, "drop": round(check.drop, 5), "max_drop": round(check.max_drop, 5),
               "changed": check.changed, "samples": check.samples, "seconds": round(check.seconds, 1),
               "drops": [round(d, 4) for d in check.drops], "same": list(check.same)}
        result["checks"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    if args.probe_samples:
        from trimix_probe.probe import probe_sample, probing

        times = []
        with probing(lm, "auto", checkpoint_layers=False) as gates:
            for ids, n in samples[:args.probe_samples]:
                t1 = time.perf_counter()
                probe_sample(lm, gates, ids, n)
                times.append(time.perf_counter() - t1)
        result["probe_seconds_per_sample"] = [round(t, 1) for t in times]
        print(f"probe: {times}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
