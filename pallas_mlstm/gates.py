"""Gate math of the chunkwise form, shared by every backend: in-chunk log gates, hard resets, the max state.

All of it runs in float32 (float64 for float64 gates), outside the kernels. A forget-gate pre-activation
of −∞ is a hard reset (the state is zeroed before that token, which still writes); an input-gate
pre-activation of −∞ is a token that writes nothing. Both are exact here: no difference of two infinite
cumulative sums is ever formed (see docs/math.md, "Hard resets and masked tokens").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_mlstm.states import acc_dtype

# Floor of the max state m. m only falls to it when every term of a state is e^{−∞} (a reset followed by
# tokens that write nothing): the state is then exactly zero, and a finite m keeps exp(x − m) free of −∞ + ∞.
MIN_LOG_SCALE = -1e30


def log_input_gate(vecI: jax.Array, input_gate: str = "exponential") -> jax.Array:
    """The log of the input gate, the ĩ every kernel uses, in float32 (float64 for float64 gates): ĩ itself for
    the exponential gate (mLSTMexp), log σ(ĩ) for the sigmoid gate (mLSTMsig); −∞ where ĩ = −∞ either way."""
    vecI = vecI.astype(acc_dtype(vecI.dtype))
    return vecI if input_gate == "exponential" else jax.nn.log_sigmoid(vecI)


def input_gate_gradient(vecDeltaLogI: jax.Array, vecI: jax.Array, input_gate: str) -> jax.Array:
    """The gradient of the pre-activation ĩ from that of `log_input_gate`: × σ(−ĩ) for the sigmoid gate."""
    if input_gate == "exponential":
        return vecDeltaLogI
    return vecDeltaLogI * jax.nn.sigmoid(-vecI.astype(vecDeltaLogI.dtype))


def tracks_max_state(input_gate: str) -> bool:
    """Whether the kernels track the max state m. The sigmoid gate's log weights are all <= 0, so its states
    are bounded and need no stabiliser: m stays at its initial value (0 when none is given) in every kernel."""
    return input_gate == "exponential"


def chunked(x: jax.Array, chunk_size: int) -> jax.Array:
    """(B, NH, S, ...) -> (B, NH, NC, L, ...)."""
    return x.reshape(*x.shape[:2], x.shape[2] // chunk_size, chunk_size, *x.shape[3:])


def unchunked(x: jax.Array) -> jax.Array:
    """(B, NH, NC, L, ...) -> (B, NH, S, ...)."""
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])


def chunk_log_forget(vecF: jax.Array, chunk_size: int) -> jax.Array:
    """log σ(f̃) in float32 (float64 for float64 gates), (B, NH, S) -> (B, NH, NC, L); −∞ at hard resets."""
    return chunked(jax.nn.log_sigmoid(vecF.astype(acc_dtype(vecF.dtype))), chunk_size)


def compute_chunkwise_vecB(vecF: jax.Array, chunk_size: int) -> jax.Array:
    """vecB (B, NH, NC, L): the inclusive in-chunk cumsum of log σ(f̃), −∞ from a hard reset on."""
    return jnp.cumsum(chunk_log_forget(vecF, chunk_size), axis=-1)


def chunkwise_log_gates(vecI: jax.Array, vecF: jax.Array, chunk_size: int, input_gate: str = "exponential"):
    """In-chunk log gates (vecB, vecA), (B, NH, NC, L) in float32 (float64 for float64 gates): vecB = inclusive
    cumsum of log σ(f̃), vecA = reverse exclusive cumsum + ĩ, with ĩ = `log_input_gate(vecI, input_gate)`.

    vecA is summed from the chunk end, never formed as g − b + ĩ. From a hard reset on, vecB is −∞ (the chunk's
    start state no longer reaches those tokens); vecA is −∞ for tokens before the chunk's last reset.
    """
    vecB = compute_chunkwise_vecB(vecF, chunk_size)  # (B, NH, NC, L)
    log_f = chunk_log_forget(vecF, chunk_size)
    # Σ_{r > j} log σ(f̃_r): a reverse cumsum shifted by one position
    log_f_after = jnp.concatenate([log_f[..., 1:], jnp.zeros_like(log_f[..., :1])], axis=-1)
    log_i = chunked(log_input_gate(vecI, input_gate).astype(log_f.dtype), chunk_size)
    vecA = jnp.cumsum(log_f_after[..., ::-1], axis=-1)[..., ::-1] + log_i
    return vecB, vecA


def compute_chunkwise_reset_gates(
    vecF: jax.Array, chunk_size: int, reset_dtype: jnp.dtype = jnp.int32
) -> tuple[jax.Array, jax.Array]:
    """The in-chunk gates of the parallel kernels, exact across hard resets: (vecB, vecR), (B, NH, NC, L).

    vecB is the inclusive cumsum of log σ(f̃) with each reset counted as 0, so it stays finite;
    vecR (`reset_dtype`) is the in-chunk position of the last reset at or before t, −1 where there is none. Key j
    reaches query t inside a chunk iff vecR_t <= j <= t, with log decay vecB_t − vecB_j + ĩ_j; the chunk's
    start state reaches t iff vecR_t = −1, with log decay vecB_t. ValueError if `reset_dtype` cannot hold every
    in-chunk position.
    """
    if chunk_size - 1 > jnp.iinfo(reset_dtype).max:
        raise ValueError(f"reset_dtype {jnp.dtype(reset_dtype).name} cannot hold positions in chunks of {chunk_size}.")
    log_f = chunk_log_forget(vecF, chunk_size)
    is_reset = jnp.isneginf(log_f)
    vecB = jnp.cumsum(jnp.where(is_reset, 0.0, log_f), axis=-1)
    position = lax.broadcasted_iota(reset_dtype, log_f.shape, log_f.ndim - 1)
    vecR = lax.cummax(jnp.where(is_reset, position, jnp.array(-1, reset_dtype)), axis=log_f.ndim - 1)
    return vecB, vecR


def _segment_max(values: jax.Array, starts: jax.Array) -> jax.Array:
    """Running max along the last axis that restarts wherever `starts` is True."""

    def combine(left, right):
        left_max, left_start = left
        right_max, right_start = right
        return jnp.where(right_start, right_max, jnp.maximum(left_max, right_max)), left_start | right_start

    return lax.associative_scan(combine, (values, starts), axis=values.ndim - 1)[0]


def compute_chunkwise_vecM(
    vecB: jax.Array,  # (B, NH, NC, L), resets counted as 0 (compute_chunkwise_reset_gates)
    vecR: jax.Array,  # (B, NH, NC, L) integers (compute_chunkwise_reset_gates)
    vecI: jax.Array,  # (B, NH, S)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    *,
    input_gate: str = "exponential",
) -> jax.Array:  # vecM_out (B, NH, S)
    """The in-chunk running log-max m_t = max(b_t + m_{k-1}, max_{vecR_t <= j <= t} (b_t − b_j + ĩ_j)).

    The first term only where the chunk's start state reaches t (vecR_t = −1); floored at MIN_LOG_SCALE. With
    the sigmoid gate m is not tracked (`tracks_max_state`): m_t is the chunk's start m.
    """
    if not tracks_max_state(input_gate):
        return unchunked(jnp.broadcast_to(scaM_all[..., :-1, None].astype(vecB.dtype), vecB.shape))
    vecI = chunked(log_input_gate(vecI, input_gate).astype(vecB.dtype), vecB.shape[-1])
    position = lax.broadcasted_iota(jnp.int32, vecR.shape, vecR.ndim - 1)
    running_max = _segment_max(vecI - vecB, vecR == position)  # max over the keys since the last reset
    m_prev = jnp.where(vecR < 0, scaM_all[..., :-1, None].astype(vecB.dtype), -jnp.inf)
    return unchunked(jnp.maximum(vecB + jnp.maximum(m_prev, running_max), MIN_LOG_SCALE))


def chunk_max_state(scaG: jax.Array, m_prev: jax.Array, vecA: jax.Array) -> jax.Array:
    """m_k = max(g_k + m_{k-1}, max_j a_j), floored at MIN_LOG_SCALE: (..., ) from g, m (...) and a (..., L)."""
    return jnp.maximum(jnp.maximum(scaG + m_prev, jnp.max(vecA, axis=-1)), MIN_LOG_SCALE)


def chunk_max_states(scaG: jax.Array, m_initial: jax.Array, vecA: jax.Array) -> jax.Array:
    """`chunk_max_state` of every chunk, (..., NC) from g (..., NC), m_0 (...) and a (..., NC, L), in log depth:
    each chunk maps m to max(m + g_k, ã_k), ã_k = max(max_j a_j, MIN_LOG_SCALE), and such maps compose to
    another, (g, ã) then (g', ã') to (g + g', max(ã + g', ã')), so an associative scan gives every m_k at once
    (a scan over the chunks takes one dependent step per chunk). The same numbers up to the order of the sums of g."""

    def compose(first, then):
        return first[0] + then[0], jnp.maximum(first[1] + then[0], then[1])

    floors = jnp.maximum(jnp.max(vecA, axis=-1), MIN_LOG_SCALE)  # (..., NC)
    scaG_sums, floors = lax.associative_scan(compose, (scaG, floors), axis=-1)
    return jnp.maximum(m_initial[..., None] + scaG_sums, floors)
