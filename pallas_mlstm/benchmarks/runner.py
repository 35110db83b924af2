"""`python -m pallas_mlstm bench`: check, then time, each implementation at each named shape on this card.

Each (shape, implementation, chunk size) runs in a fresh worker process (`--isolate`, the default), so that
its `peak_bytes_in_use` is its own: JAX cannot reset the peak. A worker makes one input set, runs every mode
once (compiling it) and reads the peak, checks the forward output against the float32 reference, then times
the median of `--calls` calls per mode, each waited for, and the time per call of the same calls issued back to
back (`timing.back_to_back_ms`), rotating between NUM_INPUT_SETS input sets. A run that fails or is refused
by the check is one FAILED / REFUSED line (its traceback too under --traceback); the bench then ends with one line
on stderr and exit code 1, as it does when nothing was timed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import traceback

import jax
import jax.numpy as jnp
from absl import app, flags

from pallas_mlstm import accuracy
from pallas_mlstm.benchmarks import impls, plot
from pallas_mlstm.benchmarks.shapes import (
    CPU_DEFAULT_SHAPES,
    GPU_DEFAULT_SHAPES,
    SWEEP_ALIAS,
    Shape,
    cpu_shape_warning,
    resolve_shapes,
)
from pallas_mlstm.benchmarks.shapes import (
    SHAPES as NAMED_SHAPES,
)
from pallas_mlstm.benchmarks.timing import back_to_back_ms, median_ms
from pallas_mlstm.config import is_power_of_2

MODES = ("fw", "fwbw")
DEFAULT_CHUNK = "default"  # --chunk_sizes token: the library's own choice (peers: their default, 128)
NUM_INPUT_SETS = 3
CHECK_BATCH = 1  # the check compares batch element 0 (all heads; attention: a few heads, a prefix)
CHECK_ATTENTION_HEADS = 4
CHECK_ATTENTION_LENGTH = 4096  # causal: the first L outputs depend on the first L inputs alone
CPU_DISCLAIMER = (
    "NOTE: no GPU here (JAX platform cpu): this ran the Pallas interpreter / XLA on a CPU, by default at a toy "
    "shape, only to check that the tooling works. These times mean nothing about the kernels' speed."
)
_ENVIRONMENT_AT_START = dict(os.environ)  # what the workers get: the parent changes its own

SHAPES = flags.DEFINE_list(
    "shapes",
    [],
    f"Named shapes, any of {','.join(NAMED_SHAPES)}, or '{SWEEP_ALIAS}' for all sweep-S*; "
    f"default {','.join(GPU_DEFAULT_SHAPES)} on a GPU, {','.join(CPU_DEFAULT_SHAPES)} otherwise.",
)
MODES_FLAG = flags.DEFINE_list("modes", list(MODES), "Modes to time: fw (forward), fwbw (forward + backward).")
IMPLS = flags.DEFINE_list(
    "impls",
    [],
    f"Implementations ({', '.join(impls.IMPLEMENTATIONS)}); default: every installed one of "
    f"{','.join(impls.GPU_DEFAULT_IMPLS)} on a GPU, {','.join(impls.CPU_DEFAULT_IMPLS)} otherwise.",
)
CHUNK_SIZES = flags.DEFINE_list(
    "chunk_sizes",
    [DEFAULT_CHUNK],
    f"Chunk sizes of the mLSTM implementations; '{DEFAULT_CHUNK}' is the "
    f"library's own choice (the peers': {impls.PEER_CHUNK_SIZE}).",
)
JSON_PATH = flags.DEFINE_string("json", None, "Write the records to this JSON file (a list of records).")
PLOT_PATH = flags.DEFINE_string("plot", None, "Write the runtime-vs-S plot of the sweep-S* records to this PNG.")
CALLS = flags.DEFINE_integer(
    "calls",
    100,
    "Timed calls per (implementation, shape, mode), each waited for, the median kept (20 calls left medians of "
    "~2 ms calls up to 15% apart between runs on an H200); then as many issued back to back, in rounds of 10. "
    "tune times each candidate by the calls back to back only.",
    lower_bound=1,
)
ISOLATE = flags.DEFINE_bool(
    "isolate",
    True,
    "Run each (shape, implementation, chunk size) in its own worker process, so that its "
    "peak memory is its own; with --noisolate peak_bytes is recorded only for a single run.",
)
WORKER_RECORDS = flags.DEFINE_string(
    "worker_records",
    None,
    "Set by --isolate on each worker process it starts: the file the worker writes its records and failures to.",
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One worker's job: an implementation at a shape and chunk size (None: its default)."""

    shape: Shape
    impl: impls.Implementation
    chunk_size: int | None

    def label(self) -> str:
        """How progress lines name this run."""
        chunk = f" chunk {self.chunk_size or 'default'}" if self.impl.uses_chunk_size else ""
        return f"{self.impl.name} at {self.shape.name}{chunk}"


def say(line: str) -> None:
    """Prints a line at once (workers and the parent share stdout)."""
    print(line, flush=True)


def make_inputs(computes: str, shape: Shape, seed: int) -> tuple[jax.Array, ...]:
    """Random inputs: q, k, v ~ N(0, 1) bf16, i ~ N(0, 1) and f ~ 3 + N(0, 1) float32 (accuracy.mlstm_inputs,
    drawn array by array: the peak read after the first run is the op's, not the draw's); attention: q, k, v ~
    N(0, 1) bf16."""
    key = jax.random.PRNGKey(seed)
    if computes == impls.ATTENTION:
        heads = impls.attention_heads(shape.NH, shape.DHHV)
        size = (shape.B, shape.S, heads, impls.ATTENTION_HEAD_DIM)
        return tuple(jax.random.normal(k, size, jnp.bfloat16) for k in jax.random.split(key, 3))
    dims = (shape.B, shape.NH, shape.S, shape.DHQK, shape.DHHV)
    q, k, v, i, f = accuracy.mlstm_inputs(key, *dims, jnp.bfloat16, per_array=True)[:5]
    if shape.document_len is not None:  # packed documents: a hard reset before each document's first token
        f = f.at[:, :, shape.document_len :: shape.document_len].set(-jnp.inf)
    return q, k, v, i, f


def make_weights(forward, inputs, seed: int = 1000) -> jax.Array:
    """The fixed random bf16 weights of the forward+backward loss, of the forward output's shape."""
    output = jax.eval_shape(forward, *inputs)
    return jax.random.normal(jax.random.PRNGKey(seed), output.shape, jnp.bfloat16)


def check_forward(computes: str, inputs, output) -> tuple[float, str]:
    """The relative error of `output` against the float32 reference on a slice, and the reference's name."""
    with jax.default_matmul_precision("highest"):
        if computes == impls.ATTENTION:
            window = (slice(0, CHECK_BATCH), slice(0, CHECK_ATTENTION_LENGTH), slice(0, CHECK_ATTENTION_HEADS))
            q, k, v = (x[window].astype(jnp.float32) for x in inputs)
            reference = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
            name = f"float32 XLA attention (batch 0, {q.shape[2]} heads, first {q.shape[1]} positions)"
        else:
            window = (slice(0, CHECK_BATCH),)
            oracle = "mlstm_sigmoid_recurrent" if computes == impls.MLSTM_SIGMOID else "mlstm_recurrent"
            reference = jax.jit(getattr(accuracy.load_oracles(), oracle))(
                *(x[window].astype(jnp.float32) for x in inputs)
            )
            name = f"float32 reference.{oracle} (batch 0)"
        return accuracy.rel_err(output[window], reference), name


def peak_bytes() -> int | None:
    """`peak_bytes_in_use` of device 0 since the process started, or None where JAX does not report it."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def _bytes_of(arrays) -> int:
    return sum(x.size * x.dtype.itemsize for x in arrays)


def run_one(run: Run, modes: list[str], calls: int, measure_peak: bool) -> list[dict]:
    """Checks, then times, one run in this process; returns its records (none when the check refused it)."""
    callables = impls.build(run.impl.name, run.chunk_size)
    inputs = make_inputs(run.impl.computes, run.shape, seed=0)
    weights = None
    peaks, input_bytes = {}, {}
    for mode in modes:  # first calls compile; fw goes first, so the fwbw peak is max(fw, fwbw)
        if mode == "fwbw":
            weights = make_weights(callables.forward, inputs)
        arguments = inputs if mode == "fw" else (weights, *inputs)
        jax.block_until_ready(function_of(callables, mode)(*arguments))
        peaks[mode] = peak_bytes() if measure_peak else None
        input_bytes[mode] = _bytes_of(arguments)

    rel_err, reference_name = check_forward(run.impl.computes, inputs, callables.forward(*inputs))
    if not rel_err <= accuracy.BENCH_TOLERANCE:
        say(
            f"REFUSED {run.label()}: rel err {rel_err:.2e} > {accuracy.BENCH_TOLERANCE:.0e} against {reference_name}; "
            "not timed."
        )
        return []
    say(f"checked {run.label()}: rel err {rel_err:.2e} against {reference_name}")

    input_sets = [inputs] + [make_inputs(run.impl.computes, run.shape, seed) for seed in range(1, NUM_INPUT_SETS)]
    chunk_size = run.chunk_size if run.chunk_size is not None else run.impl.default_chunk_size
    records = []
    for mode in modes:
        argument_sets = input_sets if mode == "fw" else [(weights, *x) for x in input_sets]
        milliseconds = median_ms(function_of(callables, mode), argument_sets, calls)
        back_to_back = back_to_back_ms(function_of(callables, mode), argument_sets, calls)
        records.append(
            {
                "impl": run.impl.name,
                "impl_description": run.impl.description,
                "shape": run.shape.name,
                **run.shape.dims(),
                "chunk_size": chunk_size if run.impl.uses_chunk_size else None,
                "mode": mode,
                "median_ms": milliseconds,
                "back_to_back_ms": back_to_back,
                "calls": calls,
                "peak_bytes": peaks[mode],
                "input_bytes": input_bytes[mode],
                "rel_err": rel_err,
            }
        )
        peak = "" if peaks[mode] is None else f", peak {peaks[mode] / 2**30:.2f} GiB"
        say(f"timed {run.label()} {mode}: {milliseconds:.3f} ms ({back_to_back:.3f} back to back){peak}")
    return records


def function_of(callables: impls.TimedCallables, mode: str):
    """The callable that `mode` times."""
    return callables.forward if mode == "fw" else callables.forward_backward


def _show_tracebacks() -> bool:
    """The `--traceback` flag of `python -m pallas_mlstm` (read by name: that module runs as __main__)."""
    return flags.FLAGS.get_flag_value("traceback", False)


def _failed(run: Run, reason: str) -> list[str]:
    """Says that `run` failed and why, in one FAILED line; returns that failure as a one-item list."""
    failure = f"{run.label()}: {textwrap.shorten(reason, width=300, placeholder=' ...')}"
    say(f"FAILED {failure}")
    return [failure]


def _run_here(run: Run, modes: list[str], calls: int, measure_peak: bool) -> tuple[list[dict], list[str]]:
    """Checks, then times, one run in this process: its records, and its failure (a one-item list) or []."""
    try:
        records = run_one(run, modes, calls, measure_peak)
    except Exception as error:
        if _show_tracebacks():
            traceback.print_exc()
        return [], _failed(run, f"{type(error).__name__}: {error}")
    return records, [] if records else [f"{run.label()}: refused by the check (the REFUSED line)"]


def _chunk_requests(tokens: list[str]) -> list[int | None]:
    requests = []
    for token in tokens:
        if token == DEFAULT_CHUNK:
            requests.append(None)
        elif token.isdigit() and is_power_of_2(int(token)):
            requests.append(int(token))
        else:
            raise app.UsageError(f"--chunk_sizes takes powers of 2 (e.g. 64,128) or {DEFAULT_CHUNK!r}; got {token!r}.")
    return list(dict.fromkeys(requests))


def _refuse_impossible(impl_names: list[str], chunk_requests: list[int | None], platform: str, requested: bool) -> None:
    """UsageError for an implementation that cannot run here (when `requested` by --impls, not by default) or a
    chunk size below the smallest an implementation takes."""
    for name in impl_names:
        reason = impls.unavailable_reason(name, platform)
        if reason and requested:
            runnable = [other for other in impls.IMPLEMENTATIONS if not impls.unavailable_reason(other, platform)]
            raise app.UsageError(f"--impls={name}: {name} {reason}; use --impls={','.join(runnable)} here.")
        smallest = impls.get_implementation(name).min_chunk_size
        too_small = [chunk for chunk in chunk_requests if chunk is not None and chunk < smallest]
        if too_small and not reason:
            raise app.UsageError(
                f"--chunk_sizes={too_small[0]}: {name} takes chunks of at least {smallest} (its backend's "
                f"minimum); use --chunk_sizes={smallest} or larger."
            )


def validated_shapes(names: list[str]) -> list[Shape]:
    """The shapes --shapes names; UsageError for an unknown name."""
    try:
        return resolve_shapes(names)
    except ValueError as error:
        raise app.UsageError(f"--shapes: {error}") from None


def default_shapes(platform: str) -> list[str]:
    """The shapes a bare `bench` / `tune` runs on this platform."""
    return list(GPU_DEFAULT_SHAPES if platform == "gpu" else CPU_DEFAULT_SHAPES)


def _plan_runs(shapes: list[Shape], impl_names: list[str], chunk_requests, platform: str) -> list[Run]:
    runs = []
    for name in impl_names:
        reason = impls.unavailable_reason(name, platform)
        if reason:
            say(f"SKIP {name}: {reason}.")
            continue
        impl = impls.get_implementation(name)
        for shape in shapes:
            if impl.computes == impls.ATTENTION and (shape.NH * shape.DHHV) % impls.ATTENTION_HEAD_DIM:
                say(f"SKIP {name} at {shape.name}: NH*DHHV is not a multiple of {impls.ATTENTION_HEAD_DIM}.")
                continue
            chunks = [impl.default_chunk_size if chunk is None else chunk for chunk in chunk_requests]
            for chunk in list(dict.fromkeys(chunks)) if impl.uses_chunk_size else [None]:
                if chunk is not None and shape.S % chunk:
                    say(f"SKIP {name} at {shape.name} chunk {chunk}: it does not divide S={shape.S}.")
                    continue
                runs.append(Run(shape, impl, chunk))
    return runs


def _run_in_worker(run: Run, modes: list[str], calls: int) -> tuple[list[dict], list[str]]:
    """Runs `run` in a fresh `bench` process: its records and failures (a worker that crashed: one failure)."""
    with tempfile.TemporaryDirectory() as folder:
        records_path = os.path.join(folder, "records.json")
        command = [
            sys.executable,
            "-m",
            "pallas_mlstm",
            "bench",
            f"--shapes={run.shape.name}",
            f"--impls={run.impl.name}",
            f"--chunk_sizes={run.chunk_size or DEFAULT_CHUNK}",
            f"--modes={','.join(modes)}",
            f"--calls={calls}",
            "--noisolate",
            f"--worker_records={records_path}",
            *(["--traceback"] if _show_tracebacks() else []),
        ]
        finished = subprocess.run(command, env=_ENVIRONMENT_AT_START, check=False)
        if finished.returncode or not os.path.exists(records_path):
            return [], _failed(run, f"its worker exited with code {finished.returncode} (its error above)")
        with open(records_path) as file:
            outcome = json.load(file)
        return outcome["records"], outcome["failures"]


def _failure_summary(failures: list[str], runs: list[Run]) -> str:
    """The line a bench that failed, or timed nothing, ends with."""
    if not failures:
        return "nothing was timed: every requested run was skipped (the SKIP lines above say why)."
    which = ":" if len(failures) == 1 else " (the FAILED and REFUSED lines above), the first:"
    hint = "" if _show_tracebacks() else "; --traceback shows where"
    return f"{len(failures)} of {len(runs)} runs failed{which} {failures[0]}{hint}."


def _chunk_cell(record: dict) -> str:
    if record["chunk_size"] is not None:
        return str(record["chunk_size"])
    uses_chunks = impls.IMPLEMENTATIONS.get(record["impl"], None)
    return "auto" if uses_chunks is None or uses_chunks.uses_chunk_size else "-"


def format_table(records: list[dict]) -> str:
    """The records as a text table; each time also as a ratio to triton's best (else the first impl's) there."""
    if not records:
        return "(no records)"
    names = [record["impl"] for record in records]
    baseline = "triton" if "triton" in names else names[0]
    best = {}  # (shape, mode, timer): the baseline's least time there
    for r in records:
        for timer in ("median_ms", "back_to_back_ms"):
            if r["impl"] == baseline:
                cell = (r["shape"], r["mode"], timer)
                best[cell] = min(r[timer], best.get(cell, float("inf")))

    def time_cells(r: dict, timer: str) -> tuple[str, str]:
        reference = best.get((r["shape"], r["mode"], timer))
        return f"{r[timer]:.3f}", "-" if reference is None else f"{r[timer] / reference:.2f}"

    header = (
        "shape",
        "impl",
        "chunk",
        "mode",
        "median ms",
        f"/ best {baseline}",
        "back to back ms",
        f"/ best {baseline}",
    )
    header += ("peak GiB", "rel err")
    rows = [header]
    for r in records:
        rows.append(
            (
                r["shape"],
                r["impl"],
                _chunk_cell(r),
                r["mode"],
                *time_cells(r, "median_ms"),
                *time_cells(r, "back_to_back_ms"),
                "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}",
                f"{r['rel_err']:.1e}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _check_output_folder(flag: flags.FlagHolder) -> None:
    """UsageError when the file `flag` names cannot be written: found before the runs, not after them."""
    if flag.value is not None and not os.path.isdir(os.path.dirname(os.path.abspath(flag.value))):
        raise app.UsageError(f"--{flag.name}={flag.value}: its folder does not exist; create it or choose another.")


def main_bench(argv: list[str]) -> None:
    """The `bench` subcommand: plan, check and time the runs; print the table; write JSON and plot."""
    if len(argv) > 1:
        raise app.UsageError(f"bench takes flags only; got the arguments {argv[1:]}.")
    modes = list(dict.fromkeys(MODES_FLAG.value))
    if not modes or set(modes) - set(MODES):
        raise app.UsageError(
            f"--modes must be a non-empty subset of {','.join(MODES)}; got {','.join(MODES_FLAG.value)!r}."
        )
    chunk_requests = _chunk_requests(CHUNK_SIZES.value)
    requested_shapes = validated_shapes(SHAPES.value)
    for name in IMPLS.value:
        if name not in impls.IMPLEMENTATIONS:
            raise app.UsageError(f"--impls entries must be among {','.join(impls.IMPLEMENTATIONS)}; got {name!r}.")
    _check_output_folder(JSON_PATH)
    _check_output_folder(PLOT_PATH)
    is_worker = WORKER_RECORDS.value is not None
    if ISOLATE.value:  # the parent only plans and collects: it must not take the workers' GPU memory
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    platform = jax.default_backend()
    card = jax.devices()[0].device_kind
    shapes = requested_shapes or resolve_shapes(default_shapes(platform))
    impl_names = IMPLS.value or list(impls.GPU_DEFAULT_IMPLS if platform == "gpu" else impls.CPU_DEFAULT_IMPLS)
    _refuse_impossible(impl_names, chunk_requests, platform, requested=bool(IMPLS.value))
    if any(impls.get_implementation(name).computes != impls.ATTENTION for name in impl_names):
        accuracy.load_oracles()  # mLSTM runs are checked against the oracle: refuse here, not in every worker
    if not is_worker:
        say(f"pallas_mlstm bench on {card} (JAX platform {platform}), jax {jax.__version__}")
        if platform != "gpu":
            say(CPU_DISCLAIMER)
            warning = cpu_shape_warning(shapes, "--shapes")
            if warning:
                say(warning)
    runs = _plan_runs(shapes, impl_names, chunk_requests, platform)
    if not ISOLATE.value and len(runs) > 1:
        say("peak memory is not recorded: with --noisolate it would be the peak of all runs so far.")
    context = {
        "card": card,
        "platform": platform,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m pallas_mlstm " + shlex.join(sys.argv[1:]),
    }
    records, failures = [], []
    for run in runs:
        if ISOLATE.value:
            run_records, run_failures = _run_in_worker(run, modes, CALLS.value)
        else:
            run_records, run_failures = _run_here(run, modes, CALLS.value, measure_peak=len(runs) == 1)
        records += [{**record, **context} for record in run_records]
        failures += run_failures
        if JSON_PATH.value and not is_worker:  # after every run, so that a run stopped midway keeps what it measured
            with open(JSON_PATH.value, "w") as file:
                json.dump(records, file, indent=1)
    if is_worker:
        with open(WORKER_RECORDS.value, "w") as file:
            json.dump({"records": records, "failures": failures}, file, indent=1)
        return
    say("")
    say(format_table(records))
    if JSON_PATH.value:
        say(f"wrote {len(records)} records to {JSON_PATH.value}")
    if PLOT_PATH.value:
        say(plot.plot_constant_token_sweep(records, PLOT_PATH.value))
    if platform != "gpu":
        say(CPU_DISCLAIMER)
    if failures or not records:
        sys.exit(_failure_summary(failures, runs))
