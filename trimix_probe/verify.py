"""Verification of a starting layer: run the samples with triangle layers from ``L`` on and compare
the answers with dense, then search for the lowest ``L`` whose loss stays within a bound.

The check follows inference, which is prefill(prompt) with the plan, then dense decode, in one
forward over ``prompt + answer`` (teacher forced) with the plan's ``last_n`` grown by the answer's
``A`` tokens (:func:`at_inference`): the prompt rows see exactly what prefill(prompt) gives them
(the rows from ``N - last_n`` on dense, the others sinks + window) and the answer rows attend densely,
as decode steps over the cache do. No cache keyword is passed (renamed across transformers releases)::

    drop    = mean log p_dense(answer) - mean log p_L(answer)     # nats per answer token, > 0: worse
    loss    = max(drop, 0)                                        # what the bound averages: losses only
    lost    = at some answer position dense's argmax is the gold token and the plan's is not
    changed = the argmax at some answer position differs from dense's (both teacher forced)

The argmax checks are greedy decoding under teacher forcing: when the gold answer is dense's greedy
answer, ``changed`` is exactly "greedy generation under the plan gives dense's tokens"; otherwise
it compares the two models' next-token choices along the gold answer. The bound uses ``loss`` and
``lost``, not ``drop`` and ``changed``: a mean of signed drops lets one sample's gain hide another's
loss, and near-tie flips where dense itself is wrong (an answer the model words differently,
"The number is ..." against the bare gold "1234") change no answer dense had right (docs/probe.md,
"Verification"). With dynamic shallow layers the forward
differs from inference in one way: the vertical-slash pattern is estimated from the last rows of
``prompt + answer`` rather than of the prompt (``dense_last`` is grown like ``last_n``).

The search (:func:`search_layer`) starts at the gradient's layer ``g``. If ``g`` passes it bisects
below it; if not it moves up (1, 2, 4, ... layers, up to the last layer) until a layer passes and
bisects the last gap.
It assumes the loss grows as ``L`` goes down (more triangle layers), which is the premise of a
single starting layer; every checked layer's figures are recorded, so a violation shows in them.
Each layer is checked at most once. No layer passing means the plan keeps no triangle layer
(``L = num_layers``). A scan (:func:`scan_layers`, ``analyze --verify-layers``) checks a given list
of layers instead and takes the lowest one from which every checked layer passes: the whole curve,
at one forward pass of the samples per layer.

A check of ``L`` starts from dense's hidden state entering layer ``L``, recorded in the dense pass
(:mod:`~trimix_probe.replay`), when the layers below ``L`` are dense: the figures are the same, bit
for bit (checked on the first replayed forward), at the cost of the layers from ``L`` on.

With dynamic shallow layers, :func:`verify_plan` then checks the whole emitted plan (dynamic and
triangle layers together) against the same bound on the same samples and raises the shallow budgets
(:func:`settle_budgets`; the rule in :func:`trimix_probe.choice.raise_budgets`) until it passes, at
most ``max_checks`` checks, dense shallow layers (the plan the starting layer's check passed) last.
It reuses the dense references of the starting layer's check (the same samples: one dense pass).

The generation check (``analyze --check-generation``, :class:`GoldAnswers`; off by default) adds what
``eval`` measures: each sample's answer generated greedily, ``MAX_NEW_TOKENS[task]`` tokens from the
prompt and its answer prefix, the plan's attention in the prefill and dense decode over the cache
(:func:`generated_score`), scored with RULER's metric (:func:`~trimix_probe.tasks.score`). Teacher
forcing along the gold answer cannot see a value that free generation omits or repeats in a list
whose order dense itself does not keep (``niah_multivalue``, docs/probe.md "Verification"). A sample
whose plan score is below dense's counts as lost too (``lost_generation``; a sample lost either way
counts once against ``max_lost``). Dense generates once per sample (kept with the references); each
check adds one greedy generation per sample, whole (no replay).

Dense is the model's own attention (unpatched). Forward only (the generation check aside), under
``torch.inference_mode``.
Verified (tests/test_verify.py) on random-init Llama models on CPU: the figures equal those of
prefill(prompt) with the plan then a dense continuation over transformers' cache, computed apart;
the search on constructed curves; replayed checks equal whole ones. On the GPU: the curves of
docs/probe.md ("Verification"), H200.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import zip_longest

import torch

from .config import TriMixConfig
from .errors import InputError

# Defaults of the bound (docs/probe.md, "Verification": the curves they were chosen from).
# On the curves of every layer at six grid points (SmolLM2 2K/4K/8128, Qwen 8K/16K/32704; H200), these
# pick the Qwen layers the eval sweeps keep at >= 99% of dense (12, 17, 14) with 2 samples a task,
# and stay conservative on SmolLM2; 1 sample a task is too noisy (Qwen 32K would take layer 12, -1.3).
EPSILON = 0.015
MAX_LOST = 0.125  # a share of the verification samples: 2 of 16
MAX_CHECKS = 4
SAMPLES = 2  # verification samples per task and length
VERIFY = True


# ------------------------------------------------------------------------------------------ bound
@dataclass(frozen=True)
class Bound:
    """A starting layer passes when the mean answer log-likelihood loss against dense (per-sample
    drops, gains counted as 0) is at most ``epsilon`` nats per answer token and at most a share
    ``max_lost`` of the samples (rounded down) lose a token that dense's greedy choice had right (with
    the generation check: or generate an answer that scores below dense's; :attr:`LayerCheck.lost`)."""

    epsilon: float = EPSILON
    max_lost: float = MAX_LOST

    def __post_init__(self) -> None:
        ok = isinstance(self.epsilon, (int, float)) and not isinstance(self.epsilon, bool)
        if not ok or not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise InputError(f"epsilon must be a finite number >= 0 (nats per answer token), got {self.epsilon!r}")
        ok = isinstance(self.max_lost, (int, float)) and not isinstance(self.max_lost, bool)
        if not ok or not 0 <= self.max_lost <= 1:
            raise InputError(f"max_lost must be a share of the samples in [0, 1], got {self.max_lost!r}")

    def allowed(self, samples: int) -> int:
        """Answers of ``samples`` that may lose a token dense had right."""
        return math.floor(self.max_lost * samples + 1e-9)

    def holds(self, check: "LayerCheck") -> bool:
        return check.loss <= self.epsilon and check.lost <= self.allowed(check.samples)


@dataclass(frozen=True)
class LayerCheck:
    """The figures of one starting layer against dense, over the verification samples."""

    layer: int
    drop: float                   # mean over samples of the answer log-likelihood drop, nats per token
    changed: int                  # samples whose greedy answer differs from dense's
    samples: int
    max_drop: float               # the worst sample's drop
    seconds: float
    drops: tuple[float, ...] = ()  # per sample
    same: tuple[bool, ...] = ()    # per sample: the greedy answer equals dense's
    lost_flags: tuple[bool, ...] = ()  # per sample: a gold token dense's argmax had right is lost
    dense_scores: tuple[float, ...] = ()  # per sample, with the generation check: dense's generated answer's score
    plan_scores: tuple[float, ...] = ()   # per sample, with the generation check: the plan's

    @property
    def loss(self) -> float:
        """Mean over samples of the drop with gains counted as 0 (nats per answer token)."""
        return sum(max(d, 0.0) for d in self.drops) / len(self.drops) if self.drops else max(self.drop, 0.0)

    @property
    def generation_flags(self) -> tuple[bool, ...]:
        """Per sample, with the generation check: the plan's generated answer scores below dense's."""
        return tuple(p < d for p, d in zip(self.plan_scores, self.dense_scores))

    @property
    def lost_generation(self) -> int:
        return sum(self.generation_flags)

    @property
    def lost(self) -> int:
        """Samples that lose an answer token dense's greedy choice had right or, with the generation
        check, whose generated answer scores below dense's (a sample lost both ways counts once)."""
        return sum(a or b for a, b in zip_longest(self.lost_flags, self.generation_flags, fillvalue=False))


_GENERATION_FIELDS = ("dense_scores", "plan_scores")


def _generation_record(c: LayerCheck, per_sample: bool) -> dict:
    """The generation check's figures of ``c`` for JSON, only when it ran (so records without it are as
    before): ``lost_generation``, and the scores per sample with ``per_sample``."""
    if not c.plan_scores:
        return {}
    scores = {k: _rounded(getattr(c, k)) for k in _GENERATION_FIELDS} if per_sample else {}
    return {"lost_generation": c.lost_generation} | scores


def _check_record(c: LayerCheck, per_sample: bool) -> dict:
    """``c``'s figures for JSON: the per-sample ones only with ``per_sample``; the generation check's
    only when it ran (:func:`_generation_record`)."""
    skip = ("drops", "same", "lost_flags") if not per_sample else ()
    row = {k: _rounded(v) for k, v in asdict(c).items() if k not in skip + _GENERATION_FIELDS}
    return row | {"loss": _rounded(c.loss), "lost": c.lost} | _generation_record(c, per_sample)


@dataclass(frozen=True)
class Verification:
    """The search's result: the gradient's layer, the verified one, the figures of every checked layer
    (by layer), the bound, one sentence of reason, and the cost (dense reference included);
    ``references``: dense's figures of the samples (without recorded states), for :func:`verify_plan`."""

    gradient_layer: int
    verified_layer: int
    num_layers: int
    checks: tuple[LayerCheck, ...]
    bound: Bound
    reason: str
    seconds: float = 0.0
    samples: int = 0
    search: str = "bisect"  # or "scan"
    replayed: bool = False  # the checks started from dense's recorded hidden states
    references: tuple[DenseReference, ...] = field(default=(), compare=False, repr=False)

    def to_dict(self, per_sample: bool = False) -> dict:
        """JSON-ready; the per-sample figures only with ``per_sample``."""
        return {"gradient_layer": self.gradient_layer, "verified_layer": self.verified_layer,
                "epsilon": self.bound.epsilon, "max_lost": self.bound.max_lost, "reason": self.reason,
                "search": self.search, "replayed": self.replayed, "seconds": round(self.seconds, 1),
                "samples": self.samples,
                "checks": [_check_record(c, per_sample) for c in self.checks]}


def _rounded(v):
    if isinstance(v, float):
        return round(v, 6)
    return [_rounded(x) for x in v] if isinstance(v, (tuple, list)) else v


def check_inputs(epsilon: float, max_lost: float, max_checks: int, samples: int = SAMPLES) -> Bound:
    """The bound, with every option checked (one line each), before any model work."""
    if not isinstance(max_checks, int) or isinstance(max_checks, bool) or max_checks < 1:
        raise InputError(f"max_checks must be an integer >= 1 (layers checked), got {max_checks!r}")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise InputError(f"verify_samples must be an integer >= 1 (samples per task and length), got {samples!r}")
    return Bound(epsilon, max_lost)


def parse_layers(spec: str, num_layers: int | None = None) -> list[int]:
    """The layers of ``--verify-layers``: ``all``, ``A-B`` (inclusive), ``A,B,C`` or a mix
    (``8-12,16,20``), sorted and without repeats; with ``num_layers`` each must be a layer index."""
    what = "--verify-layers"
    accepted = "accepted: all, A-B, or layer indices separated by commas (e.g. 8-14,16,20)"
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"{what} {spec!r} is empty; {accepted}")
    if spec.strip() == "all":
        if num_layers is None:
            return []
        return list(range(num_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise InputError(f"{what} {spec!r}: {part!r} is not a layer or a range; {accepted}") from None
        if a < 0 or b < a:
            raise InputError(f"{what} {spec!r}: {part!r} is not a range of layers >= 0; {accepted}")
        layers.update(range(a, b + 1))
    out = sorted(layers)
    if num_layers is not None and out[-1] >= num_layers:
        raise InputError(f"{what} {spec!r}: layer {out[-1]} does not exist; the model has layers 0-{num_layers - 1}")
    return out


# ----------------------------------------------------------------------------------------- search
def search_layer(check: Callable[[int], LayerCheck], gradient_layer: int, num_layers: int, bound: Bound,
                 max_checks: int = MAX_CHECKS) -> Verification:
    """The lowest starting layer in ``[0, num_layers)`` whose ``check`` passes ``bound``, searched from
    ``gradient_layer`` (module docstring) with at most ``max_checks`` calls of ``check``; ``num_layers``
    (no triangle layer) when none of the checked layers passes."""
    if not 0 <= gradient_layer <= num_layers:
        raise InputError(f"gradient layer must be in [0, {num_layers}], got {gradient_layer!r}")
    done: dict[int, LayerCheck] = {}

    def passes(layer: int) -> bool:
        if layer not in done:
            done[layer] = check(layer)
        return bound.holds(done[layer])

    def budget() -> bool:
        return len(done) < max_checks

    fail, ok = -1, None  # highest failing layer below the lowest passing one; lowest passing layer
    start = min(gradient_layer, num_layers - 1)
    if passes(start):
        ok = start
    else:  # move up: 1, 2, 4, ... layers above the last failure
        fail, step = start, 1
        while budget() and fail < num_layers - 1:
            up = min(fail + step, num_layers - 1)
            if passes(up):
                ok = up
                break
            fail, step = up, step * 2
    if ok is not None:
        while ok - fail > 1 and budget():  # bisect (fail, ok]
            mid = (fail + ok) // 2
            if passes(mid):
                ok = mid
            else:
                fail = mid
    checks = tuple(done[k] for k in sorted(done))
    generated = any(c.plan_scores for c in checks)
    if ok is None:
        verified = num_layers
        reason = (f"no checked starting layer ({', '.join(str(c.layer) for c in checks)}) keeps the answers within "
                  f"{_bound_text(bound, generated)}, so the config keeps every layer as it is in the shallow part (no triangle layer)")
    else:
        verified, c = ok, done[ok]
        reason = (f"layer {ok} is the lowest checked starting layer within {_bound_text(bound, generated)} "
                  f"({_figures(c)})")
        if ok > 0 and fail == ok - 1:
            reason += f"; layer {fail} is not ({_figures(done[fail])})"
        elif ok > 0:
            reason += f"; layers {fail + 1}-{ok - 1} were not checked (check budget {max_checks})"
    return Verification(gradient_layer=gradient_layer, verified_layer=verified, num_layers=num_layers,
                        checks=checks, bound=bound, reason=reason)


def scan_layers(check: Callable[[int], LayerCheck], layers: Sequence[int], gradient_layer: int, num_layers: int,
                bound: Bound) -> Verification:
    """Check every layer of ``layers`` (the whole curve) and take the lowest one from which every
    checked layer passes ``bound``; ``num_layers`` (no triangle layer) when the highest checked fails."""
    if not layers:
        raise InputError("--verify-layers names no layer")
    done = {layer: check(layer) for layer in sorted(set(layers))}
    checks = tuple(done[k] for k in sorted(done))
    verified = num_layers
    for c in reversed(checks):  # from the top down, while the checked layers pass
        if not bound.holds(c):
            break
        verified = c.layer
    generated = any(c.plan_scores for c in checks)
    if verified == num_layers:
        reason = (f"the highest checked starting layer ({checks[-1].layer}) is not within {_bound_text(bound, generated)} "
                  f"({_figures(checks[-1])}), so the config keeps every layer as it is in the shallow part (no triangle layer)")
    else:
        reason = (f"layer {verified} is the lowest of the scanned layers ({_span(done)}) from which every scanned "
                  f"layer is within {_bound_text(bound, generated)} ({_figures(done[verified])})")
        below = [c for c in checks if c.layer < verified]
        if below:
            reason += f"; layer {below[-1].layer} is not ({_figures(below[-1])})"
    return Verification(gradient_layer=gradient_layer, verified_layer=verified, num_layers=num_layers,
                        checks=checks, bound=bound, reason=reason, search="scan")


def _span(done: dict) -> str:
    layers = sorted(done)
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ", ".join(map(str, layers))


def _figures(c: LayerCheck) -> str:
    if c.plan_scores:
        lost = (f"{c.lost}/{c.samples} answers lost a token dense had right or scored below dense's generated "
                f"answer ({c.lost_generation} in generation)")
    else:
        lost = f"{c.lost}/{c.samples} answers lost a token dense had right"
    return f"loss {c.loss:.3g} nats/token, {lost}, {c.changed} changed"


def _bound_text(bound: Bound, generated: bool = False) -> str:
    lost = ("losing a token dense had right or generating an answer that scores below dense's (generation check)"
            if generated else "losing a token dense had right")
    return (f"the bound (mean answer log-likelihood loss <= {bound.epsilon:g} nats/token, <= {bound.max_lost:g} "
            f"of the answers {lost})")


# -------------------------------------------------------------------------------------- the figures
def answer_rows(model: torch.nn.Module, ids: torch.Tensor, n_prompt: int) -> tuple[float, torch.Tensor]:
    """One forward of ``ids`` [1, N + A] with the model as it is now (patched or not), no cache: the
    mean log-probability of the answer tokens ``ids[N:]`` (teacher forced) and the argmax token at
    each answer position ([A] ids; row t predicts token t + 1)."""
    n_answer = ids.shape[1] - n_prompt
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n_answer + 1).logits[0, :-1]  # [A, vocab]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[0, n_prompt:, None]).mean()
    return float(logp), logits.argmax(-1)


def at_inference(config: TriMixConfig, n_answer: int) -> TriMixConfig:
    """``config`` for one forward over prompt + ``n_answer`` answer tokens that gives the prompt rows
    what prefill(prompt) gives them and the answer rows dense attention (decode): ``last_n`` (and a
    dynamic spec's ``dense_last``) grown by ``n_answer``."""
    def grown(spec):
        return spec and replace(spec, dense_last=spec.dense_last + n_answer)
    return replace(config, last_n=config.last_n + n_answer, dynamic=grown(config.dynamic),
                   dynamic_layers={i: grown(s) for i, s in config.dynamic_layers.items()})


@dataclass(frozen=True)
class DenseReference:
    """Dense's figures of one sample: the ids [1, N + A], N, the answer's mean log-probability and the
    argmax token at each answer position; ``inputs``: dense's hidden state entering some decoder
    layers (host copies, by layer) for :mod:`~trimix_probe.replay`; ``score``: with the generation
    check, dense's generated answer's score (:func:`dense_scores`)."""

    ids: torch.Tensor
    n_prompt: int
    logp: float
    argmax: torch.Tensor
    inputs: dict = field(default_factory=dict, compare=False, repr=False)
    score: float | None = None


@dataclass(frozen=True)
class GoldAnswers:
    """What the generation check needs beside the samples' ids, one entry per sample in their order:
    the task (its generation length and metric, :mod:`~trimix_probe.tasks`) and the gold answers; the
    tokenizer decodes the generated ids."""

    tokenizer: object
    tasks: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if len(self.tasks) != len(self.answers):
            raise InputError(f"the generation check needs a task and answers per sample, got {len(self.tasks)} "
                             f"tasks and {len(self.answers)} answer lists")


def generated_score(model: torch.nn.Module, tokenizer, prompt: torch.Tensor, task: str, answers) -> float:
    """Greedy generation of ``prompt`` [1, N] (the template and the answer prefix, as ``eval`` encodes
    it) with the model as it is now, ``MAX_NEW_TOKENS[task]`` tokens by ``eval``'s call (patched:
    the plan's prefill, then dense decode over the cache), scored as ``eval`` scores it."""
    from .runner import generate_batch
    from .tasks import MAX_NEW_TOKENS, score

    gen, = generate_batch(model, tokenizer, [prompt], MAX_NEW_TOKENS[task])
    return score(task, gen.text, answers)


def dense_scores(model: torch.nn.Module, refs: Sequence[DenseReference], gold: GoldAnswers,
                 progress: Callable[[], None] | None = None) -> list[DenseReference]:
    """``refs`` with dense's generated answer's score where they lack one (dense generates once per
    sample, however many checks use it)."""
    from .patch import unpatch_model

    if len(gold.tasks) != len(refs):
        raise InputError(f"the generation check needs the gold answers of every sample: {len(refs)} samples, "
                         f"{len(gold.tasks)} answer lists")
    unpatch_model(model)  # dense is the model's own attention (a no-op when not patched)
    out = []
    for ref, task, answers in zip(refs, gold.tasks, gold.answers):
        if ref.score is None:
            ref = replace(ref, score=generated_score(model, gold.tokenizer, ref.ids[:, :ref.n_prompt], task, answers))
            if progress is not None:
                progress()
        out.append(ref)
    return out


def check_generation(model: torch.nn.Module, refs: Sequence[DenseReference], config: TriMixConfig,
                     gold: GoldAnswers, figures: LayerCheck,
                     progress: Callable[[], None] | None = None) -> LayerCheck:
    """``figures`` (``config``'s teacher-forced check) with the generation check added: each sample's
    answer generated under ``config`` as ``eval`` generates it (:func:`generated_score`) beside dense's
    (``ref.score``, :func:`dense_scores`)."""
    from .patch import patch_model, unpatch_model

    t0 = time.perf_counter()
    scores = []
    patch_model(model, config)  # the plan as emitted: at_inference is for the teacher-forced forward only
    try:
        for ref, task, answers in zip(refs, gold.tasks, gold.answers):
            scores.append(generated_score(model, gold.tokenizer, ref.ids[:, :ref.n_prompt], task, answers))
            if progress is not None:
                progress()
    finally:
        unpatch_model(model)
    return replace(figures, dense_scores=tuple(ref.score for ref in refs), plan_scores=tuple(scores),
                   seconds=figures.seconds + time.perf_counter() - t0)


@dataclass
class Replay:
    """Whether checks start from dense's recorded hidden states (:mod:`~trimix_probe.replay`); the
    first replayed forward is compared with a whole one and replay stops if they differ."""

    enabled: bool = True
    confirmed: bool = False


def search_candidates(gradient_layer: int, num_layers: int, max_checks: int) -> set[int]:
    """Every layer :func:`search_layer` could check from ``gradient_layer`` with ``max_checks`` checks,
    whatever the outcomes (each pattern of passes and fails replayed through the search itself)."""
    seen: set[int] = set()
    for pattern in range(2 ** max_checks):
        calls: list[int] = []

        def check(layer: int) -> LayerCheck:
            d = 0.0 if pattern >> len(calls) & 1 else 1.0
            calls.append(layer)
            return LayerCheck(layer=layer, drop=d, changed=0, samples=1, max_drop=d, seconds=0.0, drops=(d,))
        search_layer(check, gradient_layer, num_layers, Bound(0.5, 1.0), max_checks)
        seen.update(calls)
    return seen


@torch.inference_mode()
def dense_references(model: torch.nn.Module, samples: Sequence[tuple[torch.Tensor, int]],
                     record: set[int] = frozenset()) -> list[DenseReference]:
    """Dense's figures for ``samples``: (ids [1, N + A], N) pairs with ``A >= 1`` answer tokens; with
    ``record``, the hidden states entering those decoder layers too (none if the model's layers do
    not allow replay, :mod:`~trimix_probe.replay`)."""
    from .patch import unpatch_model
    from .replay import recording

    unpatch_model(model)  # dense is the model's own attention (a no-op when not patched)
    device = model.get_input_embeddings().weight.device
    refs = []
    with recording(model, set(record)) as recorder:
        for ids, n in samples:
            if not 0 < n < ids.shape[1]:
                raise InputError(f"a verification sample needs a prompt and an answer; got {n} prompt tokens of {ids.shape[1]}")
            ids = ids.to(device)
            figures = answer_rows(model, ids, n)
            refs.append(DenseReference(ids, n, *figures, inputs=recorder.take()))
    if not recorder.ok:
        for ref in refs:
            ref.inputs.clear()
    return refs


def _figures_of(model: torch.nn.Module, ref: DenseReference, config: TriMixConfig,
                replay: Replay | None) -> tuple[float, torch.Tensor]:
    """``answer_rows`` of ``ref`` under the patched ``config``, from dense's recorded state at the
    starting layer when the layers below it are dense (or keep their window) and replay is on."""
    from .replay import replaying

    start = int(config.starting_layer)
    hidden = ref.inputs.get(start)
    usable = (replay is not None and replay.enabled and hidden is not None and start > 0
              and config.own_prefix >= start)
    if not usable:
        return answer_rows(model, ref.ids, ref.n_prompt)
    with replaying(model, start, hidden):
        logp, argmax = answer_rows(model, ref.ids, ref.n_prompt)
    if not replay.confirmed:  # once: the replayed forward must equal the whole one, bit for bit
        whole = answer_rows(model, ref.ids, ref.n_prompt)
        if whole[0] != logp or not torch.equal(whole[1], argmax):
            replay.enabled = False
            return whole
        replay.confirmed = True
    return logp, argmax


@torch.inference_mode()
def _check(model: torch.nn.Module, refs: Sequence[DenseReference], config: TriMixConfig,
           generation: GoldAnswers | None, progress: Callable[[], None], replay: Replay | None = None) -> LayerCheck:
    """One check of ``config``: :func:`check_layer`, then :func:`check_generation` when ``generation``
    is given (``verify`` and ``verify_plan`` alike)."""
    figures = check_layer(model, refs, config, progress, replay)
    return figures if generation is None else check_generation(model, refs, config, generation, figures, progress)


def check_layer(model: torch.nn.Module, refs: Sequence[DenseReference], config: TriMixConfig,
                progress: Callable[[], None] | None = None, replay: Replay | None = None) -> LayerCheck:
    """The figures of ``config`` (starting layer ``config.starting_layer``) against dense on ``refs``;
    with ``replay``, from dense's recorded hidden states where the refs hold them."""
    from .patch import patch_model, unpatch_model

    t0 = time.perf_counter()
    drops, same, lost = [], [], []
    try:
        for ref in refs:
            patch_model(model, at_inference(config, ref.ids.shape[1] - ref.n_prompt))
            logp, argmax = _figures_of(model, ref, config, replay)
            drops.append(ref.logp - logp)
            same.append(bool(torch.equal(argmax, ref.argmax)))
            gold = ref.ids[0, ref.n_prompt:]
            lost.append(bool(((ref.argmax == gold) & (argmax != gold)).any()))
            if progress is not None:
                progress()
    finally:
        unpatch_model(model)
    return LayerCheck(layer=int(config.starting_layer if config.starting_layer is not None else -1), drop=sum(drops) / len(drops), changed=same.count(False),
                      samples=len(drops), max_drop=max(drops), seconds=time.perf_counter() - t0,
                      drops=tuple(drops), same=tuple(same), lost_flags=tuple(lost))


def _replay_layers(model: torch.nn.Module, samples: Sequence[tuple[torch.Tensor, int]], layers: set[int]) -> set[int]:
    """``layers`` (0 dropped: nothing to skip) if recording them for every sample fits in
    :data:`~trimix_probe.replay.REPLAY_BYTES` of host memory, else none."""
    from .replay import REPLAY_BYTES, state_bytes

    layers = {x for x in layers if x > 0}
    return layers if state_bytes(model, sum(ids.shape[1] for ids, _ in samples), layers) <= REPLAY_BYTES else set()


def verify(model: torch.nn.Module, samples: Sequence[tuple[torch.Tensor, int]], make_config: Callable[[int], TriMixConfig],
           gradient_layer: int, bound: Bound = Bound(), max_checks: int = MAX_CHECKS, *,
           layers: Sequence[int] | None = None, progress: bool = True, replay: bool = True,
           generation: GoldAnswers | None = None) -> Verification:
    """Verify ``gradient_layer`` on ``samples`` ((ids [1, N + A], N) pairs, N prompt tokens then A answer
    tokens) and search for the lowest starting layer within ``bound`` (:func:`search_layer`), or, given
    ``layers``, check exactly those (:func:`scan_layers`). ``make_config(L)`` is the config that would be
    emitted with starting layer L. ``replay``: checks start from dense's hidden states where they fit
    in memory (:mod:`~trimix_probe.replay`; the figures are the same, bit for bit). ``generation``: the
    samples' gold answers, which turns the generation check on (module docstring)."""
    import sys

    from tqdm.auto import tqdm

    num_layers = model.config.get_text_config().num_hidden_layers
    if not samples:
        raise InputError("verification needs at least one sample")
    if layers is not None and (not layers or not all(0 <= x < num_layers for x in layers)):
        raise InputError(f"verification layers must be within 0-{num_layers - 1}, got {list(layers)!r}")
    t0 = time.perf_counter()
    candidates = set(layers) if layers is not None else search_candidates(gradient_layer, num_layers, max_checks)
    record = _replay_layers(model, samples, candidates) if replay else set()
    refs = dense_references(model, samples, record)
    state = Replay(enabled=bool(refs[0].inputs))
    per = 1 if generation is None else 2  # a forward, and a generation with the check
    total = len(refs) * ((max_checks if layers is None else len(set(layers))) * per + per - 1)
    bar = tqdm(total=total, desc="verify", unit="sample", file=sys.stderr, disable=not progress)
    try:
        if generation is not None:
            refs = dense_scores(model, refs, generation, bar.update)

        def one(layer: int) -> LayerCheck:
            return _check(model, refs, make_config(layer), generation, bar.update, state)
        if layers is None:
            result = search_layer(one, gradient_layer, num_layers, bound, max_checks)
        else:
            result = scan_layers(one, layers, gradient_layer, num_layers, bound)
    finally:
        bar.close()
    kept = tuple(replace(ref, inputs={}) for ref in refs)  # the recorded states (host memory) end here
    return replace(result, seconds=time.perf_counter() - t0, samples=len(refs),
                   replayed=state.enabled and state.confirmed, references=kept)


# ------------------------------------------------------------------------------------ the whole plan
Steps = dict[int, "int | None"]  # shallow layer -> rung of its budget ladder; None: dense


@dataclass(frozen=True)
class PlanCheck:
    """One check of the whole plan: the rung of every shallow layer and the figures against dense."""

    steps: tuple[tuple[int, int | None], ...]
    figures: LayerCheck
    passed: bool


@dataclass(frozen=True)
class PlanVerification:
    """The whole plan's verification: every check (in order), the rungs emitted, the bound, one
    sentence of reason, the cost."""

    checks: tuple[PlanCheck, ...]
    steps: tuple[tuple[int, int | None], ...]
    bound: Bound
    passed: bool
    reason: str
    seconds: float = 0.0
    samples: int = 0

    def to_dict(self, names=None, per_sample: bool = False) -> dict:
        """JSON-ready; ``names(layer, rung)`` spells a budget (default: the rung); the generation
        check's figures when it ran (its scores per sample only with ``per_sample``)."""
        def spell(steps):
            return {str(layer): ("dense" if s is None else (names(layer, s) if names else s)) for layer, s in steps}
        return {"epsilon": self.bound.epsilon, "max_lost": self.bound.max_lost, "passed": self.passed,
                "reason": self.reason, "seconds": round(self.seconds, 1), "samples": self.samples,
                "budgets": spell(self.steps),
                "checks": [{"budgets": spell(c.steps), "passed": c.passed, "loss": _rounded(c.figures.loss),
                            "lost": c.figures.lost, "changed": c.figures.changed, "samples": c.figures.samples,
                            "drop": _rounded(c.figures.drop), "max_drop": _rounded(c.figures.max_drop),
                            "seconds": round(c.figures.seconds, 1)} | _generation_record(c.figures, per_sample)
                           for c in self.checks]}


def settle_budgets(check: Callable[[Steps], LayerCheck], steps: Steps, advance: Callable[[Steps, int], Steps],
                   bound: Bound, max_checks: int = MAX_CHECKS) -> PlanVerification:
    """Raise shallow budgets until the whole plan passes ``bound``. ``steps``: each shallow layer's rung
    (None: dense); ``advance(steps, failures)``: the rungs after that many failed checks
    (:func:`~trimix_probe.choice.raise_budgets`; it must raise at least one layer, else every layer
    goes dense). At most ``max_checks`` checks, then every shallow layer dense: the plan the starting
    layer's verification passed (a plan with every shallow layer dense is never checked here for that
    reason)."""
    steps, done = dict(steps), []
    while True:
        sparse = sorted(layer for layer, s in steps.items() if s is not None)
        if not sparse:
            reason = ("every shallow layer is dense: the plan is the triangle plan the starting layer's "
                      "verification checked")
            if done:
                generated = bool(done[-1].figures.plan_scores)
                reason = (f"no checked budget kept the whole plan within {_bound_text(bound, generated)} in {len(done)} "
                          f"check(s) (last: {_figures(done[-1].figures)}), so " + reason)
            return PlanVerification(tuple(done), tuple(sorted(steps.items())), bound, True, reason)
        if len(done) >= max_checks:
            steps = dict.fromkeys(steps)
            continue
        figures = check(dict(steps))
        ok = bound.holds(figures)
        done.append(PlanCheck(tuple(sorted(steps.items())), figures, ok))
        if ok:
            dense = len(steps) - len(sparse)
            reason = (f"the whole plan ({len(sparse)} dynamic shallow layer(s), {dense} dense, triangle layers) "
                      f"is within {_bound_text(bound, bool(figures.plan_scores))} ({_figures(figures)})")
            if len(done) > 1:
                reason += f" after {len(done) - 1} raise(s) of the budgets"
            return PlanVerification(tuple(done), tuple(sorted(steps.items())), bound, True, reason)
        raised = advance(dict(steps), len(done))
        if raised == steps or any(_rung(raised[layer]) < _rung(steps[layer]) for layer in steps):
            raised = dict.fromkeys(steps)  # no progress, or a rung went down: dense, the plan known to pass
        steps = raised


def _rung(step: int | None) -> float:
    return math.inf if step is None else step


def same_samples(refs: Sequence[DenseReference], samples: Sequence[tuple[torch.Tensor, int]]) -> bool:
    """Whether ``refs`` are dense's figures of exactly ``samples``: the same tokens, split at the same
    prompt length, in the same order."""
    return len(refs) == len(samples) and all(
        ref.n_prompt == n and ref.ids.shape == ids.shape and torch.equal(ref.ids, ids.to(ref.ids.device))
        for ref, (ids, n) in zip(refs, samples))


def verify_plan(model: torch.nn.Module, samples: Sequence[tuple[torch.Tensor, int]],
                make_config: Callable[[Steps], TriMixConfig], steps: Steps, advance: Callable[[Steps, int], Steps],
                bound: Bound = Bound(), max_checks: int = MAX_CHECKS, *, progress: bool = True,
                references: Sequence[DenseReference] | None = None,
                generation: GoldAnswers | None = None) -> PlanVerification:
    """Check the whole plan ``make_config(steps)`` (dynamic shallow layers and triangle layers together)
    against dense on ``samples`` and raise its shallow budgets until it passes (:func:`settle_budgets`).
    Every check is a whole forward (no replay: the shallow layers differ from dense). ``references``:
    dense's figures from the starting layer's check (:attr:`Verification.references`), used when they
    are of the same samples (:func:`same_samples`), else dense runs again: the same figures either way.
    ``generation``: the samples' gold answers, which turns the generation check on (dense's generated
    scores reused from ``references`` where they hold them)."""
    import sys

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    reuse = references is not None and same_samples(references, samples)
    refs = list(references) if reuse else dense_references(model, samples)
    per = 1 if generation is None else 2  # a forward, and a generation with the check
    missing = 0 if generation is None else sum(ref.score is None for ref in refs)
    bar = tqdm(total=len(refs) * max_checks * per + missing, desc="verify plan", unit="sample", file=sys.stderr,
               disable=not progress)
    try:
        if generation is not None:
            refs = dense_scores(model, refs, generation, bar.update)

        result = settle_budgets(lambda s: _check(model, refs, make_config(s), generation, bar.update), steps,
                                advance, bound, max_checks)
    finally:
        bar.close()
    return replace(result, seconds=time.perf_counter() - t0, samples=len(refs))
