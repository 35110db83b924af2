"""Per-kernel time, work and traffic of the triton backend (where the time goes), and per-kernel launch sweeps.

    python -m pallas_mlstm kernel_times --kernel_shapes=7b --kernel_chunk=128
    python -m pallas_mlstm kernel_times --kernel_shapes=7b --kernel_chunk=256 \
        --kernel_sweep --kernel_names=parallel_bw_dQ,parallel_bw_dK

For each of the six kernels (and the gate preprocessing): median ms, the matmul FLOPs it must do (causal
tiles counted half), the bytes of its inputs and outputs (each moved once at least), and what those give
per second. With --kernel_sweep, each named kernel is timed alone at every launch of LAUNCH_CANDIDATES
(the kernels' own defaults first), its first output compared with the defaults'. NVIDIA GPU only (bf16 inputs as
in the bench); --kernel_interpret --kernel_shapes=tiny smoke-tests on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_mlstm
from pallas_mlstm import accuracy, pallas_triton, registry
from pallas_mlstm.benchmarks.shapes import cpu_shape_warning, resolve_shapes
from pallas_mlstm.benchmarks.timing import median_ms
from pallas_mlstm.kernel_call import CHUNKWISE_KERNELS
from pallas_mlstm.plan import validate_chunk_size
from pallas_mlstm.states import state_buffer_dtype

_SHAPES = flags.DEFINE_list("kernel_shapes", ["7b"], "Named shapes (pallas_mlstm/benchmarks/shapes.py).")
_CHUNK = flags.DEFINE_integer("kernel_chunk", 128, "Chunk size: a power of 2, at least 16.")
_CALLS = flags.DEFINE_integer("kernel_calls", 20, "Timed calls per kernel (median kept).", lower_bound=1)
_JSON = flags.DEFINE_string("kernel_json", None, "Write the rows to this JSON file.")
_INTERPRET = flags.DEFINE_bool(
    "kernel_interpret", False, "Run the Pallas interpreter (CPU smoke test; times mean nothing)."
)
_SWEEP = flags.DEFINE_bool("kernel_sweep", False, "Time each kernel at every launch of LAUNCH_CANDIDATES.")
_NAMES = flags.DEFINE_list(
    "kernel_names", None, f"Kernels to time, any of {','.join(CHUNKWISE_KERNELS)} (default: all)."
)

# Launches the sweep tries per kernel, each a dict of the kernel's keyword arguments ({}: its defaults).
# Parallel kernels: output-row tile, loop tile, head-dim tiles, warps, stages around the defaults.
_PARALLEL_VARIANTS = (
    {},
    dict(num_warps=4),
    dict(num_stages=1),
    dict(num_stages=3),
    dict(loop=128),
    dict(loop=128, num_stages=3),
    dict(rows=64),
    dict(head=128),
    dict(head=128, depth=128),
    dict(depth=128),
)
# Recurrent kernels: state tiles, warps and stages.
RECURRENT_CANDIDATES = (
    {},
    *(
        dict(siz_b_DHQK=dhqk, siz_b_DHHV=dhhv, num_warps=warps, num_stages=1)
        for dhqk, dhhv in ((64, 64), (64, 128), (128, 64), (128, 128))
        for warps in (4, 8)
    ),
)


def parallel_candidates(rows_arg: str, loop_arg: str, head_arg: str, depth_arg: str) -> tuple[dict, ...]:
    """The parallel-kernel launches in terms of one kernel's argument names (rows: its output rows)."""
    names = dict(rows=rows_arg, loop=loop_arg, head=head_arg, depth=depth_arg)
    return tuple({names.get(key, key): value for key, value in variant.items()} for variant in _PARALLEL_VARIANTS)


LAUNCH_CANDIDATES = {
    "recurrent_fw_C": RECURRENT_CANDIDATES,
    "parallel_fw_Hintra": parallel_candidates("siz_b_LQ", "siz_b_LKV", "siz_b_DHHV", "siz_b_DHQK"),
    "recurrent_bw_dC": RECURRENT_CANDIDATES,
    "parallel_bw_dQ": parallel_candidates("siz_b_LQ", "siz_b_LKV", "siz_b_DHQK", "siz_b_DHHV"),
    "parallel_bw_dK": parallel_candidates("siz_b_LKV", "siz_b_LQ", "siz_b_DHQK", "siz_b_DHHV"),
    "parallel_bw_dV": parallel_candidates("siz_b_LKV", "siz_b_LQ", "siz_b_DHHV", "siz_b_DHQK"),
}


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One kernel at one shape: `make(launch)` jits it with those launch keyword arguments."""

    name: str
    make: Callable[[dict], Callable]
    args: tuple
    flops: float


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kernel_cases(shape, chunk: int, interpret: bool = False) -> list[KernelCase]:
    """The gate preprocessing and the six kernels, on inputs chained through the kernels themselves."""
    B, NH, S, DK, DV = shape.B, shape.NH, shape.S, shape.DHQK, shape.DHHV
    key = jax.random.PRNGKey(0)
    q, k, v, i, f, *_ = accuracy.mlstm_inputs(key, B, NH, S, DK, DV, jnp.bfloat16)
    dh = jax.random.normal(jax.random.fold_in(key, 1), (B, NH, S, DV), jnp.bfloat16)
    p = types.SimpleNamespace(
        **{
            name: functools.partial(getattr(pallas_triton, f"mlstm_chunkwise__{name}"), interpret=interpret)
            for name in CHUNKWISE_KERNELS
        }
    )
    gates = lambda launch: jax.jit(lambda i, f: pallas_mlstm.compute_chunkwise_log_gates_vecB_vecA(i, f, chunk))
    narrow = dict(states_dtype=state_buffer_dtype(q.dtype))  # the state buffers of the production path
    fw_c = lambda launch: jax.jit(lambda k, v, i, f: p.recurrent_fw_C(k, v, f, i, chunk_size=chunk, **narrow, **launch))
    fw_h = lambda launch: jax.jit(
        lambda *a: p.parallel_fw_Hintra(*a, chunk_size=chunk, output_dtype=jnp.bfloat16, **launch)
    )
    states = fw_c({})(k, v, i, f)[:3]
    _, n_out, m_out = fw_h({})(q, k, v, i, f, *states)
    bw_c = (
        lambda launch: jax.jit(  # arguments: q, f, m states, vecM_out, dH, vecN_out, then the C states
            lambda *a: p.recurrent_bw_dC(*a[:-1], chunk_size=chunk, matC_states=a[-1], **narrow, **launch)
        )
    )
    bw_c_args = (q, f, states[2], m_out, dh, n_out, states[0])
    dc_states = bw_c({})(*bw_c_args)[0]
    vec_b, vec_a = gates({})(i, f)
    bw_args = (q, k, v, i, vec_a, vec_b, *states, n_out, m_out, dh, dc_states)

    def parallel_bw(name):
        rows = dict(return_row_dots=True) if name != "dV" else {}
        fn = getattr(p, f"parallel_bw_{name}")
        return lambda launch: jax.jit(lambda *a: fn(*a, chunk_size=chunk, output_dtype=jnp.bfloat16, **rows, **launch))

    tokens, half_chunk = B * NH * S, chunk / 2  # causal: on average half a chunk of keys per query
    inter = 2 * tokens * DK * DV  # one (L x DK) x (DK x DV)-sized product per chunk and token
    intra = 2 * tokens * half_chunk * (DK + DV)
    return [
        KernelCase("gates (vecB, vecA)", gates, (i, f), 0),
        KernelCase("recurrent_fw_C", fw_c, (k, v, i, f), inter),
        KernelCase("parallel_fw_Hintra", fw_h, (q, k, v, i, f, *states), inter + intra),
        KernelCase("recurrent_bw_dC", bw_c, bw_c_args, inter),
        *(KernelCase(f"parallel_bw_{name}", parallel_bw(name), bw_args, inter + intra) for name in ("dQ", "dK", "dV")),
    ]


def kernel_rows(shape, chunk: int, calls: int, interpret: bool = False, names=None) -> list[dict]:
    """Times each kernel at its default launch."""
    rows = []
    for case in kernel_cases(shape, chunk, interpret):
        if names and case.name not in names:
            continue
        fn = case.make({})
        ms = median_ms(fn, [case.args], calls)
        # arguments + outputs: an upper bound on what an ideal kernel moves (some arguments go unread)
        rows.append(
            dict(
                shape=shape.name,
                chunk=chunk,
                kernel=case.name,
                ms=ms,
                tflop=case.flops / 1e12,
                gbytes=(_nbytes(fn(*case.args)) + _nbytes(case.args)) / 1e9,
                card=jax.devices()[0].device_kind,
                jax_version=jax.__version__,
            )
        )
    return rows


def sweep_rows(shape, chunk: int, calls: int, interpret: bool = False, names=None) -> list[dict]:
    """Times each kernel at every launch of LAUNCH_CANDIDATES; a launch that fails to compile gets its error."""
    rows = []
    for case in kernel_cases(shape, chunk, interpret):
        if case.name not in LAUNCH_CANDIDATES or (names and case.name not in names):
            continue
        expected = None
        for launch in LAUNCH_CANDIDATES[case.name]:
            row = dict(
                shape=shape.name,
                chunk=chunk,
                kernel=case.name,
                launch=launch,
                card=jax.devices()[0].device_kind,
                jax_version=jax.__version__,
            )
            try:
                fn = case.make(launch)
                out = jax.tree.leaves(fn(*case.args))[0]  # (B, NH, ...) first output
                expected = out if expected is None else expected
                row["rel_diff"] = accuracy.rel_err(out, expected)
                row["ms"] = median_ms(fn, [case.args], calls)
            except Exception as error:  # e.g. Triton out of shared memory
                row["error"] = f"{type(error).__name__}: {str(error)[:160]}"
            rows.append(row)
            print(
                f"{case.name:<20} {json.dumps(launch):<60} "
                + (f"{row['ms']:8.3f} ms  diff {row['rel_diff']:.1e}" if "ms" in row else row["error"]),
                flush=True,
            )
    return rows


def main(argv) -> None:
    """The `kernel_times` subcommand: time each kernel (or sweep its launches) at each shape; print; write JSON."""
    if len(argv) > 1:
        raise app.UsageError(f"kernel_times takes flags only; got the arguments {argv[1:]}.")
    try:
        shapes = resolve_shapes(_SHAPES.value)
    except ValueError as error:
        raise app.UsageError(f"--kernel_shapes: {error}") from None
    try:
        validate_chunk_size(_CHUNK.value, None, name="--kernel_chunk", minimum=registry.registered("triton").min_chunk)
    except ValueError as error:
        raise app.UsageError(error) from None
    unknown = sorted(set(_NAMES.value or ()) - set(CHUNKWISE_KERNELS))
    if unknown:
        raise app.UsageError(f"--kernel_names entries must be among {','.join(CHUNKWISE_KERNELS)}; got {unknown}.")
    if not _INTERPRET.value and not registry.registered("triton").available():
        raise app.UsageError(
            "kernel_times times the triton kernels on an NVIDIA GPU, and JAX's platform here is "
            f"{jax.default_backend()}; on a CPU, --kernel_interpret --kernel_shapes=tiny smoke-tests it."
        )
    if jax.default_backend() != "gpu":
        warning = cpu_shape_warning(shapes, "--kernel_shapes")
        if warning:
            print(warning, flush=True)
    rows = []
    for shape in shapes:
        if _SWEEP.value:
            rows += sweep_rows(shape, _CHUNK.value, _CALLS.value, _INTERPRET.value, _NAMES.value)
        else:
            rows += kernel_rows(shape, _CHUNK.value, _CALLS.value, _INTERPRET.value, _NAMES.value)
    if not _SWEEP.value:
        print(f"{'shape':<12} {'kernel':<20} {'ms':>8} {'TFLOP':>7} {'TFLOP/s':>8} {'GB in+out':>10} {'GB/s':>7}")
        for row in rows:
            rate = row["tflop"] / row["ms"] * 1e3 if row["tflop"] else 0.0
            print(
                f"{row['shape']:<12} {row['kernel']:<20} {row['ms']:>8.3f} {row['tflop']:>7.3f} {rate:>8.1f} "
                f"{row['gbytes']:>10.2f} {row['gbytes'] / row['ms'] * 1e3:>7.0f}"
            )
    if _JSON.value:
        with open(_JSON.value, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    from pallas_mlstm.__main__ import run_subcommand

    run_subcommand("kernel_times", main, sys.modules[__name__], sys.argv[1:])
