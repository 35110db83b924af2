"""Step-by-step recurrent mLSTM: the oracle built on a different algorithm from the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_mlstm.validation import validate_mlstm_inputs


def _exp_diff(log_weight, log_max):
    """exp(log_weight − log_max), 0 where log_weight is −∞ (a reset or a gate of −∞), with finite gradients."""
    empty = jnp.isneginf(log_weight)
    return jnp.where(empty, 0.0, jnp.exp(jnp.where(empty, 0.0, log_weight - log_max)))


def mlstm_recurrent(
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
    kernel_gradient_semantics: bool = False,
):
    """The stabilised mLSTM cell as a `lax.scan` over time; differentiable by autodiff.

    Computes in `promote_types(q.dtype, float32)`. With `kernel_gradient_semantics=True`
    the running max m_t (t >= 1) and the denominator are wrapped in `stop_gradient`, which
    is the gradient the chunkwise kernels compute (docs/math.md §4) for any loss.
    Returns `h` (B, NH, S, DHHV), or `(h, (c_last, n_last, m_last))`.
    """
    validate_mlstm_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    batch, heads, _, dhqk = q.shape
    dhhv = v.shape[-1]
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    qk_scale = dhqk**-0.5
    hold = lax.stop_gradient if kernel_gradient_semantics else (lambda x: x)

    c0 = jnp.zeros((batch, heads, dhqk, dhhv), dtype) if c_initial is None else c_initial.astype(dtype)
    n0 = jnp.zeros((batch, heads, dhqk), dtype) if n_initial is None else n_initial.astype(dtype)
    m0 = jnp.zeros((batch, heads), dtype) if m_initial is None else m_initial.astype(dtype)

    log_f = jax.nn.log_sigmoid(f.astype(dtype))
    # time-major sequences for the scan
    xs = (
        jnp.moveaxis(q.astype(dtype), 2, 0) * qk_scale,  # (S, B, NH, DHQK)
        jnp.moveaxis(k.astype(dtype), 2, 0),  # (S, B, NH, DHQK)
        jnp.moveaxis(v.astype(dtype), 2, 0),  # (S, B, NH, DHHV)
        jnp.moveaxis(i.astype(dtype), 2, 0),  # (S, B, NH)
        jnp.moveaxis(log_f, 2, 0),  # (S, B, NH)
    )

    def step(carry, x):
        c, n, m = carry
        q_t, k_t, v_t, i_t, lf_t = x
        m_new = hold(jnp.maximum(lf_t + m, i_t))  # (B, NH); −∞ when the state is empty (reset, nothing written)
        decay = _exp_diff(lf_t + m, m_new)[..., None]  # (B, NH, 1)
        weight = _exp_diff(i_t, m_new)[..., None]  # (B, NH, 1)
        c = decay[..., None] * c + (weight * k_t)[..., :, None] * v_t[..., None, :]
        n = decay * n + weight * k_t
        num = jnp.einsum("bhd,bhde->bhe", q_t, c, precision=lax.Precision.HIGHEST)
        den = hold(jnp.maximum(jnp.abs(jnp.sum(q_t * n, axis=-1)), jnp.exp(-m_new)))
        h = num / (den + eps)[..., None]
        return (c, n, m_new), h

    (c_last, n_last, m_last), h = lax.scan(step, (c0, n0, m0), xs)
    h = jnp.moveaxis(h, 0, 2)
    if return_last_states:
        return h, (c_last, n_last, m_last)
    return h
