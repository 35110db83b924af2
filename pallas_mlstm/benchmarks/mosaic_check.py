"""The Mosaic GPU kernels on a Hopper GPU: each one's time against the Triton launcher's in the same run, and the
forward's outputs against the jnp twin and the Triton launcher (tests/test_mosaic.py checks each kernel's).

    PYTHONPATH=. python3 -m pallas_mlstm.benchmarks.mosaic_check --out mosaic_fw.json

Timing first, of each kernel of --kernels (recurrent_fw_C, recurrent_bw_dC, parallel_fw_Hintra, parallel_bw_dV,
parallel_bw_dK, parallel_bw_dQ): 7b, tfla-paper, small-heads and odd-heads in bfloat16 at the card's tuned chunk
size (the default chunk where none is tuned), on kernel_times' inputs (chained through the Triton kernels, 16-bit
state buffers) with its FLOP count; median ms of --calls calls after a warm-up (benchmarks/timing.py), Triton at its
tuned launch; TFLOP/s; mosaic / triton; and the relative difference of their outputs. Then correctness on small
shapes and 7b-short, bfloat16 and float32, each cell: the largest relative error of the three outputs (h, vecN_out,
vecM_out) against the twin (xla_kernels) and against the Triton launcher, on inputs chained through the twins
(float32 states) as tests/test_kernels.py builds them, with Triton's kernel-twin bound as the mark. Each row is
caught and reported on its own (a compile error's first lines); rows left when --budget_s is spent are skipped.
Prints a table at the end and rewrites the JSON (--out) after every row. About 7 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from pallas_mlstm import accuracy, pallas_triton, xla_kernels
from pallas_mlstm.benchmarks.kernel_times import kernel_cases
from pallas_mlstm.benchmarks.shapes import SHAPES, Shape
from pallas_mlstm.benchmarks.timing import median_ms
from pallas_mlstm.config import tuned_config
from pallas_mlstm.device import device_properties
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common as mosaic_common
from pallas_mlstm.mosaic_gpu import parallel_bw, parallel_bw_sliced, parallel_fw, recurrent_bw, recurrent_fw
from pallas_mlstm.plan import default_chunk_size

CELLS = {"exponential": ("exponential", True), "sigmoid": ("sigmoid", True), "sigmoid-unnormalised": ("sigmoid", False)}
# (B, NH, S, DHQK, DHHV, chunk): one warpgroup; 7B widths; two warpgroups, two query and two DHHV tiles; padded DHQK.
CASES = {
    "L64-d64x64": (1, 2, 128, 64, 64, 64),
    "7b-short": (*SHAPES["7b-short"].dims().values(), 256),
    "L256-d128x512": (1, 2, 512, 128, 512, 256),
    "L128-d96x192-padded": (2, 1, 256, 96, 192, 128),
}
TIMED_SHAPES = ("7b", "tfla-paper", "small-heads", "odd-heads")
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


def _mosaic(call: KernelCall):
    return jax.jit(lambda *a: parallel_fw.parallel_fw_Hintra(call, *a))


def _mosaic_backward(launcher):
    """A Mosaic GPU backward launcher (from a KernelCall) on kernel_times' upstream-order arguments (q, k, v, i,
    vecA, vecB, C, n, m states, vecN_out, vecM_out, dH, dC states)."""

    def bind(call: KernelCall):
        def launch(*args):
            q, k, v, i, vec_a, vec_b, *states, n_out, m_out, dh, dc_states = args
            gates = (vec_a, vec_b, None)
            return launcher(call, q, k, v, i, gates, tuple(states), n_out, m_out, dh, dc_states)

        return jax.jit(launch)

    return bind


def _sliced_tiles(chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...]):
    count, stages = parallel_bw_sliced.kernel_tiles(chunk, dhqk, dhhv, parts)
    return count, mosaic_common.Tiles(warpgroups=1, block_v=dhqk, stages=stages)


def _mosaic_states(call: KernelCall):
    """The Mosaic GPU states launcher on kernel_times' arguments (k, v, i, f), with its bf16 state buffers."""
    call = dataclasses.replace(call, states_dtype="bfloat16")
    return jax.jit(lambda k, v, i, f: recurrent_fw.recurrent_fw_C(call, k, v, f, i, None, None, None))


def _mosaic_states_backward(call: KernelCall):
    """The Mosaic GPU states backward launcher on kernel_times' arguments (q, f, m states, vecM_out, dH, vecN_out,
    C states), with its bf16 state buffers."""
    call = dataclasses.replace(call, states_dtype="bfloat16")
    launch = lambda q, f, m, m_out, dh, n_out, c: recurrent_bw.recurrent_bw_dC(call, q, f, m, m_out, dh, n_out, None, c)
    return jax.jit(launch)


def _states_tiles(chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...]):
    del chunk  # the states kernels step through any chunk 64 rows at a time
    return recurrent_fw.kernel_tiles(dhqk, dhhv, parts, 2, recurrent_fw.compute_warpgroups(dhqk))


# The timed kernels: their Mosaic GPU launcher (from a KernelCall, on kernel_times' arguments) and tile choice.
KERNELS = {
    "recurrent_fw_C": (_mosaic_states, _states_tiles),
    "recurrent_bw_dC": (_mosaic_states_backward, _states_tiles),
    "parallel_fw_Hintra": (_mosaic, parallel_fw.kernel_tiles),
    "parallel_bw_dV": (_mosaic_backward(parallel_bw.parallel_bw_dV), parallel_bw.kernel_tiles),
    "parallel_bw_dK": (_mosaic_backward(parallel_bw_sliced.parallel_bw_dK), _sliced_tiles),
    "parallel_bw_dQ": (_mosaic_backward(parallel_bw_sliced.parallel_bw_dQ), _sliced_tiles),
}


def _tiles(dhqk: int, dhhv: int, chunk: int, dtype, kernel: str = "parallel_fw_Hintra") -> str:
    parts = mosaic_common.operand_parts(dtype)
    kernel_tiles = KERNELS[kernel][1]
    count, tiles = kernel_tiles(chunk, mosaic_common.padded_dim(dhqk), mosaic_common.padded_dim(dhhv), parts)
    return f"P={count} warpgroups={tiles.warpgroups} block_v={tiles.block_v} stages={tiles.stages}"


def _timed_chunk(shape: Shape, kernel: str) -> tuple[int, dict]:
    """The card's tuned chunk size for this shape and the Triton launch of `kernel` tuned with it (none tuned: the
    default chunk and the kernel's default launch)."""
    props = device_properties()
    capability = None if props.compute_capability is None else ".".join(map(str, props.compute_capability))
    dims = shape.dims()
    config = tuned_config(props.device_kind, **dims, compute_capability=capability, core_count=props.core_count)
    if config is None or config.chunk_size is None:
        return default_chunk_size(shape.S), {}
    return config.chunk_size, config.kernel_launches().get(kernel, {})


def timing_row(shape_name: str, kernel: str, calls: int) -> dict:
    """Both launchers of `kernel` on the same inputs: median ms, TFLOP/s, mosaic / triton, and their outputs'
    difference."""
    shape = SHAPES[shape_name]
    row = dict(step="timing", case=shape_name, kernel=kernel, dtype="bfloat16")
    try:
        chunk, launch = _timed_chunk(shape, kernel)
        tiles = _tiles(shape.DHQK, shape.DHHV, chunk, jnp.bfloat16, kernel)
        row.update(chunk=chunk, triton_launch=launch, mosaic_tiles=tiles)
        case = next(c for c in kernel_cases(shape, chunk) if c.name == kernel)
    except Exception as error:
        row["error"] = _error_text(error)
        traceback.print_exc()
        return row
    row["tflop"] = case.flops / 1e12
    triton = case.make(launch)
    mosaic = KERNELS[kernel][0](KernelCall(chunk_size=chunk, eps=EPS, output_dtype=jnp.bfloat16))
    _attempt(row, "triton_ms", lambda: median_ms(triton, [case.args], calls))
    _attempt(row, "mosaic_ms", lambda: median_ms(mosaic, [case.args], calls))
    for name in ("triton", "mosaic"):
        if f"{name}_ms" in row:
            row[f"{name}_tflops"] = case.flops / row[f"{name}_ms"] / 1e9
    if "mosaic_ms" in row and "triton_ms" in row:
        row["mosaic_over_triton"] = row["mosaic_ms"] / row["triton_ms"]
        outputs = lambda fn: jax.tree.leaves(fn(*case.args))
        _attempt(row, "mosaic_vs_triton", lambda: _max_rel_err(outputs(mosaic), outputs(triton)))
    return row


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


def correctness_row(case: str, dtype, cell: str) -> dict:
    """Mosaic vs the twin and vs Triton at one case, dtype and cell."""
    shape = CASES[case]
    input_gate, normalize = CELLS[cell]
    row = dict(step="correctness", case=case, dtype=jnp.dtype(dtype).name, cell=cell)
    try:
        row["mosaic_tiles"] = _tiles(*shape[3:], dtype)
        args = _inputs(shape, dtype, input_gate)
        call = KernelCall(chunk_size=shape[-1], eps=EPS, input_gate=input_gate, normalize=normalize)
        mosaic = _mosaic(call)(*args)
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
    if row["step"] == "timing":
        get = lambda key, fmt: format(row[key], fmt) if key in row else "-"
        mosaic = f"mosaic {get('mosaic_ms', '.3f')} ms {get('mosaic_tflops', '.0f')} TFLOP/s"
        triton = f"triton {get('triton_ms', '.3f')} ms {get('triton_tflops', '.0f')}"
        ratio = f"ratio {get('mosaic_over_triton', '.2f')} | diff {get('mosaic_vs_triton', '.1e')}"
        return f"{mosaic} | {triton} | {ratio}" + (f"  {errors}" if errors else "")
    return row.get("note", "")


def table(rows: list[dict]) -> str:
    """One line per row: step, case, dtype, cell or chunk, result."""
    lines = [f"{'step':<12} {'case':<20} {'dtype':<9} {'cell / kernel, chunk':<30} result"]
    for row in rows:
        label = row.get("cell", f"{row.get('kernel', '')} {row.get('chunk', '')}")
        lines.append(f"{row['step']:<12} {row['case']:<20} {row.get('dtype', ''):<9} {label:<30} {_result(row)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the rows to this JSON file")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per launcher (median kept)")
    parser.add_argument("--budget_s", type=float, default=390, help="skip the rows left after this many seconds")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"timed kernels among {', '.join(KERNELS)}")
    parser.add_argument("--shapes", default=",".join(TIMED_SHAPES), help="timed shapes (benchmarks/shapes.py), or ''")
    parser.add_argument("--cases", default=",".join(CASES), help=f"correctness cases among {', '.join(CASES)}, or ''")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"cells among {', '.join(CELLS)}")
    args = parser.parse_args(argv)

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
    todo = [
        lambda s=s, k=k: timing_row(s, k, args.calls)
        for k in filter(None, args.kernels.split(","))
        for s in filter(None, args.shapes.split(","))
    ]
    todo += [
        lambda case=case, dtype=dtype, cell=cell: correctness_row(case, dtype, cell)
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
