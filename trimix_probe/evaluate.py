"""``trimix-probe eval``: the same samples through dense attention, a TriangleMix config and baselines.

Methods (all share the config's ``n_init`` / ``n_local`` / ``last_n``, or :data:`trimix_probe.config.TRIANGLE` without one):

- ``dense``: the model as loaded (SDPA);
- ``config``: the config's own plan;
- ``streaming``: sink + window in every layer, no dense last rows (triangle from layer 0, ``last_n=0``);
- ``triangle-all``: triangle attention in every layer (starting layer 0);
- ``trimix@L{s}``: dense below layer ``s``, triangle from ``s`` on (the ``--sweep`` list).

Only the prefill follows a plan; generated tokens attend densely to the whole cache (see
:mod:`trimix_probe.patch`). So ``streaming`` here is StreamingLLM at prefill: its first answer
token comes from a row that sees only the sink and the window, later tokens see everything.

The loaded model is reused: ``patch_model`` / ``unpatch_model`` around each (sample, method) run. Greedy generation of
``MAX_NEW_TOKENS[task]`` tokens after the task's answer prefix, RULER scoring. A result is a folder:
``results.csv`` (one row per sample x method), ``summary.md`` (method x task averages per length,
and each method's average as a share of dense's, over the tasks dense can do: see
:data:`DENSE_FLOOR`), ``scores.png``, and ``configs/<method>.json``.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import TRIANGLE, ModelIdentity, TriMixConfig, mark_sliding
from .errors import ConfigError, InputError
from .tasks import MAX_NEW_TOKENS, Sample, check_lengths, load_jsonl, make_samples, parse_lengths, parse_tasks, score, split_items

BASELINES = ("streaming", "triangle-all")
SWEEP_PREFIX = "trimix@L"
"""Method name of a sweep entry: ``trimix@L{starting layer}``."""


DENSE_FLOOR = 0.5
"""A task at a length where dense's mean score is below this is flagged and left out of the headline
average, % of dense, intervals and lost/gained counts (still shown in the per-task table). Below it
dense fails most samples, so a plan cannot lose them and can only "gain" by chance: the task then
measures what the model cannot do, not what sparsity costs (issue 23: dense at 40% on a needle task
let triangle-all "beat" it). 0.5 is the point where a method has more samples it can gain on than
lose on; ``--dense-floor`` sets it, 0 keeps every task."""

SAMPLES = 50
"""Default samples per task and length. The paired 95% interval of the average over 8 tasks is about
``1.96 * sqrt(p / (8 n))`` when a plan changes a share ``p`` of the answers: with n = 50, +-1 point
at p = 1%, +-1.4 at p = 2%, +-2.2 at p = 5% (+-1 point at p = 5% needs ~240 a task). So the summary
calls a difference one only when its interval excludes 0, and states the samples +-1 point would need."""


def sweep_layer(method: str) -> int | None:
    """The starting layer of a sweep method name (``trimix@L12`` -> 12), None for other methods."""
    return int(method[len(SWEEP_PREFIX):]) if method.startswith(SWEEP_PREFIX) else None


@dataclass(frozen=True)
class Method:
    """One attention plan to evaluate; ``config`` None is dense."""

    name: str
    config: TriMixConfig | None
    starting_layer: int | None


# ---------------------------------------------------------------------------------------- parsing
def parse_sweep(sweep, num_layers: int) -> list[int]:
    out = []
    for v in split_items(sweep):
        try:
            layer = int(v)
        except ValueError:
            raise InputError(f"sweep entry {v!r} is not a layer number; use e.g. --sweep 0,4,8") from None
        if not 0 <= layer <= num_layers:
            raise InputError(f"sweep layer {layer} is outside [0, {num_layers}] for this model")
        out.append(layer)
    return out


def parse_compare(compare) -> list[tuple[str, TriMixConfig]]:
    """``--compare NAME=PATH`` entries -> [(name, config)]: more configs evaluated beside ``--config``
    on the same samples (e.g. two dynamic budgets). Names are checked before any model loads."""
    out: list[tuple[str, TriMixConfig]] = []
    reserved = {"dense", "config", *BASELINES}
    for item in split_items(compare):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise InputError(f"compare entry {item!r} is not NAME=PATH; use e.g. --compare dyn-big=big.json")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in reserved or name.startswith(SWEEP_PREFIX):
            raise InputError(f"compare name {name!r} is not accepted: use letters, digits and _.+- only, and not "
                             f"{', '.join(sorted(reserved))} or a name starting with {SWEEP_PREFIX!r}")
        if name in {n for n, _ in out}:
            raise InputError(f"compare name {name!r} is given twice")
        out.append((name, TriMixConfig.load(path)))
    return out


def build_methods(identity: ModelIdentity, config: TriMixConfig | None, baselines=(), sweep=(),
                  compare: list[tuple[str, TriMixConfig]] = (), windows: dict[int, int | None] | None = None
                  ) -> list[Method]:
    """dense, the config, the compared configs, the baselines, the sweep (each plan once, in that order).
    ``windows`` (each layer's sliding window, None for full attention): the baselines and the sweep keep
    window layers ``"sliding"``, as ``analyze``'s plans do; the given configs are taken as they are."""
    bad = [b for b in split_items(baselines) if b not in BASELINES]
    if bad:
        raise InputError(f"unknown baseline(s) {bad}; accepted: {', '.join(BASELINES)}")
    windows = windows or {}
    shape = ({"n_init": config.n_init, "n_local": config.n_local, "last_n": config.last_n}
             if config is not None else asdict(TRIANGLE))
    methods = [Method("dense", None, None)]
    if config is not None:
        config.check_model(identity)
        methods.append(Method("config", config, config.starting_layer))
    for name, cfg in compare:
        cfg.check_model(identity)
        methods.append(Method(name, cfg, cfg.starting_layer))
    for b in split_items(baselines):
        if b == "streaming":
            cfg = TriMixConfig.triangle_from(identity, 0, **(shape | {"last_n": 0}),
                                             provenance={"method": "baseline: streaming (sink + window)"})
        else:
            cfg = TriMixConfig.triangle_from(identity, 0, **shape, provenance={"method": "baseline: triangle-all"})
        methods.append(Method(b, mark_sliding(cfg, windows), 0))
    for layer in sweep:
        cfg = TriMixConfig.triangle_from(identity, layer, **shape, provenance={"method": "sweep"})
        methods.append(Method(f"{SWEEP_PREFIX}{layer}", mark_sliding(cfg, windows), layer))
    return methods


# ---------------------------------------------------------------------------------------- running
def plan_key(config: TriMixConfig | None) -> str:
    """What decides a method's generations: the config without its provenance ("dense" for None).
    Greedy decoding of one plan gives the same text, so a plan listed twice (the probe's config and
    the sweep entry at its layer) is generated once and reported under both names."""
    if config is None:
        return "dense"
    import json

    data = config.to_dict()
    data.pop("provenance", None)
    return json.dumps(data, sort_keys=True)


def prefix_layer(config: TriMixConfig | None) -> int:
    """How many leading layers of ``config`` compute exactly what dense computes (dense or sliding
    layers): its prefill can start there from dense's state (:mod:`trimix_probe.replay`). 0 for dense
    itself and for plans sparse from layer 0."""
    if config is None:
        return 0
    n = config.own_prefix
    return n if n < len(config.layers) else 0


def _share_fits(lm, n_prompts: int, longest: int, layers: set[int]) -> bool:
    """Whether dense's states entering ``layers`` and its KV cache below the highest of them, for a
    batch of ``n_prompts`` x ``longest`` tokens, fit in a quarter of the free memory of the model's
    device (on CPU: :data:`~trimix_probe.replay.REPLAY_BYTES`)."""
    import torch

    from .replay import REPLAY_BYTES, state_bytes

    need = state_bytes(lm, n_prompts * longest, layers, cache_below=max(layers))
    device = lm.device
    if device.type == "cuda":
        return need <= torch.cuda.mem_get_info(device)[0] // 4
    return need <= REPLAY_BYTES


def _shared_generation(lm, tokenizer, prompts, new_tokens: int, start: int, record, *, check: bool,
                       name: str) -> tuple[list, bool]:
    """The patched ``lm``'s generations of ``prompts`` with the prefill starting at layer ``start`` from
    dense's ``record`` (:func:`~trimix_probe.replay.prefilling_from`), and whether sharing holds.
    ``check``: also generate whole and compare (prefill logits bit for bit, the answers); a mismatch,
    or a replay that raises, is named on stderr and the whole generations are returned with False."""
    import torch

    from .replay import first_logits, prefilling_from
    from .runner import generate_batch

    failed = None
    try:
        with first_logits(lm) as replayed, prefilling_from(lm, start, record):
            gens = generate_batch(lm, tokenizer, prompts, new_tokens)
    except Exception as err:  # a model this cannot replay: once, before it is trusted
        if not check:
            raise
        failed, gens = f"{type(err).__name__}: {err}", []
    if not check:
        return gens, True
    with first_logits(lm) as whole:
        whole_gens = generate_batch(lm, tokenizer, prompts, new_tokens)
    if (failed or replayed.value is None or whole.value is None or not torch.equal(replayed.value, whole.value)
            or [g.text for g in gens] != [g.text for g in whole_gens]):
        why = f" ({failed})" if failed else ""
        print(f"warning: {name}: starting from dense's state at layer {start} did not match a whole "
              f"prefill{why}; every plan runs whole from here on", file=sys.stderr)
        return whole_gens, False
    return gens, True


def run_methods(lm, tokenizer, methods: list[Method], samples: list[tuple[int, int, Sample]], *,
                chat: bool = True, max_new_tokens: int | None = None, model_name: str = "",
                on_row=None, batch_size: int = 1, batch_tokens: int | None = None,
                share_prefix: bool = True) -> list[dict]:
    """Every sample through every method; one row per (sample, method). ``samples``:
    ``(length, index, sample)``. The loaded model is patched and unpatched around each run.
    ``batch_size`` > 1 generates consecutive samples of one task and length together (left-padded;
    each prompt follows the plan on its own span, so scores equal one-at-a-time runs); ``batch_tokens``
    caps a batch at that many prompt tokens (e.g. 20 prompts at 8K but 5 at 32K).

    ``share_prefix``: a sweep entry (``trimix@L{s}``: dense below ``s``) prefills from dense's state
    at ``s`` and dense's KV cache below it, recorded in dense's run of the same batch
    (:mod:`trimix_probe.replay`), so it costs the layers from ``s`` on. Each starting layer's first
    batch also runs whole and must give the same prefill logits, bit for bit, and the same answers,
    else sharing stops for the rest of the run. Rows of shared runs leave ``prefill_s`` / ``total_s``
    empty (they are not the plan's time), and dense's time includes the recording copies. The
    config, the compared configs and the baselines always run whole, so their times stand; with
    ``share_prefix=False`` every plan runs whole."""
    from tqdm.auto import tqdm

    from .models import encode_prompt
    from .patch import patch_model, unpatch_model
    from .replay import recording_prefill
    from .runner import generate_batch

    encoded = [encode_prompt(tokenizer, s.prompt, chat=chat, answer_prefix=s.answer_prefix).to(lm.device)
               for _, _, s in samples]
    batches: list[list[int]] = []
    for i, (length, _, sample) in enumerate(samples):
        last = batches[-1] if batches else None
        cap = batch_size if not batch_tokens else max(1, min(batch_size, batch_tokens // max(length, 1)))
        if last and len(last) < cap and samples[last[0]][0] == length and samples[last[0]][2].task == sample.task:
            last.append(i)
        else:
            batches.append([i])
    starts = {m.name: prefix_layer(m.config) if sweep_layer(m.name) is not None else 0 for m in methods}
    shared = {layer for layer in starts.values() if layer > 0}
    share = share_prefix and bool(shared) and methods[0].config is None
    confirmed: set[int] = set()          # starting layers whose shared prefill matched a whole one
    rows = []
    bar = tqdm(total=len(methods) * len(samples), desc="eval", unit="run", file=sys.stderr)
    # samples outer, methods inner: a run cut short still compares every method on the samples it did
    for batch in batches:
        length, _, first = samples[batch[0]]
        prompts = [encoded[i] for i in batch]
        new_tokens = max_new_tokens or MAX_NEW_TOKENS[first.task]
        record = None
        done: dict[str, tuple[list, float | None]] = {}   # plan key -> generations: a plan listed twice runs once
        for method in methods:
            bar.set_postfix_str(f"{method.name} {first.task}@{length}")
            key = plan_key(method.config)
            start = starts[method.name]
            if key in done:
                gens, elapsed = done[key]
            elif method.config is None and share and _share_fits(lm, len(batch), max(p.shape[1] for p in prompts),
                                                                 shared):
                t0 = time.perf_counter()
                with recording_prefill(lm, shared, max(shared)) as record:
                    gens = generate_batch(lm, tokenizer, prompts, new_tokens)
                elapsed = (time.perf_counter() - t0) / len(batch)
                record = record if record.ok else None
                done[key] = gens, elapsed
            elif share and record is not None and start > 0:
                patch_model(lm, method.config)
                try:
                    gens, share = _shared_generation(lm, tokenizer, prompts, new_tokens, start, record,
                                                     check=start not in confirmed, name=method.name)
                finally:
                    unpatch_model(lm)
                if share:
                    confirmed.add(start)
                elapsed = None
                done[key] = gens, elapsed
            else:
                if method.config is not None:
                    patch_model(lm, method.config)
                try:
                    t0 = time.perf_counter()
                    gens = generate_batch(lm, tokenizer, prompts, new_tokens)
                    elapsed = (time.perf_counter() - t0) / len(batch)
                finally:
                    if method.config is not None:
                        unpatch_model(lm)
                done[key] = gens, elapsed
            for i, gen in zip(batch, gens):
                _, index, sample = samples[i]
                row = {"model": model_name, "method": method.name,
                       "starting_layer": "" if method.starting_layer is None else method.starting_layer,
                       "task": sample.task, "length": length, "n_tokens": gen.prompt_tokens, "sample": index,
                       "score": score(sample.task, gen.text, sample.answers),
                       "prefill_s": "" if elapsed is None else round(gen.prefill_s / len(batch), 4),
                       "total_s": "" if elapsed is None else round(elapsed, 4),
                       "answers": "|".join(sample.answers), "prediction": gen.text}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            bar.update(len(batch))
    bar.close()
    return rows


def evaluate(model: str | None = None, config: Path | str | None = None, lengths="4k", tasks="all",
             samples: int = SAMPLES, baselines="", sweep="", out: Path | str = "eval-out", *, seed: int = 0,
             samples_file: Path | str | None = None, max_new_tokens: int | None = None, chat: bool = True,
             device: str | None = None, dtype: str = "auto", batch_size: int = 1,
             batch_tokens: int | None = None, resume: bool = False, compare=(), against=(),
             rope_scaling: str | None = None, share_prefix: bool = True, dense_floor: float = DENSE_FLOOR) -> Path:
    """Run the samples (built-in tasks at each length, or a JSONL ``samples_file``) through dense,
    the config, the ``compare`` configs (``NAME=PATH`` entries, reported as NAME) and the baselines /
    sweep; write the result folder ``out``. Returns ``out``. ``against``: methods the summary also
    pairs every method with (besides dense), e.g. ``trimix@L14`` beside a dynamic config.

    ``resume``: keep the rows already in ``out/results.csv`` for the samples (same length, task,
    index and seed) that every method finished, drop the rest, and run only what is missing, e.g.
    after a run was cut short by a time limit. ``rope_scaling``: see :mod:`~trimix_probe.rope`.
    ``share_prefix``: the sweep entries start their prefill from dense's state at their starting
    layer (see :func:`run_methods`; the answers are the same, the times of those runs are not
    recorded; the config's are). ``dense_floor``: tasks dense scores below this at a length are
    flagged and left out of the summary's headline (:data:`DENSE_FLOOR`)."""
    from .models import device_name, load_model, resolve_device
    from .rope import warn_probed_rope

    # everything a user can get wrong is checked before the model loads
    cfg = TriMixConfig.load(config) if config is not None else None
    compared = parse_compare(compare)
    if samples_file is None:
        length_list, task_list = parse_lengths(lengths), parse_tasks(tasks)
    if not isinstance(samples, int) or samples <= 0:
        raise InputError(f"samples must be a positive count, got {samples!r}")
    _check_floor(dense_floor)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch size must be a positive count, got {batch_size!r}")
    if batch_tokens is not None and (not isinstance(batch_tokens, int) or batch_tokens <= 0):
        raise InputError(f"batch tokens must be a positive token count (e.g. 160k), got {batch_tokens!r}")
    for b in split_items(baselines):
        if b not in BASELINES:
            raise InputError(f"unknown baseline {b!r}; accepted: {', '.join(BASELINES)}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                       or max_new_tokens < 1):
        raise InputError(f"--max-new-tokens {max_new_tokens!r}: expected a positive number of tokens")
    if samples_file is None:
        check_lengths(length_list, task_list)
    else:
        load_jsonl(samples_file, chat=chat)  # a bad line is named now, not after the load
    resolve_device(device)
    lm, tokenizer, name = load_model(model, device=device, dtype=dtype, rope_scaling=rope_scaling,
                                     max_tokens=None if samples_file is not None else max(length_list))
    identity = ModelIdentity.from_hf_config(lm.config, name=name)
    sweep_list = parse_sweep(sweep, identity.num_layers)
    for where, c in ([(str(config), cfg)] if cfg is not None else []) + [(f"--compare {n}", c) for n, c in compared]:
        try:
            c.check_model(identity)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        warn_probed_rope(c.provenance, lm.config, where=f"{where}: ")
    from .families import attention_modules, layer_windows
    from .patch import check_runnable

    methods = build_methods(identity, cfg, baselines, sweep_list, compared,
                            windows=layer_windows(lm, attention_modules(lm)))
    for method in methods:  # a plan the model cannot run is named now, not after dense's generations
        if method.config is not None:
            try:
                check_runnable(lm, method.config)
            except ConfigError as err:
                raise ConfigError(f"{method.name}: {err}") from None
    unknown = [a for a in split_items(against) if a not in {m.name for m in methods}]
    if unknown:
        raise InputError(f"--against {', '.join(unknown)}: not a method of this run; methods: "
                         f"{', '.join(m.name for m in methods)}")

    todo: list[tuple[int, int, Sample]] = []
    if samples_file is not None:
        todo = [(s.n_tokens, i, s) for i, s in enumerate(load_jsonl(samples_file, tokenizer, chat=chat))]
    else:
        for length in length_list:
            for task in task_list:
                todo += [(length, i, s) for i, s in enumerate(make_samples(tokenizer, task, length, samples,
                                                                            seed=seed, chat=chat))]
    out = Path(out)
    csv_path = out / "results.csv"
    run_seed = "" if samples_file is not None else seed
    kept: list[dict] = []
    if resume and csv_path.is_file():
        kept = _finished_rows(csv_path, [m.name for m in methods], name)
        done = {_sample_key(r) for r in kept}
        todo = [t for t in todo if _sample_key({"length": t[0], "task": t[2].task, "sample": t[1], "seed": run_seed})
                not in done]
        print(f"resume: {len(done)} samples already done, {len(todo)} to run", file=sys.stderr)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for m in methods:
        if m.config is not None:
            m.config.save(out / "configs" / f"{m.name}.json")
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(kept)

        def on_row(row):  # written as it comes, so a long run that dies keeps what it did
            row["seed"] = run_seed
            writer.writerow(row)
            fh.flush()

        rows = run_methods(lm, tokenizer, methods, todo, chat=chat, max_new_tokens=max_new_tokens,
                           model_name=name, on_row=on_row, batch_size=batch_size, batch_tokens=batch_tokens,
                           share_prefix=share_prefix)
    rows = [_typed(r) for r in kept] + rows
    (out / "summary.md").write_text(summary_markdown(rows, title=f"{name} on {device_name(lm)}", against=against,
                                                     dense_floor=dense_floor))
    plot_scores(rows, out / "scores.png")
    plot_sweep(rows, out / "sweep.png", dense_floor=dense_floor)
    print(f"wrote {csv_path}, {out / 'summary.md'}, {out / 'scores.png'}", file=sys.stderr)
    return out


def _check_floor(dense_floor) -> None:
    if isinstance(dense_floor, bool) or not isinstance(dense_floor, (int, float)) or not 0 <= dense_floor <= 1:
        raise InputError(f"--dense-floor {dense_floor!r}: expected a share of samples in [0, 1], e.g. 0.5 (0: flag nothing)")


RESULT_FIELDS = ["model", "method", "starting_layer", "task", "length", "n_tokens", "sample", "seed", "score",
                 "prefill_s", "total_s", "answers", "prediction"]


def _typed(row: dict) -> dict:
    """A row read back from a CSV with its numbers as numbers again."""
    return row | {"score": float(row["score"]), "length": int(row["length"]), "sample": int(row["sample"])}


def _sample_key(row: dict) -> tuple[str, str, str, str]:
    """Which sample a row is about, in the CSV's string form: (length, task, index, seed)."""
    return str(row["length"]), row["task"], str(row["sample"]), str(row["seed"])


def _finished_rows(csv_path: Path, methods: list[str], model_name: str) -> list[dict]:
    """The rows of ``methods`` in ``csv_path`` for the samples every one of them finished (as read:
    strings); rows of methods not in this run are dropped."""
    with csv_path.open(newline="") as fh:
        old = list(csv.DictReader(fh))
    if old and "seed" not in old[0]:
        raise InputError(f"{str(csv_path)!r} has no seed column (written by an older version); "
                         "cannot resume it: run without --resume or into another --out")
    models = {r["model"] for r in old}
    if models - {model_name}:
        raise InputError(f"{str(csv_path)!r} holds results of {sorted(models)}, not {model_name!r}; "
                         "resume with the same model or use another --out")
    per_sample: dict[tuple, set[str]] = {}
    for r in old:
        per_sample.setdefault(_sample_key(r), set()).add(r["method"])
    finished = {k for k, ms in per_sample.items() if set(methods) <= ms}
    return [r for r in old if _sample_key(r) in finished and r["method"] in methods]


def merge_results(parts: list[Path | str], out: Path | str, title: str = "", against=(),
                  allow_missing: bool = False, dense_floor: float = DENSE_FLOOR) -> Path:
    """Concatenate the ``results.csv`` of several result folders (e.g. one per GPU) into ``out``
    and draw its table and chart there. Returns ``out``. ``allow_missing``: a part without a
    results.csv is skipped with a warning (a worker cut short before its first row) instead of refused."""
    _check_floor(dense_floor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for part in parts:
        path = Path(part) / "results.csv"
        if not path.is_file() and allow_missing:
            print(f"warning: no results in {str(part)!r} (see its .log); merging the rest", file=sys.stderr)
            continue
        if not path.is_file():
            raise InputError(f"{str(path)!r} does not exist (did that part run?)")
        with path.open(newline="") as fh:
            rows += [_typed(row) for row in csv.DictReader(fh)]
    if not rows:
        raise InputError("no result rows to merge")
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.md").write_text(summary_markdown(rows, title=title, against=against, dense_floor=dense_floor))
    plot_scores(rows, out / "scores.png")
    plot_sweep(rows, out / "sweep.png", dense_floor=dense_floor)
    return out


# ---------------------------------------------------------------------------------------- reporting
def _frame(rows):
    """Rows as a DataFrame with a ``unit`` column naming one sample: its index, and its seed when
    known (a resumed run may hold two seeds' samples under the same index)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    seed = df["seed"].astype(str) if "seed" in df else ""
    return df.assign(unit=df["sample"].astype(str) + "/" + seed)


def _config_layers(df) -> set[int]:
    """The starting layers of the ``config`` rows (a results CSV holds them as text, '' for none)."""
    text = {str(v).strip() for v in df.loc[df["method"] == "config", "starting_layer"]} - {"", "nan"}
    return {int(float(v)) for v in text}


KEEP = 0.99
"""The share of dense's average a starting layer must keep (issue 4's goal)."""


def paired_delta_ci(part, method: str, *, against: str = "dense", n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0):
    """``method``'s average minus ``against``'s (in score units), with a bootstrap confidence interval.

    Paired: both methods saw the same samples, so the difference is taken per sample and the
    samples of each task are resampled (stratified by task; the average is the mean of the task
    means, as in the table). Returns ``(delta, low, high)``, or None without ``against`` rows."""
    import numpy as np

    if "unit" not in part:
        part = _frame(part.to_dict("records"))
    diffs = []
    for _, task_rows in part.groupby("task"):
        table = task_rows.pivot_table(index="unit", columns="method", values="score", aggfunc="mean")
        if against not in table or method not in table:
            return None
        d = (table[method] - table[against]).dropna().to_numpy()
        if len(d):
            diffs.append(d)
    if not diffs:
        return None
    rng = np.random.default_rng(seed)
    boot = np.mean([d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1) for d in diffs], axis=0)
    tail = (1 - level) / 2
    return (float(np.mean([d.mean() for d in diffs])), float(np.quantile(boot, tail)),
            float(np.quantile(boot, 1 - tail)))


def changed_samples(part, method: str, against: str = "dense") -> tuple[int, int] | None:
    """How many samples ``method`` scores below and above ``against`` on (paired by task and sample).
    An average nets the two: a plan can keep dense's average while changing many of its answers.
    None without rows of both."""
    if "unit" not in part:
        part = _frame(part.to_dict("records"))
    table = part.pivot_table(index=["task", "unit"], columns="method", values="score", aggfunc="mean")
    if against not in table or method not in table:
        return None
    both = table[[method, against]].dropna()
    return int((both[method] < both[against]).sum()), int((both[method] > both[against]).sum())


def sweep_verdict(averages: dict[str, float], config_layer: int | None = None, keep: float = KEEP) -> str | None:
    """One line on the sweep: the lowest starting layer whose average keeps ``keep`` of dense's,
    the lowest from which every swept layer does, and where the config's layer sits. ``averages``:
    method name -> average (``dense`` and ``trimix@L{s}`` entries are used). None without a sweep."""
    dense = averages.get("dense")
    sweep = sorted((sweep_layer(m), v) for m, v in averages.items()
                   if sweep_layer(m) is not None and v == v)          # NaN: not run
    if not sweep or not dense:
        return None
    ok = [layer for layer, v in sweep if v >= keep * dense]
    lowest = ok[0] if ok else None
    from_on = None
    for layer, v in reversed(sweep):
        if v < keep * dense:
            break
        from_on = layer
    pct = f"{keep * 100:g}%"
    text = (f"sweep over layers {', '.join(str(layer) for layer, _ in sweep)}: lowest starting layer keeping "
            f">= {pct} of dense: {lowest if lowest is not None else 'none'}; every swept layer from "
            f"{from_on if from_on is not None else '(none)'} on keeps it")
    if config_layer is not None:
        if lowest is None:
            text += f"; the config starts at layer {config_layer}"
        else:
            text += f"; the config starts at layer {config_layer} ({config_layer - lowest:+d} from the lowest)"
    return text


def prefill_lines(part) -> list[str]:
    """A table of each method's median ``prefill_s`` (seconds of prefill a prompt: its time to first
    token at batch 1) over the rows that carry a time, with the change against dense's median.
    Rows of runs that shared dense's prefix carry none. Empty when no row of ``part`` is timed."""
    import pandas as pd

    if "prefill_s" not in part:
        return []
    timed = part.assign(t=pd.to_numeric(part["prefill_s"], errors="coerce")).dropna(subset=["t"])
    if timed.empty:
        return []
    stats = timed.groupby("method")["t"].agg(["median", "count"])
    order = [m for m in dict.fromkeys(part["method"]) if m in stats.index]     # the score table's order
    dense = stats["median"].get("dense")
    lines = ["| method | prefill s (median) | vs dense | prompts timed |", "|---|---|---|---|"]
    for method in order:
        median, count = stats.loc[method, "median"], int(stats.loc[method, "count"])
        change = "-" if method == "dense" or not dense else f"{(median / dense - 1) * 100:+.1f}%"
        lines.append(f"| {method} | {median:.3f} | {change} | {count} |")
    return ["Time to first token (prefill seconds a prompt, a batch's prefill shared by its prompts; a plan's "
            "first prompt in a process also pays Triton's compile, which the median leaves out from 3 "
            "prompts on):", ""] + lines + [""]


def flagged_tasks(part, floor: float = DENSE_FLOOR) -> list[str]:
    """The tasks of ``part`` (one length's rows) on which dense's mean score is below ``floor``."""
    dense = part[part["method"] == "dense"].groupby("task")["score"].mean()
    return sorted(t for t, v in dense.items() if v < floor)


def _differs(ci) -> str:
    """A difference is called one only when its 95% interval excludes 0."""
    if ci is None:
        return "-"
    return "lower" if ci[2] < 0 else "higher" if ci[1] > 0 else "no"


def summary_markdown(rows: list[dict], title: str = "", against=(), dense_floor: float = DENSE_FLOOR) -> str:
    """Per length: a method x task table of mean scores (in %), the mean over the tasks dense can do
    (dense's mean >= ``dense_floor``; :func:`flagged_tasks` are shown, marked, and left out), that mean
    as a share of dense's, the paired difference to dense with its 95% bootstrap interval (and to each
    method named in ``against``, e.g. TriangleMix alone beside a dynamic config), whether the
    interval excludes 0, the samples it scores below and above dense on (:func:`changed_samples`),
    the samples a task +-1 point would need, a line on the sweep (:func:`sweep_verdict`), and the
    median time to first token of the timed rows (:func:`prefill_lines`)."""
    df = _frame(rows)
    order = list(dict.fromkeys(df["method"]))
    lines = [f"# Accuracy: {title}", ""] if title else []
    for length, whole in df.groupby("length", sort=True):
        flagged = flagged_tasks(whole, dense_floor)
        part = whole[~whole["task"].isin(flagged)]
        table = whole.pivot_table(index="method", columns="task", values="score", aggfunc="mean") * 100
        table = table.reindex([m for m in order if m in table.index])   # methods run at this length
        counts = whole.groupby("task")["unit"].nunique()
        kept_cols = [t for t in table.columns if t not in flagged]
        table["average"] = table[kept_cols].mean(axis=1) if kept_cols else float("nan")
        dense = table.loc["dense", "average"] if "dense" in table.index else float("nan")
        table["% of dense"] = table["average"] / dense * 100 if dense else float("nan")
        table = table.rename(columns={t: f"{t} (flagged)" for t in flagged})
        refs = ["dense"] + [a for a in split_items(against) if a != "dense" and a in table.index]
        cis = ({(m, r): paired_delta_ci(part, m, against=r) for r in refs for m in table.index if m != r}
               if kept_cols else {})
        lines += [f"## {length} tokens ({', '.join(f'{t}: n={c}' for t, c in counts.items())})", ""]
        if flagged:
            lines += [f"Flagged: dense scores below {dense_floor * 100:g}% on {', '.join(flagged)} at this length, "
                      "so the model cannot do these here and they say nothing about sparsity: they are shown "
                      "in the table but left out of the average, % of dense, the intervals and the "
                      "samples below / above dense.", ""]
        lines += ["| method | " + " | ".join(table.columns) + " | "
                  + " | ".join(f"vs {r}, points (95% CI)" for r in refs)
                  + " | differs from dense? | samples below / above dense |",
                  "|---" * (len(table.columns) + 3 + len(refs)) + "|"]
        widths = []
        for method, values in table.iterrows():
            ci_text = []
            for r in refs:
                ci = cis.get((method, r))
                ci_text.append("-" if ci is None else f"{ci[0] * 100:+.1f} [{ci[1] * 100:+.1f}, {ci[2] * 100:+.1f}]")
            ci_dense = cis.get((method, "dense"))
            if ci_dense is not None:
                widths.append((ci_dense[2] - ci_dense[1]) / 2 * 100)
            moved = None if method == "dense" or not kept_cols else changed_samples(part, method)
            lines.append(f"| {method} | " + " | ".join("-" if v != v else f"{v:.1f}" for v in values)
                         + " | " + " | ".join(ci_text) + f" | {_differs(ci_dense)} | "
                         + ("-" if moved is None else f"{moved[0]} / {moved[1]}") + " |")
        if widths:
            n = int(part.groupby("task")["unit"].nunique().min())
            widest = max(widths)
            need = math.ceil(n * widest ** 2) if widest > 1 else n
            lines += ["", f"A method differs from dense only where its paired 95% interval excludes 0 (column "
                          f"'differs from dense?'). Interval half-widths here: {min(widths):.1f} to {widest:.1f} "
                          f"points with {n} samples a task; +-1 point for every method would need about {need} "
                          "samples a task at these spreads."]
        cfg_layers = _config_layers(part)
        verdict = sweep_verdict(table["average"].to_dict(), cfg_layers.pop() if len(cfg_layers) == 1 else None)
        lines += ["", verdict + "."] if verdict else []
        lines.append("")
        lines += prefill_lines(whole)
    return "\n".join(lines)


def plot_scores(rows: list[dict], path: Path) -> Path:
    """Bar chart: mean score per task, one bar per method, one panel per length (fixed 0..100 scale)."""
    from .plotting import pyplot, save

    _, sns = pyplot()
    df = _frame(rows).assign(score=lambda d: d["score"] * 100)
    grid = sns.catplot(data=df, kind="bar", x="task", y="score", hue="method", col="length",
                       errorbar=None, height=4, aspect=1.8, sharey=True)
    grid.set(ylim=(0, 100), ylabel="score (%)")
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", rotation=30)
    return save(grid, path, dpi=110)


def plot_sweep(rows: list[dict], path: Path, keep: float = KEEP, dense_floor: float = DENSE_FLOOR) -> Path | None:
    """The sweep as a curve: average (over the tasks dense can do, as in the summary) as a share of
    dense's vs the starting layer, one line per length, ``triangle-all`` drawn at layer 0, the
    ``keep`` line and the config's layer marked. Returns None (and draws nothing) without sweep rows."""
    df = _frame(rows)
    flagged = {(length, t) for length, part in df.groupby("length") for t in flagged_tasks(part, dense_floor)}
    df = df[[(length, t) not in flagged for length, t in zip(df["length"], df["task"])]]
    averages = df.groupby(["length", "method", "task"])["score"].mean().groupby(["length", "method"]).mean()
    points = []
    for (length, method), value in averages.items():
        layer = 0 if method == "triangle-all" else sweep_layer(method)
        dense = averages.get((length, "dense"))
        if layer is not None and dense:
            points.append({"length": f"{length} tokens", "starting layer": layer, "% of dense": value / dense * 100})
    if not any(p["starting layer"] > 0 for p in points):
        return None
    import pandas as pd

    from .plotting import pyplot, save

    plt, sns = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=pd.DataFrame(points).sort_values("starting layer"), x="starting layer", y="% of dense",
                 hue="length", marker="o", palette="viridis", ax=ax)
    ax.axhline(keep * 100, color="grey", ls="--", lw=1, label=f"{keep * 100:g}% of dense")
    for layer in sorted(_config_layers(df)):
        ax.axvline(layer, color="crimson", ls=":", lw=1.5, label=f"config (layer {layer})")
    ax.set(title="TriangleMix from layer s on (dense below); 0 = triangle in every layer")
    ax.legend(fontsize=8)
    return save(fig, path, dpi=110)
