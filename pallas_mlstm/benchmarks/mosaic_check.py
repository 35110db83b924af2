"""The Mosaic GPU kernels on a Hopper GPU: each one's time against the Triton launcher's (and, with --baseline,
against another revision of itself) in the same run, and the forward's outputs against the jnp twin and the Triton
launcher (tests/test_mosaic.py checks each kernel's).

    PYTHONPATH=. python3 -m pallas_mlstm.benchmarks.mosaic_check --out mosaic_fw.json

Timing first, of each kernel of --kernels (recurrent_fw_C, recurrent_bw_dC, parallel_fw_Hintra, parallel_bw_dV,
parallel_bw_dK, parallel_bw_dQ): 7b, tfla-paper, small-heads and odd-heads in bfloat16 at the card's tuned chunk
size (the default chunk where none is tuned), on kernel_times' inputs (chained through the Triton kernels, 16-bit
state buffers) with its FLOP count. After a warm-up, --rounds rounds each time every launcher over --calls calls
issued back to back (benchmarks/timing.py's pipelined_ms: the host waits once, after the last), the launchers taking
turns in alternating order; the medians over rounds are kept. Triton runs at its tuned launch. Reported: ms,
TFLOP/s, mosaic / triton, and the relative difference of their outputs; with --baseline DIR (a directory holding
another revision's pallas_mlstm package, e.g. from `git archive REV pallas_mlstm | tar -x -C DIR`), the same for
that revision's Mosaic GPU kernel, with the rounds in which the current one was faster. With --ops=fw,fwbw, the
whole op too (`op_row`: backend="mosaic" against "triton" as the bench calls them, at --shapes, their rounds
interleaved, so that the ratio does not take the drift between the bench's separate runs; --op_chunks: mosaic's
chunk sizes, a row each). With --profile, each launcher's GPU time by kernel (`_profile`). Then correctness on small
shapes and 7b-short, bfloat16 and float32, each cell: the largest relative error of the three outputs (h, vecN_out,
vecM_out) against the twin (xla_kernels) and against the Triton launcher, on inputs chained through the twins
(float32 states) as tests/test_kernels.py builds them, with Triton's kernel-twin bound as the mark. Each row is
caught and reported on its own (a compile error's first lines); rows left when --budget_s is spent are skipped.
Prints a table at the end and rewrites the JSON (--out) after every row. --interpret runs it all in the interpreters
on the CPU (a check of the script; its times mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import pathlib
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from pallas_mlstm import accuracy, pallas_triton, xla_kernels
from pallas_mlstm.benchmarks import impls, runner, timing
from pallas_mlstm.benchmarks.kernel_times import card_chunk_and_config, kernel_cases
from pallas_mlstm.benchmarks.shapes import SHAPES
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common as mosaic_common
from pallas_mlstm.mosaic_gpu import parallel_bw, parallel_bw_sliced, parallel_fw, recurrent_fw

CELLS = {"exponential": ("exponential", True), "sigmoid": ("sigmoid", True), "sigmoid-unnormalised": ("sigmoid", False)}
# (B, NH, S, DHQK, DHHV, chunk): one warpgroup; 7B widths; two warpgroups, two query and two DHHV tiles; padded DHQK.
CASES = {
    "L64-d64x64": (1, 2, 128, 64, 64, 64),
    "7b-short": (*SHAPES["7b-short"].dims().values(), 256),
    "L256-d128x512": (1, 2, 512, 128, 512, 256),
    "L128-d96x192-padded": (2, 1, 256, 96, 192, 128),
}
TIMED_SHAPES = ("7b", "tfla-paper", "small-heads", "odd-heads")
OP_MODES = ("fw", "fwbw")  # the whole op as the bench times it: the forward, and forward + backward
DTYPES = (jnp.bfloat16, jnp.float32)
EPS = 1e-6


def _error_text(error: BaseException) -> str:
    """The first lines of an exception (Mosaic compile errors are long)."""
    lines = [line for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
    return "\n".join(lines[:6])[:800]


def _attempt(row: dict, key: str, fn) -> None:
    """row[key] = fn(), or row[key + "_error"] = the error's first lines."""
    try:
        row[key] = fn()
    except Exception as error:
        row[f"{key}_error"] = _error_text(error)
        traceback.print_exc()


def _max_rel_err(outputs, expected) -> float:
    return max(accuracy.rel_err(a, b) for a, b in zip(outputs, expected))


def _mosaic(kernel: str, call: KernelCall, modules=None):
    """The Mosaic GPU launcher of `kernel`, jitted on the backend's arguments (`modules`: the kernel modules, this
    revision's if None)."""
    modules = current_modules() if modules is None else modules
    launcher = getattr(modules[KERNELS[kernel][0]], kernel)
    return jax.jit(lambda *args: launcher(call, *args))


def _sliced_tiles(chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...]):
    count, tiles = parallel_bw_sliced.kernel_tiles(chunk, dhqk, dhhv, parts)
    block = parallel_bw_sliced.tile_columns(dhqk)  # the Q/K column blocks of the tiles ring
    return count, mosaic_common.Tiles(warpgroups=tiles.warpgroups, block_v=block, stages=tiles.stages)


def _states_tiles(chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...]):
    return recurrent_fw.kernel_tiles(dhqk, dhhv, parts, 2, recurrent_fw.compute_warpgroups(dhqk), chunk)


# The timed kernels: the module of pallas_mlstm.mosaic_gpu that holds each one's Mosaic GPU launcher, and its tile
# choice.
KERNELS = {
    "recurrent_fw_C": ("recurrent_fw", _states_tiles),
    "recurrent_bw_dC": ("recurrent_bw", _states_tiles),
    "parallel_fw_Hintra": ("parallel_fw", parallel_fw.kernel_tiles),
    "parallel_bw_dV": ("parallel_bw", parallel_bw.kernel_tiles),
    "parallel_bw_dK": ("parallel_bw_sliced", _sliced_tiles),
    "parallel_bw_dQ": ("parallel_bw_sliced", _sliced_tiles),
}
# pallas_mlstm.mosaic_gpu's kernel modules, each after those it imports
KERNEL_MODULES = ("common", "parallel_fw", "parallel_bw", "parallel_bw_sliced", "recurrent_fw", "recurrent_bw")


def current_modules() -> dict:
    """This revision's kernel modules by name."""
    return {name: importlib.import_module(f"pallas_mlstm.mosaic_gpu.{name}") for name in KERNEL_MODULES}


def load_revision(directory) -> dict:
    """The kernel modules of another revision's pallas_mlstm package in `directory` (DIR/pallas_mlstm/mosaic_gpu/),
    by name, beside this revision's: each is executed while its siblings' names in pallas_mlstm.mosaic_gpu point at
    that revision's, so that they import one another; the rest of pallas_mlstm is this revision's. Names are put
    back afterwards. A module the revision lacks is left out."""
    package = importlib.import_module("pallas_mlstm.mosaic_gpu")
    folder = pathlib.Path(directory) / "pallas_mlstm" / "mosaic_gpu"
    how = f"make it with: mkdir -p {directory} && git archive REV pallas_mlstm | tar -x -C {directory}"
    if not folder.is_dir():
        raise ValueError(f"--baseline: {folder} is not a directory; {how}")
    saved = {name: (sys.modules[f"{package.__name__}.{name}"], getattr(package, name)) for name in current_modules()}
    loaded = {}
    try:
        for name in KERNEL_MODULES:
            path = folder / f"{name}.py"
            if not path.is_file():
                continue
            spec = importlib.util.spec_from_file_location(f"{package.__name__}.{name}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            setattr(package, name, module)
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name, (module, attribute) in saved.items():
            sys.modules[f"{package.__name__}.{name}"] = module
            setattr(package, name, attribute)
    if not loaded:
        raise ValueError(f"--baseline: {folder} holds none of {', '.join(KERNEL_MODULES)}; {how}")
    return loaded


def _tiles(dhqk: int, dhhv: int, chunk: int, dtype, kernel: str = "parallel_fw_Hintra") -> str:
    parts = mosaic_common.operand_parts(dtype)
    kernel_tiles = KERNELS[kernel][1]
    count, tiles = kernel_tiles(chunk, mosaic_common.padded_dim(dhqk), mosaic_common.padded_dim(dhhv), parts)
    states = "".join(
        f" {field}={getattr(tiles, field)}" for field in ("step_rows", "staging_buffers") if hasattr(tiles, field)
    )
    return f"P={count} warpgroups={tiles.warpgroups} block_v={tiles.block_v} stages={tiles.stages}{states}"


def timing_row(
    shape_name: str, kernel: str, calls: int, rounds: int, baseline=None, interpret=False, profile=False
) -> dict:
    """The launchers of `kernel` on the same inputs (Triton's, this revision's Mosaic GPU one and, given, the
    `baseline` revision's), their rounds interleaved: median ms, TFLOP/s, ratios, and their outputs' difference;
    with `profile`, each one's GPU time by kernel (`_profile`)."""
    shape = SHAPES[shape_name]
    row = dict(step="timing", case=shape_name, kernel=kernel, dtype="bfloat16", rounds=rounds, calls=calls)
    try:
        chunk, config = card_chunk_and_config(shape, "mosaic")
        tiles = _tiles(shape.DHQK, shape.DHHV, chunk, jnp.bfloat16, kernel)
        triton = "interpret" if interpret else "triton"
        case = next(c for c in kernel_cases(shape, chunk, triton, config) if c.name == kernel)
        call = case.call(None)  # Triton's tuned launch, which the Mosaic GPU kernels ignore
        launch = {key: value for key, value in dataclasses.asdict(call.launch).items() if value is not None}
        row.update(chunk=chunk, triton_launch=launch, mosaic_tiles=tiles)
    except Exception as error:
        row["error"] = _error_text(error)
        traceback.print_exc()
        return row
    row["tflop"] = case.flops / 1e12
    launchers = {"triton": lambda: case.make(None), "mosaic": lambda: _mosaic(kernel, call)}
    if baseline is not None:
        launchers["baseline"] = lambda: _mosaic(kernel, call, baseline)
    compiled = _compile(launchers, case.args, row)
    times = _interleaved_times(compiled, case.args, calls, rounds, row)
    if times is None:
        return row
    for name, ms in times.items():
        row[f"{name}_ms"] = statistics.median(ms)
        row[f"{name}_tflops"] = case.flops / row[f"{name}_ms"] / 1e9
    _compare(row, compiled, times, ("triton", "baseline"))
    if profile:
        _profile(row, compiled, case.args, calls)
    if "mosaic" in times and "baseline" in times:
        row["mosaic_faster_rounds"] = sum(a < b for a, b in zip(times["mosaic"], times["baseline"]))
    return row


def op_row(
    shape_name: str, mode: str, calls: int, rounds: int, interpret: bool = False, profile=False, chunk=None
) -> dict:
    """The whole op as the bench times it (`mode`: fw, or fwbw the gradients of a weighted sum of h) with
    backend="mosaic" at chunk size `chunk` (None: the card's default) against backend="triton" at the card's
    default (interpreted: "mosaic_interpret" against "interpret"), on the same inputs, their rounds interleaved as
    in `timing_row`: each one's median ms, mosaic / triton, the rounds mosaic was faster, and their outputs'
    difference (with `profile`, each one's GPU time by kernel: `_profile`). A ratio the two take in turns, where
    the bench times each alone."""
    shape = SHAPES[shape_name]
    row = dict(step="op", case=shape_name, kernel=f"op {mode}", dtype="bfloat16", rounds=rounds, calls=calls)
    row["mosaic_chunk"] = chunk or "default"
    backends = (
        {"triton": "interpret", "mosaic": "mosaic_interpret"} if interpret else {"triton": "triton", "mosaic": "mosaic"}
    )
    inputs = runner.make_inputs(impls.MLSTM, shape, seed=0)
    chunks = {backends["triton"]: None, backends["mosaic"]: chunk}
    forward_of = lambda backend: impls.pallas_mlstm_forward(backend)(chunks[backend])
    make = lambda backend: runner.function_of(impls.timed_callables(forward_of(backend), len(inputs)), mode)
    arguments = inputs if mode == "fw" else (runner.make_weights(forward_of(backends["triton"]), inputs), *inputs)
    compiled = _compile({name: lambda b=backend: make(b) for name, backend in backends.items()}, arguments, row)
    times = _interleaved_times(compiled, arguments, calls, rounds, row)
    if times is None:
        return row
    for name, ms in times.items():
        row[f"{name}_ms"] = statistics.median(ms)
    _compare(row, compiled, times, ("triton",))
    if profile:
        _profile(row, compiled, arguments, calls)
    if "mosaic" in times and "triton" in times:
        row["mosaic_faster_rounds"] = sum(a < b for a, b in zip(times["mosaic"], times["triton"]))
    return row


def _compile(launchers: dict, arguments, row: dict) -> dict:
    """{name: (jitted launcher, the outputs of its first call, which compiles it)} of `launchers` ({name: a
    function that makes one}); a launcher that fails is left out, its error in row[f"{name}_error"]."""
    compiled = {}
    for name, make in launchers.items():
        try:
            function = make()
            compiled[name] = (function, jax.tree.leaves(jax.block_until_ready(function(*arguments))))
        except Exception as error:
            row[f"{name}_error"] = _error_text(error)
            traceback.print_exc()
    return compiled


def _interleaved_times(compiled: dict, arguments, calls: int, rounds: int, row: dict) -> dict | None:
    """Each compiled launcher's time per round (`pipelined_ms` over `calls` calls), the launchers taking turns,
    each round in the other order than the last so that none always goes first; None (the error in
    row["rounds_error"]) if a round fails."""
    times = {name: [] for name in compiled}
    try:
        for index in range(rounds):
            for name in list(compiled)[:: 1 if index % 2 == 0 else -1]:
                times[name].append(timing.pipelined_ms(compiled[name][0], arguments, calls))
    except Exception as error:
        row["rounds_error"] = _error_text(error)
        traceback.print_exc()
        return None
    return times


def _profile(row: dict, compiled: dict, arguments, calls: int, shown: int = 8) -> None:
    """row[f"{name}_device_ms"], the GPU time per call of all the kernels each compiled launcher runs, and
    row[f"{name}_kernels_ms"], the `shown` longest of them by name (the rest as "others"): `timing.device_kernel_ms`
    over `calls` calls. Their sum below the launcher's time is the GPU idling between kernels; the kernels beside
    the Mosaic GPU one are XLA's work around it. Nothing on the CPU (no GPU trace)."""
    for name, (function, _) in compiled.items():
        key = f"{name}_kernels_ms"
        _attempt(row, key, lambda function=function: timing.device_kernel_ms(function, arguments, calls))
        kernels = row.pop(key, None)
        if kernels:
            ranked = list(kernels.items())
            row[f"{name}_device_ms"] = sum(kernels.values())
            row[key] = dict(ranked[:shown]) | (
                {"others": sum(ms for _, ms in ranked[shown:])} if ranked[shown:] else {}
            )


def _compare(row: dict, compiled: dict, times: dict, others: tuple[str, ...]) -> None:
    """row's mosaic_over_X (ratio of median times) and mosaic_vs_X (outputs' difference) for each X of `others`
    timed beside mosaic."""
    for other in others:
        if "mosaic" in times and other in times:
            row[f"mosaic_over_{other}"] = row["mosaic_ms"] / row[f"{other}_ms"]
            _attempt(row, f"mosaic_vs_{other}", lambda other=other: _output_difference(compiled, other))


def _output_difference(compiled: dict, other: str) -> float:
    """The largest relative difference between the mosaic launcher's outputs and `other`'s; ValueError where they
    differ in number or shape."""
    mosaic, theirs = compiled["mosaic"][1], compiled[other][1]
    shapes = [x.shape for x in mosaic], [x.shape for x in theirs]
    if shapes[0] != shapes[1]:
        raise ValueError(f"mosaic's outputs have shapes {shapes[0]}, {other}'s {shapes[1]}: not comparable.")
    return _max_rel_err(mosaic, theirs)


def _inputs(shape: tuple, dtype, input_gate: str):
    """q, k, v in dtype, gates, and float32 states chained through the twin's recurrent_fw_C."""
    batch, heads, seq_len, dhqk, dhhv, chunk = shape
    q, k, v, i, f, c0, n0, m0 = accuracy.mlstm_inputs(
        jax.random.PRNGKey(seq_len + dhqk), batch, heads, seq_len, dhqk, dhhv, jnp.float32, with_initial=True
    )
    gate = {} if input_gate == "exponential" else {"input_gate": input_gate}
    recurrent = lambda *a: xla_kernels.mlstm_chunkwise__recurrent_fw_C(*a, chunk_size=chunk, **gate)
    states = jax.jit(recurrent)(k, v, f, i, c0, n0, m0)
    return (*(x.astype(dtype) for x in (q, k, v)), i, f, *states)


def correctness_row(case: str, dtype, cell: str, interpret: bool = False) -> dict:
    """Mosaic vs the twin and vs Triton at one case, dtype and cell."""
    shape = CASES[case]
    input_gate, normalize = CELLS[cell]
    row = dict(step="correctness", case=case, dtype=jnp.dtype(dtype).name, cell=cell)
    try:
        row["mosaic_tiles"] = _tiles(*shape[3:], dtype)
        args = _inputs(shape, dtype, input_gate)
        call = KernelCall(
            chunk_size=shape[-1], eps=EPS, input_gate=input_gate, normalize=normalize, interpret=interpret
        )
        mosaic = _mosaic("parallel_fw_Hintra", call)(*args)
        twin = jax.jit(lambda *a: xla_kernels.parallel_fw_Hintra(call, *a))(*args)
    except Exception as error:
        row["error"] = _error_text(error)
        traceback.print_exc()
        return row
    row["vs_twin"] = _max_rel_err(mosaic, twin)
    row["ok"] = row["vs_twin"] <= accuracy.KERNEL_TWIN_TOLERANCE[("triton", row["dtype"])]
    triton = lambda: jax.jit(lambda *a: pallas_triton.KERNELS.parallel_fw_Hintra(call, *a))(*args)
    _attempt(row, "vs_triton", lambda: _max_rel_err(mosaic, triton()))
    return row


def _result(row: dict) -> str:
    if "error" in row:
        return "ERROR " + row["error"].splitlines()[0][:110]
    errors = "  ".join(f"{k}: {v.splitlines()[0][:80]}" for k, v in row.items() if k.endswith("_error"))
    if row["step"] == "correctness":
        text = f"vs twin {row['vs_twin']:.1e}  vs triton {row.get('vs_triton', float('nan')):.1e}"
        return text + ("" if row["ok"] else "  ABOVE TRITON'S BOUND") + (f"  {errors}" if errors else "")
    if row["step"] in ("timing", "op"):
        get = lambda key, fmt: format(row[key], fmt) if key in row else "-"
        mosaic = f"mosaic {get('mosaic_ms', '.3f')} ms {get('mosaic_tflops', '.0f')} TFLOP/s"
        triton = f"triton {get('triton_ms', '.3f')} ms {get('triton_tflops', '.0f')}"
        ratio = f"ratio {get('mosaic_over_triton', '.2f')} | diff {get('mosaic_vs_triton', '.1e')}"
        if row["step"] == "op":
            ratio += f" | mosaic faster in {get('mosaic_faster_rounds', 'd')}/{row['rounds']} rounds"
        if "mosaic_device_ms" in row:
            ratio += f" | GPU busy: mosaic {get('mosaic_device_ms', '.3f')} ms, triton {get('triton_device_ms', '.3f')}"
        baseline = ""
        if "baseline_ms" in row:
            faster = f"faster in {get('mosaic_faster_rounds', 'd')}/{row['rounds']} rounds"
            baseline = (
                f" | baseline {get('baseline_ms', '.3f')} ms, ratio {get('mosaic_over_baseline', '.2f')}, {faster}"
            )
        return f"{mosaic} | {triton} | {ratio}{baseline}" + (f"  {errors}" if errors else "")
    return row.get("note", "")


def table(rows: list[dict]) -> str:
    """One line per row: step, case, dtype, cell or chunk, result."""
    lines = [f"{'step':<12} {'case':<20} {'dtype':<9} {'cell / kernel, chunk':<30} result"]
    for row in rows:
        label = row.get("cell", f"{row.get('kernel', '')} {row.get('chunk', '')}")
        lines.append(f"{row['step']:<12} {row['case']:<20} {row.get('dtype', ''):<9} {label:<30} {_result(row)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Runs the checks and timings the flags ask for (`--help` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the rows to this JSON file")
    parser.add_argument("--calls", type=int, default=20, help="calls per launcher and round, back to back")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per launcher (median kept)")
    parser.add_argument("--baseline", help="a directory holding another revision's pallas_mlstm package, timed too")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="run in the interpreters on the CPU (a check of the script: its times mean nothing)",
    )
    parser.add_argument("--budget_s", type=float, default=390, help="skip the rows left after this many seconds")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also each launcher's GPU time by kernel, from a jax.profiler trace (kernels_ms, device_ms)",
    )
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"timed kernels among {', '.join(KERNELS)}")
    parser.add_argument("--shapes", default=",".join(TIMED_SHAPES), help="timed shapes (benchmarks/shapes.py), or ''")
    parser.add_argument(
        "--ops",
        default="",
        help=f"whole-op rows ({', '.join(OP_MODES)}: backend mosaic against triton, rounds interleaved) at --shapes",
    )
    parser.add_argument(
        "--op_chunks",
        default="default",
        help="chunk sizes of backend mosaic in the --ops rows, a row each: 64, 128, 256 or 'default' (the card's own)",
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"correctness cases among {', '.join(CASES)}, or ''")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"cells among {', '.join(CELLS)}")
    args = parser.parse_args(argv)
    for flag in ("calls", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1; got {getattr(args, flag)}")
    named = (("ops", OP_MODES), ("kernels", KERNELS), ("shapes", SHAPES), ("cases", CASES), ("cells", CELLS))
    for flag, known in named:
        unknown = [name for name in filter(None, getattr(args, flag).split(",")) if name not in known]
        if unknown:
            parser.error(f"--{flag} takes {', '.join(known)}; got {', '.join(unknown)}")
    chunk_names = {"default": None, **{str(chunk): chunk for chunk in mosaic_common.CHUNK_SIZES}}
    op_chunks = [item.strip() for item in args.op_chunks.split(",")]
    if not all(item in chunk_names for item in op_chunks):
        parser.error(f"--op_chunks takes {', '.join(chunk_names)} (comma-separated); got {args.op_chunks!r}")
    op_chunks = [chunk_names[item] for item in op_chunks]

    start = time.perf_counter()
    device = jax.devices()[0]
    header = dict(
        step="environment",
        case="",
        note=f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, {jax.devices()}",
        device_kind=device.device_kind,
        compute_capability=getattr(device, "compute_capability", None),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=" ".join(["python -m pallas_mlstm.benchmarks.mosaic_check", *(sys.argv[1:] if argv is None else argv)]),
    )
    print(json.dumps(header), flush=True)
    baseline = None if args.baseline is None else load_revision(args.baseline)
    todo = [
        lambda s=s, k=k: timing_row(s, k, args.calls, args.rounds, baseline, args.interpret, args.profile)
        for k in filter(None, args.kernels.split(","))
        for s in filter(None, args.shapes.split(","))
    ]
    todo += [
        lambda s=s, mode=mode, c=c: op_row(s, mode, args.calls, args.rounds, args.interpret, args.profile, c)
        for mode in filter(None, args.ops.split(","))
        for s in filter(None, args.shapes.split(","))
        for c in op_chunks
    ]
    todo += [
        lambda case=case, dtype=dtype, cell=cell: correctness_row(case, dtype, cell, args.interpret)
        for case in filter(None, args.cases.split(","))
        for dtype in DTYPES
        for cell in filter(None, args.cells.split(","))
    ]
    rows = [header]
    for index, step in enumerate(todo):
        if time.perf_counter() - start > args.budget_s:
            rows.append(dict(step="skipped", case="", note=f"{len(todo) - index} rows: --budget_s={args.budget_s:.0f}"))
        else:
            rows.append(step())
            print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(rows, handle, indent=1, default=str)
        if rows[-1]["step"] == "skipped":
            break
    print(table(rows))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
