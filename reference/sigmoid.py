"""The mLSTMsig cell (sigmoid input gate, TFLA paper): a recurrent scan and the quadratic form, the two oracles of
the sigmoid variant. Both gates are sigmoids, so the states need no max stabiliser: (C, n) only.

    C_t = σ(f̃_t) C_{t-1} + σ(ĩ_t) k_t v_tᵀ,    n_t = σ(f̃_t) n_{t-1} + σ(ĩ_t) k_t
    h_t = (s q_t)ᵀ C_t / (max(|(s q_t)ᵀ n_t|, 1) + eps)    with normalize=True
    h_t = (s q_t)ᵀ C_t                                     with normalize=False

with s = DHQK^-1/2. A gate pre-activation of −∞ gives σ = 0: f̃ = −∞ resets the state before the token, ĩ = −∞
writes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_mlstm.validation import validate_mlstm_inputs

_HIGHEST = lax.Precision.HIGHEST


def _initial_states(q, v, c_initial, n_initial, dtype):
    batch, heads, _, dhqk = q.shape
    c0 = jnp.zeros((batch, heads, dhqk, v.shape[-1]), dtype) if c_initial is None else c_initial.astype(dtype)
    n0 = jnp.zeros((batch, heads, dhqk), dtype) if n_initial is None else n_initial.astype(dtype)
    return c0, n0


def mlstm_sigmoid_recurrent(
    q: jax.Array,  # (B, NH, S, DHQK)
    k: jax.Array,  # (B, NH, S, DHQK)
    v: jax.Array,  # (B, NH, S, DHHV)
    i: jax.Array,  # (B, NH, S)
    f: jax.Array,  # (B, NH, S)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    *,
    normalize: bool = True,
    return_last_states: bool = False,
    eps: float = 1e-6,
    kernel_gradient_semantics: bool = False,
):
    """The mLSTMsig cell as a `lax.scan` over time, in `promote_types(q.dtype, float32)`; differentiable by autodiff.

    With `kernel_gradient_semantics` (and `normalize`) the denominator is held constant (`stop_gradient`), the
    gradient the chunkwise kernels compute. Returns `h` (B, NH, S, DHHV), or `(h, (c_last, n_last))`.
    """
    validate_mlstm_inputs(q, k, v, i, f, c_initial, n_initial, None)
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    hold = lax.stop_gradient if kernel_gradient_semantics else (lambda x: x)
    time_major = lambda x: jnp.moveaxis(x.astype(dtype), 2, 0)
    xs = (
        time_major(q) * q.shape[-1] ** -0.5,
        time_major(k),
        time_major(v),  # (S, B, NH, D)
        jax.nn.sigmoid(time_major(i)),
        jax.nn.sigmoid(time_major(f)),
    )  # (S, B, NH)

    def step(carry, x):
        c, n = carry
        q_t, k_t, v_t, input_t, forget_t = x
        c = forget_t[..., None, None] * c + (input_t[..., None] * k_t)[..., :, None] * v_t[..., None, :]
        n = forget_t[..., None] * n + input_t[..., None] * k_t
        h = jnp.einsum("bhd,bhde->bhe", q_t, c, precision=_HIGHEST)  # (B, NH, DHHV)
        if normalize:
            den = hold(jnp.maximum(jnp.abs(jnp.sum(q_t * n, axis=-1)), 1.0))  # (B, NH)
            h = h / (den + eps)[..., None]
        return (c, n), h

    (c_last, n_last), h = lax.scan(step, _initial_states(q, v, c_initial, n_initial, dtype), xs)
    h = jnp.moveaxis(h, 0, 2)
    return (h, (c_last, n_last)) if return_last_states else h


def mlstm_sigmoid_parallel(
    q: jax.Array,  # (B, NH, S, DHQK)
    k: jax.Array,  # (B, NH, S, DHQK)
    v: jax.Array,  # (B, NH, S, DHHV)
    i: jax.Array,  # (B, NH, S)
    f: jax.Array,  # (B, NH, S)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    *,
    normalize: bool = True,
    return_last_states: bool = False,
    eps: float = 1e-6,
):
    """The mLSTMsig cell as one S x S decay-masked product, the initial state a virtual token before the first;
    O(S^2) memory. Same outputs as `mlstm_sigmoid_recurrent`."""
    validate_mlstm_inputs(q, k, v, i, f, c_initial, n_initial, None)
    seq_len, dhqk = q.shape[2], q.shape[3]
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    c0, n0 = _initial_states(q, v, c_initial, n_initial, dtype)
    log_f = jax.nn.log_sigmoid(f.astype(dtype))  # (B, NH, S), −∞ at resets
    later = jnp.arange(seq_len)[:, None] > jnp.arange(seq_len)[None, :]  # (t, j): t after j
    # Σ_{j<u<=t} log σ(f̃_u) as a cumulative sum over t of masked terms: no difference of sums, so no −∞ + ∞
    log_decay = jnp.cumsum(jnp.where(later, log_f[..., :, None], 0.0), axis=-2)  # (B, NH, t, j)
    log_decay = jnp.where(later | jnp.eye(seq_len, dtype=bool), log_decay, -jnp.inf)  # causal, with j = t
    weights = jnp.exp(log_decay + jax.nn.log_sigmoid(i.astype(dtype))[..., None, :])  # (B, NH, t, j)
    initial_decay = jnp.exp(jnp.cumsum(log_f, axis=-1))  # (B, NH, S): of the initial state through t

    q_scaled = q * dhqk**-0.5
    scores = jnp.einsum("bhtd,bhjd->bhtj", q_scaled, k, precision=_HIGHEST) * weights
    h = jnp.einsum("bhtj,bhje->bhte", scores, v, precision=_HIGHEST)
    h += initial_decay[..., None] * jnp.einsum("bhtd,bhde->bhte", q_scaled, c0, precision=_HIGHEST)
    if normalize:
        qn = jnp.sum(scores, axis=-1) + initial_decay * jnp.einsum("bhtd,bhd->bht", q_scaled, n0, precision=_HIGHEST)
        h = h / (jnp.maximum(jnp.abs(qn), 1.0) + eps)[..., None]
    if not return_last_states:
        return h
    last_weights, last_decay = weights[..., -1, :], initial_decay[..., -1]  # (B, NH, S), (B, NH)
    c_last = last_decay[..., None, None] * c0 + jnp.einsum(
        "bhj,bhjd,bhje->bhde", last_weights, k, v, precision=_HIGHEST
    )
    n_last = last_decay[..., None] * n0 + jnp.einsum("bhj,bhjd->bhd", last_weights, k, precision=_HIGHEST)
    return h, (c_last, n_last)
