"""Per-kernel time, work and traffic of the triton backend at a benchmark shape (where the time goes).

    PYTHONPATH=. python3 -m pallas_mlstm.benchmarks.kernel_times --kernel_shapes=7b --kernel_chunk=128

For each of the six kernels (and the gate preprocessing): median ms, the matmul FLOPs it must do (causal
tiles counted half), the bytes of its inputs and outputs (each moved once at least), and what those give
per second. GPU only; bf16 inputs as in the bench.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_mlstm.backend
import reference
from pallas_mlstm.benchmarks.shapes import resolve_shapes
from pallas_mlstm.benchmarks.timing import median_ms

_SHAPES = flags.DEFINE_list("kernel_shapes", ["7b"], "Named shapes (pallas_mlstm/benchmarks/shapes.py).")
_CHUNK = flags.DEFINE_integer("kernel_chunk", 128, "Chunk size.")
_CALLS = flags.DEFINE_integer("kernel_calls", 20, "Timed calls per kernel (median kept).")
_JSON = flags.DEFINE_string("kernel_json", None, "Write the rows to this JSON file.")
_INTERPRET = flags.DEFINE_bool("kernel_interpret", False, "Run the Pallas interpreter (CPU smoke test; times mean nothing).")


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kernel_rows(shape, chunk: int, calls: int, interpret: bool = False) -> list[dict]:
    """Times each kernel on inputs chained through the kernels themselves."""
    B, NH, S, DK, DV = shape.B, shape.NH, shape.S, shape.DHQK, shape.DHHV
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k = (jax.random.normal(key, (B, NH, S, DK), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (B, NH, S, DV), jnp.bfloat16)
    i = jax.random.normal(keys[3], (B, NH, S), jnp.float32)
    f = 3.0 + jax.random.normal(keys[4], (B, NH, S), jnp.float32)
    dh = jax.random.normal(keys[5], (B, NH, S, DV), jnp.bfloat16)
    p = pallas_mlstm.backend.kernel_set("interpret" if interpret else "triton")
    gates = jax.jit(lambda i, f: reference.compute_chunkwise_log_gates_vecB_vecA(i, f, chunk))
    fw_c = jax.jit(lambda k, v, i, f: p.recurrent_fw_C(k, v, f, i, chunk_size=chunk))
    fw_h = jax.jit(lambda q, k, v, i, f, c, n, m: p.parallel_fw_Hintra(
        q, k, v, i, f, c, n, m, chunk_size=chunk, output_dtype=jnp.bfloat16))
    states = fw_c(k, v, i, f)
    _, n_out, m_out = fw_h(q, k, v, i, f, *states)
    bw_c = jax.jit(lambda q, f, m_all, m_out, dh, n_out, c: p.recurrent_bw_dC(
        q, f, m_all, m_out, dh, n_out, chunk_size=chunk, matC_states=c))
    dc_states, _ = bw_c(q, f, states[2], m_out, dh, n_out, states[0])
    vec_b, vec_a = gates(i, f)
    bw_args = (q, k, v, i, vec_b, vec_a, *states, n_out, m_out, dh, dc_states)
    bw = {name: jax.jit(lambda *a, fn=getattr(p, f"parallel_bw_{name}"), rows=name != "dV":
                        fn(*a, chunk_size=chunk, output_dtype=jnp.bfloat16,
                           **(dict(return_row_dots=True) if rows else {})))
          for name in ("dQ", "dK", "dV")}

    tokens, half_chunk = B * NH * S, chunk / 2  # causal: on average half a chunk of keys per query
    inter = 2 * tokens * DK * DV  # one (L x DK) x (DK x DV)-sized product per chunk and token
    intra_qk, intra_v = 2 * tokens * half_chunk * DK, 2 * tokens * half_chunk * DV
    plan = [
        ("gates (vecB, vecA)", gates, (i, f), 0),
        ("recurrent_fw_C", fw_c, (k, v, i, f), inter),
        ("parallel_fw_Hintra", fw_h, (q, k, v, i, f, *states), inter + intra_qk + intra_v),
        ("recurrent_bw_dC", bw_c, (q, f, states[2], m_out, dh, n_out, states[0]), inter),
        ("parallel_bw_dQ", bw["dQ"], bw_args, inter + intra_v + intra_qk),
        ("parallel_bw_dK", bw["dK"], bw_args, inter + intra_v + intra_qk),
        ("parallel_bw_dV", bw["dV"], bw_args, inter + intra_qk + intra_v),
    ]
    rows = []
    for name, fn, args, flops in plan:
        ms = median_ms(fn, [args], calls)
        out = fn(*args)
        # arguments + outputs: an upper bound on what an ideal kernel moves (some arguments go unread)
        rows.append(dict(shape=shape.name, chunk=chunk, kernel=name, ms=ms, tflop=flops / 1e12,
                         gbytes=(_nbytes(out) + _nbytes(args)) / 1e9, card=jax.devices()[0].device_kind,
                         jax_version=jax.__version__))
    return rows


def main(argv) -> None:
    del argv
    if jax.default_backend() != "gpu" and not _INTERPRET.value:
        raise ValueError("kernel_times needs a GPU (the triton backend), or --kernel_interpret for a CPU smoke test.")
    rows = []
    for shape in resolve_shapes(_SHAPES.value):
        rows += kernel_rows(shape, _CHUNK.value, _CALLS.value, _INTERPRET.value)
    print(f"{'shape':<12} {'kernel':<20} {'ms':>8} {'TFLOP':>7} {'TFLOP/s':>8} {'GB in+out':>10} {'GB/s':>7}")
    for row in rows:
        rate = row["tflop"] / row["ms"] * 1e3 if row["tflop"] else 0.0
        print(f"{row['shape']:<12} {row['kernel']:<20} {row['ms']:>8.3f} {row['tflop']:>7.3f} {rate:>8.1f} "
              f"{row['gbytes']:>10.2f} {row['gbytes'] / row['ms'] * 1e3:>7.0f}")
    if _JSON.value:
        with open(_JSON.value, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    app.run(main)
