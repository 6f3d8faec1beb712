"""Inputs of the CPU prefill measurement (docs/performance.md, "CPU prefill"): a SmolLM2 config with
triangle layers from 21, and niah_multikey prompts of about 4K and 8K tokens (chat template included)."""

import sys
from pathlib import Path

from trimix_probe.config import ModelIdentity, TriMixConfig
from trimix_probe.models import load_model
from trimix_probe.tasks import make_samples

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
lm, tokenizer, name = load_model(None, device="cpu", dtype="float32")
TriMixConfig.triangle_from(ModelIdentity.from_hf_config(lm.config, name=name), 21).save(out / "config-L21.json")
for label, length in (("4k", 4096), ("8k", 8150)):
    (out / f"prompt-{label}.txt").write_text(make_samples(tokenizer, "niah_multikey", length, 1, seed=0)[0].prompt)
