"""Random inputs, error measures and losses shared by the tests."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from tests import flags as test_flags


def case_key(*parts) -> jax.Array:
    """A PRNG key from --seed and a description of the test case (fresh inputs per case)."""
    return jax.random.PRNGKey(test_flags.SEED.value * 1_000_003 + zlib.crc32(repr(parts).encode()))


def mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, dtype=jnp.float32, *, with_initial=False,
                 igate_shift=0.0, fgate_shift=3.0, gate_scale=1.0):
    """q, k, v, i, f and (optionally) c/n/m initial states; forget gates around +3, never zeros."""
    keys = jax.random.split(key, 8)
    q = jax.random.normal(keys[0], (batch, heads, seq_len, dhqk), dtype)
    k = jax.random.normal(keys[1], (batch, heads, seq_len, dhqk), dtype)
    v = jax.random.normal(keys[2], (batch, heads, seq_len, dhhv), dtype)
    gate_dtype = jnp.promote_types(dtype, jnp.float32)
    i = igate_shift + gate_scale * jax.random.normal(keys[3], (batch, heads, seq_len), gate_dtype)
    f = fgate_shift + gate_scale * jax.random.normal(keys[4], (batch, heads, seq_len), gate_dtype)
    if not with_initial:
        return (q, k, v, i, f, None, None, None)
    c0 = jax.random.normal(keys[5], (batch, heads, dhqk, dhhv), gate_dtype)
    n0 = jax.random.normal(keys[6], (batch, heads, dhqk), gate_dtype)
    m0 = jax.random.normal(keys[7], (batch, heads), gate_dtype)
    return (q, k, v, i, f, c0, n0, m0)


def rel_err(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaN or inf in actual gives inf)."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32) if actual.dtype == jnp.bfloat16 else actual, np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32) if expected.dtype == jnp.bfloat16 else expected,
                          np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def to_dtype(arrays, dtype):
    """Casts every non-None array to dtype."""
    return tuple(None if x is None else x.astype(dtype) for x in arrays)


def kernel_and_oracle_inputs(inputs64, dtype):
    """q, k, v in `dtype` and the rest in float32 for the kernels, and exactly those values in float64 for the
    oracle (so that errors measure the computation, not the rounding of the inputs). Call under enable_x64."""
    kernel_inputs = (*to_dtype(inputs64[:3], dtype), *to_dtype(inputs64[3:], jnp.float32))
    return kernel_inputs, to_dtype(kernel_inputs, jnp.float64)


def _weights(key, like):
    """Fixed random loss weights shaped like `like`, the same values whatever its dtype."""
    return jax.random.normal(key, like.shape, jnp.float32).astype(like.dtype)


def scale_blind_loss(fn, weights_key, with_last_state_loss: bool):
    """Σ w·h/‖h‖ per step (+ Σ w_c·c_last/‖c_last‖): blind to positive per-step rescaling of h and c_last."""

    def loss(*args):
        out = fn(*args)
        h, last = out if with_last_state_loss else (out, None)
        h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
        w = _weights(weights_key, h)
        total = jnp.sum(w * h / jnp.linalg.norm(h, axis=-1, keepdims=True))
        if last is not None:
            c_last = last[0]
            wc = _weights(jax.random.fold_in(weights_key, 1), c_last)
            total += jnp.sum(wc * c_last / jnp.linalg.norm(c_last, axis=(-2, -1), keepdims=True))
        return total

    return loss


def plain_loss(fn, weights_key, with_last_states: bool):
    """Σ w·h (+ Σ w_c·c_last + Σ w_n·n_last): not scale-blind, for the kernel-semantics oracle."""

    def loss(*args):
        out = fn(*args)
        h, last = out if with_last_states else (out, None)
        h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
        total = jnp.sum(_weights(weights_key, h) * h)
        if last is not None:
            c_last, n_last, _ = last
            total += jnp.sum(_weights(jax.random.fold_in(weights_key, 1), c_last) * c_last)
            total += jnp.sum(_weights(jax.random.fold_in(weights_key, 2), n_last) * n_last)
        return total

    return loss
