"""Per-kernel time, work and traffic of a backend's kernels (where the time goes), and per-kernel launch sweeps.

    python -m pallas_mlstm kernel_times --kernel_shapes=7b
    python -m pallas_mlstm kernel_times --kernel_shapes=7b --kernel_backend=mosaic
    python -m pallas_mlstm kernel_times --kernel_shapes=7b --kernel_chunk=256 \\
        --kernel_sweep --kernel_names=parallel_bw_dQ,parallel_bw_dK

For the gate preprocessing, each of the six kernels and, where the backend has a call of both, dK and dQ together
(`KernelSet.dK_and_dQ`: Mosaic GPU's one launch): ms per call, the matmul FLOPs it must do (causal tiles counted
half), the bytes of the inputs it reads and of its outputs (each moved once at least), and what those give per
second. The kernels run as `mlstm_chunkwise(..., backend=--kernel_backend)` runs them in bf16 on this card: at its
chunk size and launches (the card's tuned entry for the shape, else the defaults; --kernel_chunk another chunk: the
kernels' default launches), each jitted and timed alone, its calls issued back to back (`timing.back_to_back_ms`).
With --kernel_sweep, each named Triton kernel is timed so at every launch of LAUNCH_CANDIDATES (the kernels' own
defaults first), its first output compared with the defaults'. A GPU for triton and mosaic (Hopper); on a CPU,
--kernel_backend=interpret (or xla) --kernel_shapes=tiny smoke-tests it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from pallas_mlstm import accuracy, pallas_triton, registry
from pallas_mlstm.benchmarks.shapes import cpu_shape_warning, resolve_shapes
from pallas_mlstm.benchmarks.timing import back_to_back_ms
from pallas_mlstm.config import ChunkwiseConfig
from pallas_mlstm.gates import chunkwise_log_gates, compute_chunkwise_reset_gates
from pallas_mlstm.kernel_call import CHUNKWISE_KERNELS, KernelCall
from pallas_mlstm.plan import make_chunking, resolve_config, validate_chunk_size
from pallas_mlstm.states import state_buffer_dtype

ROUNDS = 3  # timed rounds per kernel, the median kept
GATES = "gates (vecA, vecB, vecR)"  # XLA's gate preprocessing of the parallel backward kernels, timed first
PARALLEL_BACKWARD = ("parallel_bw_dQ", "parallel_bw_dK", "parallel_bw_dV")
BOTH_GRADIENTS = "dK_and_dQ"  # KernelSet.dK_and_dQ, where the set has a launch of both (Mosaic GPU's: one launch
# where no head dim is padded, else two)

_SHAPES = flags.DEFINE_list("kernel_shapes", ["7b"], "Named shapes (pallas_mlstm/benchmarks/shapes.py).")
_BACKEND = flags.DEFINE_string(
    "kernel_backend",
    "triton",
    "Whose kernels: a registered backend (triton; mosaic, Hopper only; xla; interpret or mosaic_interpret, their "
    "interpreters on the CPU: a smoke test whose times mean nothing).",
)
_CHUNK = flags.DEFINE_integer(
    "kernel_chunk",
    None,
    "Chunk size, a power of 2 of at least 16 (default: the one mlstm_chunkwise takes on this card for the shape).",
)
_CALLS = flags.DEFINE_integer(
    "kernel_calls", 20, "Calls per timed round, issued back to back (the median of 3 rounds kept).", lower_bound=1
)
_JSON = flags.DEFINE_string("kernel_json", None, "Write the rows to this JSON file.")
_SWEEP = flags.DEFINE_bool("kernel_sweep", False, "Time each kernel at every launch of LAUNCH_CANDIDATES.")
_NAMES = flags.DEFINE_list(
    "kernel_names",
    None,
    f"Kernels to time, any of {','.join(CHUNKWISE_KERNELS)} or {BOTH_GRADIENTS} (default: all the backend has).",
)

# Launches the sweep tries per kernel, each a dict of `TritonLaunch` fields ({}: the kernel's defaults).
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
    """One kernel of one backend at one shape: `call(launch)` is its `KernelCall` with a Triton launch override
    (a dict of `TritonLaunch` fields over the config's, None: the config's), `run(call, *args)` its launcher,
    `make(launch)` the two jitted; `flops`: the matmul work it must do; `read`: the arguments it reads (None: all of
    `args`; the parallel backward kernels each take the same arguments and leave some unread)."""

    name: str
    call: Callable[[dict | None], KernelCall]
    run: Callable[..., Any]
    args: tuple
    flops: float
    read: tuple | None = None

    def make(self, launch: dict | None) -> Callable:
        """The launcher jitted on `args` with `launch` (see `call`)."""
        call = self.call(launch)
        return jax.jit(lambda *args: self.run(call, *args))


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def card_chunk_and_config(shape, backend: str) -> tuple[int, ChunkwiseConfig | None]:
    """The chunk size and config `mlstm_chunkwise(..., backend=backend)` takes for `shape` in bf16 on this card:
    its tuned entry (None where none applies) and the chunk it plans with that entry (`plan.make_chunking`)."""
    chosen = registry.registered(backend)
    usable = functools.partial(registry.runs_tuned_kernels, chosen)
    config = resolve_config(chosen, None, tuple(shape.dims().values()), jnp.bfloat16, usable=usable)
    chunking, _ = make_chunking(chosen, config, None, shape.S, None, None)
    return chunking.chunk_size, (None if config == ChunkwiseConfig() else config)


def kernel_cases(shape, chunk: int, backend: str = "triton", config: ChunkwiseConfig | None = None) -> list[KernelCase]:
    """The gate preprocessing and the six kernels of `backend` (and its call of dK and dQ together, where it has
    one), bf16 with 16-bit state buffers as `mlstm_chunkwise` runs them, on inputs chained through the kernels
    themselves; Triton launches from `config`'s fields (None: the kernels' defaults)."""
    chosen = registry.registered(backend)
    kernels = chosen.kernels
    B, NH, S, DK, DV = shape.B, shape.NH, shape.S, shape.DHQK, shape.DHHV
    key = jax.random.PRNGKey(0)
    q, k, v, i, f, *_ = accuracy.mlstm_inputs(key, B, NH, S, DK, DV, jnp.bfloat16)
    dh = jax.random.normal(jax.random.fold_in(key, 1), (B, NH, S, DV), jnp.bfloat16)
    flat = {} if config is None else dict(config.launch_items())
    tuned = {} if config is None else config.kernel_launches()
    tokens, half_chunk = B * NH * S, chunk / 2  # causal: on average half a chunk of keys per query
    inter = 2 * tokens * DK * DV  # one (L x DK) x (DK x DV)-sized product per chunk and token
    intra = 2 * tokens * half_chunk * (DK + DV)

    def call_of(name: str, **fields) -> Callable[[dict | None], KernelCall]:
        def call(launch: dict | None) -> KernelCall:
            override = {**tuned.get(name, {}), **(launch or {})}
            return KernelCall(
                chunk_size=chunk,
                states_dtype=state_buffer_dtype(q.dtype),  # the state buffers of the production path
                launch=chosen.launch(name, flat, override or None),
                interpret=chosen.interpret,
                **fields,
            )

        return call

    def case(name: str, args: tuple, flops: float, read: tuple | None = None, **fields) -> KernelCase:
        return KernelCase(name, call_of(name, **fields), getattr(kernels, name), args, flops, read)

    def outputs(item: KernelCase):
        return item.make(None)(*item.args)

    states_case = case("recurrent_fw_C", (k, v, f, i, None, None, None), inter)
    states = outputs(states_case)[:3]  # C, n, m at every chunk boundary
    h_case = case("parallel_fw_Hintra", (q, k, v, i, f, *states), inter + intra, output_dtype=jnp.bfloat16)
    _, n_out, m_out = outputs(h_case)
    dc_case = case("recurrent_bw_dC", (q, f, states[2], m_out, dh, n_out, None, states[0]), inter)
    dc_states = outputs(dc_case)[0]
    _, vec_a = chunkwise_log_gates(i, f, chunk)
    vec_b, vec_r = compute_chunkwise_reset_gates(f, chunk)
    bw_args = (q, k, v, i, (vec_a, vec_b, vec_r), tuple(states), n_out, m_out, dh, dc_states)
    m_only = (None, None, states[2])  # of the forward's states: the m states alone
    bw_read = {  # the arguments each reads: dQ leaves the dC states unread, dK the C states, dV V and the C states
        "parallel_bw_dQ": (*bw_args[:-1], None),
        "parallel_bw_dK": (*bw_args[:5], m_only, *bw_args[6:]),
        "parallel_bw_dV": (q, k, None, i, bw_args[4], m_only, *bw_args[6:]),
    }
    gates = lambda _, i, f: (chunkwise_log_gates(i, f, chunk)[1], *compute_chunkwise_reset_gates(f, chunk))
    cases = [
        KernelCase(GATES, lambda launch: None, gates, (i, f), 0),
        states_case,
        h_case,
        dc_case,
        *(case(name, bw_args, inter + intra, bw_read[name], output_dtype=jnp.bfloat16) for name in PARALLEL_BACKWARD),
    ]
    if kernels.parallel_bw_dK_dQ is not None:
        dk_call, dq_call = (call_of(name, output_dtype=jnp.bfloat16) for name in ("parallel_bw_dK", "parallel_bw_dQ"))
        pair = lambda launch: (dk_call(launch), dq_call(launch))
        run = lambda calls, *args: kernels.dK_and_dQ(*calls, *args)
        cases.append(KernelCase(BOTH_GRADIENTS, pair, run, bw_args, 2 * (inter + intra)))
    return cases


def kernel_rows(shape, chunk: int, calls: int, backend: str = "triton", config=None, names=None) -> list[dict]:
    """Times each kernel of `backend` at its launch from `config` (None: the kernels' defaults)."""
    rows = []
    for case in kernel_cases(shape, chunk, backend, config):
        if names and case.name not in names:
            continue
        fn = case.make(None)
        ms = back_to_back_ms(fn, [case.args], ROUNDS * calls, per_round=calls)
        # what it reads + writes: each array moved once, the least an ideal kernel moves
        rows.append(
            dict(
                shape=shape.name,
                chunk=chunk,
                backend=backend,
                tuned=config is not None,  # launches from the card's tuned entry, else the kernels' defaults
                kernel=case.name,
                ms=ms,
                tflop=case.flops / 1e12,
                gbytes=(_nbytes(fn(*case.args)) + _nbytes(case.args if case.read is None else case.read)) / 1e9,
                card=jax.devices()[0].device_kind,
                jax_version=jax.__version__,
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                command="python -m pallas_mlstm " + shlex.join(sys.argv[1:]),
            )
        )
        print(table_line(rows[-1]), flush=True)
    return rows


TABLE_HEADER = (
    f"{'shape':<12} {'backend':<16} {'chunk':>5} {'kernel':<20} {'ms':>8} {'TFLOP':>7} {'TFLOP/s':>8} "
    f"{'GB r+w':>10} {'GB/s':>7}"
)


def table_line(row: dict) -> str:
    """One `kernel_rows` row as a line of the printed table (TABLE_HEADER names its columns)."""
    rate = row["tflop"] / row["ms"] * 1e3 if row["tflop"] else 0.0
    return (
        f"{row['shape']:<12} {row['backend']:<16} {row['chunk']:>5} {row['kernel']:<20} {row['ms']:>8.3f} "
        f"{row['tflop']:>7.3f} {rate:>8.1f} {row['gbytes']:>10.2f} {row['gbytes'] / row['ms'] * 1e3:>7.0f}"
    )


def sweep_rows(shape, chunk: int, calls: int, backend: str = "triton", names=None) -> list[dict]:
    """Times each kernel at every launch of LAUNCH_CANDIDATES (over the kernels' defaults); a launch that fails to
    compile gets its error."""
    rows = []
    for case in kernel_cases(shape, chunk, backend):
        if case.name not in LAUNCH_CANDIDATES or (names and case.name not in names):
            continue
        expected = None
        for launch in LAUNCH_CANDIDATES[case.name]:
            row = dict(
                shape=shape.name,
                chunk=chunk,
                backend=backend,
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
                row["ms"] = back_to_back_ms(fn, [case.args], ROUNDS * calls, per_round=calls)
            except Exception as error:  # e.g. Triton out of shared memory
                row["error"] = f"{type(error).__name__}: {str(error)[:160]}"
            rows.append(row)
            print(
                f"{case.name:<20} {json.dumps(launch):<60} "
                + (f"{row['ms']:8.3f} ms  diff {row['rel_diff']:.1e}" if "ms" in row else row["error"]),
                flush=True,
            )
    return rows


def timed_kernels(backend) -> tuple[str, ...]:
    """The kernels `kernel_rows` times for `backend` (a registered `Backend`), by name."""
    both = (BOTH_GRADIENTS,) if backend.kernels.parallel_bw_dK_dQ is not None else ()
    return (*CHUNKWISE_KERNELS, *both)


def main(argv) -> None:
    """The `kernel_times` subcommand: time each kernel (or sweep its launches) at each shape; print; write JSON."""
    if len(argv) > 1:
        raise app.UsageError(f"kernel_times takes flags only; got the arguments {argv[1:]}.")
    try:
        shapes = resolve_shapes(_SHAPES.value)
    except ValueError as error:
        raise app.UsageError(f"--kernel_shapes: {error}") from None
    if _BACKEND.value not in registry.BACKENDS:
        raise app.UsageError(f"--kernel_backend must be one of {', '.join(registry.BACKENDS)}; got {_BACKEND.value!r}.")
    backend = registry.registered(_BACKEND.value)
    if _CHUNK.value is not None:
        try:
            validate_chunk_size(_CHUNK.value, None, name="--kernel_chunk", minimum=backend.min_chunk)
        except ValueError as error:
            raise app.UsageError(error) from None
    if _SWEEP.value and backend.kernels is not pallas_triton.KERNELS:
        raise app.UsageError(
            f"--kernel_sweep tries Triton launches, which backend {backend.name}'s kernels do not take: use "
            "--kernel_backend=triton (or interpret on a CPU)."
        )
    timed = tuple(LAUNCH_CANDIDATES) if _SWEEP.value else timed_kernels(backend)
    unknown = sorted(set(_NAMES.value or ()) - set(timed))
    if unknown:
        what = "--kernel_sweep sweeps" if _SWEEP.value else f"backend {backend.name} times"
        raise app.UsageError(f"--kernel_names: {what} {','.join(timed)}; got {unknown}.")
    try:
        registry.get_backend(backend.name)  # runs here
    except ValueError as error:
        raise app.UsageError(
            f"--kernel_backend={backend.name}: {error} On a CPU, --kernel_backend=interpret --kernel_shapes=tiny "
            "smoke-tests kernel_times."
        ) from None
    planned = []  # (shape, chunk, config)
    for shape in shapes:
        chunk, config = card_chunk_and_config(shape, backend.name)
        if _CHUNK.value not in (None, chunk):  # another chunk than the card's: the kernels' default launches
            chunk, config = _CHUNK.value, None
        if shape.S % chunk:
            raise app.UsageError(f"--kernel_chunk={chunk} does not divide {shape.name}'s S = {shape.S}.")
        planned.append((shape, chunk, config))
    if jax.default_backend() != "gpu":
        warning = cpu_shape_warning(shapes, "--kernel_shapes")
        if warning:
            print(warning, flush=True)
    if not _SWEEP.value:
        print(TABLE_HEADER, flush=True)
    rows = []
    for shape, chunk, config in planned:
        if _SWEEP.value:
            rows += sweep_rows(shape, chunk, _CALLS.value, backend.name, _NAMES.value)
        else:
            rows += kernel_rows(shape, chunk, _CALLS.value, backend.name, config, _NAMES.value)
        if _JSON.value:  # after each shape, so that a run cut short keeps what it timed
            with open(_JSON.value, "w") as handle:
                json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    from pallas_mlstm.__main__ import run_subcommand

    run_subcommand("kernel_times", main, sys.modules[__name__], sys.argv[1:])
