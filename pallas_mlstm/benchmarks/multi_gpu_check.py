"""Sharded `mlstm_chunkwise` on every visible GPU: correctness against one GPU, the speed of context
parallelism, and the longest sequence that trains.

    python -m pallas_mlstm.benchmarks.multi_gpu_check [--skip_timing] [--skip_length] [--json PATH] [--backend triton]

1. Correctness (backend="triton", float32 and bfloat16): h, last states and the gradients of all
   inputs with the batch, the heads, and the sequence axis (context parallel, Auto and Explicit mesh
   axes) sharded over the N GPUs (and batch x sequence for N >= 4), each against the same call on one GPU.
2. Timing, bf16, default launch config: the median of jitted calls waited for one by one, and the time
   per call of calls issued back to back (as a training loop does, without per-call dispatch latency),
   after warm-up; forward and forward+backward at `7b` (B=8, NH=8, S=8192, DHQK=256, DHHV=512) and
   `long-256k` (B=1, S=262144),
   on one GPU, sequence-sharded over the N GPUs (Auto and Explicit mesh axes), and at 7b batch-sharded.
3. Length: the longest S (a multiple of 65536) whose forward+backward fits, at B=1, NH=8, 256 / 512,
   bf16, on one GPU and sequence-sharded over N: found from the compiled programs' memory needs, then
   run once at that S. Exits non-zero when a correctness check fails.

`--backend xla --skip_timing --skip_length` with XLA_FLAGS=--xla_force_host_platform_device_count=4
smoke-tests the script on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_mlstm
from pallas_mlstm import accuracy
from pallas_mlstm.benchmarks.shapes import SHAPES
from pallas_mlstm.benchmarks.timing import median_ms, pipelined_ms

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)


def _inputs(batch, heads, seq_len, dhqk, dhhv, dtype, seed=0, initial_states=True):
    arrays = accuracy.mlstm_inputs(
        jax.random.key(seed), batch, heads, seq_len, dhqk, dhhv, dtype, with_initial=initial_states
    )
    return [x for x in arrays if x is not None]


def _place(arrays, mesh, lead_spec):
    """Sequence-shaped arrays get lead_spec on (B, NH, S); states get it on (B, NH)."""
    seq_len = arrays[0].shape[2]
    spec = lambda x: lead_spec if x.ndim >= 3 and x.shape[2] == seq_len else lead_spec[:2]
    return [jax.device_put(x, NamedSharding(mesh, P(*spec(x)))) for x in arrays]


def _value_and_grad(backend, chunk_size):
    def loss(*arrays):
        h, (c, n, _) = pallas_mlstm.mlstm_chunkwise(
            *arrays, backend=backend, chunk_size=chunk_size, return_last_states=True
        )
        h32 = h.astype(jnp.float32)
        return jnp.sum(h32 / (jnp.linalg.norm(h32, axis=-1, keepdims=True) + 1e-6)) + jnp.sum(c) + jnp.sum(n), (h, c, n)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8)), has_aux=True))


def check_correctness(devices, backend: str = "triton") -> list[dict]:
    """Sharded vs one-GPU errors for each layout and dtype."""
    count = len(devices)
    layouts = {
        "batch": ((count,), ("b",), ("b", None, None), AxisType.Auto),
        "heads": ((count,), ("h",), (None, "h", None), AxisType.Auto),
        "sequence": ((count,), ("s",), (None, None, "s"), AxisType.Auto),
        "sequence, Explicit axes": ((count,), ("s",), (None, None, "s"), AxisType.Explicit),
    }
    if count >= 4 and count % 2 == 0:
        layouts["batch x sequence"] = ((2, count // 2), ("b", "s"), ("b", None, "s"), AxisType.Auto)
    names = ("h", "c_last", "n_last", "dq", "dk", "dv", "di", "df", "dc_initial", "dn_initial", "dm_initial")
    rows = []
    for dtype in ("float32", "bfloat16"):
        arrays = _inputs(2 * count, count, 256 * count, 64, 128, jnp.dtype(dtype))
        fn = _value_and_grad(backend, chunk_size=64)
        one = [jax.device_put(x, devices[0]) for x in arrays]
        (_, ref_out), ref_grads = fn(*one)
        for layout, (mesh_shape, axis_names, lead_spec, axis_type) in layouts.items():
            mesh = Mesh(np.array(devices).reshape(mesh_shape), axis_names, axis_types=(axis_type,) * len(axis_names))
            sharded = _place(arrays, mesh, lead_spec)
            (_, out), grads = fn(*sharded)
            errors = {n: accuracy.rel_err(a, b) for n, a, b in zip(names, (*out, *grads), (*ref_out, *ref_grads))}
            same_sharding = out[0].sharding.is_equivalent_to(sharded[0].sharding, 4)
            worst = max(errors, key=errors.get)
            finite = all(np.isfinite(list(errors.values())))  # NaN: the one-GPU reference itself is not finite
            ok = errors[worst] <= accuracy.MULTI_GPU_TOLERANCE[dtype] and same_sharding and finite
            rows.append(
                dict(
                    dtype=dtype,
                    layout=layout,
                    worst=worst,
                    error=errors[worst],
                    h_sharded_like_q=same_sharding,
                    ok=bool(ok),
                    errors=errors,
                )
            )
            print(
                f"{dtype:9s} {layout:23s} worst {worst:11s} {errors[worst]:.2e}  h sharded like q: {same_sharding}  "
                f"{'PASS' if ok else 'FAIL'}",
                flush=True,
            )
    return rows


def _timed(name: str, calls: int) -> dict:
    shape = SHAPES[name]
    return dict(batch=shape.B, heads=shape.NH, seq_len=shape.S, dhqk=shape.DHQK, dhhv=shape.DHHV, calls=calls)


TIMED_SHAPES = {"7b": _timed("7b", 20), "long-256k": _timed("long-256k", 5)}
LENGTH_STEP = 65536  # the longest-S search runs over multiples of this
# the longest-S search's heads: long-256k's
LENGTH_HEADS, LENGTH_DHQK, LENGTH_DHHV = (getattr(SHAPES["long-256k"], dim) for dim in ("NH", "DHQK", "DHHV"))


def _functions(backend: str):
    """Jitted forward and forward+backward (gradients of q, k, v, i, f) of the default call on bf16 inputs."""
    forward = jax.jit(lambda *a: pallas_mlstm.mlstm_chunkwise(*a, backend=backend))
    loss = lambda *a: jnp.sum(pallas_mlstm.mlstm_chunkwise(*a, backend=backend).astype(jnp.float32))
    return forward, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _input_shapes(batch, heads, seq_len, dhqk, dhhv, sharding):
    """ShapeDtypeStructs of bf16 q, k, v and float32 gates, all with `sharding`."""
    shapes = ((batch, heads, seq_len, dhqk),) * 2 + ((batch, heads, seq_len, dhhv),)
    return [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding) for s in shapes] + [
        jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32, sharding=sharding)
    ] * 2


def _random_inputs(batch, heads, seq_len, dhqk, dhhv, sharding, seed=0):
    """bf16 q, k, v ~ N(0, 1), gates as `accuracy.mlstm_inputs` draws them, created in place with `sharding`."""
    structs = _input_shapes(batch, heads, seq_len, dhqk, dhhv, sharding)

    def draw():
        keys = jax.random.split(jax.random.key(seed), 5)
        arrays = [jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys[:3], structs)]
        return [
            *arrays,
            jax.random.normal(keys[3], structs[3].shape),
            accuracy.FORGET_GATE_SHIFT + jax.random.normal(keys[4], structs[4].shape),
        ]

    return jax.jit(draw, out_shardings=[x.sharding for x in structs])()


def _setups(devices, shape_name: str):
    """(name, sharding of q, k, v and gates) to time: one GPU, and the N GPUs sequence-sharded (Auto and Explicit
    mesh axes) and, at 7b, batch-sharded."""
    count = len(devices)
    setups = [("1 GPU", jax.sharding.SingleDeviceSharding(devices[0]))]
    for axis_type, label in ((AxisType.Auto, "Auto"), (AxisType.Explicit, "Explicit")):
        mesh = Mesh(np.array(devices), ("x",), axis_types=(axis_type,))
        setups.append((f"{count} GPUs, sequence-sharded ({label} axes)", NamedSharding(mesh, P(None, None, "x"))))
    if shape_name == "7b":
        setups.append((f"{count} GPUs, batch-sharded", NamedSharding(Mesh(np.array(devices), ("x",)), P("x"))))
    return setups


def time_context_parallel(devices, backend: str = "triton") -> list[dict]:
    """fw and fwbw of each TIMED_SHAPES shape on one GPU and sharded over all GPUs, with speed-ups against one."""
    forward, fwbw = _functions(backend)
    rows = []
    for shape_name, shape in TIMED_SHAPES.items():
        dims = {k: v for k, v in shape.items() if k != "calls"}
        base = None
        for setup, sharding in _setups(devices, shape_name):
            args = _random_inputs(**dims, sharding=sharding)
            row = dict(shape=shape_name, **dims, setup=setup)
            for mode, function in (("fw", forward), ("fwbw", fwbw)):
                row[f"{mode}_ms"] = median_ms(function, [args], shape["calls"])
                row[f"{mode}_pipelined_ms"] = pipelined_ms(function, args, shape["calls"])
            base = base or row
            for key in ("fw_ms", "fwbw_ms", "fw_pipelined_ms", "fwbw_pipelined_ms"):
                row[key.replace("_ms", "_speedup")] = base[key] / row[key]
            rows.append(row)
            del args
            print(
                f"{shape_name:9s} {setup:42s} fw {row['fw_ms']:7.2f} ms ({row['fw_speedup']:.2f}x), back to back "
                f"{row['fw_pipelined_ms']:7.2f} ({row['fw_pipelined_speedup']:.2f}x)  fwbw {row['fwbw_ms']:7.2f} ms "
                f"({row['fwbw_speedup']:.2f}x), back to back {row['fwbw_pipelined_ms']:7.2f} "
                f"({row['fwbw_pipelined_speedup']:.2f}x)",
                flush=True,
            )
    return rows


def _fits(fwbw, seq_len: int, sharding, capacity: int) -> tuple[bool, int]:
    """(whether fwbw at B=1 and seq_len fits in `capacity` bytes per device, the bytes it needs per device),
    from the compiled program's memory analysis."""
    structs = _input_shapes(1, LENGTH_HEADS, seq_len, LENGTH_DHQK, LENGTH_DHHV, sharding)
    try:
        memory = fwbw.lower(*structs).compile().memory_analysis()
    except Exception as error:  # noqa: BLE001 - a program that cannot even be compiled does not fit
        print(f"  S={seq_len}: does not compile ({type(error).__name__})", flush=True)
        return False, -1
    needed = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return needed <= capacity, needed


def longest_sequence(devices, backend: str = "triton") -> list[dict]:
    """The longest S (a multiple of LENGTH_STEP) whose fwbw fits on one GPU and sequence-sharded over all GPUs.

    Memory grows linearly with S: the compiled needs at 8 and 16 steps give the line, its crossing of the
    device's memory limit the candidate, and compiles one step either side confirm it; then one real fwbw
    runs at that S."""
    _, fwbw = _functions(backend)
    capacity = int(devices[0].memory_stats()["bytes_limit"])
    mesh = Mesh(np.array(devices), ("x",), axis_types=(AxisType.Explicit,))
    rows = []
    for setup, sharding in (
        ("1 GPU", jax.sharding.SingleDeviceSharding(devices[0])),
        (f"{len(devices)} GPUs, sequence-sharded (Explicit axes)", NamedSharding(mesh, P(None, None, "x"))),
    ):
        fits = functools.lru_cache(maxsize=None)(lambda steps: _fits(fwbw, steps * LENGTH_STEP, sharding, capacity))
        small, large = fits(8)[1], fits(16)[1]
        per_step = (large - small) / 8
        steps = max(1, int((capacity - small) / per_step) + 8)
        for _ in range(4):  # the line is exact up to the programs' fixed parts; step to the last that fits
            if not fits(steps)[0]:
                steps -= 1
            elif fits(steps + 1)[0]:
                steps += 1
            else:
                break
        while not fits(steps)[0]:
            steps -= 1
        seq_len = steps * LENGTH_STEP
        row = dict(
            setup=setup,
            B=1,
            NH=LENGTH_HEADS,
            DHQK=LENGTH_DHQK,
            DHHV=LENGTH_DHHV,
            longest_S=seq_len,
            step=LENGTH_STEP,
            bytes_needed=fits(steps)[1],
            next_step_bytes_needed=fits(steps + 1)[1],
            bytes_limit=capacity,
            bytes_per_step=per_step,
        )
        args = _random_inputs(1, LENGTH_HEADS, seq_len, LENGTH_DHQK, LENGTH_DHHV, sharding)
        row["fwbw_ms"] = median_ms(fwbw, [args], 1)  # it trains: one warm-up call and one timed
        del args
        rows.append(row)
        print(
            f"longest S that trains, {setup}: {seq_len} ({row['bytes_needed']} of {capacity} bytes per device)",
            flush=True,
        )
    rows[1]["times_one_gpu"] = rows[1]["longest_S"] / rows[0]["longest_S"]
    return rows


def main() -> None:
    """Runs the multi-GPU checks and timings the flags ask for (`--help` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip_timing", action="store_true", help="skip the timing")
    parser.add_argument("--skip_length", action="store_true", help="skip the longest-sequence search")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--backend", default="triton", choices=pallas_mlstm.BACKENDS, help="kernels to run")
    options = parser.parse_args()
    devices = jax.devices()
    if len(devices) < 2 or (options.backend == "triton" and devices[0].platform != "gpu"):
        raise SystemExit(f"needs at least 2 devices (GPUs for the triton backend); got {devices}")
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}, backend {options.backend}", flush=True)
    correctness = check_correctness(devices, options.backend)
    timing = [] if options.skip_timing else time_context_parallel(devices, options.backend)
    length = [] if options.skip_length else longest_sequence(devices, options.backend)
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(
                dict(
                    devices=len(devices),
                    device_kind=devices[0].device_kind,
                    jax=jax.__version__,
                    pallas_mlstm=pallas_mlstm.__version__,
                    date=time.strftime("%Y-%m-%d"),
                    command="python -m pallas_mlstm.benchmarks.multi_gpu_check " + " ".join(sys.argv[1:]),
                    correctness=correctness,
                    timing=timing,
                    longest_sequence=length,
                ),
                handle,
                indent=1,
            )
    failed = [row for row in correctness if not row["ok"]]
    if failed:
        print(f"\nFAILED: {[(row['dtype'], row['layout']) for row in failed]}")
        sys.exit(1)
    print("\nall sharded results match one GPU")


if __name__ == "__main__":
    main()
