"""Replaying dense's prefix of layers: a plan whose layers below ``L`` are dense computes them exactly
as the unpatched model does, so a forward of that plan can start at layer ``L`` from the hidden state
dense fed that layer. The verification (:mod:`trimix_probe.verify`) records those states in its dense
pass (:func:`recording`) and replays them in each check (:func:`replaying`): a check of ``L`` then
costs the layers from ``L`` on, not the whole model.

While replaying, in the first forward the decoder layers below ``L`` pass their input through
(their ``forward`` is swapped on the instance and put back after), and a forward pre-hook on layer
``L`` hands it the recorded state on its own device; later forwards run every layer. Embeddings, rotary tables and masks still run (cheap). A
decoder layer that does not return a plain tensor (an older transformers' tuple), a layer type
this cannot see into, or layers that reuse earlier layers' K/V (Gemma-3n) make :func:`recording`
report ``ok = False`` and the caller runs whole forwards; the verification also compares its first replayed forward with a whole one, bit for bit,
and stops replaying if they differ.

``eval`` generates, so it also needs the KV cache: :func:`recording_prefill` (:func:`recording` of
the first forward only) keeps, from dense's prefill, the states and copies of the cache layers below
the highest starting layer (on the model's device), and :func:`prefilling_from` (:func:`replaying`
with those cache layers) makes a plan's prefill put them in place and start at ``L``; the decode
steps after it run every layer. ``eval`` checks each starting layer's first
shared batch against a whole one (:func:`first_logits`, bit for bit, and the answers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .config import ModelIdentity
from .families import decoder_layers, shares_kv_across_layers

# Host memory the recorded states may take (all samples, all recorded layers); above it, no replay.
REPLAY_BYTES = 2 * 2**30


def state_bytes(model: torch.nn.Module, tokens: int, layers: set[int], cache_below: int = 0) -> int:
    """Bytes :func:`recording` takes for ``tokens`` tokens (over all prompts): the hidden state entering
    each of ``layers``, and with ``cache_below`` the keys and values of the cache layers below it, in
    the model's floating dtype."""
    shape = ModelIdentity.from_hf_config(model.config)
    width = model.config.get_text_config().hidden_size
    itemsize = next(p.dtype.itemsize for p in model.parameters() if p.is_floating_point())
    return tokens * itemsize * (width * len(layers) + 2 * shape.num_kv_heads * shape.head_dim * cache_below)


_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")
"""What transformers has called the KV cache, as a keyword of decoder layers and an attribute of
model outputs (``cache`` from 5.2x, ``past_key_values`` before, ``past_key_value`` before 4.56;
GPT-NeoX's and Falcon's layers take ``layer_past``)."""


def _cache_in(found) -> object | None:
    for name in _CACHE_NAMES:
        cache = found.get(name) if isinstance(found, dict) else getattr(found, name, None)
        if hasattr(cache, "layers"):
            return cache
    return None


class Recorder:
    """The hidden states entering the recorded decoder layers, by layer (host copies, or clones on
    their device), and copies of KV-cache layers (:func:`recording` with ``cache_below``); ``ok`` is
    False once something could not be read (a decoder layer returned something other than a tensor,
    or the forward left no cache)."""

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.cache_layers: dict[int, object] = {}
        self.ok = True
        self.done = False   # with ``once``: the first forward is over

    def take(self) -> dict[int, torch.Tensor]:
        states, self.states = self.states, {}
        return states


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


@contextmanager
def recording(model: torch.nn.Module, layers: set[int], *, to_host: bool = True, once: bool = False,
              cache_below: int = 0) -> Iterator[Recorder]:
    """Inside, forwards of ``model`` record into the yielded :class:`Recorder` the hidden state
    entering each decoder layer of ``layers``: a copy in host memory (``to_host``) or a clone on its
    device. ``once``: only the first forward (a ``generate``'s prefill), after which copies of the
    KV-cache layers below ``cache_below`` are kept too."""
    import copy

    recorder = Recorder()
    found = decoder_layers(model)
    handles = []
    if shares_kv_across_layers(model):  # a middle layer needs earlier layers' K/V, not only its input
        recorder.ok = False

    def pre(idx):
        def hook(module, args, kwargs):
            if recorder.done:
                return
            hidden = _hidden_arg(args, kwargs)
            if hidden is None:
                recorder.ok = False
            else:
                recorder.states[idx] = hidden.detach().to("cpu", copy=True) if to_host else hidden.detach().clone()
        return hook

    def post(module, args, kwargs, output):
        if not recorder.done and not isinstance(output, torch.Tensor):
            recorder.ok = False

    def first_over(module, args, kwargs, output):
        if recorder.done:
            return
        recorder.done = True
        cache_layers = getattr(_cache_in(output), "layers", None) if cache_below else []
        if cache_layers is None or len(cache_layers) < cache_below:
            recorder.ok = False
            return
        recorder.cache_layers = {i: copy.deepcopy(cache_layers[i]) for i in range(cache_below)}

    try:
        if once:
            handles.append(model.register_forward_hook(first_over, with_kwargs=True))
        for idx, layer in found.items():
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
            if idx in layers:
                handles.append(layer.register_forward_pre_hook(pre(idx), with_kwargs=True))
        yield recorder
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replaying(model: torch.nn.Module, layer: int, hidden: torch.Tensor,
              cache_layers: dict[int, object] | None = None) -> Iterator[None]:
    """Inside, the first forward of ``model`` skips the decoder layers below ``layer`` (they return
    their input) and starts ``layer`` from ``hidden``; later forwards (a ``generate``'s decode steps)
    run every layer. ``cache_layers``: each skipped layer puts a copy of its entry in place in the
    forward's KV cache (dense's cache, from :func:`recording` with ``cache_below``)."""
    import copy

    found = decoder_layers(model)
    start = found[layer]
    device = next(start.parameters()).device
    state = {"first": True}
    saved = []

    def through(idx, original):
        def forward(hidden_states, *args, **kwargs):
            if not state["first"]:
                return original(hidden_states, *args, **kwargs)
            if cache_layers is not None:
                cache = _cache_in(kwargs)
                if cache is None or len(cache.layers) < idx:
                    raise RuntimeError(f"replay: no KV cache to fill at layer {idx}")
                entry = copy.deepcopy(cache_layers[idx])
                if len(cache.layers) == idx:
                    cache.layers.append(entry)
                else:
                    cache.layers[idx] = entry
            return hidden_states
        return forward

    def swap(module, args, kwargs):
        if not state["first"]:
            return None
        value = hidden.to(device)
        if args and isinstance(args[0], torch.Tensor):
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}

    def first_over(module, args, output):
        state["first"] = False

    handles = [start.register_forward_pre_hook(swap, with_kwargs=True), model.register_forward_hook(first_over)]
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


# ------------------------------------------------------------------------------- generation (eval)
# ``eval`` generates: a plan whose layers below ``L`` are dense prefills those layers exactly as dense
# did, so its prefill can start at ``L`` from dense's state there, with dense's KV cache of the layers
# below ``L`` put in place; the decode steps then run every layer as usual (they are dense in every
# plan). Only the first forward of a ``generate`` (the prefill) is recorded or replayed.

def recording_prefill(model: torch.nn.Module, layers: set[int], cache_below: int):
    """:func:`recording` of a ``generate``'s prefill, kept on the model's device: the states entering
    ``layers`` and copies of the KV-cache layers below ``cache_below``."""
    return recording(model, layers, to_host=False, once=True, cache_below=cache_below)


def prefilling_from(model: torch.nn.Module, layer: int, record: Recorder):
    """:func:`replaying` of a ``generate``'s prefill from ``record`` (:func:`recording_prefill`): the
    layers below ``layer`` put dense's cache in place, ``layer`` starts from dense's state."""
    return replaying(model, layer, record.states[layer], record.cache_layers)


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
