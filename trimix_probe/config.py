"""The TriangleMix config: one versioned JSON format, owned by this module.

A config says, for one model, which attention each layer runs at prefill:

- ``"dense"``: the model's own attention (as loaded: eager, SDPA, flash-attn, flex), its window included;
- ``"sliding"``: the same, on a layer the model declares sliding-window (window layers already cost
  O(N * window), so a plan keeps them as they are; ``patch_model`` refuses triangle/dynamic there);
- ``"triangle"``: sink + local window for every query, the last ``last_n`` queries dense;
- ``"dynamic"``: a dynamic-sparse method estimated per head (see :class:`DynamicSpec`).

``layers`` is the plan the runtime follows. ``starting_layer`` (optional) records the first
triangle layer for people and reports; when it is given it must agree with ``layers`` (the index of
the first ``"triangle"`` entry, or ``num_layers`` when there is none; ``"sliding"`` layers between the
two are allowed), else the config is refused
with one line. So a hand edit of one field without the other cannot be silently ignored. Version 1
files written by trimix-probe always agree and load as before; a hand-edited file that disagrees
is refused with the line saying which value ``layers`` implies.

It also names the model it was made for (so a config for another model is refused) and where
it came from (by hand, or chosen by the probe, with the reason).

Example (``trimix-probe`` writes these; ``trimix-probe run --config`` reads them)::

    {"format": "trimix-config", "version": 1,
     "model": {"name": "SmolLM2-135M-Instruct", "architecture": "LlamaForCausalLM",
               "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64},
     "n_init": 8, "n_local": 512, "last_n": 128, "starting_layer": 16,
     "layers": ["dense", ..., "triangle", ...],
     "dense_heads": {"20": [3]},
     "dynamic": {"method": "vertical_slash", "vertical": 1024, "slash": 4096, ...},   # dynamic layers' budget
     "dynamic_layers": {"3": {"method": "vertical_slash", "vertical": 2048, ...}},     # per-layer exceptions
     "provenance": {"method": "probe", "reason": "...", "created": "2026-11-27T07:00:00Z"}}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

from .errors import ConfigError

FORMAT = "trimix-config"
VERSION = 1

LayerKind = Literal["dense", "sliding", "triangle", "dynamic"]
OWN_KINDS = ("dense", "sliding")  # layer kinds that run the model's own attention (its window included)
DynamicMethod = Literal["vertical_slash", "blockwise"]
# the probe's closed sets live here too, beside the config's, because this module imports no torch:
# the CLI types its options with them and its --help stays fast
Objective = Literal["answer", "prompt"]
Backend = Literal["auto", "reference", "flex"]


def text_config(hf_config: Any) -> Any:
    """The text model's config of a Hugging Face config (a multimodal model's ``get_text_config()``; a
    text model's is itself)."""
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_keys(where: str, data: dict, allowed: set[str], required: set[str]) -> None:
    _require(isinstance(data, dict), f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    _require(not unknown, f"{where}: unknown key(s) {unknown}; accepted: {sorted(allowed)}")
    missing = sorted(required - set(data))
    _require(not missing, f"{where}: missing key(s) {missing}")


def _positive_int(where: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    _require(ok, f"{where} must be an integer {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class ModelIdentity:
    """What a config was made for; checked against the model it is applied to."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    architecture: str = ""

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _positive_int(f"model.{key}", getattr(self, key))
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})",
        )

    @classmethod
    def from_hf_config(cls, hf_config: Any, name: str | None = None) -> "ModelIdentity":
        """Identity of a Hugging Face model config (``model.config``)."""
        text = text_config(hf_config)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        archs = getattr(text, "architectures", None) or [type(text).__name__]
        return cls(
            name=name or getattr(text, "_name_or_path", "") or archs[0],
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            architecture=archs[0],
        )

    def mismatch(self, other: "ModelIdentity") -> str | None:
        """A one-line description of how ``other`` differs in shape, or None if the shapes agree."""
        diffs = [
            f"{key} {getattr(self, key)} (config) vs {getattr(other, key)} (model)"
            for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim")
            if getattr(self, key) != getattr(other, key)
        ]
        return "; ".join(diffs) or None


@dataclass(frozen=True)
class TriangleSpec:
    """The triangle's shape: every query keeps the first ``n_init`` keys (sinks) and its last
    ``n_local`` keys (window); the last ``last_n`` query rows keep every key. The one home of the
    defaults; signatures elsewhere default from :data:`TRIANGLE`."""

    n_init: int = 8
    n_local: int = 512
    last_n: int = 128

    def __post_init__(self) -> None:
        _positive_int("n_init", self.n_init, allow_zero=True)
        _positive_int("n_local", self.n_local)
        _positive_int("last_n", self.last_n, allow_zero=True)


TRIANGLE = TriangleSpec()
"""The default triangle (8 sinks, a 512-key window, the last 128 rows dense)."""


@dataclass(frozen=True)
class DynamicSpec:
    """Budget of a ``"dynamic"`` layer.

    ``vertical_slash``: keep the top ``vertical`` key columns and top ``slash`` diagonals per head,
    estimated from the last ``last_q`` queries. ``blockwise``: keep key blocks per query block
    until their pooled attention mass reaches ``gamma``. Both: the last ``dense_last`` query rows
    attend to every earlier key (exact), as TriangleMix's ``last_n`` rows do in triangle layers.
    """

    method: DynamicMethod = "vertical_slash"
    vertical: int = 1000
    slash: int = 6096
    gamma: float = 0.9
    block_size: int = 128
    last_q: int = 64
    dense_last: int = 0

    def __post_init__(self) -> None:
        _require(self.method in get_args(DynamicMethod),
                 f"dynamic.method must be one of {list(get_args(DynamicMethod))}, got {self.method!r}")
        for key in ("vertical", "slash", "block_size", "last_q"):
            _positive_int(f"dynamic.{key}", getattr(self, key))
        _positive_int("dynamic.dense_last", self.dense_last, allow_zero=True)
        _require(isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1,
                 f"dynamic.gamma must be in (0, 1], got {self.gamma!r}")


@dataclass(frozen=True)
class TriMixConfig:
    """A per-layer attention plan for one model. Frozen; validated on construction."""

    model: ModelIdentity
    layers: tuple[LayerKind, ...]
    n_init: int = TRIANGLE.n_init
    n_local: int = TRIANGLE.n_local
    last_n: int = TRIANGLE.last_n
    starting_layer: int | None = None
    dense_heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    dynamic: DynamicSpec | None = None
    dynamic_layers: dict[int, DynamicSpec] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        TriangleSpec(self.n_init, self.n_local, self.last_n)  # validates the shape
        object.__setattr__(self, "layers", tuple(self.layers))
        _require(
            len(self.layers) == self.model.num_layers,
            f"layers has {len(self.layers)} entries but model.num_layers is {self.model.num_layers}",
        )
        kinds = get_args(LayerKind)
        for i, kind in enumerate(self.layers):
            _require(kind in kinds, f"layers[{i}] is {kind!r}; accepted: {list(kinds)}")
        if self.starting_layer is not None:
            _require(
                isinstance(self.starting_layer, int) and 0 <= self.starting_layer <= self.model.num_layers,
                f"starting_layer must be in [0, {self.model.num_layers}], got {self.starting_layer!r}",
            )
        specs = {}
        for layer, spec in self.dynamic_layers.items():
            layer = int(layer)
            _require(0 <= layer < self.model.num_layers and self.layers[layer] == "dynamic",
                     f"dynamic_layers: layer {layer} is not a 'dynamic' layer of the plan; a per-layer budget "
                     "applies to dynamic layers")
            _require(isinstance(spec, DynamicSpec), f"dynamic_layers[{layer}] must be a DynamicSpec")
            specs[layer] = spec
        object.__setattr__(self, "dynamic_layers", specs)
        bare = [i for i, kind in enumerate(self.layers) if kind == "dynamic" and self.dynamic_spec(i) is None]
        _require(not bare, f"layers {bare} are 'dynamic' but have no budget: give a 'dynamic' spec (method and "
                 "budget, for every dynamic layer) or a 'dynamic_layers' entry for each")
        if self.starting_layer is not None:
            first = next((i for i, kind in enumerate(self.layers) if kind == "triangle"), len(self.layers))
            # window layers between the two keep their own attention whatever the plan ("sliding")
            _require(self.starting_layer <= first
                     and all(kind == "sliding" for kind in self.layers[self.starting_layer:first]),
                     f"starting_layer is {self.starting_layer} but layers has "
                     f"{f'its first triangle at layer {first}' if first < len(self.layers) else 'no triangle layer'}"
                     "; the runtime follows layers: set "
                     f"starting_layer to {first}, make layers triangle from {self.starting_layer} on, or drop "
                     "starting_layer")
        heads = {}
        for layer, hs in self.dense_heads.items():
            layer = int(layer)
            _require(0 <= layer < self.model.num_layers,
                     f"dense_heads: layer {layer} is outside [0, {self.model.num_layers})")
            _require(self.layers[layer] in ("triangle", "dynamic"),
                     f"dense_heads: layer {layer} is {self.layers[layer]!r}; per-head dense entries apply to triangle "
                     "and dynamic layers")
            for h in hs:
                _require(isinstance(h, int) and 0 <= h < self.model.num_heads,
                         f"dense_heads[{layer}]: head {h!r} is outside [0, {self.model.num_heads})")
            heads[layer] = tuple(sorted(set(hs)))
        object.__setattr__(self, "dense_heads", heads)

    @property
    def triangle(self) -> TriangleSpec:
        """The triangle layers' shape."""
        return TriangleSpec(self.n_init, self.n_local, self.last_n)

    def dynamic_spec(self, layer: int) -> DynamicSpec | None:
        """The budget of dynamic layer ``layer``: its own ``dynamic_layers`` entry, else ``dynamic``."""
        return self.dynamic_layers.get(layer, self.dynamic)

    def with_budgets(self, budgets: dict[int, DynamicSpec | None],
                     heads: dict[int, tuple[int, ...]] | None = None) -> "TriMixConfig":
        """This plan with layer ``l`` of ``budgets`` dynamic with budget ``budgets[l]``, or dense where it
        is None; ``heads[l]``: the heads of dynamic layer ``l`` that stay dense (exact). ``dynamic``
        becomes the most common budget (readers of the single spec see it), ``dynamic_layers`` the others."""
        heads = heads or {}
        dense_heads = {i: hs for i, hs in self.dense_heads.items() if i not in budgets}
        dense_heads |= {i: tuple(heads[i]) for i, spec in budgets.items() if spec is not None and heads.get(i)}
        layers = list(self.layers)
        for layer, spec in budgets.items():
            layers[layer] = "dense" if spec is None else "dynamic"
        specs = {i: self.dynamic_spec(i) for i, kind in enumerate(self.layers) if kind == "dynamic"}
        specs = {i: s for i, s in (specs | budgets).items() if s is not None}
        counts: dict[DynamicSpec, int] = {}
        for s in specs.values():
            counts[s] = counts.get(s, 0) + 1
        common = max(counts, key=counts.get) if counts else None
        return replace(self, layers=tuple(layers), dynamic=common, dense_heads=dense_heads,
                       dynamic_layers={i: s for i, s in specs.items() if s != common})

    @property
    def own_prefix(self) -> int:
        """How many leading layers run the model's own attention (:data:`OWN_KINDS`): below it, the
        plan computes exactly what the unpatched model does."""
        n = 0
        while n < len(self.layers) and self.layers[n] in OWN_KINDS:
            n += 1
        return n

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def triangle_from(
        cls,
        model: ModelIdentity,
        starting_layer: int,
        *,
        n_init: int = TRIANGLE.n_init,
        n_local: int = TRIANGLE.n_local,
        last_n: int = TRIANGLE.last_n,
        shallow: LayerKind = "dense",
        dynamic: DynamicSpec | None = None,
        dense_heads: dict[int, tuple[int, ...]] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> "TriMixConfig":
        """TriangleMix: ``shallow`` layers below ``starting_layer``, triangle from it on."""
        _require(0 <= starting_layer <= model.num_layers,
                 f"starting_layer must be in [0, {model.num_layers}], got {starting_layer}")
        layers = tuple(shallow if i < starting_layer else "triangle" for i in range(model.num_layers))
        prov = {"method": "manual", "created": _now()} | (provenance or {})
        return cls(model=model, layers=layers, n_init=n_init, n_local=n_local, last_n=last_n,
                   starting_layer=starting_layer, dense_heads=dense_heads or {}, dynamic=dynamic,
                   provenance=prov)

    def check_model(self, identity: ModelIdentity) -> None:
        """Refuse a model whose shape differs from the one this config was made for."""
        diff = self.model.mismatch(identity)
        _require(diff is None, f"config was made for {self.model.name!r} and does not fit this model: {diff}")

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": asdict(self.model)}
        data |= {"n_init": self.n_init, "n_local": self.n_local, "last_n": self.last_n,
                 "starting_layer": self.starting_layer, "layers": list(self.layers)}
        if self.dense_heads:
            data["dense_heads"] = {str(k): list(v) for k, v in sorted(self.dense_heads.items())}
        if self.dynamic is not None:
            data["dynamic"] = asdict(self.dynamic)
        if self.dynamic_layers:
            data["dynamic_layers"] = {str(k): asdict(v) for k, v in sorted(self.dynamic_layers.items())}
        data["provenance"] = dict(self.provenance)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "TriMixConfig":
        top = {"format", "version", "model", "n_init", "n_local", "last_n", "starting_layer", "layers",
               "dense_heads", "dynamic", "dynamic_layers", "provenance"}
        _check_keys(where, data, top, {"format", "version", "model", "layers"})
        _require(data["format"] == FORMAT, f"{where}: format is {data['format']!r}, expected {FORMAT!r}")
        _require(data["version"] == VERSION,
                 f"{where}: version {data['version']!r} is not supported (this trimix-probe reads version {VERSION})")
        model_keys = {"name", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim"}
        _check_keys(f"{where}: model", data["model"], model_keys, model_keys - {"architecture"})
        dyn = data.get("dynamic")
        if dyn is not None:
            _check_keys(f"{where}: dynamic", dyn, set(DynamicSpec.__dataclass_fields__), {"method"})
        per_layer = data.get("dynamic_layers") or {}
        _require(isinstance(per_layer, dict), f"{where}: dynamic_layers must be an object (layer -> budget)")
        for key, spec in per_layer.items():
            _require(str(key).isdigit(), f"{where}: dynamic_layers key {key!r} is not a layer index")
            _check_keys(f"{where}: dynamic_layers[{key}]", spec, set(DynamicSpec.__dataclass_fields__), {"method"})
        _require(isinstance(data["layers"], list), f"{where}: layers must be a list")
        try:
            return cls(
                model=ModelIdentity(**data["model"]),
                layers=tuple(data["layers"]),
                n_init=data.get("n_init", TRIANGLE.n_init),
                n_local=data.get("n_local", TRIANGLE.n_local),
                last_n=data.get("last_n", TRIANGLE.last_n),
                starting_layer=data.get("starting_layer"),
                dense_heads={int(k): tuple(v) for k, v in (data.get("dense_heads") or {}).items()},
                dynamic=DynamicSpec(**dyn) if dyn is not None else None,
                dynamic_layers={int(k): DynamicSpec(**v) for k, v in per_layer.items()},
                provenance=dict(data.get("provenance") or {}),
            )
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TriMixConfig":
        path = Path(path)
        _require(path.is_file(), f"config file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not text (binary, e.g. a pickle?); expected the JSON "
                              "that `trimix-probe analyze` writes (nothing is unpickled)") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_dict(data, where=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def mark_sliding(config: TriMixConfig, windows: dict[int, int | None]) -> TriMixConfig:
    """``config`` with every layer that has a sliding window (``windows[layer]`` not None) marked
    ``"sliding"``: a window layer already costs O(N * window), and TriangleMix applies to full-attention
    layers. Per-head dense entries and per-layer budgets of such layers are dropped."""
    sliding = {i for i, w in windows.items() if w is not None}
    if not sliding:
        return config
    layers = tuple("sliding" if i in sliding else kind for i, kind in enumerate(config.layers))
    heads = {i: h for i, h in config.dense_heads.items() if i not in sliding}
    budgets = {i: b for i, b in config.dynamic_layers.items() if i not in sliding}
    return replace(config, layers=layers, dense_heads=heads, dynamic_layers=budgets)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
