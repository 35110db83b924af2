"""Sharded `mlstm_chunkwise` on every visible GPU: correctness against one GPU, and the 7b timing.

    python -m pallas_mlstm.benchmarks.multi_gpu_check [--skip_timing] [--json PATH] [--backend triton]

1. Correctness (backend="triton", float32 and bfloat16): h, last states and the gradients of all
   inputs with the batch, the heads, and the sequence axis (context parallel) sharded over the N
   GPUs (and batch x sequence for N >= 4), each against the same call on one GPU.
2. Timing: the `7b` shape (B=8, NH=8, S=8192, DHQK=256, DHHV=512, bf16), forward and
   forward+backward, batch-sharded over N GPUs and sequence-sharded over N GPUs, vs one GPU
   (median of 20 jitted calls after warm-up). Exits non-zero when a correctness check fails.

`--backend xla --skip_timing` with XLA_FLAGS=--xla_force_host_platform_device_count=4 smoke-tests the
script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_mlstm
from pallas_mlstm import accuracy
from pallas_mlstm.benchmarks.timing import median_ms

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)

SHAPE_7B = dict(batch=8, heads=8, seq_len=8192, dhqk=256, dhhv=512)


def _inputs(batch, heads, seq_len, dhqk, dhhv, dtype, seed=0, initial_states=True):
    arrays = accuracy.mlstm_inputs(jax.random.key(seed), batch, heads, seq_len, dhqk, dhhv, dtype,
                                   with_initial=initial_states)
    return [x for x in arrays if x is not None]


def _place(arrays, mesh, lead_spec):
    """Sequence-shaped arrays get lead_spec on (B, NH, S); states get it on (B, NH)."""
    seq_len = arrays[0].shape[2]
    spec = lambda x: lead_spec if x.ndim >= 3 and x.shape[2] == seq_len else lead_spec[:2]
    return [jax.device_put(x, NamedSharding(mesh, P(*spec(x)))) for x in arrays]


def _value_and_grad(backend, chunk_size):
    def loss(*arrays):
        h, (c, n, _) = pallas_mlstm.mlstm_chunkwise(*arrays, backend=backend, chunk_size=chunk_size,
                                                    return_last_states=True)
        h32 = h.astype(jnp.float32)
        return jnp.sum(h32 / (jnp.linalg.norm(h32, axis=-1, keepdims=True) + 1e-6)) + jnp.sum(c) + jnp.sum(n), (h, c, n)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8)), has_aux=True))


def check_correctness(devices, backend: str = "triton") -> list[dict]:
    """Sharded vs one-GPU errors for each layout and dtype."""
    count = len(devices)
    layouts = {"batch": ((count,), ("b",), ("b", None, None)),
               "heads": ((count,), ("h",), (None, "h", None)),
               "sequence": ((count,), ("s",), (None, None, "s"))}
    if count >= 4 and count % 2 == 0:
        layouts["batch x sequence"] = ((2, count // 2), ("b", "s"), ("b", None, "s"))
    names = ("h", "c_last", "n_last", "dq", "dk", "dv", "di", "df", "dc_initial", "dn_initial", "dm_initial")
    rows = []
    for dtype in ("float32", "bfloat16"):
        arrays = _inputs(2 * count, count, 256 * count, 64, 128, jnp.dtype(dtype))
        fn = _value_and_grad(backend, chunk_size=64)
        one = [jax.device_put(x, devices[0]) for x in arrays]
        (_, ref_out), ref_grads = fn(*one)
        for layout, (mesh_shape, axis_names, lead_spec) in layouts.items():
            mesh = Mesh(np.array(devices).reshape(mesh_shape), axis_names)
            sharded = _place(arrays, mesh, lead_spec)
            (_, out), grads = fn(*sharded)
            errors = {n: accuracy.rel_err(a, b) for n, a, b in zip(names, (*out, *grads), (*ref_out, *ref_grads))}
            same_sharding = out[0].sharding.is_equivalent_to(sharded[0].sharding, 4)
            worst = max(errors, key=errors.get)
            finite = all(np.isfinite(list(errors.values())))  # NaN: the one-GPU reference itself is not finite
            ok = errors[worst] <= accuracy.MULTI_GPU_TOLERANCE[dtype] and same_sharding and finite
            rows.append(dict(dtype=dtype, layout=layout, worst=worst, error=errors[worst], h_sharded_like_q=same_sharding,
                             ok=bool(ok), errors=errors))
            print(f"{dtype:9s} {layout:17s} worst {worst:11s} {errors[worst]:.2e}  h sharded like q: {same_sharding}  "
                  f"{'PASS' if ok else 'FAIL'}", flush=True)
    return rows


def time_7b(devices, backend: str = "triton") -> list[dict]:
    """fw and fwbw of the 7b shape on one GPU, batch-sharded and sequence-sharded over all GPUs."""
    arrays = _inputs(**SHAPE_7B, dtype=jnp.bfloat16, initial_states=False)
    forward = jax.jit(lambda *a: pallas_mlstm.mlstm_chunkwise(*a, backend=backend, chunk_size=128))
    loss = lambda *a: jnp.sum(pallas_mlstm.mlstm_chunkwise(*a, backend=backend, chunk_size=128).astype(jnp.float32))
    fwbw = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    count = len(devices)
    mesh = Mesh(np.array(devices), ("x",))
    setups = [("1 GPU", [jax.device_put(x, devices[0]) for x in arrays])]
    for layout, dim, lead_spec in (("batch", "batch", ("x", None, None)), ("sequence", "seq_len", (None, None, "x"))):
        if SHAPE_7B[dim] % count == 0:
            setups.append((f"{count} GPUs, {layout}-sharded", _place(arrays, mesh, lead_spec)))
    rows = []
    for name, args in setups:
        rows.append(dict(setup=name, fw_ms=median_ms(forward, [args], 20), fwbw_ms=median_ms(fwbw, [args], 20)))
        print(f"timed {name}", flush=True)
    base = rows[0]
    print(f"\n7b shape {SHAPE_7B}, bf16, chunk 128, median of 20 ({devices[0].device_kind})")
    print("| setup | fw ms | fwbw ms | fw speed-up | fwbw speed-up |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setup']} | {row['fw_ms']:.2f} | {row['fwbw_ms']:.2f} | {base['fw_ms'] / row['fw_ms']:.2f}x "
              f"| {base['fwbw_ms'] / row['fwbw_ms']:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip_timing", action="store_true", help="only check correctness")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--backend", default="triton", choices=pallas_mlstm.BACKENDS, help="kernels to run")
    options = parser.parse_args()
    devices = jax.devices()
    if len(devices) < 2 or (options.backend == "triton" and devices[0].platform != "gpu"):
        raise SystemExit(f"needs at least 2 devices (GPUs for the triton backend); got {devices}")
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}, backend {options.backend}", flush=True)
    correctness = check_correctness(devices, options.backend)
    timing = [] if options.skip_timing else time_7b(devices, options.backend)
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(dict(devices=len(devices), device_kind=devices[0].device_kind, jax=jax.__version__,
                           date=time.strftime("%Y-%m-%d"), correctness=correctness, timing_7b=timing), handle, indent=1)
    failed = [row for row in correctness if not row["ok"]]
    if failed:
        print(f"\nFAILED: {[(row['dtype'], row['layout']) for row in failed]}")
        sys.exit(1)
    print("\nall sharded results match one GPU")


if __name__ == "__main__":
    main()
