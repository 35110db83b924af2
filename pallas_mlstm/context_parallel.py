"""Context parallelism: the state a sequence shard starts from, and the state gradient it ends with, from one
weighted matmul per shard and an exchange of states; no pass over the sequence is repeated.

The recurrence is linear with a scalar decay per step. From a zero state, a shard's end state is one weighted
matmul over its steps (`shard_end_state`):

    C_end = Σ_t e^{ĩ_t + Σ_{u>t} log σ(f̃_u)} k_t v_tᵀ,    n_end = Σ_t (the same weight) k_t.

A scan over the shards in order (`lax.ppermute` rounds, each moving one B·NH·DHQK·DHHV state per device, never
a sequence) gives shard s the end states of the shards before it, composed in turn, each decayed through the
shards after it, and with the initial state in front (`incoming_states`): the state it starts from. Each shard
then runs the chunkwise forward on its own steps.

The backward runs the same way in reverse. From a zero gradient at its end, the gradient of a shard's start
state is one weighted matmul too (`shard_start_state_gradient`), with the forward's stabiliser m_t and
denominator den_t held constant, as the one-device backward holds them:

    dC_start = Σ_t s e^{Σ_{u<=t} log σ(f̃_u) − m_t} q_t dH_tᵀ / (den_t + eps).

The scan in the other direction composes those of the shards after it, nearest first, and the cotangent of the
last states behind them (`outgoing_state_gradients`): the gradient of its end state, with which it runs the chunkwise
backward from its start state. Every exchanged state carries its log scale, and every sum is scaled by its
largest term, as the kernels' max state m does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_mlstm.gates import (
    MIN_LOG_SCALE,
    chunk_log_forget,
    chunkwise_log_gates,
    compute_chunkwise_vecB,
    tracks_max_state,
)
from pallas_mlstm.states import acc_dtype


def _weighted_outer_sum(a, weights, b):
    """(Σ_t w_t a_tᵀ b_t, Σ_t w_t a_t) over the steps: (B, NH, L, D1), (B, NH, L), (B, NH, L, D2) -> (B, NH, D1, D2),
    (B, NH, D1) in the accumulator dtype, the weighted operand rounded to a's dtype first (as the kernels round
    theirs)."""
    dtype = acc_dtype(a.dtype)
    weighted = (a.astype(dtype) * weights[..., None]).astype(a.dtype)  # (B, NH, L, D1)
    wide = jnp.dtype(a.dtype).itemsize >= 4
    outer = jnp.einsum(
        "bhld,bhle->bhde",
        weighted,
        b.astype(a.dtype),
        preferred_element_type=dtype,
        precision=lax.Precision.HIGHEST if wide else lax.Precision.DEFAULT,
    )
    ones = jnp.ones(weighted.shape[:3], weighted.dtype)  # Σ_t as a matrix-vector product: faster than a reduce over t
    return outer, jnp.einsum(
        "bhld,bhl->bhd",
        weighted,
        ones,
        preferred_element_type=dtype,
        precision=lax.Precision.HIGHEST if wide else lax.Precision.DEFAULT,
    )


def shard_end_state(matK, matV, vecI, vecF, input_gate: str):
    """The end state of a shard's steps from a zero state: (C (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH)),
    stabilised as the kernels' states are (the true state is C·e^m), and the shard's total log decay g (B, NH).
    With the sigmoid input gate, ĩ above is log σ(ĩ) (`log_input_gate`)."""
    shard_len = vecF.shape[-1]  # the shard as one chunk: its in-chunk gates are the shard's
    # Σ_{u>t} log σ(f̃_u) + ĩ_t, summed from the end (never a difference of cumulative sums: −∞ at resets)
    log_weight = chunkwise_log_gates(vecI, vecF, shard_len, input_gate)[1][:, :, 0]  # (B, NH, L)
    log_f = chunk_log_forget(vecF, shard_len)[:, :, 0]  # (B, NH, L), −∞ at hard resets
    scaM = jnp.maximum(jnp.max(log_weight, axis=-1), MIN_LOG_SCALE)  # (B, NH)
    weights = jnp.exp(log_weight - scaM[..., None])  # (B, NH, L), <= 1
    matC, vecN = _weighted_outer_sum(matK, weights, matV)  # (B, NH, DHQK, DHHV), (B, NH, DHQK)
    return matC, vecN, scaM, jnp.sum(log_f, axis=-1)


def shard_start_state_gradient(matQ, vecF, vecN_out, vecM_out, matDeltaH, qk_scale: float, eps: float):
    """The gradient of a shard's start state C from its own outputs' cotangent dH alone: (dC (B, NH, DHQK, DHHV),
    its log scale ν (B, NH): the true gradient is dC·e^ν). vecN_out / vecM_out: the forward's den and m (B, NH, L)."""
    dtype = acc_dtype(matQ.dtype)
    reach = compute_chunkwise_vecB(vecF, vecF.shape[-1])[:, :, 0]  # Σ_{u<=t} log σ(f̃_u), (B, NH, L)
    # log of the true-scale weight s e^{reach − m} / (den + eps): den carries e^{−m}, so this stays O(reach)
    log_weight = reach - vecM_out.astype(dtype) - jnp.log(vecN_out.astype(dtype) + eps)  # (B, NH, L)
    scaNu = jnp.maximum(jnp.max(log_weight, axis=-1), MIN_LOG_SCALE)  # (B, NH)
    weights = qk_scale * jnp.exp(log_weight - scaNu[..., None])  # (B, NH, L)
    return _weighted_outer_sum(matQ, weights, matDeltaH)[0], scaNu


def _ordered_scan(seq_axes, num_shards: int, element, combine, identity, *, from_later: bool):
    """For this shard: combine(...) of the elements of the shards before it, in order (those after it, nearest
    first, with `from_later`); `identity` where there are none. A shift to the next shard, then the Hillis-Steele
    rounds: ceil(log2(P − 1)) more, each passing one state to the shard d further on (lax.ppermute), so that
    each device sends and receives one state per round and nothing else."""
    me = lax.axis_index(seq_axes)
    direction = -1 if from_later else 1

    def shift(tree, distance: int):
        pairs = [(j, j + direction * distance) for j in range(num_shards) if 0 <= j + direction * distance < num_shards]
        return jax.tree.map(lambda x: lax.ppermute(x, seq_axes, pairs), tree)

    def where(condition, a, b):
        return jax.tree.map(lambda x, y: jnp.where(condition, x, y), a, b)

    received = lambda distance: me - distance >= 0 if not from_later else me + distance <= num_shards - 1
    scan = where(received(1), shift(element, 1), identity)
    distance = 1
    while distance < num_shards - 1:
        other = shift(scan, distance)  # covers the shards `distance` further away
        scan = where(received(distance), combine(scan, other) if from_later else combine(other, scan), scan)
        distance *= 2
    return scan


def _then(earlier, later):
    """The end state of two stretches of steps in turn, each given as (C, n, m, g): its end state from a zero state,
    stabilised by m, and its total log decay g."""
    c_a, n_a, m_a, g_a = earlier
    c_b, n_b, m_b, g_b = later
    m = jnp.maximum(m_a + g_b, m_b)  # (B, NH)
    scale_a, scale_b = jnp.exp(m_a + g_b - m), jnp.exp(m_b - m)
    return (
        scale_a[..., None, None] * c_a + scale_b[..., None, None] * c_b,
        scale_a[..., None] * n_a + scale_b[..., None] * n_b,
        m,
        g_a + g_b,
    )


def incoming_states(seq_axes, num_shards: int, end_states, initial_states, input_gate: str):
    """(C, n, m) at the start of this sequence shard, in the states' dtype.

    end_states: this shard's `shard_end_state` (C, n, m, g); initial_states: the op's (C, n, m) initial states,
    None where not given. The shards before this one, in turn, from the initial state (from a zero state with
    m = 0 where none is given, as the kernels start). Where the kernels track no max state (the sigmoid gate:
    their m stays at the initial one), the state comes in its true scale, m = 0: bounded, as every weight <= 1.
    """
    matC, vecN, scaM, scaG = end_states
    identity = (jnp.zeros_like(matC), jnp.zeros_like(vecN), jnp.full_like(scaM, MIN_LOG_SCALE), jnp.zeros_like(scaG))
    before = _ordered_scan(seq_axes, num_shards, end_states, _then, identity, from_later=False)
    c_initial, n_initial, m_initial = initial_states
    initial = (
        identity[0] if c_initial is None else c_initial.astype(matC.dtype),
        identity[1] if n_initial is None else n_initial.astype(vecN.dtype),
        jnp.zeros_like(scaM) if m_initial is None else m_initial.astype(scaM.dtype),
        jnp.zeros_like(scaG),
    )
    c_in, n_in, m_in, _ = _then(initial, before)
    if not tracks_max_state(input_gate):
        scale = jnp.exp(m_in)  # (B, NH)
        return scale[..., None, None] * c_in, scale[..., None] * n_in, jnp.zeros_like(m_in)
    return c_in, n_in, jnp.maximum(m_in, MIN_LOG_SCALE)


def _before(nearer, farther):
    """The start-state gradient of two stretches of steps in turn, each given as (dC, ν, g): its start-state gradient
    from a zero end gradient, stabilised by ν (the true gradient is dC·e^ν), and its total log decay g."""
    d_a, nu_a, g_a = nearer
    d_b, nu_b, g_b = farther
    nu = jnp.maximum(nu_a, g_a + nu_b)  # (B, NH)
    return (jnp.exp(nu_a - nu)[..., None, None] * d_a + jnp.exp(g_a + nu_b - nu)[..., None, None] * d_b, nu, g_a + g_b)


def outgoing_state_gradients(seq_axes, num_shards: int, start_gradient, scaG, frame, last_cotangents):
    """(dC, dN) of this shard's end state, in the frame e^{frame} (B, NH): the true gradient is dC·e^{−frame}.

    start_gradient: this shard's `shard_start_state_gradient` (dC, ν); scaG its total log decay; last_cotangents:
    (dC_last, dN_last, m_last) of the op's last states (dC_last, dN_last None where absent). The shards after this
    one, nearest first, then the last states' cotangent decayed through all of them.
    """
    d_start, scaNu = start_gradient
    identity = (jnp.zeros_like(d_start), jnp.full_like(scaNu, MIN_LOG_SCALE), jnp.zeros_like(scaG))
    d_after, nu_after, g_after = _ordered_scan(
        seq_axes, num_shards, (d_start, scaNu, scaG), _before, identity, from_later=True
    )
    d_end = jnp.exp(frame + nu_after)[..., None, None] * d_after  # (B, NH, DHQK, DHHV)
    dc_last, dn_last, m_last = last_cotangents
    last_scale = jnp.exp(frame + g_after - m_last)  # (B, NH)
    if dc_last is not None:
        d_end += last_scale[..., None, None] * dc_last.astype(d_end.dtype)
    dn_end = None if dn_last is None else last_scale[..., None] * dn_last.astype(d_end.dtype)
    return d_end, dn_end
