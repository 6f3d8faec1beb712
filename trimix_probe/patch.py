"""Plug TriangleMix into Hugging Face transformers.

We register one attention function, ``"trimix"``, through ``AttentionInterface`` (and the SDPA mask
builder under the same name through ``AttentionMaskInterface``), and pick each layer's method from
``module.layer_idx``. Model forwards are not rewritten.

At a prefill (no cached keys before the prompt: ``q_len == k_len``) a layer follows its plan;
decode steps and continued prefill over a cache are dense, and the KV cache keeps every key, so
``model.generate()`` works as before.

Verified on CPU with random-init Llama and Qwen2 models and SmolLM2-135M-Instruct; on CUDA
(H100, H200) with the Llama-3.1-8B architecture; and with a model split over two H200s by a
device_map (dynamic, dense and triangle layers on different cards: tests/test_multi_gpu.py). Mistral-style sliding-window layers are refused in
triangle mode (their own window would be ignored).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .config import DynamicSpec, LayerKind, ModelIdentity, TriMixConfig
from .triangle_sdpa import triangle_attention_sdpa

ATTN_NAME = "trimix"

try:  # optional: flash-attn for dense prefill when installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


class PaddedBatchError(ValueError):
    """A batch whose mask the runtime cannot follow (padding inside a prompt, a custom 4D mask)."""


@dataclass(frozen=True)
class LayerPlan:
    """What one attention module does at prefill."""

    kind: LayerKind
    n_init: int
    n_local: int
    last_n: int
    dense_heads: tuple[int, ...] = ()
    dynamic: DynamicSpec | None = None


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


_warned: set[str] = set()


def _kernel_applies(q: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA (or under TRITON_INTERPRET=1) for bf16/fp16 and its head dims;
    anything else takes the exact torch SDPA-block path (slower), with one warning per reason on CUDA."""
    from .kernels.triangle import DTYPES, HEAD_DIMS

    if not _use_triton(q):
        return False
    reason = None
    if q.dtype not in DTYPES:
        reason = f"dtype {q.dtype} (the kernel takes {', '.join(map(str, DTYPES))})"
    elif q.shape[-1] not in HEAD_DIMS:
        reason = f"head_dim {q.shape[-1]} (the kernel takes {HEAD_DIMS})"
    if reason is None:
        return True
    if q.is_cuda and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"trimix: triangle layers fall back to torch SDPA blocks for {reason}; "
                      "load the model in bfloat16 or float16 for the Triton kernel", stacklevel=3)
    return False


def triangle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, n_init: int, n_local: int, last_n: int,
             scale: float | None = None) -> torch.Tensor:
    """Triangle attention on any device: the Triton kernel where it applies (:func:`_kernel_applies`),
    exact blocked SDPA elsewhere (:mod:`trimix_probe.triangle_sdpa`; the torch reference stays the
    tests' yardstick). Shapes as :func:`trimix_probe.triangle_attention`."""
    if _kernel_applies(q):
        from .kernels.triangle import triangle_attention

        return triangle_attention(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale)
    return triangle_attention_sdpa(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale)


def fallback_paths(kinds, device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, str]:
    """For each layer kind in ``kinds`` that will not run a Triton kernel on inputs of this device,
    dtype and head_dim, the path it takes, in words (``run`` prints them)."""
    q = torch.empty(0, 1, 0, head_dim, device=device, dtype=dtype)
    why = f"no Triton on {device.type}" if not _use_triton(q) else f"{dtype}, head_dim {head_dim}"
    paths = {}
    if "triangle" in kinds and not _kernel_applies(q):
        paths["triangle"] = f"torch SDPA blocks ({why})"
    if "dynamic" in kinds and not _use_triton(q):
        paths["dynamic"] = f"torch reference ({why})"
    return paths


def dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense causal attention: flash-attn for an unmasked prefill when installed, SDPA otherwise."""
    if (_flash_attn_func is not None and query.is_cuda and attention_mask is None
            and query.dtype in (torch.float16, torch.bfloat16) and query.shape[2] == key.shape[2]
            and query.shape[-1] <= 256 and kwargs.get("sliding_window") is None):
        out = _flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                               dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _prefill_sparse(plan: LayerPlan, query, key, value, scaling):
    """[batch, heads, seq, head_dim] -> same, following a non-dense plan."""
    if plan.kind == "dynamic":
        from .dynamic import dynamic_attention

        return dynamic_attention(query, key, value, plan.dynamic, scale=scaling)
    out = triangle(query, key, value, n_init=plan.n_init, n_local=plan.n_local, last_n=plan.last_n,
                   scale=scaling)
    if plan.dense_heads:
        # heads the plan keeps dense in this layer: recompute them with full causal attention
        group = query.shape[1] // key.shape[1]
        heads = torch.tensor(plan.dense_heads, device=query.device)
        dense = torch.nn.functional.scaled_dot_product_attention(
            query[:, heads], key[:, heads // group], value[:, heads // group], is_causal=True, scale=scaling)
        out[:, heads] = dense
    return out


def _prefill(plan: LayerPlan | None, query, key, value, scaling):
    """Causal prefill of one unpadded batch following ``plan``: [batch, heads, seq, head_dim] -> same."""
    seq = query.shape[2]
    dense = plan is None or plan.kind == "dense" or (plan.kind == "triangle" and seq <= plan.n_local + plan.last_n)
    if not dense:  # (a triangle no longer than n_local + last_n is the causal mask itself)
        return _prefill_sparse(plan, query, key, value, scaling)
    if _flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                softmax_scale=scaling, causal=True).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                            enable_gqa=query.shape[1] != key.shape[1])


def _prefill_key_padded(plan: LayerPlan | None, query, key, value, key_valid, scaling, layer):
    """A padded prefill: each prompt runs on its own unpadded span, so the plan (sinks, window, last rows)
    is that of the prompt alone. key_valid: [batch, seq] bool. Padding rows get zeros (no key sees them)."""
    out = torch.zeros_like(query)
    for b in range(query.shape[0]):
        idx = key_valid[b].nonzero()
        if idx.numel() == 0:
            continue
        start, stop = idx[0, 0].item(), idx[-1, 0].item() + 1
        if stop - start != idx.shape[0]:
            raise PaddedBatchError(f"layer {layer}: batch row {b} has padding inside the prompt; TriangleMix "
                                   "accepts left or right padding only")
        span = slice(start, stop)
        out[b:b + 1, :, span] = _prefill(plan, query[b:b + 1, :, span], key[b:b + 1, :, span],
                                         value[b:b + 1, :, span], scaling)
    return out


def trimix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"trimix"`` attention function. query: [batch, heads, q_len, head_dim];
    key, value: [batch, kv_heads, k_len, head_dim] (the whole cache). Returns [batch, q_len, heads, head_dim]."""
    plan: LayerPlan | None = getattr(module, "_trimix_plan", None)
    q_len, k_len = query.shape[2], key.shape[2]
    key_padded = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] == 1
    # Decode steps and continued prefill over a cache are dense (with transformers' own mask).
    if q_len != k_len or q_len == 1 or (not key_padded and (plan is None or plan.kind == "dense")):
        return dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = getattr(module, "layer_idx", "?")
    if attention_mask is not None and not key_padded:
        raise PaddedBatchError(
            f"layer {layer}: a custom attention mask reached a {plan.kind} layer; TriangleMix accepts unpadded "
            "prompts or left/right-padded batches (2D attention_mask)")
    if plan is not None and plan.kind != "dense":
        if kwargs.get("sliding_window") is not None:
            raise ValueError(f"layer {layer}: sliding-window attention layers cannot run the {plan.kind} plan; "
                             "mark this layer 'dense' in the config")
        if module.training and dropout > 0:
            raise ValueError(f"layer {layer}: {plan.kind} prefill is inference-only (dropout={dropout}); "
                             "call model.eval()")
    if key_padded:
        out = _prefill_key_padded(plan, query, key, value, attention_mask[:, 0, 0, :], scaling, layer)
    else:
        out = _prefill(plan, query, key, value, scaling)
    return out.transpose(1, 2), None


def trimix_mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=None, **kwargs):
    """transformers' SDPA mask, except for a padded causal prefill: there we return the key-padding
    vector [batch, 1, 1, kv_len] instead of a [batch, 1, q_len, kv_len] mask (no seq x seq tensor);
    :func:`trimix_attention` then runs each prompt on its own unpadded span."""
    if (attention_mask is not None and attention_mask.dim() == 2 and q_length > 1 and q_length == kv_length
            and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
            and mask_function is causal_mask_function and not bool(attention_mask[:, :kv_length].all())):
        return attention_mask[:, None, None, :kv_length].to(torch.bool)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


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
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The self-attention modules of a decoder, by ``layer_idx``."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "o_proj") and hasattr(module, "q_proj"):
            found[idx] = module
    return found


def patch_model(model: torch.nn.Module, config: TriMixConfig) -> torch.nn.Module:
    """Run ``model``'s prefill with ``config``'s per-layer plan. Refuses a config made for another
    model shape. Undo with :func:`unpatch_model`. Returns the model (patched in place)."""
    config.check_model(ModelIdentity.from_hf_config(model.config))
    modules = attention_modules(model)
    if sorted(modules) != list(range(config.model.num_layers)):
        raise ValueError(f"found attention modules for layers {sorted(modules)[:4]}...; expected "
                         f"0..{config.model.num_layers - 1} (is this a decoder with q_proj/o_proj attention?)")
    register()
    for idx, module in modules.items():
        module._trimix_plan = LayerPlan(
            kind=config.layers[idx], n_init=config.n_init, n_local=config.n_local, last_n=config.last_n,
            dense_heads=config.dense_heads.get(idx, ()), dynamic=config.dynamic)
    if getattr(model, "_trimix_previous_attn", None) is None:
        model._trimix_previous_attn = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    model._trimix_config = config
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_model`: restore the previous attention implementation."""
    previous = getattr(model, "_trimix_previous_attn", None)
    if previous is None:
        return model
    for module in attention_modules(model).values():
        if hasattr(module, "_trimix_plan"):
            del module._trimix_plan
    model.set_attn_implementation(previous)
    del model._trimix_previous_attn
    del model._trimix_config
    return model
