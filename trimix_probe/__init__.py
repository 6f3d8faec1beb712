"""trimix-probe: find where a long-context LLM can drop attention, emit a TriangleMix config, run it.

Public API:
    triangle_attention(q, k, v, *, n_init=8, n_local=512, last_n=128, scale=None, return_lse=False,
                       softcap=None, sinks=None)   (defaults: config.TRIANGLE)
    patch_model(model, config) / unpatch_model(model)
    TriMixConfig, ModelIdentity, DynamicSpec
"""

from .config import TRIANGLE, DynamicSpec, ModelIdentity, TriangleSpec, TriMixConfig
from .errors import ConfigError, InputError, PaddedBatchError
from .patch import patch_model, unpatch_model
from .reference import triangle_attention_ref

__version__ = "0.1.0"


def triangle_attention(q, k, v, *, n_init=TRIANGLE.n_init, n_local=TRIANGLE.n_local, last_n=TRIANGLE.last_n,
                       scale=None, return_lse=False, softcap=None, sinks=None):
    """Triangle attention (Triton). q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim].

    Row i attends to keys j <= i with j < n_init or i - j < n_local; the last ``last_n`` rows attend
    to every j <= i. Returns out shaped like q (and lse [batch, heads, seq] fp32 if ``return_lse``).
    ``softcap``: scores become softcap * tanh(scores / softcap) (Gemma-2); ``sinks`` [heads]: one
    logit per q head joins the softmax denominator (gpt-oss), and the lse. Runs on CUDA tensors, or
    on CPU under ``TRITON_INTERPRET=1``.
    No backward: inputs that require grad are refused (use :func:`triangle_attention_ref` to
    differentiate); bad values of n_init, n_local, last_n are ValueErrors, non-tensors TypeErrors.
    """
    from .kernels.triangle import triangle_attention as _launch

    return _launch(q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale, return_lse=return_lse,
                   softcap=softcap, sinks=sinks)


__all__ = [
    "ConfigError", "DynamicSpec", "InputError", "ModelIdentity", "PaddedBatchError", "TriMixConfig", "TriangleSpec", "__version__",
    "patch_model", "triangle_attention", "triangle_attention_ref", "unpatch_model",
]
