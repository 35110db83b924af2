"""Decoding-step benchmark: `mlstm_recurrent_step` against mlstm_kernels' step kernels, same run, same card.

    python -m pallas_mlstm step_bench --step_json=$OUT/step.json

At the 7b widths (NH 8, DHQK 256, DHHV 512), B = 1, 8, 64, bf16 q, k, v and float32 states: median ms of one
jitted step (states in, states out) for ours (triton), mlstm_kernels' `mlstm_recurrent_step__triton` (through
jax-triton) and `__native` (plain XLA), each checked against ours on h first; and, as the bound, the time of
reading and writing the C state once (a jitted `c + 1`). NVIDIA GPU only.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_mlstm
from pallas_mlstm import accuracy, registry
from pallas_mlstm.benchmarks import impls
from pallas_mlstm.benchmarks.shapes import SHAPES
from pallas_mlstm.benchmarks.timing import median_ms

_BATCHES = flags.DEFINE_list("step_batches", ["1", "8", "64"], "Batch sizes: positive integers.")
_CALLS = flags.DEFINE_integer("step_calls", 100, "Timed calls per step function (median kept).", lower_bound=1)
_JSON = flags.DEFINE_string("step_json", None, "Write the records to this JSON file.")
NH, DHQK, DHHV = (getattr(SHAPES["7b"], dim) for dim in ("NH", "DHQK", "DHHV"))  # the 7b widths


def _inputs(batch: int):
    keys = jax.random.split(jax.random.PRNGKey(batch), 8)
    q, k = (jax.random.normal(key, (batch, NH, DHQK), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (batch, NH, DHHV), jnp.bfloat16)
    i = jax.random.normal(keys[3], (batch, NH, 1), jnp.float32)
    f = accuracy.FORGET_GATE_SHIFT + jax.random.normal(keys[4], (batch, NH, 1), jnp.float32)
    c = jax.random.normal(keys[5], (batch, NH, DHQK, DHHV), jnp.float32)
    n = jax.random.normal(keys[6], (batch, NH, DHQK), jnp.float32)
    m = jnp.zeros((batch, NH, 1), jnp.float32)
    return q, k, v, i, f, c, n, m


def _steps():
    """name -> step function (q, k, v, i, f, c, n, m) -> (h, (c, n, m)); peers only where installed."""
    steps = {"triton": lambda *a: pallas_mlstm.mlstm_recurrent_step(*a, backend="triton")}
    try:
        impls.disable_llvm_opt()
        from mlstm_kernels.jax.recurrent.native_step import mlstm_recurrent_step__native
        from mlstm_kernels.jax.recurrent.triton_step import mlstm_recurrent_step__triton

        steps["mk_step_triton"] = mlstm_recurrent_step__triton
        steps["mk_step_native"] = mlstm_recurrent_step__native
    except ImportError as error:
        print(f"mlstm_kernels peers skipped: {error}", flush=True)
    return steps


def _command_line() -> str:
    """This run's command line, as `python -m pallas_mlstm step_bench FLAGS` however it was started."""
    given = sys.argv[2:] if sys.argv[1:2] == ["step_bench"] else sys.argv[1:]
    return "python -m pallas_mlstm step_bench " + shlex.join(given)


def main(argv) -> None:
    """The `step_bench` subcommand: time the steps at each batch size; print them; write JSON."""
    if len(argv) > 1:
        raise app.UsageError(f"step_bench takes flags only; got the arguments {argv[1:]}.")
    if not all(batch.isdecimal() and int(batch) > 0 for batch in _BATCHES.value):
        raise app.UsageError(f"--step_batches must be positive integers (e.g. 1,8); got {','.join(_BATCHES.value)!r}.")
    if not registry.registered("triton").available():
        raise app.UsageError(
            "step_bench times the Pallas step kernel (backend triton) on an NVIDIA GPU, and JAX's platform here is "
            f"{jax.default_backend()}; on a CPU, `python -m pallas_mlstm check` checks the kernels and "
            "`python -m pallas_mlstm bench` smoke-tests the timing."
        )
    steps = _steps()
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
            command=_command_line(),
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
        for name, step in steps.items():
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
        for record in records[-(len(steps) + 1) :]:
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
    from pallas_mlstm.__main__ import run_subcommand

    run_subcommand("step_bench", main, sys.modules[__name__], sys.argv[1:])
