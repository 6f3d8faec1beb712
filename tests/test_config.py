import json

import pytest

from trimix_probe import ConfigError, DynamicSpec, ModelIdentity, TriMixConfig

IDENT = ModelIdentity(name="tiny", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, architecture="LlamaForCausalLM")


def _valid() -> dict:
    return TriMixConfig.triangle_from(IDENT, 2, n_init=4, n_local=32, last_n=8, dense_heads={3: (1,)}).to_dict()


def test_roundtrip_keeps_every_field(tmp_path):
    cfg = TriMixConfig.triangle_from(IDENT, 1, n_init=0, n_local=16, last_n=0, dense_heads={2: (3, 0)},
                                     provenance={"reason": "hand-picked"})
    back = TriMixConfig.load(cfg.save(tmp_path / "cfg.json"))
    assert back == cfg
    assert back.layers == ("dense", "triangle", "triangle", "triangle")
    assert back.dense_heads == {2: (0, 3)}
    assert back.provenance["reason"] == "hand-picked"


def test_dynamic_roundtrip(tmp_path):
    cfg = TriMixConfig.triangle_from(IDENT, 2, shallow="dynamic",
                                     dynamic=DynamicSpec(vertical=100, slash=200, dense_last=64))
    back = TriMixConfig.load(cfg.save(tmp_path / "d.json"))
    assert back.layers[:2] == ("dynamic", "dynamic") and back.dynamic.slash == 200 and back.dynamic.dense_last == 64
    # a config written before dense_last existed keeps its meaning (no dense rows)
    data = json.loads((tmp_path / "d.json").read_text())
    del data["dynamic"]["dense_last"]
    assert TriMixConfig.from_dict(data).dynamic.dense_last == 0
    with pytest.raises(ConfigError, match="dynamic.dense_last must be an integer >= 0"):
        DynamicSpec(dense_last=-1)


@pytest.mark.parametrize(
    "mutate, message",
    [
        # an unknown key anywhere is refused, not ignored
        (lambda d: d.update(n_lokal=3), "unknown key"),
        (lambda d: d["model"].update(layers=3), "unknown key"),
        # a layer count that differs from the model's
        (lambda d: d.update(layers=d["layers"][:-1]), "layers has 3 entries"),
        # negative or zero sizes
        (lambda d: d.update(n_local=0), "n_local must be an integer > 0"),
        (lambda d: d.update(n_init=-1), "n_init must be an integer >= 0"),
        (lambda d: d.update(last_n=-5), "last_n must be an integer >= 0"),
        (lambda d: d["model"].update(num_heads=0), "model.num_heads"),
        # unknown layer kind
        (lambda d: d["layers"].__setitem__(0, "sparse"), "layers[0] is 'sparse'"),
        # per-head entry on a dense layer, or a head out of range
        (lambda d: d.update(dense_heads={"0": [1]}), "per-head dense entries apply to triangle and dynamic layers"),
        (lambda d: d.update(dense_heads={"3": [9]}), "head 9 is outside"),
        # another format or version
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d.update(format="other"), "format is 'other'"),
        (lambda d: d.update(layers=["dynamic"] * 4), "are 'dynamic' but have no budget"),
    ],
)
def test_bad_configs_are_refused_with_one_line(tmp_path, mutate, message):
    data = _valid()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        TriMixConfig.load(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TriMixConfig.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TriMixConfig.load(tmp_path / "x.json")


def test_config_for_another_model_is_refused():
    cfg = TriMixConfig.from_dict(_valid())
    other = ModelIdentity(name="big", num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
    with pytest.raises(ConfigError, match="num_layers 4 \\(config\\) vs 32 \\(model\\)"):
        cfg.check_model(other)
    cfg.check_model(IDENT)  # the same shape passes


def test_frozen():
    cfg = TriMixConfig.from_dict(_valid())
    with pytest.raises(Exception):
        cfg.n_local = 3  # type: ignore[misc]


def test_starting_layer_may_precede_the_first_triangle_across_window_layers():
    """Window layers keep their own attention ('sliding'), so a starting layer followed only by
    'sliding' layers up to the first triangle agrees with layers; a dense layer in between does not."""
    model = ModelIdentity("x", 6, 2, 1, 64)
    layers = ("dense", "dense", "sliding", "sliding", "triangle", "triangle")
    for start in (2, 3, 4):
        assert TriMixConfig(model=model, layers=layers, starting_layer=start).starting_layer == start
    for start in (1, 5):
        with pytest.raises(ConfigError, match="first triangle at layer 4"):
            TriMixConfig(model=model, layers=layers, starting_layer=start)


def test_per_layer_budgets_roundtrip(tmp_path):
    cfg = TriMixConfig.triangle_from(IDENT, 3).with_budgets(
        {0: DynamicSpec(vertical=64, slash=256), 1: None, 2: DynamicSpec(vertical=128, slash=512)})
    assert cfg.layers == ("dynamic", "dense", "dynamic", "triangle") and cfg.starting_layer == 3
    back = TriMixConfig.load(cfg.save(tmp_path / "p.json"))
    assert back == cfg
    assert back.dynamic_spec(0).vertical == 64 and back.dynamic_spec(2).vertical == 128
    data = json.loads((tmp_path / "p.json").read_text())
    assert set(data["dynamic_layers"]) | {"0"} == {"0", "2"} and len(data["dynamic_layers"]) == 1
    # the most common budget is the single "dynamic" field; a plan with one budget writes no exceptions
    same = TriMixConfig.triangle_from(IDENT, 2).with_budgets({0: DynamicSpec(vertical=8), 1: DynamicSpec(vertical=8)})
    assert same.dynamic.vertical == 8 and "dynamic_layers" not in same.to_dict()
    # a budget for a layer that is not dynamic, or a dynamic layer without any budget, is refused
    bad = dict(data, dynamic_layers={"1": data["dynamic"]})
    with pytest.raises(ConfigError, match="dynamic_layers: layer 1 is not a 'dynamic' layer"):
        TriMixConfig.from_dict(bad)
    bare = dict(data)
    del bare["dynamic"]
    with pytest.raises(ConfigError, match=r"layers \[0\] are 'dynamic' but have no budget"):
        TriMixConfig.from_dict(bare)
    with pytest.raises(ConfigError, match="unknown key"):
        TriMixConfig.from_dict(dict(data, dynamic_layers={"2": {"method": "vertical_slash", "slahs": 3}}))


def test_a_config_with_one_dynamic_spec_still_loads(tmp_path):
    """The format before per-layer budgets (one 'dynamic' spec for every dynamic layer) loads unchanged
    and writes back byte for byte the same keys."""
    from pathlib import Path

    path = Path(__file__).parent.parent / "docs/raw/long-context-2026-12-01/ttft/configs/dynamic.json"
    cfg = TriMixConfig.load(path)
    assert cfg.dynamic_layers == {} and cfg.layers.count("dynamic") == 16
    assert {cfg.dynamic_spec(i) for i in range(16)} == {cfg.dynamic} and cfg.dynamic.vertical == 1000
    assert cfg.to_dict() == json.loads(path.read_text())
