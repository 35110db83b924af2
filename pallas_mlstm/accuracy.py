"""How accurate is accurate enough: the relative error, the random mLSTM inputs it is measured on, the bounds
it must stay under, and the oracles it is measured against.

One home for the tests, `python -m pallas_mlstm check`, the bench / tune and the multi-GPU check:

- `rel_err(actual, expected)`: ‖actual − expected‖ / ‖expected‖ in float64.
- `mlstm_inputs(...)`: random q, k, v, i, f (and initial states); `kernel_and_oracle_inputs(...)`: the same
  values as the kernels get them and, exactly, in float64 for the oracle.
- The bounds, one named table per comparison (below). Each is a ceiling the computation meets with margin
  on every tested shape: tightening one is a decision, loosening one hides regressions.
- `load_oracles()`: the float64 oracles of the source tree's top-level `reference` package, which the
  wheel does not ship; a clear one-line `absl.app.UsageError` where it is missing.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

# --- Bounds on rel_err, per comparison. Dtype keys are names ("float32"): `jnp.dtype(dtype).name`. ---

# mlstm_chunkwise vs the float64 recurrent oracle (kernel gradient semantics), run on exactly the kernels'
# input values, per (backend, dtype of q, k, v): (h and last states, every gradient). tests/test_api.py;
# the float32 row also bounds tests/test_resets.py's infinite gates against the float64 unstabilised cell.
# The mosaic backends take the bounds of the Pallas backend they stand beside (pallas_mlstm.mosaic_gpu).
_SAME_BOUNDS_AS = {"mosaic": "triton", "mosaic_interpret": "interpret"}


def _with_mosaic_rows(bounds: dict) -> dict:
    """`bounds` (keyed by (backend, dtype)) with a row for each mosaic backend and dtype its peer has."""
    extra = {
        (mosaic, dtype): bounds[peer, dtype]
        for mosaic, peer in _SAME_BOUNDS_AS.items()
        for b, dtype in bounds
        if b == peer
    }
    return {**extra, **bounds}


ORACLE_TOLERANCE = _with_mosaic_rows(
    {
        ("xla", "float32"): (1e-5, 1e-5),
        ("interpret", "float32"): (1e-5, 1e-5),
        ("triton", "float32"): (1e-4, 1e-4),
        ("triton", "bfloat16"): (1e-2, 2e-2),
        ("triton", "float16"): (1e-2, 2e-2),
    }
)
# `python -m pallas_mlstm check` vs the same oracle, per input dtype whatever the backend: (h, worst gradient);
# the loosest backend's bound of ORACLE_TOLERANCE (triton's). Its keys are the dtypes `check` accepts.
CHECK_TOLERANCE = {dtype: ORACLE_TOLERANCE["triton", dtype] for dtype in ("float32", "bfloat16", "float16")}
# Each Pallas kernel vs its jnp twin (the xla backend's kernel) on identical inputs, per (backend, dtype):
# every output. tests/test_kernels.py.
KERNEL_TWIN_TOLERANCE = _with_mosaic_rows(
    {
        ("interpret", "float32"): 1e-5,
        ("triton", "float32"): 1e-4,
        ("triton", "bfloat16"): 1e-2,
        ("triton", "float16"): 1e-2,
    }
)
# triton on bfloat16 q, k, v vs the xla backend on the same values in float32, at the benchmark shapes:
# (h, each gradient). tests/test_gpu.py.
GPU_SHAPES_TOLERANCE = (1e-2, 2e-2)
# The bench and tune gate: a bfloat16 forward output vs the float32 reference (and, in tune, a candidate
# config's h and gradients vs the start config's); a run above it is refused, not timed.
BENCH_TOLERANCE = 2e-2
# Sharded vs one device, float32, on 4 CPU devices (tests/test_sharding.py). Where float32 itself is noisier
# than that, the sharded result passes when it meets ORACLE_TOLERANCE's xla float32 bound against float64.
SHARDED_TOLERANCE = 1e-6
# benchmarks/multi_gpu_check.py: sharded vs the same call on one GPU, per dtype, h, last states and gradients.
# Batch / head shards run the same kernels on fewer rows; a sequence split adds the state combine and runs
# each piece from a combined (bf16-rounded in the matmuls) state.
MULTI_GPU_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}

ORACLES_MISSING = (
    "this command needs the float64 oracles of the source tree's reference/ package, which the installed "
    "wheel does not ship: run it from a clone of the repository (`pip install -e .` there)."
)


def rel_err(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius norms over all elements), computed in float64.

    Any array-likes of any float dtype (bfloat16 too) and of one shape (no broadcasting: ValueError). When
    `actual` lives on an accelerator it is computed there (sharded arrays too; `expected` moves to `actual`'s
    devices first), so that large outputs are not copied to the host; otherwise in NumPy, which compiles
    nothing. Edge cases, chosen so that only a meaningful error can pass a `<= bound` test:
    - a NaN or inf in `expected` gives NaN (nothing to measure against; NaN fails every bound);
    - a NaN or inf in `actual` gives inf;
    - `expected` all zeros (or empty) gives 0.0 when `actual` is all zeros too, else inf.
    """
    if _on_accelerator(actual):
        with jax.enable_x64(True):
            expected = jnp.asarray(expected)
            if actual.shape == expected.shape and expected.sharding != actual.sharding:
                expected = jax.device_put(expected, actual.sharding)
            _check_shapes(actual, expected)
            terms = jax.device_get(_device_error_terms(actual, expected))
    else:
        actual, expected = _host_float64(actual), _host_float64(expected)
        _check_shapes(actual, expected)
        terms = _error_terms(np, actual, expected)
    actual_finite, expected_finite, diff_norm, expected_norm, actual_nonzero = (np.asarray(t).item() for t in terms)
    if not expected_finite:
        return float("nan")
    if not actual_finite:
        return float("inf")
    if expected_norm == 0.0:
        return float("inf") if actual_nonzero else 0.0
    return diff_norm / expected_norm


def _on_accelerator(x) -> bool:
    return isinstance(x, jax.Array) and any(device.platform != "cpu" for device in x.devices())


def _check_shapes(actual, expected) -> None:
    if actual.shape != expected.shape:
        raise ValueError(f"rel_err compares arrays of one shape; got {actual.shape} and {expected.shape}.")


def _host_float64(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":  # bfloat16 (an ml_dtypes type), ints, bools: through float32, which holds them
        x = x.astype(np.float32)
    return x.astype(np.float64)


def _error_terms(xp, actual, expected):
    """(actual finite, expected finite, ‖actual − expected‖, ‖expected‖, actual non-zero) in float64, with
    `xp` NumPy or jax.numpy."""
    actual, expected = actual.astype(xp.float64), expected.astype(xp.float64)
    return (
        xp.all(xp.isfinite(actual)),
        xp.all(xp.isfinite(expected)),
        xp.linalg.norm(actual - expected),
        xp.linalg.norm(expected),
        xp.any(actual != 0),
    )


_device_error_terms = jax.jit(functools.partial(_error_terms, jnp))  # call under enable_x64 (float64)
# The random forget gates' mean pre-activation: σ(3) ≈ 0.95, a memory of about 20 steps, never zeros.
FORGET_GATE_SHIFT = 3.0


def mlstm_inputs(
    key,
    batch,
    heads,
    seq_len,
    dhqk,
    dhhv,
    dtype=jnp.float32,
    *,
    with_initial=False,
    igate_shift=0.0,
    fgate_shift=FORGET_GATE_SHIFT,
    gate_scale=1.0,
    per_array=False,
):
    """Random (q, k, v, i, f, c_initial, n_initial, m_initial); the states are None unless `with_initial`.

    q, k, v ~ N(0, 1) in `dtype`, shapes (B, NH, S, DHQK) and (B, NH, S, DHHV); the gates and the states in
    `dtype` promoted to at least float32: i ~ igate_shift + gate_scale·N(0, 1), f ~ fgate_shift +
    gate_scale·N(0, 1) (B, NH, S) (by default forget gates around +3: a memory of ~20 steps, never zeros),
    c_initial (B, NH, DHQK, DHHV), n_initial (B, NH, DHQK) and m_initial (B, NH) ~ N(0, 1). For float64,
    call under `jax.enable_x64(True)`. One compiled program per shapes and dtypes: one draw for all the arrays,
    split (each draw costs about half a second of compile on a CPU); `per_array=True` draws each array apart,
    so that the program holds no memory beyond its outputs (for a peak-memory measurement after it). The two
    give different values for the same key.
    """
    gate_dtype = jnp.promote_types(dtype, jnp.float32)
    shapes = [(batch, heads, seq_len, dhqk), (batch, heads, seq_len, dhqk), (batch, heads, seq_len, dhhv)]
    shapes += [(batch, heads, seq_len)] * 2 + (
        [(batch, heads, dhqk, dhhv), (batch, heads, dhqk), (batch, heads)] * with_initial
    )
    gates = (igate_shift, fgate_shift, gate_scale)
    drawn = _normal_draws(key, gates, tuple(shapes), jnp.dtype(gate_dtype), jnp.dtype(dtype), bool(per_array))
    q, k, v, i, f, *states = drawn
    return (q, k, v, i, f, *(states or (None, None, None)))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _normal_draws(key, gates, shapes, gate_dtype, dtype, per_array):
    """`mlstm_inputs`' arrays in one compiled program."""
    if per_array:
        keys = jax.random.split(key, len(shapes))
        q, k, v, i, f, *states = (jax.random.normal(part, shape, gate_dtype) for part, shape in zip(keys, shapes))
    else:
        sizes = [math.prod(shape) for shape in shapes]
        flat = jnp.split(jax.random.normal(key, (sum(sizes),), gate_dtype), list(itertools.accumulate(sizes))[:-1])
        q, k, v, i, f, *states = (x.reshape(shape) for x, shape in zip(flat, shapes))
    igate_shift, fgate_shift, gate_scale = gates
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return (q, k, v, igate_shift + gate_scale * i, fgate_shift + gate_scale * f, *states)


def kernel_and_oracle_inputs(inputs64, dtype):
    """(kernel inputs, oracle inputs) from float64 `mlstm_inputs`: q, k, v in `dtype` and the rest in float32
    for the kernels, and exactly those values in float64 for the oracle, so that errors measure the
    computation, not the rounding of the inputs. None entries stay None. Call under `jax.enable_x64(True)`."""
    cast = lambda arrays, to: tuple(None if x is None else x.astype(to) for x in arrays)
    kernel_inputs = (*cast(inputs64[:3], dtype), *cast(inputs64[3:], jnp.float32))
    return kernel_inputs, cast(kernel_inputs, jnp.float64)


def load_oracles():
    """The source tree's `reference` package (mlstm_recurrent, mlstm_parallel: the float64 oracles).

    Imported on demand, never at module import, so that commands which do not compare against the oracles
    (and every `--help`) run from an installed wheel, which ships no `reference`. Raises
    `absl.app.UsageError` (one line and exit 2 under `python -m pallas_mlstm`) where it is missing, or where
    the importable `reference` is some other package.
    """
    try:
        import reference
    except ModuleNotFoundError as error:
        if error.name != "reference":  # the oracles are there but one of their own imports fails: show it
            raise
        raise app.UsageError(ORACLES_MISSING) from None
    if not hasattr(reference, "mlstm_recurrent"):
        raise app.UsageError(
            f"the importable `reference` ({getattr(reference, '__file__', None)}) is not this "
            f"project's; {ORACLES_MISSING}"
        )
    return reference
