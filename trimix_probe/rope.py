"""Rope scaling: stretch a model's rotary position embedding past the length it was trained on.

A spec is ``TYPE:FACTOR[:ORIGINAL]`` (``yarn:4:32768``, ``linear:2``, ``dynamic:2``, ``llama3:8:8192``),
mapped onto transformers' own ``rope_parameters`` (the 5.x spelling; ``rope_scaling`` in older
``config.json`` files is read into it by transformers), so the rotary embedding is built by
transformers' ``ROPE_INIT_FUNCTIONS`` as for a model shipped with those settings:

- ``yarn``: ``factor``, ``original_max_position_embeddings`` (default: the model's own, else its
  ``max_position_embeddings``); attention scaling and ramp from transformers' defaults;
- ``linear``: ``factor`` (position interpolation);
- ``dynamic``: dynamic NTK; transformers treats ``max_position_embeddings`` as the trained length, so
  ``ORIGINAL`` sets it;
- ``llama3``: ``factor``, ``original_max_position_embeddings``, and ``low_freq_factor`` /
  ``high_freq_factor`` (the model's own, else Llama 3.1's published 1 and 4).

The scaled context is ``max(max_position_embeddings, original * factor)``; a longer prompt is refused.
Not verified here: accuracy under any scaling (that is measured in docs/accuracy.md), per-layer
rope parameters (Gemma-style configs are refused), and rope scaling a GGUF file carries beyond what
transformers maps into the config.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .config import text_config
from .errors import InputError

RopeType = Literal["yarn", "linear", "dynamic", "llama3"]
LLAMA3_FREQ_FACTORS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's config.json
# what a config records about its rope (provenance["rope"]) and what run/eval compare
RECORDED = ("rope_type", "factor", "original_max_position_embeddings", "rope_theta")
SPEC_HELP = "TYPE:FACTOR[:ORIGINAL] with TYPE one of yarn, linear, dynamic, llama3 (e.g. yarn:4:32768, linear:2)"


@dataclass(frozen=True)
class RopeScaling:
    """One rope scaling asked for by the user: ``type``, ``factor`` > 1, and the trained length
    ``original`` (None: the model's own)."""

    type: RopeType
    factor: float
    original: int | None = None

    def __post_init__(self) -> None:
        if self.type not in get_args(RopeType):
            raise InputError(f"rope scaling type {self.type!r} is not known; accepted: {', '.join(get_args(RopeType))}")
        if not self.factor > 1:
            raise InputError(f"rope scaling factor must be > 1 (1 is no scaling), got {self.factor:g}")
        if self.original is not None and self.original <= 0:
            raise InputError(f"rope scaling original length must be a positive token count, got {self.original}")
        if self.type == "linear" and self.original is not None:
            raise InputError("rope scaling linear takes no original length (linear:FACTOR)")


def _tokens(text: str) -> int:
    t = text.strip().lower()
    return round(float(t[:-1]) * 1024) if t.endswith("k") else int(t)


def parse_rope_scaling(spec: str | RopeScaling | None) -> RopeScaling | None:
    """``"yarn:4:32768"`` -> RopeScaling("yarn", 4.0, 32768); ORIGINAL may be written 32k. None stays None."""
    if spec is None or isinstance(spec, RopeScaling):
        return spec
    parts = spec.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise InputError(f"rope scaling {spec!r} is malformed; expected {SPEC_HELP}")
    kind = parts[0].strip().lower()
    if kind not in get_args(RopeType):
        raise InputError(f"rope scaling type {kind!r} is not known; accepted: {', '.join(get_args(RopeType))}")
    try:
        factor = float(parts[1])
        original = _tokens(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise InputError(f"rope scaling {spec!r} is malformed; expected {SPEC_HELP}") from None
    return RopeScaling(kind, factor, original)


def rope_parameters(hf_config) -> dict[str, Any]:
    """A copy of the model's global rope parameters (``{}`` when it has none)."""
    params = getattr(text_config(hf_config), "rope_parameters", None) or {}
    return dict(params)


def context_length(hf_config) -> int:
    """The longest prompt the rope settings are meant for: ``max(max_position_embeddings, original *
    factor)`` with a scaling, else ``max_position_embeddings``."""
    text = text_config(hf_config)
    params, longest = rope_parameters(hf_config), int(text.max_position_embeddings)
    factor = params.get("factor")
    if params.get("rope_type", "default") != "default" and factor:
        original = params.get("original_max_position_embeddings") or longest
        return max(longest, int(original * factor))
    return longest


def describe(hf_config) -> dict[str, Any]:
    """What a config records about the rope of the model it was probed on: the :data:`RECORDED`
    keys the model has, and ``context`` (:func:`context_length`)."""
    params = rope_parameters(hf_config)
    return {k: params[k] for k in RECORDED if params.get(k) is not None} | {"context": context_length(hf_config)}


def _one_line(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if k != "context") + f" (context {summary.get('context', '?')})"


def apply_rope_scaling(hf_config, scaling: RopeScaling) -> str:
    """Set ``scaling`` on ``hf_config`` (before the model is built from it). Returns the note to
    print: the settings now in force and what the model had."""
    text = text_config(hf_config)
    own = rope_parameters(hf_config)
    nested = text.nested_rope_parameter_keys(own) if hasattr(text, "nested_rope_parameter_keys") else []
    if not own or nested:
        raise InputError(f"--rope-scaling: this model ({type(text).__name__}) has no single global rope "
                         "parameters to scale (none, or one set per layer type)")
    before = describe(hf_config)
    params: dict[str, Any] = {k: own[k] for k in ("rope_theta", "partial_rotary_factor") if k in own}
    params |= {"rope_type": scaling.type, "factor": scaling.factor}
    own_original = own.get("original_max_position_embeddings") or text.max_position_embeddings
    if scaling.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = scaling.original or own_original
    if scaling.type == "llama3":
        params |= {k: own.get(k, v) for k, v in LLAMA3_FREQ_FACTORS.items()}
    if scaling.type == "dynamic" and scaling.original is not None:
        text.max_position_embeddings = scaling.original  # dynamic NTK's trained length
    text.rope_parameters = params
    return f"rope scaling {_one_line(describe(hf_config))} overrides the model's {_one_line(before)}"


def check_length(hf_config, n_tokens: int, what: str = "prompt") -> None:
    """Refuse ``n_tokens`` beyond the model's (scaled) context, naming the option that stretches it."""
    limit = context_length(hf_config)
    if n_tokens > limit:
        raise InputError(f"a {what} of {n_tokens} tokens is beyond this model's context of {limit} tokens "
                         f"({_one_line(describe(hf_config))}); ask for a shorter length or stretch the rope "
                         f"with --rope-scaling {SPEC_HELP}")


def probed_rope_mismatch(provenance: dict[str, Any], hf_config) -> str | None:
    """One line when a config was probed under other rope settings (``provenance["rope"]``) than
    ``hf_config`` has now; None when they agree or the config does not record them."""
    recorded = provenance.get("rope")
    if not isinstance(recorded, dict):
        return None
    now = describe(hf_config)
    if all(recorded.get(k) == now.get(k) for k in RECORDED):
        return None
    lengths = provenance.get("probed_lengths")
    at = f" at {', '.join(map(str, lengths))} tokens" if lengths else ""
    return (f"the config was probed{at} with rope {_one_line(recorded)}; the model now runs with rope "
            f"{_one_line(now)}: its starting layer may not carry over")


def warn_probed_rope(provenance: dict[str, Any], hf_config, where: str = "") -> None:
    """Print :func:`probed_rope_mismatch`'s line as one warning on stderr, if there is one."""
    note = probed_rope_mismatch(provenance, hf_config)
    if note:
        print(f"warning: {where}{note}", file=sys.stderr)
