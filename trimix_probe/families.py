"""What a transformers decoder declares about its attention, read the same way for every family.

- :func:`attention_modules`: each decoder layer's self-attention (``self_attn``; GPT-NeoX's ``attention``,
  Falcon's ``self_attention``) by its ``layer_idx`` (fused ``qkv_proj`` as in Phi-3 is fine: projections are
  not looked at);
- :func:`layer_windows`: which layers attend through a sliding window and how wide (``config.layer_types``,
  a module's own ``sliding_window``, or a model-wide ``config.sliding_window`` as in Mistral);
- :func:`own_attention`: the attention function and mask builder the model was loaded with
  (``eager`` is per family: the ``eager_attention_forward`` of the module's own modeling file);
- :func:`features`: the score features a layer's attention applies (Gemma-2's logit softcap,
  gpt-oss's sinks, Falcon's ALiBi), read from the module, for refusals that must come before any forward;
- :func:`check_supported` (:func:`check_softmax_layers`, :func:`check_routable`): one-line refusals of hybrid models (layers without
  softmax attention) and of models whose attention ignores transformers' attention interface.

Verified on CPU with tiny random-init models of Llama, Qwen2, Qwen3, Mistral (with and without a window),
Phi-3, Gemma-2, Gemma-3, gpt-oss, OLMo-2, Granite, Cohere, Cohere-2, Phi, StableLM, Starcoder2, Gemma, GLM,
OLMo, SmolLM3, EXAONE-4, OLMo-3, Qwen2 with window layers, GPT-NeoX, Falcon, Gemma-3n (with and without
K/V shared across layers), Falcon-H1 (attention beside a state-space branch), Llama 4 (chunked-attention
layers kept as window layers; a NoPE layer's query temperature) and DeepSeek-V3 (MLA: v's head_dim is not
q's, so the kernels, which take one head_dim, give way to the torch paths) (tests/test_families.py),
transformers 5.24 and 5.25; flash_attention_2 and flex_attention as the loaded implementation were not run.
Mixtral, Qwen2-MoE and Qwen3-MoE passed the run tests by hand (2026-12-07), outside the suite: its float64
probe reference cannot run their experts. GLM-4-MoE, HunYuan, ERNIE-4.5, Seed-OSS, Nemotron, Helium and BitNet
passed the reference, triangle, verification, eval-replay, probe and generate tests by hand (2026-12-08;
Helium's generate stopped at a random EOS). Attention under other names than ``ATTENTION_ATTRS`` is refused.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .config import text_config
from .errors import ConfigError, InputError

FULL = "full_attention"
SLIDING = "sliding_attention"
CHUNKED = "chunked_attention"  # Llama 4: a query sees the keys of its own chunk (attention_chunk_size) only
# the layer types that mix tokens with softmax attention ("hybrid": Falcon-H1's attention beside a state-space
# branch in every layer; the plan applies to the attention, the other branch runs as it is)
ATTENTION_TYPES = (FULL, SLIDING, CHUNKED, "hybrid")


# where a decoder layer keeps its self-attention, by family: most (Llama, Qwen, Gemma, ...) ``self_attn``;
# GPT-NeoX / Pythia ``attention``; Falcon ``self_attention``
ATTENTION_ATTRS = ("self_attn", "attention", "self_attention")


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The self-attention modules of a decoder, by ``layer_idx`` (:func:`decoder_layers`)."""
    return {idx: _own_attention_module(layer) for idx, layer in decoder_layers(model).items()}


def _own_attention_module(layer: torch.nn.Module) -> torch.nn.Module | None:
    for name in ATTENTION_ATTRS:
        attn = getattr(layer, name, None)
        if isinstance(attn, torch.nn.Module) and isinstance(getattr(attn, "layer_idx", None), int):
            return attn
    return None


def decoder_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The decoder layers, by the ``layer_idx`` of their attention: the modules with a self-attention
    child (one of ``ATTENTION_ATTRS``) that has an integer ``layer_idx``."""
    found: dict[int, torch.nn.Module] = {}
    for layer in model.modules():
        attn = _own_attention_module(layer)
        if attn is not None:
            found[attn.layer_idx] = layer
    return found


def non_attention_layers(hf_config) -> dict[int, str]:
    """The layers a hybrid model declares (``config.layer_types``) as mixing tokens some other way than
    softmax attention (Qwen3-Next's and MiniMax's ``linear_attention``, LFM2's ``conv``, ...): their type
    by index. Empty for a model without ``layer_types`` or with attention in every layer."""
    return {i: t for i, t in enumerate(getattr(text_config(hf_config), "layer_types", None) or [])
            if t not in ATTENTION_TYPES}


def check_softmax_layers(hf_config) -> None:
    """Refuse, in one line and before any weight loads, a hybrid model (:func:`non_attention_layers`):
    a plan has one entry per layer, and TriangleMix needs softmax attention in each."""
    odd = non_attention_layers(hf_config)
    if odd:
        text = text_config(hf_config)
        shown = ", ".join(map(str, list(odd)[:8])) + (", ..." if len(odd) > 8 else "")
        raise InputError(f"this model ({type(text).__name__}) mixes tokens without softmax attention in "
                         f"{len(odd)} of its {len(text.layer_types)} layers ({shown}: "
                         f"{', '.join(sorted(set(odd.values())))}); TriangleMix plans need softmax attention in "
                         "every layer, so hybrid models are not supported")


def check_routable(model: torch.nn.Module) -> None:
    """Refuse, in one line, a model whose attention does not go through transformers' attention interface
    in this transformers version (its modeling file calls SDPA or its own kernels itself, as Falcon's did
    before 5.2x): ``set_attn_implementation`` would leave it as it is, and a plan (or the probe's gates)
    would silently not run. transformers' own test of that (``_can_set_attn_implementation``) where it has
    one; :func:`set_routed` checks the result after setting."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        _not_routable(model)


def set_routed(model: torch.nn.Module, name: str) -> None:
    """``model.set_attn_implementation(name)``, refused in one line when the model ignores it."""
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        _not_routable(model)


def _not_routable(model: torch.nn.Module):
    import transformers

    raise InputError(f"this model ({type(model).__name__}) does not run its attention through transformers' "
                     f"attention interface in transformers {transformers.__version__} (its modeling file calls "
                     "attention itself), so a TriangleMix plan cannot reach it; a newer transformers may "
                     "(Falcon's does from 5.2x)")


def check_supported(model: torch.nn.Module) -> None:
    """The refusals a plan or the probe needs before touching ``model``: :func:`check_softmax_layers`
    and :func:`check_routable`."""
    check_softmax_layers(model.config)
    check_routable(model)


def shares_kv_across_layers(model: torch.nn.Module) -> bool:
    """Whether later layers reuse the K/V of earlier ones (Gemma-3n's ``num_kv_shared_layers``): a forward
    cannot then start at a middle layer from its hidden state alone (:mod:`trimix_probe.replay`)."""
    return (getattr(model.config.get_text_config(), "num_kv_shared_layers", 0) or 0) > 0


def layer_types(model: torch.nn.Module, num_layers: int) -> list[str]:
    """Each layer's attention type: ``config.layer_types`` where the model declares them, else
    ``"sliding_attention"`` for every layer of a model-wide ``sliding_window`` (Mistral, Phi-3), else
    ``"full_attention"``."""
    text = model.config.get_text_config()
    types = getattr(text, "layer_types", None)
    if types is not None:
        return list(types)
    return [SLIDING if getattr(text, "sliding_window", None) is not None else FULL] * num_layers


def layer_windows(model: torch.nn.Module, modules: dict[int, torch.nn.Module]) -> dict[int, int | None]:
    """The sliding window (keys a query sees, itself included) of each layer, None for full attention:
    the module's own ``sliding_window`` where it has one, else the config's for a sliding layer. A
    chunked-attention layer (Llama 4) counts as a window layer of its chunk size (a query sees at most
    that many keys): like a sliding one, it keeps its own attention in every plan."""
    text = model.config.get_text_config()
    types = layer_types(model, len(modules))
    windows = {}
    for idx, module in modules.items():
        if hasattr(module, "sliding_window"):
            windows[idx] = module.sliding_window
        elif types[idx] == CHUNKED:
            windows[idx] = getattr(text, "attention_chunk_size", None)
        else:
            windows[idx] = getattr(text, "sliding_window", None) if types[idx] == SLIDING else None
    return windows


def window_words(model: torch.nn.Module, idx: int, window: int) -> str:
    """How a window layer is named in messages: 'a sliding-window layer (window W)' or, for Llama 4's
    chunked attention, 'a chunked-attention layer (chunks of W keys)'."""
    types = layer_types(model, idx + 1)
    if idx < len(types) and types[idx] == CHUNKED:
        return f"a chunked-attention layer (chunks of {window} keys)"
    return f"a sliding-window layer (window {window})"


@dataclass(frozen=True)
class Features:
    """Score features of one attention module: ``softcap`` (tanh cap of the scaled scores), ``sinks`` (a
    learned logit per head joining the softmax denominator, gpt-oss's ``s_aux``) and ``alibi`` (a
    position bias added to the scores through the mask, Falcon with ``alibi=True``)."""

    softcap: float | None = None
    sinks: bool = False
    alibi: bool = False

    def names(self) -> list[str]:
        return ((["softcap"] if self.softcap is not None else []) + (["sinks (s_aux)"] if self.sinks else [])
                + (["ALiBi"] if self.alibi else []))


def features(module: torch.nn.Module) -> Features:
    """The features ``module`` passes to its attention function (as the modeling files name them)."""
    softcap = getattr(module, "attn_logit_softcapping", None)
    sinks = isinstance(getattr(module, "sinks", None), torch.Tensor)
    return Features(softcap=softcap, sinks=sinks, alibi=adds_alibi(getattr(module, "config", None)))


def adds_alibi(config) -> bool:
    """Whether the model builds an ALiBi bias into its attention mask (Falcon's ``alibi``)."""
    return bool(getattr(config, "alibi", False))


@dataclass(frozen=True)
class OwnAttention:
    """The attention a model was loaded with: ``name`` (eager, sdpa, flash_attention_2, ...), its function
    ``(module, q, k, v, mask, **kw) -> (out [batch, q_len, heads, head_dim], weights)`` and its mask
    builder (None when that implementation takes no mask)."""

    name: str
    fn: Callable
    mask: Callable | None

    def causal_mask(self, module: torch.nn.Module, key_valid: torch.Tensor, dtype: torch.dtype):
        """The mask this implementation gets for a causal prefill whose keys ``key_valid`` [batch, seq]
        (bool) are not padding: what transformers' ``create_causal_mask`` builds for it."""
        if self.mask is None:
            return None
        batch, seq = key_valid.shape
        return self.mask(batch_size=batch, q_length=seq, kv_length=seq, q_offset=0, kv_offset=0,
                         mask_function=causal_mask_function, attention_mask=key_valid, allow_is_causal_skip=True,
                         dtype=dtype, config=module.config, use_vmap=False, device=key_valid.device)


def own_attention(module: torch.nn.Module, name: str) -> OwnAttention:
    """The attention function ``name`` means for ``module``; ConfigError when transformers has none."""
    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ConfigError(f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}; "
                              "load the model with attn_implementation='sdpa'")
    elif name in ALL_ATTENTION_FUNCTIONS:
        fn = ALL_ATTENTION_FUNCTIONS[name]
    else:
        raise ConfigError(f"attention implementation {name!r} is not registered with transformers")
    mask = ALL_MASK_ATTENTION_FUNCTIONS[name] if name in ALL_MASK_ATTENTION_FUNCTIONS else None
    return OwnAttention(name, fn, mask)


# The mask builders of the models whose attention is routed elsewhere, by the id of their config (the
# object transformers hands a mask builder): a routed model's masks are still its own implementation's.
_mask_owners: dict[int, tuple[weakref.ref, OwnAttention]] = {}


def remember_own(config, own: OwnAttention) -> None:
    _mask_owners[id(config)] = (weakref.ref(config), own)


def forget_own(config) -> None:
    _mask_owners.pop(id(config), None)


def recalled_own(config) -> OwnAttention | None:
    """What :func:`remember_own` stored for this config object, or None."""
    ref, own = _mask_owners.get(id(config), (None, None))
    return own if ref is not None and ref() is config else None
