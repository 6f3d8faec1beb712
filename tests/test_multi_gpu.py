"""A model split over two GPUs (what ``device_map="auto"`` does): the runtime (dense, dynamic and
triangle layers on different cards), ``generate``, the probe's gate gradients and the recall pass
give what the same model gives on one GPU. Skipped with fewer than two CUDA devices."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trimix_probe import DynamicSpec, ModelIdentity, TriMixConfig, patch_model, unpatch_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

LAYERS = 4
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
         "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    path = tmp_path_factory.mktemp("split")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(folder, dtype, split: bool):
    kw = {"device_map": SPLIT} if split else {}
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    if not split:
        model = model.to("cuda:0")
    model.eval().set_attn_implementation("sdpa")
    return model


def mixed_plan(model):
    """Layer 0 dynamic (vertical-slash), 1 dense, 2-3 triangle: every kind, on both cards."""
    return TriMixConfig(model=ModelIdentity.from_hf_config(model.config),
                        layers=("dynamic", "dense", "triangle", "triangle"), n_init=8, n_local=256, last_n=64,
                        starting_layer=2, dynamic=DynamicSpec(vertical=128, slash=256, block_size=64))


def test_split_runtime_matches_one_gpu(folder, monkeypatch):
    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "inf")  # the sparse path, not the dense fallback
    ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(1))
    one, two = load(folder, torch.bfloat16, False), load(folder, torch.bfloat16, True)
    assert {str(p.device) for p in two.parameters()} == {"cuda:0", "cuda:1"}
    outs = {}
    for name, model in (("one", one), ("two", two)):
        with torch.inference_mode():
            dense = model(ids.to(model.device)).logits.float().cpu()
            patch_model(model, mixed_plan(model))
            mixed = model(ids.to(model.device)).logits.float().cpu()
            gen = model.generate(ids.to(model.device), max_new_tokens=8, do_sample=False).cpu()
            unpatch_model(model)
        outs[name] = dense, mixed, gen
    scale = outs["one"][1].abs().max()
    assert (outs["one"][1] - outs["two"][1]).abs().max() <= 2e-2 * scale     # same plan, same answer
    assert (outs["one"][0] - outs["one"][1]).abs().max() > 1e-3 * scale       # and the plan changed it
    assert outs["two"][2].shape == (1, 2048 + 8) and torch.equal(outs["two"][2][:, :2048], ids)


def test_split_probe_and_recall_match_one_gpu(folder):
    from trimix_probe.probe import probe_sample, probing
    from trimix_probe.recall import measuring, parse_budget

    ids = torch.randint(0, 1000, (1, 1536), generator=torch.Generator().manual_seed(2))
    grads, recalls = {}, {}
    for name, split in (("one", False), ("two", True)):
        model = load(folder, torch.float32, split)
        with probing(model, "flex", checkpoint_layers=True) as gates:
            if split:
                assert {str(g.device) for g in gates.values()} == {"cuda:0", "cuda:1"}
            grads[name] = probe_sample(model, gates, ids, 1500, n_init=8, n_local=256, last_n=64)
        with measuring(model, {"vs": parse_budget("vs:128/256", block_size=64)}, list(range(LAYERS))) as rows, \
                torch.inference_mode():
            model(ids.to(model.device), logits_to_keep=1, use_cache=False)
            recalls[name] = torch.stack([r["mean"].cpu() for _, _, r in sorted(rows, key=lambda t: t[0])])
        del model
    assert torch.isfinite(grads["two"]).all() and grads["one"].abs().max() > 0
    torch.testing.assert_close(grads["two"], grads["one"], rtol=1e-3, atol=1e-3 * grads["one"].abs().max().item())
    torch.testing.assert_close(recalls["two"], recalls["one"], rtol=0, atol=1e-4)
