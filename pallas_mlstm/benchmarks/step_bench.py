"""Decoding-step benchmark: `mlstm_recurrent_step` against mlstm_kernels' step kernels, same run, same card.

    python3 -m pallas_mlstm.benchmarks.step_bench --step_json=$OUT/step.json

At the 7b widths (NH 8, DHQK 256, DHHV 512), B = 1, 8, 64, bf16 q, k, v and float32 states: median ms of one
jitted step (states in, states out) for ours (triton), mlstm_kernels' `mlstm_recurrent_step__triton` (through
jax-triton) and `__native` (plain XLA), each checked against ours on h first; and, as the bound, the time of
reading and writing the C state once (a jitted `c + 1`). GPU only.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_mlstm
from pallas_mlstm import accuracy
from pallas_mlstm.benchmarks.timing import median_ms

_BATCHES = flags.DEFINE_list("step_batches", ["1", "8", "64"], "Batch sizes.")
_CALLS = flags.DEFINE_integer("step_calls", 100, "Timed calls per step function (median kept).")
_JSON = flags.DEFINE_string("step_json", None, "Write the records to this JSON file.")
NH, DHQK, DHHV = 8, 256, 512


def _inputs(batch: int):
    keys = jax.random.split(jax.random.PRNGKey(batch), 8)
    q, k = (jax.random.normal(key, (batch, NH, DHQK), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (batch, NH, DHHV), jnp.bfloat16)
    i = jax.random.normal(keys[3], (batch, NH, 1), jnp.float32)
    f = 3.0 + jax.random.normal(keys[4], (batch, NH, 1), jnp.float32)
    c = jax.random.normal(keys[5], (batch, NH, DHQK, DHHV), jnp.float32)
    n = jax.random.normal(keys[6], (batch, NH, DHQK), jnp.float32)
    m = jnp.zeros((batch, NH, 1), jnp.float32)
    return q, k, v, i, f, c, n, m


def _steps():
    """name -> step function (q, k, v, i, f, c, n, m) -> (h, (c, n, m)); peers only where installed."""
    steps = {"triton": lambda *a: pallas_mlstm.mlstm_recurrent_step(*a, backend="triton")}
    try:
        os.environ.setdefault("DISABLE_LLVM_OPT", "1")  # Triton 3.6's LLVM aborts on the upstream kernels otherwise
        from mlstm_kernels.jax.recurrent.native_step import mlstm_recurrent_step__native
        from mlstm_kernels.jax.recurrent.triton_step import mlstm_recurrent_step__triton

        steps["mk_step_triton"] = mlstm_recurrent_step__triton
        steps["mk_step_native"] = mlstm_recurrent_step__native
    except ImportError as error:
        print(f"mlstm_kernels peers skipped: {error}", flush=True)
    return steps


def main(argv) -> None:
    del argv
    if jax.default_backend() != "gpu":
        raise app.UsageError("step_bench needs a GPU (the triton backend).")
    records = []
    for batch in map(int, _BATCHES.value):
        args = _inputs(batch)
        state_bytes = args[5].size * 4
        reference_h = None
        common = dict(
            B=batch,
            NH=NH,
            DHQK=DHQK,
            DHHV=DHHV,
            card=jax.devices()[0].device_kind,
            jax_version=jax.__version__,
            calls=_CALLS.value,
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            command="python -m pallas_mlstm.benchmarks.step_bench " + " ".join(sys.argv[1:]),
        )
        bound = jax.jit(lambda c: c + 1.0)
        bound_ms = median_ms(bound, [(args[5],)], _CALLS.value)
        records.append(
            dict(
                impl="state read+write (c + 1)",
                median_ms=bound_ms,
                state_bytes=state_bytes,
                gbytes_per_s=2 * state_bytes / bound_ms / 1e6,
                **common,
            )
        )
        for name, step in _steps().items():
            fn = jax.jit(step)
            h = fn(*args)[0].astype(jnp.float32)
            reference_h = h if reference_h is None else reference_h
            ms = median_ms(fn, [args], _CALLS.value)
            records.append(
                dict(
                    impl=name,
                    median_ms=ms,
                    rel_err_vs_ours=accuracy.rel_err(h, reference_h),
                    over_state_read_write=ms / bound_ms,
                    **common,
                )
            )
        for record in records[-(len(_steps()) + 1) :]:
            print(
                f"B={batch:<3} {record['impl']:<26} {record['median_ms']:8.4f} ms"
                + (
                    f"  x{record['over_state_read_write']:.2f} of the state read+write, rel err vs ours "
                    f"{record['rel_err_vs_ours']:.1e}"
                    if "over_state_read_write" in record
                    else f"  ({record['gbytes_per_s']:.0f} GB/s)"
                ),
                flush=True,
            )
        if _JSON.value:
            with open(_JSON.value, "w") as handle:
                json.dump(records, handle, indent=1)


if __name__ == "__main__":
    app.run(main)
