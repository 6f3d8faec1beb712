"""Attention operations the runtime, the dynamic layers and the benchmarks share: where the Triton
kernels run, the one dense causal path, and the table of triangle implementations.

Shapes everywhere: q ``[batch, heads, seq, head_dim]``; k, v ``[batch, kv_heads, seq, head_dim]``
(GQA: ``heads`` a multiple of ``kv_heads``); the output is shaped like q, with v's head_dim (which
DeepSeek's MLA makes differ from q's: the torch paths then).

A triangle implementation is a function ``(q, k, v, *, n_init, n_local, last_n, scale=None,
softcap=None, sinks=None) -> out``; :data:`TRIANGLE_IMPLS` maps its name to it, so a new one is one
entry there, and ``patch_model(..., impl=name)`` or :func:`triangle` with ``impl=name`` runs it.
``softcap`` (Gemma-2's ``attn_logit_softcapping``: scaled scores become ``softcap * tanh(s / softcap)``)
and ``sinks`` [heads] (gpt-oss's ``s_aux``: ``exp(sinks[h])`` joins each row's softmax denominator)
are honoured by every entry, as in :func:`trimix_probe.reference.masked_attention`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from .errors import InputError
from .reference import triangle_attention_ref, triangle_mask_fn
from .triangle_sdpa import triangle_attention_sdpa

try:  # optional: flash-attn for dense prefill when installed
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None


def use_triton(t: torch.Tensor) -> bool:
    """Whether Triton kernels can run on ``t``'s device: CUDA, or any device under TRITON_INTERPRET=1."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


_warned: set[str] = set()


def kernel_applies(q: torch.Tensor, value_dim: int | None = None) -> bool:
    """The triangle kernel runs where Triton runs (:func:`use_triton`) for bf16/fp16 and its head dims,
    one head_dim for q, k and v (``value_dim``: v's, when it is not q's, as in DeepSeek's MLA), when
    no gradient is wanted (it has no backward); anything else takes an exact torch path
    (:func:`resolve_triangle`), with one warning per dtype/head_dim reason on CUDA."""
    from .kernels.triangle import DTYPES, HEAD_DIMS

    if not use_triton(q):
        return False
    if torch.is_grad_enabled() and q.requires_grad:  # the kernel has no backward; the reference has
        return False
    reason = None
    if q.dtype not in DTYPES:
        reason = f"dtype {q.dtype} (the kernel takes {', '.join(map(str, DTYPES))})"
    elif q.shape[-1] not in HEAD_DIMS:
        reason = f"head_dim {q.shape[-1]} (the kernel takes {HEAD_DIMS})"
    elif value_dim not in (None, q.shape[-1]):
        reason = f"value head_dim {value_dim} != query head_dim {q.shape[-1]} (the kernel takes one head_dim)"
    if reason is None:
        return True
    if q.is_cuda and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"trimix: triangle layers fall back to torch (SDPA blocks or the reference) for {reason}; "
                      "load the model in bfloat16 or float16 for the Triton kernel", stacklevel=3)
    return False


def flash_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """flash-attn is installed and takes these inputs (CUDA, fp16/bf16, head_dim <= 256, a prefill)."""
    return (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and q.shape[2] == k.shape[2])


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Dense causal prefill attention, unmasked: flash-attn where it applies (:func:`flash_applies`),
    SDPA otherwise (GQA without copying K/V). The one dense causal path of the package."""
    if flash_applies(q, k):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                               causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# -- triangle implementations ----------------------------------------------------------------------
# (q, k, v, *, n_init, n_local, last_n, scale=None, softcap=None, sinks=None) -> out
TriangleFn = Callable[..., torch.Tensor]


def triangle_triton(q, k, v, *, n_init: int, n_local: int, last_n: int, scale: float | None = None,
                    softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel (``kernels/triangle.py``): CUDA, or CPU under TRITON_INTERPRET=1; bf16/fp16."""
    from .kernels.triangle import triangle_attention

    return triangle_attention(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale, softcap=softcap,
                              sinks=sinks)


def triangle_reference(q, k, v, *, n_init: int, n_local: int, last_n: int, scale: float | None = None,
                       softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The exact torch reference, chunked over queries, computed in fp32: any device and dtype (slower)."""
    return triangle_attention_ref(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale,
                                  compute_dtype=torch.float32, softcap=softcap, sinks=sinks)


@lru_cache(maxsize=2)
def compiled_flex(dynamic: bool | None = None):
    """``torch.compile(flex_attention)``, compiled once per ``dynamic`` setting."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


_flex_masks: dict[tuple, object] = {}


def clear_flex_masks() -> None:
    """Forget the block masks :func:`triangle_flex` built (the next call builds its mask again)."""
    _flex_masks.clear()


def triangle_flex(q, k, v, *, n_init: int, n_local: int, last_n: int, scale: float | None = None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """FlexAttention with the triangle block mask (built once per length and shape, see
    :func:`clear_flex_masks`): compiled on CUDA, eager elsewhere (which materialises the scores).
    ``softcap`` is a ``score_mod`` (flex hands it the scaled score); ``sinks`` rescale the output by
    ``Z / (Z + exp(sink)) = sigmoid(lse - sink)`` with the row's logsumexp ``lse = log Z``."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    seq = q.shape[2]
    key = (seq, n_init, n_local, last_n, str(q.device))
    if key not in _flex_masks:
        fn = triangle_mask_fn(seq, n_init, n_local, last_n)
        _flex_masks[key] = create_block_mask(lambda b, h, q_idx, kv_idx: fn(q_idx, kv_idx), None, None, seq, seq,
                                             device=q.device, _compile=q.is_cuda)
    flex = compiled_flex(False) if q.is_cuda else flex_attention
    score_mod = None if softcap is None else partial(_softcap_score, cap=float(softcap))
    out = flex(q, k, v, score_mod=score_mod, block_mask=_flex_masks[key], scale=scale,
               enable_gqa=q.shape[1] != k.shape[1], return_aux=None if sinks is None else AuxRequest(lse=True))
    if sinks is None:
        return out
    out, aux = out  # aux.lse: [batch, heads, seq], natural log
    return (out.float() * torch.sigmoid(aux.lse.float() - sinks.float()[None, :, None])[..., None]).to(q.dtype)


def _softcap_score(score, b, h, q_idx, kv_idx, *, cap: float):
    return cap * torch.tanh(score / cap)


TRIANGLE_IMPLS: dict[str, TriangleFn] = {
    "triton": triangle_triton,
    "flex": triangle_flex,
    "reference": triangle_reference,
    "sdpa": triangle_attention_sdpa,  # exact blocked SDPA: no softcap/sinks (it refuses them), no LSE
}
"""Triangle implementations by name; ``"auto"`` (:func:`resolve_triangle`) picks one per call."""


def check_impl(impl: str) -> str:
    """``impl`` if it names a triangle implementation or is ``"auto"``; InputError naming the accepted ones."""
    if impl != "auto" and impl not in TRIANGLE_IMPLS:
        raise InputError(f"triangle implementation {impl!r} is not known; accepted: auto, {', '.join(TRIANGLE_IMPLS)}")
    return impl


def resolve_triangle(impl: str, q: torch.Tensor, *, features: bool = False, value_dim: int | None = None) -> TriangleFn:
    """The implementation ``impl`` names; ``"auto"``: the Triton kernel where it applies
    (:func:`kernel_applies`); elsewhere the blocked SDPA path (as fast as dense attention on a CPU),
    or the torch reference when a gradient is wanted or ``features`` (softcap or sinks) are in play,
    which the SDPA path does not take. ``value_dim``: v's head_dim (:func:`kernel_applies`)."""
    if check_impl(impl) == "auto":
        if kernel_applies(q, value_dim):
            return triangle_triton
        return triangle_reference if features or (torch.is_grad_enabled() and q.requires_grad) else \
            triangle_attention_sdpa
    return TRIANGLE_IMPLS[impl]


def fallback_paths(kinds, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                   features: bool = False) -> dict[str, str]:
    """For each layer kind in ``kinds`` that will not run a Triton kernel on inputs of this device,
    dtype and head_dim (``features``: the attention has softcap or sinks), the path it takes, in words
    (``run`` prints them)."""
    q = torch.empty(0, 1, 0, head_dim, device=device, dtype=dtype)
    why = f"no Triton on {device.type}" if not use_triton(q) else f"{dtype}, head_dim {head_dim}"
    paths = {}
    if "triangle" in kinds and not kernel_applies(q):
        paths["triangle"] = f"torch reference ({why}; softcap or sinks)" if features else f"torch SDPA blocks ({why})"
    if "dynamic" in kinds and not use_triton(q):
        paths["dynamic"] = f"torch reference ({why})"
    return paths


def triangle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, n_init: int, n_local: int, last_n: int,
             scale: float | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
             impl: str = "auto") -> torch.Tensor:
    """Triangle attention with the implementation ``impl`` (``"auto"`` or a key of :data:`TRIANGLE_IMPLS`),
    ``softcap`` and ``sinks`` [heads] as in the module docstring. Shapes as
    :func:`trimix_probe.triangle_attention`."""
    fn = resolve_triangle(impl, q, features=softcap is not None or sinks is not None, value_dim=v.shape[-1])
    return fn(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale,
                                     softcap=softcap, sinks=sinks)
