"""Context parallelism: the state a sequence shard starts from, and the state gradient it ends with, from one
weighted matmul per shard and one exchange of states; no pass over the sequence is repeated.

The recurrence is linear with a scalar decay per step. From a zero state, a shard's end state is one weighted
matmul over its steps (`shard_end_state`):

    C_end = Σ_t e^{ĩ_t + Σ_{u>t} log σ(f̃_u)} k_t v_tᵀ,    n_end = Σ_t (the same weight) k_t.

The shards exchange these (one all-gather of B·NH·DHQK·DHHV per shard, never a sequence), and shard s adds up
the end states of the shards before it, each decayed through the shards in between, and the initial state
(`incoming_states`): the state it starts from. Each shard then runs the chunkwise forward on its own steps.

The backward runs the same way in reverse. From a zero gradient at its end, the gradient of a shard's start
state is one weighted matmul too (`shard_start_state_gradient`), with the forward's stabiliser m_t and
denominator den_t held constant, as the one-device backward holds them:

    dC_start = Σ_t s e^{Σ_{u<=t} log σ(f̃_u) − m_t} q_t dH_tᵀ / (den_t + eps).

The shards exchange these; shard s adds up those of the shards after it, decayed, and the cotangent of the
last states (`outgoing_state_gradients`): the gradient of its end state, with which it runs the chunkwise
backward from its start state. Every exchanged state carries its log scale, and every sum is scaled by its
largest term, as the kernels' max state m does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_mlstm.gates import MIN_LOG_SCALE, acc_dtype_of


def _weighted_outer_sum(a, weights, b):
    """(Σ_t w_t a_tᵀ b_t, Σ_t w_t a_t) over the steps: (B, NH, L, D1), (B, NH, L), (B, NH, L, D2) -> (B, NH, D1, D2),
    (B, NH, D1) in the accumulator dtype, the weighted operand rounded to a's dtype first (as the kernels round
    theirs)."""
    dtype = acc_dtype_of(a.dtype)
    weighted = (a.astype(dtype) * weights[..., None]).astype(a.dtype)  # (B, NH, L, D1)
    wide = jnp.dtype(a.dtype).itemsize >= 4
    outer = jnp.einsum("bhld,bhle->bhde", weighted, b.astype(a.dtype), preferred_element_type=dtype,
                       precision=lax.Precision.HIGHEST if wide else lax.Precision.DEFAULT)
    return outer, jnp.sum(weighted.astype(dtype), axis=2)


def _log_forget(vecF):
    return jax.nn.log_sigmoid(vecF.astype(acc_dtype_of(vecF.dtype)))  # (B, NH, L), −∞ at hard resets


def shard_end_state(matK, matV, vecI, vecF):
    """The end state of a shard's steps from a zero state: (C (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH)),
    stabilised as the kernels' states are (the true state is C·e^m), and the shard's total log decay g (B, NH)."""
    log_f = _log_forget(vecF)
    # Σ_{u>t} log σ(f̃_u), summed from the end (never a difference of cumulative sums: −∞ at resets)
    log_f_after = jnp.concatenate([log_f[..., 1:], jnp.zeros_like(log_f[..., :1])], axis=-1)
    log_weight = jnp.cumsum(log_f_after[..., ::-1], axis=-1)[..., ::-1] + vecI.astype(log_f.dtype)  # (B, NH, L)
    scaM = jnp.maximum(jnp.max(log_weight, axis=-1), MIN_LOG_SCALE)  # (B, NH)
    weights = jnp.exp(log_weight - scaM[..., None])  # (B, NH, L), <= 1
    matC, vecN = _weighted_outer_sum(matK, weights, matV)  # (B, NH, DHQK, DHHV), (B, NH, DHQK)
    return matC, vecN, scaM, jnp.sum(log_f, axis=-1)


def shard_start_state_gradient(matQ, vecF, vecN_out, vecM_out, matDeltaH, qk_scale: float, eps: float):
    """The gradient of a shard's start state C from its own outputs' cotangent dH alone: (dC (B, NH, DHQK, DHHV),
    its log scale ν (B, NH): the true gradient is dC·e^ν). vecN_out / vecM_out: the forward's den and m (B, NH, L)."""
    dtype = acc_dtype_of(matQ.dtype)
    reach = jnp.cumsum(_log_forget(vecF), axis=-1)  # Σ_{u<=t} log σ(f̃_u), (B, NH, L)
    # log of the true-scale weight s e^{reach − m} / (den + eps): den carries e^{−m}, so this stays O(reach)
    log_weight = reach - vecM_out.astype(dtype) - jnp.log(vecN_out.astype(dtype) + eps)  # (B, NH, L)
    scaNu = jnp.maximum(jnp.max(log_weight, axis=-1), MIN_LOG_SCALE)  # (B, NH)
    weights = qk_scale * jnp.exp(log_weight - scaNu[..., None])  # (B, NH, L)
    return _weighted_outer_sum(matQ, weights, matDeltaH)[0], scaNu


def _shard_position(seq_axes, num_shards: int):
    """(this shard's index along the sequence, all indices (P,))."""
    return lax.axis_index(seq_axes), jnp.arange(num_shards)


def incoming_states(seq_axes, num_shards: int, end_states, initial_states):
    """(C, n, m) at the start of this sequence shard, in the states' dtype.

    end_states: this shard's `shard_end_state` (C, n, m, g); initial_states: the op's (C, n, m) initial states,
    None where not given. Each earlier shard e contributes e^{m_e + Σ_{e<r<me} g_r} C_e and the initial state
    e^{m_0 + Σ_{r<me} g_r} C_0, all scaled by the largest of these log weights, which becomes m.
    """
    matC, vecN, scaM, scaG = end_states
    dtype = matC.dtype
    c_all, n_all, m_all, g_all = (lax.all_gather(x, seq_axes) for x in (matC, vecN, scaM, scaG))  # (P, B, NH, ...)
    me, shard = _shard_position(seq_axes, num_shards)
    earlier = (shard < me)[:, None, None]  # (P, 1, 1)
    between = (shard[:, None] < shard[None, :]) & (shard[None, :] < me)  # (e, r): r lies between e and me
    g_between = jnp.sum(jnp.where(between[:, :, None, None], g_all[None], 0.0), axis=1)  # (P, B, NH)
    g_before = jnp.sum(jnp.where(earlier, g_all, 0.0), axis=0)  # (B, NH)

    c_initial, n_initial, m_initial = initial_states
    m0 = jnp.zeros_like(scaM) if m_initial is None else m_initial.astype(dtype)
    w0 = g_before + m0
    w = jnp.where(earlier, g_between + m_all, -jnp.inf)  # (P, B, NH): −∞ for the shards from this one on
    m_in = jnp.maximum(jnp.maximum(w0, jnp.max(w, axis=0)), MIN_LOG_SCALE)
    scale0, scale = jnp.exp(w0 - m_in), jnp.exp(w - m_in)
    c_in = jnp.sum(scale[..., None, None] * c_all, axis=0)
    n_in = jnp.sum(scale[..., None] * n_all, axis=0)
    if c_initial is not None:
        c_in += scale0[..., None, None] * c_initial.astype(dtype)
    if n_initial is not None:
        n_in += scale0[..., None] * n_initial.astype(dtype)
    return c_in, n_in, m_in


def outgoing_state_gradients(seq_axes, num_shards: int, start_gradient, scaG, frame, last_cotangents):
    """(dC, dN) of this shard's end state, in the frame e^{frame} (B, NH): the true gradient is dC·e^{−frame}.

    start_gradient: this shard's `shard_start_state_gradient` (dC, ν); scaG its total log decay; last_cotangents:
    (dC_last, dN_last, m_last) of the op's last states (dC_last, dN_last None where absent). Each later shard r
    contributes e^{ν_r + Σ_{me<j<r} g_j} dC_r; the last states' cotangent arrives decayed by every later shard.
    """
    d_start, scaNu = start_gradient
    d_all, nu_all, g_all = (lax.all_gather(x, seq_axes) for x in (d_start, scaNu, scaG))  # (P, B, NH, ...)
    me, shard = _shard_position(seq_axes, num_shards)
    later = (shard > me)[:, None, None]  # (P, 1, 1)
    between = (shard[None, :] > me) & (shard[None, :] < shard[:, None])  # (r, j): j lies between me and r
    g_between = jnp.sum(jnp.where(between[:, :, None, None], g_all[None], 0.0), axis=1)  # (P, B, NH)
    scale = jnp.exp(jnp.where(later, frame + nu_all + g_between, -jnp.inf))  # (P, B, NH)
    d_end = jnp.sum(scale[..., None, None] * d_all, axis=0)  # (B, NH, DHQK, DHHV)

    dc_last, dn_last, m_last = last_cotangents
    last_scale = jnp.exp(frame + jnp.sum(jnp.where(later, g_all, 0.0), axis=0) - m_last)  # (B, NH)
    if dc_last is not None:
        d_end += last_scale[..., None, None] * dc_last.astype(d_end.dtype)
    dn_end = None if dn_last is None else last_scale[..., None] * dn_last.astype(d_end.dtype)
    return d_end, dn_end
