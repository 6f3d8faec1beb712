"""trimix-probe: find where a long-context LLM can drop attention, emit a TriangleMix config, run it.

Public API:
    triangle_attention(q, k, v, *, n_init=8, n_local=512, last_n=128, scale=None, return_lse=False,
                       softcap=None, sinks=None)   (defaults: config.TRIANGLE)
    patch_model(model, config) / unpatch_model(model)
    TriMixConfig, ModelIdentity, DynamicSpec
"""

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _source_subpackages() -> None:
    """Make ``kernels/`` and ``cli/`` of a source checkout this package's ``kernels`` and ``cli``.

    Both folders sit at the top of the repository and carry no ``__init__.py`` on purpose: a
    folder without one is only a namespace portion, and Python prefers a regular package of the
    same name anywhere on ``sys.path``. So a checkout on ``sys.path`` (``python -m pytest``,
    ``python -c``, a notebook started in it) never hides Hugging Face's ``kernels``, which
    transformers imports. Installed from a wheel, pyproject's package-dir puts them inside this
    package, and nothing here runs. From a checkout (an editable install, or this folder found on
    ``sys.path``) there is no ``trimix_probe/kernels``, and setuptools' editable finder cannot
    resolve a mapped folder without ``__init__.py``: the two namespace subpackages are made here,
    pointing at the checkout's folders."""
    here = Path(__file__).resolve().parent
    for name in ("kernels", "cli"):
        full, src = f"{__name__}.{name}", here.parent / name
        if (here / name).is_dir() or not src.is_dir() or full in sys.modules:
            continue
        spec = importlib.machinery.ModuleSpec(full, None, is_package=True)
        spec.submodule_search_locations = [str(src)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        globals()[name] = module


_source_subpackages()

from .config import TRIANGLE, DynamicSpec, ModelIdentity, TriangleSpec, TriMixConfig
from .errors import ConfigError, InputError, PaddedBatchError

__version__ = "0.1.0"

# torch and transformers load on first use of these names, so `import trimix_probe` (and with it
# the CLI's --help) stays fast
_LAZY = {"patch_model": ".patch", "unpatch_model": ".patch", "triangle_attention_ref": ".reference"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


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
