"""The ``trimix-probe`` command line: a thin skin, each command calls one library function with
the same parameter names. Errors the user can fix are printed as one line, not a traceback."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional, get_args

from enum import Enum

import typer

# only modules without torch here (tests/test_first_contact.py checks): the heavy ones load inside
# the commands, so --help answers at once
from trimix_probe.bench.common import ARCHS
from trimix_probe.config import TRIANGLE, Backend, DynamicMethod, Objective
from trimix_probe.models import DTYPES
from trimix_probe.tasks import TASKS


def _choice(name: str, values) -> type[Enum]:
    """A closed set as a str Enum: the command line checks it (a typo gets one line listing what is
    accepted) and the help lists it. Commands pass ``.value`` on to the library."""
    return Enum(name, {v: v for v in values}, type=str)


DtypeChoice = _choice("DtypeChoice", ("auto", *DTYPES))
ObjectiveChoice = _choice("ObjectiveChoice", get_args(Objective))
BackendChoice = _choice("BackendChoice", get_args(Backend))
ShallowChoice = _choice("ShallowChoice", ("dense", "dynamic"))
MethodChoice = _choice("MethodChoice", get_args(DynamicMethod))
ArchChoice = _choice("ArchChoice", ARCHS)

# plain click help and usage errors (rich_markup_mode=None): rendering them with rich costs about
# a second of imports on every --help; a usage error stays one line, exit code 2
PLAIN = {"rich_markup_mode": None}
app = typer.Typer(add_completion=False, no_args_is_help=True, **PLAIN,
                  help="Find where a long-context LLM can drop attention, emit a TriangleMix config, run it.")
bench_app = typer.Typer(no_args_is_help=True, **PLAIN, help="GPU benchmarks (print a table; not timed tests).")
app.add_typer(bench_app, name="bench")
eval_app = typer.Typer(**PLAIN, help="Accuracy runs: `eval [OPTIONS]` runs one; `eval merge` joins result folders.")
app.add_typer(eval_app, name="eval")


OUT_OF_MEMORY_HINT = ("ask for less: --batch-size 1 or a smaller --batch-tokens, fewer --lengths or methods, "
                      "--device-map auto where the command has it, or a card with more memory (nothing else on it); "
                      "eval --resume keeps the samples already finished")


def _out_of_memory(err: BaseException) -> bool:
    """torch's device out-of-memory error, without importing torch (``--help`` stays light)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


def _user_errors(fn):
    """Turn the errors a user can fix into one line on stderr: bad input (exit code 2), and running
    out of device memory (exit code 1: the input may be fine, the card too small or shared)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from trimix_probe.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(2) from None
        except Exception as err:
            if not _out_of_memory(err):
                raise
            first = (str(err).strip() or "out of memory").splitlines()[0]
            typer.secho(f"error: out of device memory ({first}); {OUT_OF_MEMORY_HINT}", fg="red", err=True)
            raise typer.Exit(1) from None

    return wrapper


# ---------------------------------------------------------------------------------------------- run
@app.command()
@_user_errors
def run(
    config: Path = typer.Option(..., "--config", help="TriangleMix config JSON (from `analyze` or written by hand)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model: a local HF folder, a .gguf file, or omitted for the embedded SmolLM2-135M-Instruct."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Text file with the prompt ('-' or omitted: stdin)."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate after the prompt."),
    chat: bool = typer.Option(True, help="Apply the model's chat template when it has one."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: DtypeChoice = typer.Option(DtypeChoice("auto"), help="Weights dtype (auto: bfloat16 on CUDA, float32 elsewhere)."),
    compare_dense: bool = typer.Option(False, help="Also run dense attention and report both prefill times."),
    rope_scaling: Optional[str] = typer.Option(None, "--rope-scaling", help="Stretch the rope past the trained length, overriding the model's own: yarn:FACTOR[:ORIGINAL], linear:FACTOR, dynamic:FACTOR[:ORIGINAL], llama3:FACTOR[:ORIGINAL] (e.g. yarn:4:32768)."),
):
    """Generate with a TriangleMix config; print the text and the prefill time."""
    from trimix_probe.runner import run as run_fn

    run_fn(config=config, model=model, prompt_file=prompt_file, max_new_tokens=max_new_tokens, chat=chat,
           device=device, dtype=dtype.value, compare_dense=compare_dense, rope_scaling=rope_scaling)


# --------------------------------------------------------------------------------------------- eval
@eval_app.callback(invoke_without_command=True)
@_user_errors
def eval_(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Model: a local HF folder, a .gguf file, or omitted for the embedded SmolLM2-135M-Instruct."),
    config: Optional[Path] = typer.Option(None, "--config", help="TriangleMix config JSON to evaluate (method 'config')."),
    lengths: str = typer.Option("4k", "--lengths", help="Prompt lengths in tokens, comma separated: 4k (= 4096), 8k, 16000."),
    tasks: str = typer.Option("all", "--tasks", help=f"'all' or a comma list of: {', '.join(TASKS)}."),
    samples: int = typer.Option(50, "--samples", help="Samples per task and length (50: the summary's paired 95% interval is about +-1 to +-2 points; it says how many +-1 would need)."),
    baselines: str = typer.Option("", "--baselines", help="Comma list of: streaming, triangle-all."),
    sweep: str = typer.Option("", "--sweep", help="TriangleMix starting layers to evaluate, e.g. 0,4,8,12."),
    out: Path = typer.Option(Path("eval-out"), "--out", help="Result folder (CSV, markdown table, bar chart)."),
    seed: int = typer.Option(0, help="Seed of the generated samples."),
    samples_file: Optional[Path] = typer.Option(None, "--samples-file", help="JSONL of {\"prompt\", \"answer\"} lines instead of the built-in tasks."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate (default: per task)."),
    chat: bool = typer.Option(True, help="Apply the model's chat template when it has one."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: DtypeChoice = typer.Option(DtypeChoice("auto"), help="Weights dtype (auto: bfloat16 on CUDA, float32 elsewhere)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples of one task and length generated together (left-padded; same answers)."),
    batch_tokens: Optional[str] = typer.Option(None, "--batch-tokens", help="Cap a batch at this many prompt tokens, e.g. 160k (20 prompts at 8K, 5 at 32K)."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows in OUT/results.csv of samples every method finished; run only the rest."),
    compare: Optional[list[str]] = typer.Option(None, "--compare", help="NAME=PATH: one more config evaluated beside --config on the same samples, reported as NAME (repeatable)."),
    against: str = typer.Option("", "--against", help="Methods the summary also pairs every method with, besides dense (comma list), e.g. trimix@L14."),
    rope_scaling: Optional[str] = typer.Option(None, "--rope-scaling", help="Stretch the rope past the trained length, overriding the model's own: yarn:FACTOR[:ORIGINAL], linear:FACTOR, dynamic:FACTOR[:ORIGINAL], llama3:FACTOR[:ORIGINAL] (e.g. yarn:4:32768)."),
    share_prefix: bool = typer.Option(True, "--share-prefix/--no-share-prefix", help="The sweep's plans (dense below their starting layer) prefill from dense's state there: same answers, checked bit for bit; their times are left empty (the config's are kept). --no-share-prefix to time every plan."),
    dense_floor: float = typer.Option(0.5, "--dense-floor", help="Flag a task at a length where dense scores below this share: shown, but left out of the summary's average and % of dense (0: keep every task)."),
):
    """Accuracy of dense vs the config vs baselines on RULER-style tasks; writes CSV, table, chart."""
    if ctx.invoked_subcommand is not None:  # `eval merge ...`
        return
    from trimix_probe.evaluate import evaluate
    from trimix_probe.tasks import parse_length

    evaluate(model=model, config=config, lengths=lengths, tasks=tasks, samples=samples, baselines=baselines,
             sweep=sweep, out=out, seed=seed, samples_file=samples_file, max_new_tokens=max_new_tokens,
             chat=chat, device=device, dtype=dtype.value, batch_size=batch_size,
             batch_tokens=None if batch_tokens is None else parse_length(batch_tokens, "--batch-tokens"), resume=resume,
             compare=compare or (), against=against, rope_scaling=rope_scaling, share_prefix=share_prefix,
             dense_floor=dense_floor)


@eval_app.command("merge")
@_user_errors
def eval_merge(
    out: Path = typer.Argument(..., help="Folder for the merged results.csv, summary.md and charts."),
    parts: list[Path] = typer.Argument(..., help="Result folders of `eval` runs (e.g. one per task or GPU)."),
    title: str = typer.Option("", "--title", help="Title of the summary."),
    against: str = typer.Option("", "--against", help="Methods the summary also pairs every method with, besides dense (comma list)."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Skip (with a warning) parts without a results.csv instead of failing."),
    dense_floor: float = typer.Option(0.5, "--dense-floor", help="Flag a task at a length where dense scores below this share (0: keep every task)."),
):
    """Join the results.csv of several eval result folders into one folder; print its summary."""
    from trimix_probe.evaluate import merge_results

    merged = merge_results(parts, out, title=title, against=against, allow_missing=allow_missing,
                           dense_floor=dense_floor)
    typer.echo((merged / "summary.md").read_text())


# -------------------------------------------------------------------------------------------- bench
@bench_app.command("kernel")
@_user_errors
def bench_kernel(
    seqs: str = typer.Option("32k,64k,128k", "--seqs", help="Sequence lengths, comma separated (k = 1024)."),
    out_dir: Path = typer.Option(Path("bench-out"), "--out-dir", help="Folder for the table (markdown) and raw JSON."),
    n_init: int = typer.Option(TRIANGLE.n_init, help="Sink keys."),
    n_local: int = typer.Option(TRIANGLE.n_local, help="Local window."),
    last_n: int = typer.Option(TRIANGLE.last_n, help="Last rows that attend densely."),
):
    """Triangle kernel vs SDPA dense (flash, cuDNN) vs FlexAttention vs the FLOP floor (Llama-3.1-8B heads)."""
    from trimix_probe.bench.triangle import bench_kernel as bench_kernel_fn

    bench_kernel_fn(seqs=seqs, out_dir=out_dir, n_init=n_init, n_local=n_local, last_n=last_n)


@bench_app.command("ttft")
@_user_errors
def bench_ttft(
    seqs: str = typer.Option("4k,32k,64k,128k", "--seqs", help="Prompt lengths, comma separated (k = 1024)."),
    runs: int = typer.Option(3, help="Timed runs per point (after one warm-up); the median is reported."),
    out_dir: Path = typer.Option(Path("bench-out"), "--out-dir", help="Folder for the table (markdown) and raw JSON."),
    starting_layer: int = typer.Option(16, help="First triangle layer of the TriangleMix plan."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Dense vs TriangleMix vs dynamic shallow layers "
                                 "(vertical-slash 1000/6096, last 128 rows dense) + TriangleMix, with one layer's "
                                 "kernel time vs SDPA dense: the `bench dynamic` table (other budgets there)."),
):
    """Time to first token, Llama-3.1-8B architecture with random weights: dense vs TriangleMix vs the Flex plan."""
    if dynamic:
        from trimix_probe.bench.dynamic import bench_dynamic as bench_dynamic_fn

        bench_dynamic_fn(seqs=seqs, runs=runs, out_dir=out_dir, starting_layer=starting_layer)
        return
    from trimix_probe.bench.triangle import bench_ttft as bench_ttft_fn

    bench_ttft_fn(seqs=seqs, runs=runs, out_dir=out_dir, starting_layer=starting_layer)


@bench_app.command("dynamic")
@_user_errors
def bench_dynamic(
    seqs: str = typer.Option("32k,64k,128k", "--seqs", help="Prompt lengths, comma separated (k = 1024)."),
    runs: int = typer.Option(1, help="Timed runs per point (after one warm-up); the median is reported."),
    out_dir: Path = typer.Option(Path("bench-out"), "--out-dir", help="Folder for the table (markdown) and raw JSON."),
    starting_layer: int = typer.Option(16, help="First triangle layer; the layers below it run vertical-slash."),
    vertical: int = typer.Option(1000, help="Vertical columns kept per head."),
    slash: int = typer.Option(6096, help="Slash diagonals kept per head (in bands of block_size)."),
    block_size: int = typer.Option(128, help="Kernel block and slash band width: 16, 32, 64 or 128."),
    last_q: int = typer.Option(64, help="Last queries the pattern is estimated from."),
    dense_last: int = typer.Option(128, help="Last query rows of the dynamic layers run dense (0: none)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A config `analyze` emitted for a real model: its "
                                          "plan laid onto this architecture by depth, timed beside dense and its "
                                          "triangle-only twin (budgets scaled to each length)."),
):
    """TTFT, Llama-3.1-8B architecture with random weights: dense vs TriangleMix vs dynamic shallow + TriangleMix."""
    from trimix_probe.bench.dynamic import bench_dynamic as bench_dynamic_fn

    bench_dynamic_fn(seqs=seqs, runs=runs, out_dir=out_dir, starting_layer=starting_layer, vertical=vertical,
                     slash=slash, block_size=block_size, last_q=last_q, dense_last=dense_last, config=config)


# ------------------------------------------------------------------------------------- analyze, report
@app.command()
@_user_errors
def analyze(
    model: Optional[str] = typer.Argument(None, help="Model: a local HF folder, a .gguf file, or omitted for the embedded SmolLM2-135M-Instruct."),
    out: Path = typer.Option(Path("probe-out"), "--out", help="Result folder (config.json, CSV tables, figures, report.md)."),
    lengths: str = typer.Option("2k", "--lengths", help="Prompt lengths in tokens, comma separated: 2k (the default: minutes on CPU), 4k (= 4096), 16000."),
    tasks: str = typer.Option("all", "--tasks", help=f"'all' (the default: the workload's variety matters) or a comma list of: {', '.join(TASKS)}."),
    samples: int = typer.Option(1, "--samples", help="Samples per task and length (1: eight samples with --tasks all)."),
    samples_file: Optional[Path] = typer.Option(None, "--samples-file", help="JSONL of {\"prompt\", \"answer\"} lines instead of the built-in tasks."),
    objective: ObjectiveChoice = typer.Option(ObjectiveChoice("answer"), help="answer: log-likelihood of the gold answer after the prompt; prompt: next-token prediction inside the prompt."),
    tau: float = typer.Option(0.1, help="Starting layer: the first layer from which middle importance stays <= tau x its peak."),
    per_head: bool = typer.Option(False, help="Also keep dense the heads of triangle layers whose middle importance exceeds tau x the head peak."),
    n_init: int = typer.Option(TRIANGLE.n_init, help="Sink tokens every query keeps."),
    n_local: int = typer.Option(TRIANGLE.n_local, help="Local window."),
    last_n: int = typer.Option(TRIANGLE.last_n, help="Last prompt rows that stay dense."),
    backend: BackendChoice = typer.Option(BackendChoice("auto"), help="auto: flex on CUDA, reference elsewhere."),
    checkpoint: Optional[bool] = typer.Option(None, "--checkpoint/--no-checkpoint", help="Checkpoint decoder layers (default: on CUDA only)."),
    seed: int = typer.Option(0, help="Seed of the generated samples."),
    chat: bool = typer.Option(True, help="Apply the model's chat template when it has one."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: DtypeChoice = typer.Option(DtypeChoice("auto"), help="Weights dtype (auto: bfloat16 on CUDA, float32 elsewhere)."),
    device_map: Optional[str] = typer.Option(None, help="'auto' splits the model over the visible GPUs."),
    shallow: ShallowChoice = typer.Option(ShallowChoice("dense"), help="Layers below the starting layer: dense, or dynamic-sparse prefill."),
    dynamic_method: MethodChoice = typer.Option(MethodChoice("vertical_slash"), help="With --shallow dynamic: the dynamic-sparse method."),
    vertical: Optional[int] = typer.Option(None, help="vertical_slash: key columns kept per head; a budget flag pins one budget for every shallow layer (none given: the probe chooses per layer, docs/probe.md 'Dynamic budgets')."),
    slash: Optional[int] = typer.Option(None, help="vertical_slash: diagonals kept per head (pins the budget, as --vertical)."),
    gamma: Optional[float] = typer.Option(None, help="blockwise: attention mass kept per query block (pins the budget, as --vertical)."),
    dense_last: Optional[int] = typer.Option(None, help="With --shallow dynamic: the last N query rows attend densely (exact); default: --last-n, as in the triangle layers."),
    recall_target: float = typer.Option(0.95, help="With --shallow dynamic and no budget flag: the mean recall each head of a shallow layer must keep at its budget, else that head stays dense (more for layers of high middle importance)."),
    budget_samples: int = typer.Option(2, help="With --shallow dynamic and no budget flag: probe prompts the budgets' recall is measured on (one forward each)."),
    rope_scaling: Optional[str] = typer.Option(None, "--rope-scaling", help="Stretch the rope past the trained length, overriding the model's own: yarn:FACTOR[:ORIGINAL], linear:FACTOR, dynamic:FACTOR[:ORIGINAL], llama3:FACTOR[:ORIGINAL] (e.g. yarn:4:32768)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the gradient's layer against dense on samples of seed + 1 and emit the lowest layer within the bound (docs/probe.md, 'Choosing the bound'), then, with --shallow dynamic, the whole plan (budgets raised until it passes); --no-verify: the gradient's layer, budgets unchecked."),
    epsilon: float = typer.Option(0.015, help="Verification bound: mean answer log-likelihood loss against dense (per-sample drops, gains as 0), nats per answer token."),
    max_lost: float = typer.Option(0.125, help="Verification bound: share of the verification samples allowed to lose an answer token that dense's greedy choice had right."),
    max_checks: int = typer.Option(4, help="Verification: starting layers checked at most, and as many checks of the whole plan with --shallow dynamic (each a forward pass of the samples)."),
    verify_samples: int = typer.Option(2, help="Verification samples per task and length (seed + 1; a samples file: its own samples)."),
    verify_layers: Optional[str] = typer.Option(None, "--verify-layers", help="Check exactly these starting layers instead of the search, the whole curve (all, 8-20, 10,12,14); implies --verify."),
    check_generation: bool = typer.Option(False, "--check-generation", help="Verification: also generate each sample's answer greedily as eval does (dense once, each checked plan) and count a sample whose plan scores below dense's as lost (one generation per sample per check)."),
):
    """Gradient probe: section importance per layer and head; choose the starting layer; write config and report."""
    from trimix_probe.probe import analyze as analyze_fn

    analyze_fn(model=model, out=out, lengths=lengths, tasks=tasks, samples=samples, samples_file=samples_file,
               objective=objective.value, tau=tau, per_head=per_head, n_init=n_init, n_local=n_local, last_n=last_n,
               backend=backend.value, checkpoint=checkpoint, seed=seed, chat=chat, device=device, dtype=dtype.value,
               device_map=device_map, shallow=shallow.value, dynamic_method=dynamic_method.value, vertical=vertical,
               slash=slash, gamma=gamma, dense_last=dense_last, recall_target=recall_target,
               budget_samples=budget_samples, rope_scaling=rope_scaling, verify=verify,
               epsilon=epsilon, max_lost=max_lost, max_checks=max_checks, verify_layers=verify_layers,
               verify_samples=verify_samples, check_generation=check_generation)


@app.command("recall")
@_user_errors
def recall_(
    model: Optional[str] = typer.Argument(None, help="Model: a local HF folder, a .gguf file, or omitted for the embedded SmolLM2-135M-Instruct."),
    budget: Optional[list[str]] = typer.Option(None, "--budget", help="vs:VERTICAL/SLASH or bw:GAMMA (repeatable; all measured in one pass). Default vs:1000/6096 without --config."),
    config: Optional[Path] = typer.Option(None, "--config", help="Take the budget and the layers from this config's dynamic layers."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to measure: all (default without --config), 0-13, 0,2,4."),
    out: Path = typer.Option(Path("recall-out"), "--out", help="Result folder (recall.csv, recall_layer.csv, recall.png, report.md)."),
    lengths: str = typer.Option("4k", "--lengths", help="Prompt lengths in tokens, comma separated."),
    tasks: str = typer.Option("all", "--tasks", help=f"'all' or a comma list of: {', '.join(TASKS)}."),
    samples: int = typer.Option(1, "--samples", help="Samples per task and length."),
    seed: int = typer.Option(0, help="Seed of the generated samples."),
    block_size: int = typer.Option(128, help="Block and slash band width of the patterns."),
    last_q: int = typer.Option(64, help="Last queries the vertical-slash pattern is estimated from."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: DtypeChoice = typer.Option(DtypeChoice("auto"), help="Weights dtype (auto: bfloat16 on CUDA, float32 elsewhere)."),
    device_map: Optional[str] = typer.Option(None, help="'auto' splits the model over the visible GPUs."),
    rope_scaling: Optional[str] = typer.Option(None, "--rope-scaling", help="Stretch the rope past the trained length, overriding the model's own: yarn:FACTOR[:ORIGINAL], linear:FACTOR, dynamic:FACTOR[:ORIGINAL], llama3:FACTOR[:ORIGINAL] (e.g. yarn:4:32768)."),
):
    """How much of dense attention a dynamic budget keeps, per layer and head (before any accuracy run)."""
    from trimix_probe.recall import recall

    budgets = list(budget or ([] if config is not None else ["vs:1000/6096"]))
    recall(model, out=out, budgets=budgets, config=config, layers=layers, lengths=lengths, tasks=tasks,
           samples=samples, seed=seed, block_size=block_size, last_q=last_q, device=device, dtype=dtype.value,
           device_map=device_map, rope_scaling=rope_scaling)


@app.command()
@_user_errors
def report(dir: Path = typer.Argument(..., help="A result folder written by `trimix-probe analyze`.")):
    """Redraw the figures and report.md of a probe result folder."""
    from trimix_probe.report import report as report_fn

    report_fn(dir=dir)


@bench_app.command("probe")
@_user_errors
def bench_probe(
    seq: int = typer.Option(16384, help="Tokens per sample (prompt + answer)."),
    samples: int = typer.Option(8, help="Samples."),
    answer: int = typer.Option(16, help="Answer tokens at the end of each sample."),
    arch: ArchChoice = typer.Option(ArchChoice("llama-3.1-8b"), help="Random-weight architecture (tiny: a 2-layer CPU dry run)."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: DtypeChoice = typer.Option(DtypeChoice("bfloat16"), help="Weights dtype."),
    backend: BackendChoice = typer.Option(BackendChoice("auto"), help="auto: flex on CUDA, reference elsewhere."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the result as JSON here."),
    device_map: Optional[str] = typer.Option(None, help="'auto' splits the random model over the visible GPUs (accelerate), e.g. for --arch llama-3.1-70b."),
    offload: Optional[bool] = typer.Option(None, "--offload/--no-offload", help="Keep the checkpointed layer inputs in host memory (default: when they would take more than 5% of the accelerator's memory)."),
):
    """Cost of the probe on a random-weight model: wall time and peak memory."""
    import json

    from trimix_probe.bench.probe import bench_probe as bench_probe_fn

    result = bench_probe_fn(seq=seq, samples=samples, answer=answer, arch=arch.value, device=device, dtype=dtype.value,
                            backend=backend.value, out=out, device_map=device_map, offload=offload)
    typer.echo(json.dumps(result, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
