"""Plug TriangleMix into Hugging Face transformers.

We register one attention function, ``"trimix"``, through ``AttentionInterface`` (and the SDPA mask
builder under the same name through ``AttentionMaskInterface``), and pick each layer's method from
``module.layer_idx``. Model forwards are not rewritten.

At a prefill (no cached keys before the prompt: ``q_len == k_len``) a layer follows its plan;
decode steps and continued prefill over a cache are dense, and the KV cache keeps every key, so
``model.generate()`` works as before.

Verified on CPU with random-init Llama and Qwen2 models and SmolLM2-135M-Instruct; on CUDA
(H100) with the Llama-3.1-8B architecture. Mistral-style sliding-window layers are refused in
triangle mode (their own window would be ignored).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import DynamicSpec, LayerKind, ModelIdentity, TriMixConfig
from .reference import triangle_attention_ref

ATTN_NAME = "trimix"

try:  # optional: flash-attn for dense prefill when installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


class PaddedBatchError(ValueError):
    """A padded batch reached a triangle layer; the static pattern is defined per unpadded prompt."""


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
    anything else takes the exact torch reference (slower), with one warning per reason on CUDA."""
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
        warnings.warn(f"trimix: triangle layers fall back to the torch reference for {reason}; "
                      "load the model in bfloat16 or float16 for the Triton kernel", stacklevel=3)
    return False


def triangle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, n_init: int, n_local: int, last_n: int,
             scale: float | None = None) -> torch.Tensor:
    """Triangle attention on any device: the Triton kernel where it applies (:func:`_kernel_applies`),
    the chunked torch reference elsewhere. Shapes as :func:`trimix_probe.triangle_attention`."""
    if _kernel_applies(q):
        from .kernels.triangle import triangle_attention

        return triangle_attention(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale)
    return triangle_attention_ref(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale,
                                  compute_dtype=torch.float32)


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


def trimix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"trimix"`` attention function. query: [batch, heads, q_len, head_dim];
    key, value: [batch, kv_heads, k_len, head_dim] (the whole cache). Returns [batch, q_len, heads, head_dim]."""
    plan: LayerPlan | None = getattr(module, "_trimix_plan", None)
    q_len, k_len = query.shape[2], key.shape[2]
    # Prefill only: decode and continued prefill over a cache are dense.
    if plan is None or plan.kind == "dense" or q_len != k_len:
        return dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if plan.kind == "triangle" and q_len <= plan.n_local + plan.last_n:
        # every row already sees all its keys: the triangle is the causal mask
        return dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = getattr(module, "layer_idx", "?")
    if attention_mask is not None:
        raise PaddedBatchError(
            f"layer {layer}: a padded (or custom-masked) batch reached a {plan.kind} layer; TriangleMix needs "
            "unpadded prompts: run prompts one at a time or in batches of equal length without padding")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"layer {layer}: sliding-window attention layers cannot run the {plan.kind} plan; "
                         "mark this layer 'dense' in the config")
    if module.training and dropout > 0:
        raise ValueError(f"layer {layer}: {plan.kind} prefill is inference-only (dropout={dropout}); call model.eval()")
    out = _prefill_sparse(plan, query, key, value, scaling)
    return out.transpose(1, 2), None


def register() -> None:
    """Register ``"trimix"`` with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, trimix_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


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
