"""Plug TriangleMix into Hugging Face transformers.

We register one attention function, ``"trimix"``, through ``AttentionInterface`` (and the SDPA mask
builder under the same name through ``AttentionMaskInterface``), and pick each layer's method from
``module.layer_idx``. Model forwards are not rewritten.

At a prefill (no cached keys before the prompt: ``q_len == k_len``) a layer follows its plan;
decode steps and continued prefill over a cache are dense, and the KV cache keeps every key, so
``model.generate()`` works as before.

Dense means the model's own attention: ``patch_model`` records the implementation the model was loaded
with (eager of its own modeling file, sdpa, flash, flex; :mod:`trimix_probe.families`), and dense and
sliding layers, decode steps and the dense fallbacks call it with its own mask and every keyword the
model passes (scaling, softcap, s_aux, sliding_window, dropout), so an all-dense plan is the unpatched
model bit for bit. Sliding-window layers cannot be triangle or dynamic (refused before any forward).

Verified on CPU with tiny random-init models of 13 transformers families (tests/test_families.py)
and SmolLM2-135M-Instruct; on CUDA (H100, H200) with the Llama-3.1-8B architecture; and with a model
split over two H200s by a device_map (tests/test_multi_gpu.py). flash_attention_2 / flex_attention as
the loaded implementation were not run.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from . import ops
from .config import OWN_KINDS, DynamicSpec, LayerKind, ModelIdentity, TriMixConfig
from .errors import ConfigError, PaddedBatchError
from .families import (OwnAttention, adds_alibi, attention_modules, features, forget_own, layer_windows,
                       check_supported, own_attention, recalled_own, remember_own, set_routed, window_words)

ATTN_NAME = "trimix"


@dataclass(frozen=True)
class LayerPlan:
    """What one attention module does at prefill."""

    kind: LayerKind
    n_init: int
    n_local: int
    last_n: int
    dense_heads: tuple[int, ...] = ()
    dynamic: DynamicSpec | None = None
    impl: str = "auto"  # triangle implementation: "auto" or a key of ops.TRIANGLE_IMPLS


def _own(module) -> OwnAttention:
    own = getattr(module, "_trimix_own", None)
    return own if own is not None else OwnAttention("sdpa", sdpa_attention_forward, sdpa_mask)


def _run_own(module, own: OwnAttention, query, key, value, mask, scaling, dropout, kwargs) -> torch.Tensor:
    """The model's own attention: [batch, heads, q_len, head_dim] -> same."""
    out, _ = own.fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    return out.transpose(1, 2)


_built: list = []  # (weakref to the key-padding vector, config, dtype, mask): the last own mask built


def _own_mask(module, own: OwnAttention, key_padding: torch.Tensor, dtype: torch.dtype):
    """The model's own causal mask for the key-padding vector ``key_padding`` [batch, 1, 1, seq] of
    :func:`trimix_mask`, built once per forward (every layer of a forward gets the same tensor)."""
    if _built and _built[0]() is key_padding and _built[1] is module.config and _built[2] == dtype:
        return _built[3]
    mask = own.causal_mask(module, key_padding[:, 0, 0, :], dtype)
    _built[:] = [weakref.ref(key_padding), module.config, dtype, mask]
    weakref.finalize(key_padding, _built.clear)  # the forward's vector is gone: so is its mask
    return mask


def _prefill_sparse(plan: LayerPlan, query, key, value, scaling, softcap, sinks):
    """[batch, heads, seq, head_dim] -> same, following a non-dense plan."""
    if plan.kind == "dynamic":
        from .dynamic import dynamic_attention

        out = dynamic_attention(query, key, value, plan.dynamic, scale=scaling, softcap=softcap, sinks=sinks)
    else:
        out = ops.triangle(query, key, value, n_init=plan.n_init, n_local=plan.n_local, last_n=plan.last_n,
                           scale=scaling, softcap=softcap, sinks=sinks, impl=plan.impl)
    if plan.dense_heads:
        # heads the plan keeps dense in this layer (triangle or dynamic): recompute them with full causal attention
        group = query.shape[1] // key.shape[1]
        heads = torch.tensor(plan.dense_heads, device=query.device)
        q, k, v = query[:, heads], key[:, heads // group], value[:, heads // group]
        if softcap is None and sinks is None:
            out[:, heads] = ops.dense_causal(q, k, v, scale=scaling)
        else:  # a triangle whose window covers the prompt is the causal mask, with softcap and sinks
            out[:, heads] = ops.triangle(q, k, v, n_init=0, n_local=q.shape[2], last_n=0, scale=scaling,
                                         softcap=softcap, sinks=None if sinks is None else sinks[heads],
                                         impl=plan.impl)
    return out


def _prefill(plan: LayerPlan, module, own: OwnAttention, query, key, value, scaling, dropout, kwargs):
    """Causal prefill of one unpadded batch following ``plan``: [batch, heads, seq, head_dim] -> same.
    A triangle no longer than n_local + last_n is the causal mask itself: the model's own attention."""
    batch, _, seq, _ = query.shape
    if plan.kind == "triangle" and seq <= plan.n_local + plan.last_n:
        valid = torch.ones(batch, seq, dtype=torch.bool, device=query.device)
        mask = own.causal_mask(module, valid, query.dtype)
        return _run_own(module, own, query, key, value, mask, scaling, dropout, kwargs)
    return _prefill_sparse(plan, query, key, value, scaling, kwargs.get("softcap"), kwargs.get("s_aux"))


def _prefill_key_padded(plan: LayerPlan, module, own, query, key, value, key_valid, scaling, dropout, kwargs):
    """A padded prefill: each prompt runs on its own unpadded span, so the plan (sinks, window, last rows)
    is that of the prompt alone. key_valid: [batch, seq] bool. Padding rows get zeros (no key sees them)."""
    out = query.new_zeros(*query.shape[:3], value.shape[-1])  # v's head_dim (MLA: not q's)
    layer = getattr(module, "layer_idx", "?")
    for b in range(query.shape[0]):
        idx = key_valid[b].nonzero()
        if idx.numel() == 0:
            continue
        start, stop = idx[0, 0].item(), idx[-1, 0].item() + 1
        if stop - start != idx.shape[0]:
            raise PaddedBatchError(f"layer {layer}: batch row {b} has padding inside the prompt; TriangleMix "
                                   "accepts left or right padding only")
        span = slice(start, stop)
        out[b:b + 1, :, span] = _prefill(plan, module, own, query[b:b + 1, :, span], key[b:b + 1, :, span],
                                         value[b:b + 1, :, span], scaling, dropout, kwargs)
    return out


def _is_key_padding(attention_mask, q_len: int) -> bool:
    """Whether ``attention_mask`` is :func:`trimix_mask`'s key-padding vector [batch, 1, 1, k_len]."""
    return (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and q_len > 1
            and attention_mask.shape[-2] == 1 and attention_mask.dtype == torch.bool)


def trimix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"trimix"`` attention function. query: [batch, heads, q_len, head_dim];
    key, value: [batch, kv_heads, k_len, head_dim] (the whole cache). Returns [batch, q_len, heads, head_dim].

    Dense layers, decode steps, continued prefill over a cache and dense fallbacks run the model's own
    attention (:class:`OwnAttention`) with its own mask and every keyword the model passed."""
    plan: LayerPlan | None = getattr(module, "_trimix_plan", None)
    own = _own(module)
    q_len, k_len = query.shape[2], key.shape[2]
    key_padded = _is_key_padding(attention_mask, q_len)
    if q_len != k_len or q_len == 1 or plan is None or plan.kind in OWN_KINDS:
        mask = _own_mask(module, own, attention_mask, query.dtype) if key_padded else attention_mask
        return own.fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = getattr(module, "layer_idx", "?")
    # the refusals, in the order of their causes: the layer's own window, the mask, training
    if kwargs.get("sliding_window") is not None:
        raise ConfigError(f"layer {layer} is a sliding-window layer (window {kwargs['sliding_window']}); it cannot "
                          f"run the {plan.kind} plan: mark it 'sliding' in the config")
    if attention_mask is not None and not key_padded:
        raise PaddedBatchError(
            f"layer {layer}: a custom attention mask reached a {plan.kind} layer; TriangleMix accepts unpadded "
            "prompts or left/right-padded batches (2D attention_mask)")
    if module.training and dropout > 0:
        raise ValueError(f"layer {layer}: {plan.kind} prefill is inference-only (dropout={dropout}); "
                         "call model.eval()")
    if key_padded and not bool(attention_mask.all()):
        out = _prefill_key_padded(plan, module, own, query, key, value, attention_mask[:, 0, 0, :], scaling,
                                  dropout, kwargs)
    else:
        out = _prefill(plan, module, own, query, key, value, scaling, dropout, kwargs)
    return out.transpose(1, 2), None


def trimix_mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=None, config=None, **kwargs):
    """The mask builder of ``"trimix"``: the model's own implementation's mask (:func:`families.recalled_own`),
    except for a causal prefill: there we return the key-padding vector [batch, 1, 1, kv_len] (no seq x seq
    tensor); :func:`trimix_attention` builds the own mask from it for the layers that run the model's own
    attention, and runs each prompt of a padded batch on its own unpadded span in sparse layers. A model
    that adds a bias to the mask it gets (Falcon's ALiBi) always gets its own mask (its layers are dense:
    :func:`check_plan`)."""
    if (q_length > 1 and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
            and mask_function is causal_mask_function and (attention_mask is None or attention_mask.dim() == 2)
            and not adds_alibi(config)):
        if attention_mask is None:
            return torch.ones(batch_size, 1, 1, kv_length, dtype=torch.bool, device=kwargs.get("device"))
        return attention_mask[:, None, None, :kv_length].to(torch.bool)
    own = recalled_own(config)
    builder = sdpa_mask if own is None else own.mask
    if builder is None:
        return None
    return builder(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                   kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, config=config,
                   **kwargs)


def register() -> None:
    """Register ``"trimix"`` with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, trimix_attention)
    AttentionMaskInterface.register(ATTN_NAME, trimix_mask)


@contextmanager
def routed(model: torch.nn.Module, name: str, attention_fn) -> Iterator[None]:
    """Run ``model``'s attention through ``attention_fn`` (registered under ``name``, with SDPA's mask)
    inside the block; the previous implementation is restored on exit, also after an error."""
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    set_routed(model, name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def check_plan(model: torch.nn.Module, config: TriMixConfig, modules: dict[int, torch.nn.Module]) -> None:
    """Refuse, before any forward, a plan the model's layers cannot run: a sparse (triangle, dynamic) kind on
    a sliding-window layer or one with an ALiBi bias, 'sliding' on a layer without a window. Softcap and sinks
    need no check: triangle layers (every entry of :data:`trimix_probe.ops.TRIANGLE_IMPLS`) and dynamic
    layers honour them."""
    windows = layer_windows(model, modules)
    for idx, kind in enumerate(config.layers):
        window = windows[idx]
        if kind in ("triangle", "dynamic") and features(modules[idx]).alibi:
            raise ConfigError(f"layer {idx}: this model adds an ALiBi position bias to its attention scores, which "
                              f"the {kind} kernels do not apply; only 'dense' layers run on it")
        if kind in ("triangle", "dynamic") and window is not None:
            raise ConfigError(f"layer {idx} is {window_words(model, idx, window)} and cannot run the {kind} "
                              "plan; mark it 'sliding' (the model's own attention): TriangleMix applies to "
                              "full-attention layers")
        if kind == "sliding" and window is None:
            raise ConfigError(f"layer {idx} is marked 'sliding' but the model declares no sliding window there; "
                              "mark it 'dense'")


def check_runnable(model: torch.nn.Module, config: TriMixConfig) -> dict[int, torch.nn.Module]:
    """The model's attention modules by layer, once every layer has one and :func:`check_plan` passes
    ``config`` (a ConfigError in one line otherwise); no forward runs."""
    check_supported(model)
    modules = attention_modules(model)
    if sorted(modules) != list(range(config.model.num_layers)):
        raise ConfigError(f"found attention modules for layers {sorted(modules)[:4]}...; expected "
                          f"0..{config.model.num_layers - 1} (decoder layers whose self-attention has a layer_idx)")
    check_plan(model, config, modules)
    return modules


def patch_model(model: torch.nn.Module, config: TriMixConfig | str | os.PathLike | dict,
                impl: str = "auto") -> torch.nn.Module:
    """Run ``model``'s prefill with ``config``'s per-layer plan (a :class:`TriMixConfig`, the path of
    its JSON file, or the JSON's dict), triangle layers on the implementation ``impl`` (``"auto"``:
    the Triton kernel where it applies, else the torch reference; or a key of
    :data:`trimix_probe.ops.TRIANGLE_IMPLS`). Refuses a config made for another model shape, or one its
    layers cannot run (:func:`check_plan`). Dense layers keep the attention the model was loaded with.
    Undo with :func:`unpatch_model`. Returns the model (patched in place)."""
    if isinstance(config, (str, os.PathLike)):
        config = TriMixConfig.load(config)
    elif isinstance(config, dict):
        config = TriMixConfig.from_dict(config)
    elif not isinstance(config, TriMixConfig):
        raise TypeError(f"patch_model: config must be a TriMixConfig, the path of its JSON file or its dict; "
                        f"got {type(config).__name__}")
    ops.check_impl(impl)
    config.check_model(ModelIdentity.from_hf_config(model.config))
    modules = check_runnable(model, config)
    previous = getattr(model, "_trimix_previous_attn", None) or model.config._attn_implementation
    owns = {idx: own_attention(module, previous) for idx, module in modules.items()}
    register()
    set_routed(model, ATTN_NAME)  # first: a model that ignores it is refused before anything is changed
    for idx, module in modules.items():
        module._trimix_plan = LayerPlan(
            kind=config.layers[idx], n_init=config.n_init, n_local=config.n_local, last_n=config.last_n,
            dense_heads=config.dense_heads.get(idx, ()), dynamic=config.dynamic_spec(idx), impl=impl)
        module._trimix_own = owns[idx]
        remember_own(module.config, owns[idx])
    remember_own(model.config, owns[0])
    model._trimix_previous_attn = previous
    model._trimix_config = config
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_model`: restore the previous attention implementation."""
    previous = getattr(model, "_trimix_previous_attn", None)
    if previous is None:
        return model
    for module in attention_modules(model).values():
        for attr in ("_trimix_plan", "_trimix_own"):
            module.__dict__.pop(attr, None)
        forget_own(module.config)
    forget_own(model.config)
    model.set_attn_implementation(previous)
    del model._trimix_previous_attn
    del model._trimix_config
    return model
