"""Quadratic (attention-like) stabilised mLSTM over the whole sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_mlstm.validation import validate_mlstm_inputs

_HIGHEST = lax.Precision.HIGHEST


def mlstm_parallel(
    q: jax.Array,  # (B, NH, S, DHQK)
    k: jax.Array,  # (B, NH, S, DHQK)
    v: jax.Array,  # (B, NH, S, DHHV)
    i: jax.Array,  # (B, NH, S)
    f: jax.Array,  # (B, NH, S)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    *,
    return_last_states: bool = False,
    eps: float = 1e-6,
):
    """The mLSTM as one S x S decay-masked product; the initial state is a virtual token 0.

    Computes in `promote_types(q.dtype, float32)`; O(S^2) memory. Same outputs as
    `mlstm_recurrent`: `h`, or `(h, (c_last, n_last, m_last))`.
    """
    validate_mlstm_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    batch, heads, seq_len, dhqk = q.shape
    dhhv = v.shape[-1]
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v, i = (x.astype(dtype) for x in (q, k, v, i))
    qk_scale = dhqk**-0.5

    c0 = jnp.zeros((batch, heads, dhqk, dhhv), dtype) if c_initial is None else c_initial.astype(dtype)
    n0 = jnp.zeros((batch, heads, dhqk), dtype) if n_initial is None else n_initial.astype(dtype)
    m0 = jnp.zeros((batch, heads), dtype) if m_initial is None else m_initial.astype(dtype)

    log_f_cumsum = jnp.cumsum(jax.nn.log_sigmoid(f.astype(dtype)), axis=-1)  # (B, NH, S)
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    # log weight of token j in the state at time t, and of the initial state at time t
    log_d = log_f_cumsum[..., :, None] - log_f_cumsum[..., None, :] + i[..., None, :]  # (B, NH, S, S)
    log_d = jnp.where(causal, log_d, -jnp.inf)
    log_d_initial = log_f_cumsum + m0[..., None]  # (B, NH, S)
    m = jnp.maximum(jnp.max(log_d, axis=-1), log_d_initial)  # (B, NH, S)

    scores = jnp.einsum("bhtd,bhjd->bhtj", q, k, precision=_HIGHEST) * qk_scale
    weights = scores * jnp.exp(log_d - m[..., None])  # (B, NH, S, S)
    q_initial = q * (qk_scale * jnp.exp(log_d_initial - m))[..., None]  # (B, NH, S, DHQK)
    num = jnp.einsum("bhtj,bhje->bhte", weights, v, precision=_HIGHEST)
    num += jnp.einsum("bhtd,bhde->bhte", q_initial, c0, precision=_HIGHEST)
    den = jnp.sum(weights, axis=-1) + jnp.einsum("bhtd,bhd->bht", q_initial, n0, precision=_HIGHEST)
    den = jnp.maximum(jnp.abs(den), jnp.exp(-m))
    h = num / (den + eps)[..., None]
    if not return_last_states:
        return h

    m_last = m[..., -1]  # (B, NH)
    key_weight = jnp.exp(log_d[..., -1, :] - m_last[..., None])  # (B, NH, S)
    initial_weight = jnp.exp(log_d_initial[..., -1] - m_last)  # (B, NH)
    c_last = initial_weight[..., None, None] * c0 + jnp.einsum(
        "bhj,bhjd,bhje->bhde", key_weight, k, v, precision=_HIGHEST
    )
    n_last = initial_weight[..., None] * n0 + jnp.einsum("bhj,bhjd->bhd", key_weight, k, precision=_HIGHEST)
    return h, (c_last, n_last, m_last)
