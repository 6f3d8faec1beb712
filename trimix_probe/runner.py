"""``trimix-probe run``: generate with a TriangleMix config and report the prefill time."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelIdentity, TriMixConfig
from .errors import InputError
from .models import check_model_path, encode_prompt, load_model, resolve_device
from .patch import patch_model, unpatch_model
from .rope import check_length, warn_probed_rope
from .families import attention_modules, features
from .ops import fallback_paths


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    prefill_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PrefillTimer:
    """Times the first forward of ``model.generate`` (the prefill) with hooks, so generation runs
    unchanged and no cache keyword (renamed across transformers releases) is passed by us."""

    def __init__(self, model, device: torch.device):
        self.device, self.start, self.seconds = device, None, None
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.start is None:
            _sync(self.device)
            self.start = time.perf_counter()

    def _post(self, module, args, output):
        if self.seconds is None:
            _sync(self.device)
            self.seconds = time.perf_counter() - self.start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Progress:
    """A generation streamer (``put``/``end``, as transformers calls them) that says on stderr what
    ``generate`` is doing: a line when the prefill starts, then a bar over the new tokens. It runs
    between forwards, outside the timed prefill."""

    def __init__(self, label: str, max_new_tokens: int):
        self.label, self.max_new_tokens, self.bar, self.prompt_seen = label, max_new_tokens, None, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            print(f"{self.label}: prefill of {value.shape[-1]} tokens ...", file=sys.stderr, flush=True)
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.max_new_tokens, desc=f"{self.label}: generating", unit="token",
                            file=sys.stderr, leave=False)
        self.bar.update(1)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.inference_mode()
def generate(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 64,
             progress: str | None = None) -> Generation:
    """Greedy generation of ``input_ids`` [1, n]; the prefill (first forward) is timed. ``progress``:
    a label under which stderr shows the prefill and a bar over the new tokens."""
    timer = _PrefillTimer(model, input_ids.device)
    streamer = _Progress(progress, max_new_tokens) if progress else None
    try:
        ids = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id, streamer=streamer)
    finally:
        timer.close()
        if streamer is not None:
            streamer.end()
    text = tokenizer.decode(ids[0, input_ids.shape[1]:], skip_special_tokens=True)
    return Generation(text=text, prompt_tokens=input_ids.shape[1], prefill_s=timer.seconds)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int = 64) -> list[Generation]:
    """Greedy generation of several prompts ([1, n_i] each) in one left-padded batch. Each prompt
    follows the plan on its own unpadded span (see ``patch.trimix_attention``), so the answers are
    those of one prompt at a time. ``prefill_s`` is the batch's prefill time."""
    longest = max(p.shape[1] for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = prompts[0].device
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, longest - p.shape[1]:] = p[0]
        mask[b, longest - p.shape[1]:] = 1
    timer = _PrefillTimer(model, device)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
    finally:
        timer.close()
    return [Generation(text=tokenizer.decode(out[b, longest:], skip_special_tokens=True),
                       prompt_tokens=p.shape[1], prefill_s=timer.seconds) for b, p in enumerate(prompts)]


def _read_prompt(prompt_file: Path | None) -> str:
    if prompt_file is None or str(prompt_file) == "-":
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end it with Ctrl-D; or pass --prompt-file)", file=sys.stderr,
                  flush=True)
        text = sys.stdin.read()
    elif not prompt_file.is_file():
        raise InputError(f"prompt file {str(prompt_file)!r} does not exist")
    else:
        text = prompt_file.read_text()
    if not text.strip():
        raise InputError("the prompt is empty; give a prompt file with text (or pipe text on stdin)")
    return text


def run(config: Path, model: str | None = None, prompt_file: Path | None = None, max_new_tokens: int = 64,
        chat: bool = True, device: str | None = None, dtype: str = "auto", compare_dense: bool = False,
        rope_scaling: str | None = None) -> dict:
    """Load ``model`` (``rope_scaling``: see :mod:`~trimix_probe.rope`), apply ``config``, generate
    from the prompt; print text and prefill time."""
    # everything a user can get wrong is checked before the model loads (and before stdin is read)
    cfg = TriMixConfig.load(config)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens!r}: expected a positive number of tokens")
    check_model_path(model)
    resolve_device(device)
    text = _read_prompt(prompt_file)
    print(f"loading {model or 'the embedded model'} ...", file=sys.stderr, flush=True)
    lm, tokenizer, name = load_model(model, device=device, dtype=dtype, rope_scaling=rope_scaling)
    cfg.check_model(ModelIdentity.from_hf_config(lm.config, name=name))
    warn_probed_rope(cfg.provenance, lm.config)
    ids = encode_prompt(tokenizer, text, chat=chat).to(lm.device)
    check_length(lm.config, ids.shape[1])
    window = cfg.n_local + cfg.last_n
    if ids.shape[1] <= window:
        print(f"note: the prompt has {ids.shape[1]} tokens, not more than n_local + last_n = {window}: "
              "triangle layers see every key, so this run is dense", file=sys.stderr)
    if "dynamic" in cfg.layers:
        from .dynamic import fallback_note

        budgets = {cfg.dynamic_spec(i) for i, kind in enumerate(cfg.layers) if kind == "dynamic"}
        for note in sorted({fallback_note(spec, ids.shape[1]) for spec in budgets} - {None}):
            print(f"note: {note}", file=sys.stderr)
    results = {}
    if compare_dense:
        generate(lm, tokenizer, ids[:, :16], max_new_tokens=1)  # warm-up outside the timing
        results["dense"] = generate(lm, tokenizer, ids, max_new_tokens, progress="dense")
    patch_model(lm, cfg)
    text_cfg = lm.config.get_text_config()
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    feats = any(f.softcap is not None or f.sinks for f in map(features, attention_modules(lm).values()))
    for kind, path in fallback_paths(set(cfg.layers), lm.device, lm.dtype, head_dim, features=feats).items():
        print(f"{kind} layers: {path}", file=sys.stderr)
    try:
        generate(lm, tokenizer, ids[:, :16], max_new_tokens=1)
        results["trimix"] = generate(lm, tokenizer, ids, max_new_tokens, progress="trimix")
    finally:
        unpatch_model(lm)
    for method, gen in results.items():
        print(f"--- {method} ---")
        print(gen.text)
    for method, gen in results.items():
        print(f"{method}: prompt {gen.prompt_tokens} tokens, prefill {gen.prefill_s * 1000:.1f} ms "
              f"({lm.device}, {lm.dtype})")
    return results
