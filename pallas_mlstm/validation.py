"""Array input checks shared by the oracles and the public API: `ValueError`s that say how to fix the call.

The rules for the non-array options live in pallas_mlstm/plan.py."""

from __future__ import annotations

import jax.numpy as jnp


def _shape_of(x):
    return tuple(getattr(x, "shape", ()))


def _check_float(name, x):
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise ValueError(
            f"{name} must be an array (a jax.Array or numpy.ndarray of floats); got a "
            f"{type(x).__name__}: pass jnp.asarray({name})."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or float64); got dtype {dtype}."
        )


def validate_mlstm_inputs(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None):
    """Checks ranks, shapes and dtypes of the mLSTM inputs; returns (B, NH, S, DHQK, DHHV)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        _check_float(name, x)
    if len(_shape_of(q)) != 4:
        raise ValueError(f"q must have rank 4, (B, NH, S, DHQK); got shape {_shape_of(q)}.")
    batch, heads, seq_len, dhqk = _shape_of(q)
    if _shape_of(k) != _shape_of(q):
        raise ValueError(f"k must have the shape of q, {_shape_of(q)}; got {_shape_of(k)}.")
    if len(_shape_of(v)) != 4 or _shape_of(v)[:3] != (batch, heads, seq_len):
        raise ValueError(
            f"v must have shape (B, NH, S, DHHV) = ({batch}, {heads}, {seq_len}, DHHV); got {_shape_of(v)}."
        )
    dhhv = _shape_of(v)[3]
    if 0 in (seq_len, dhqk, dhhv):  # an empty batch or head axis is fine: the outputs are empty too
        raise ValueError(
            f"q and v must have at least one step (S) and one element per head (DHQK, DHHV); got q {_shape_of(q)}, "
            f"v {_shape_of(v)}."
        )
    for name, gate in (("i", i), ("f", f)):
        if _shape_of(gate) != (batch, heads, seq_len):
            raise ValueError(f"{name} must have shape (B, NH, S) = {(batch, heads, seq_len)}; got {_shape_of(gate)}.")
    expected_states = (
        ("c_initial", c_initial, (batch, heads, dhqk, dhhv)),
        ("n_initial", n_initial, (batch, heads, dhqk)),
        ("m_initial", m_initial, (batch, heads)),
    )
    for name, state, shape in expected_states:
        if state is None:
            continue
        _check_float(name, state)
        if _shape_of(state) != shape:
            raise ValueError(f"{name} must have shape {shape} (from q and v); got {_shape_of(state)}.")
    if (n_initial is not None or m_initial is not None) and c_initial is None:
        raise ValueError("n_initial / m_initial were given without c_initial: pass c_initial too, or none of them.")
    return batch, heads, seq_len, dhqk, dhhv


def validate_segment_ids(segment_ids, batch: int, seq_len: int) -> None:
    """Checks that segment_ids is an integer array of shape (B, S)."""
    dtype = getattr(segment_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an integer array (B, S) of document ids, e.g. int32; got dtype {dtype}.")
    if _shape_of(segment_ids) != (batch, seq_len):
        raise ValueError(
            f"segment_ids must have shape (B, S) = {(batch, seq_len)}, one document id per token; got "
            f"{_shape_of(segment_ids)}."
        )


def validate_operand_dtypes(q, k, v) -> None:
    """Checks that q, k and v (the matmul operands) share a dtype."""
    if v.dtype != q.dtype or k.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must share a dtype (got {q.dtype}, {k.dtype}, {v.dtype}); cast them to one "
            "(mlstm_chunkwise also takes autocast_kernel_dtype)."
        )


_AUTOCAST_DTYPES = ("float16", "bfloat16", "float32")


def validate_autocast_dtype(dtype):
    """`autocast_kernel_dtype` as a NumPy dtype: float16, bfloat16, float32, or None (no cast)."""
    if dtype is None:
        return None
    try:
        checked = jnp.dtype(dtype)
    except TypeError:
        checked = None
    if checked is None or checked.name not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast_kernel_dtype must be float16, bfloat16, float32 or None; got {dtype!r}.")
    return checked
