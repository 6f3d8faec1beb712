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
