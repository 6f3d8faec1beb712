"""Replaying dense's prefix of layers: a plan whose layers below ``L`` are dense computes them exactly
as the unpatched model does, so a forward of that plan can start at layer ``L`` from the hidden state
dense fed that layer. The verification (:mod:`trimix_probe.verify`) records those states in its dense
pass (:func:`recording`) and replays them in each check (:func:`replaying`): a check of ``L`` then
costs the layers from ``L`` on, not the whole model.

While replaying, the decoder layers below ``L`` pass their input through (their ``forward`` is
swapped on the instance and put back after), and a forward pre-hook on layer ``L`` hands it the
recorded state on its own device. Embeddings, rotary tables and masks still run (cheap). A
decoder layer that does not return a plain tensor (an older transformers' tuple), or a layer type
this cannot see into, makes :func:`recording` report ``ok = False`` and the caller runs whole
forwards; the verification also compares its first replayed forward with a whole one, bit for bit,
and stops replaying if they differ.

``eval`` generates, so it also needs the KV cache: :func:`recording_prefill` keeps, from dense's
prefill, the states and copies of the cache layers below the highest starting layer (on the model's
device), and :func:`prefilling_from` makes a plan's prefill put those cache layers in place and start
at ``L``; the decode steps after it run every layer. ``eval`` checks each starting layer's first
shared batch against a whole one (:func:`first_logits`, bit for bit, and the answers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .families import decoder_layers

# Host memory the recorded states may take (all samples, all recorded layers); above it, no replay.
REPLAY_BYTES = 2 * 2**30


class Recorder:
    """The hidden states entering the recorded decoder layers during the last forward (host copies),
    by layer; ``ok`` is False once a decoder layer returned something other than a tensor."""

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.ok = True

    def take(self) -> dict[int, torch.Tensor]:
        states, self.states = self.states, {}
        return states


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


@contextmanager
def recording(model: torch.nn.Module, layers: set[int]) -> Iterator[Recorder]:
    """Inside, every forward of ``model`` records into the yielded :class:`Recorder` the hidden state
    entering each decoder layer of ``layers`` (a copy in host memory)."""
    recorder = Recorder()
    found = decoder_layers(model)
    handles = []

    def pre(idx):
        def hook(module, args, kwargs):
            hidden = _hidden_arg(args, kwargs)
            if hidden is None:
                recorder.ok = False
            else:
                recorder.states[idx] = hidden.detach().to("cpu", copy=True)
        return hook

    def post(module, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            recorder.ok = False

    try:
        for idx, layer in found.items():
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
            if idx in layers:
                handles.append(layer.register_forward_pre_hook(pre(idx), with_kwargs=True))
        yield recorder
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replaying(model: torch.nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside, a forward of ``model`` skips the decoder layers below ``layer`` (they return their
    input) and starts ``layer`` from ``hidden``."""
    found = decoder_layers(model)
    start = found[layer]
    device = next(start.parameters()).device
    saved = []

    def through(hidden_states, *args, **kwargs):
        return hidden_states

    def swap(module, args, kwargs):
        state = hidden.to(device)
        if args and isinstance(args[0], torch.Tensor):
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

    handle = start.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        for idx, module in found.items():
            if idx < layer:
                saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
                module.forward = through
        yield
    finally:
        handle.remove()
        for module, had, fn in saved:
            if had:
                module.forward = fn
            else:
                del module.forward


# ------------------------------------------------------------------------------- generation (eval)
# ``eval`` generates: a plan whose layers below ``L`` are dense prefills those layers exactly as dense
# did, so its prefill can start at ``L`` from dense's state there, with dense's KV cache of the layers
# below ``L`` put in place; the decode steps then run every layer as usual (they are dense in every
# plan). Only the first forward of a ``generate`` (the prefill) is recorded or replayed.

_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")
"""What transformers has called the KV cache, as a keyword of decoder layers and an attribute of
model outputs (``cache`` from 5.2x, ``past_key_values`` before, ``past_key_value`` before 4.56)."""


def _cache_in(found) -> object | None:
    for name in _CACHE_NAMES:
        cache = found.get(name) if isinstance(found, dict) else getattr(found, name, None)
        if hasattr(cache, "layers"):
            return cache
    return None


class PrefillRecord:
    """What dense's prefill left: the hidden states entering the recorded decoder layers (on their
    own device) and copies of the KV-cache layers below ``cache_below``; ``ok`` is False when any of
    it could not be read (the caller then runs whole prefills)."""

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.cache_layers: dict[int, object] = {}
        self.ok = True
        self.done = False


@contextmanager
def recording_prefill(model: torch.nn.Module, layers: set[int], cache_below: int) -> Iterator[PrefillRecord]:
    """Inside, the first forward of ``model`` (a ``generate``'s prefill) records into the yielded
    :class:`PrefillRecord` the hidden state entering each decoder layer of ``layers`` and, after it,
    a copy of each KV-cache layer below ``cache_below``."""
    import copy

    record = PrefillRecord()
    found = decoder_layers(model)
    handles = []

    def pre(idx):
        def hook(module, args, kwargs):
            if record.done:
                return
            hidden = _hidden_arg(args, kwargs)
            if hidden is None:
                record.ok = False
            else:
                record.states[idx] = hidden.detach().clone()
        return hook

    def post_layer(module, args, kwargs, output):
        if not record.done and not isinstance(output, torch.Tensor):
            record.ok = False

    def post_model(module, args, kwargs, output):
        if record.done:
            return
        record.done = True
        cache_layers = getattr(_cache_in(output), "layers", None)
        if cache_layers is None or len(cache_layers) < cache_below:
            record.ok = False
            return
        record.cache_layers = {i: copy.deepcopy(cache_layers[i]) for i in range(cache_below)}

    try:
        handles.append(model.register_forward_hook(post_model, with_kwargs=True))
        for idx, layer in found.items():
            handles.append(layer.register_forward_hook(post_layer, with_kwargs=True))
            if idx in layers:
                handles.append(layer.register_forward_pre_hook(pre(idx), with_kwargs=True))
        yield record
    finally:
        for h in handles:
            h.remove()


@contextmanager
def prefilling_from(model: torch.nn.Module, layer: int, record: PrefillRecord) -> Iterator[None]:
    """Inside, the first forward of ``model`` (a ``generate``'s prefill) skips the decoder layers below
    ``layer``: each puts a copy of dense's KV-cache layer in place and passes its input through, and
    ``layer`` starts from dense's recorded state. Later forwards (the decode steps) run every layer."""
    import copy

    found = decoder_layers(model)
    start = found[layer]
    device = next(start.parameters()).device
    hidden = record.states[layer]
    state = {"prefill": True}
    saved = []

    def through(idx, original):
        def forward(hidden_states, *args, **kwargs):
            if not state["prefill"]:
                return original(hidden_states, *args, **kwargs)
            cache = _cache_in(kwargs)
            if cache is None or len(cache.layers) < idx:
                raise RuntimeError(f"replay: no KV cache to fill at layer {idx}")
            entry = copy.deepcopy(record.cache_layers[idx])
            if len(cache.layers) == idx:
                cache.layers.append(entry)
            else:
                cache.layers[idx] = entry
            return hidden_states
        return forward

    def swap(module, args, kwargs):
        if not state["prefill"]:
            return None
        value = hidden.to(device)
        if args and isinstance(args[0], torch.Tensor):
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}

    def end_prefill(module, args, output):
        state["prefill"] = False

    handles = [start.register_forward_pre_hook(swap, with_kwargs=True), model.register_forward_hook(end_prefill)]
    try:
        for idx, module in found.items():
            if idx < layer:
                saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
                module.forward = through(idx, module.forward)
        yield
    finally:
        for h in handles:
            h.remove()
        for module, had, fn in saved:
            if had:
                module.forward = fn
            else:
                del module.forward


class _Value:
    value: torch.Tensor | None = None


@contextmanager
def first_logits(model: torch.nn.Module) -> Iterator[_Value]:
    """Inside, the logits of the first forward of ``model`` (a ``generate``'s prefill) are kept in the
    yielded object's ``value`` (a copy), for comparing two prefills bit for bit."""
    holder = _Value()

    def hook(module, args, output):
        logits = getattr(output, "logits", None)
        if holder.value is None and isinstance(logits, torch.Tensor):
            holder.value = logits.detach().clone()

    handle = model.register_forward_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()
