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
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pallas_mlstm.validation import validate_chunk_size, validate_gate_options

# Floor of the max state m. m only falls to it when every term of a state is e^{−∞} (a reset followed by
# tokens that write nothing): the state is then exactly zero, and a finite m keeps exp(x − m) free of −∞ + ∞.
MIN_LOG_SCALE = -1e30


def acc_dtype_of(dtype) -> jnp.dtype:
    """The dtype of accumulators, gates and states for inputs of `dtype` (float32 or float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def log_input_gate(vecI: jax.Array, input_gate: str = "exponential") -> jax.Array:
    """The log of the input gate, the ĩ every kernel uses, in float32 (float64 for float64 gates): ĩ itself for
    the exponential gate (mLSTMexp), log σ(ĩ) for the sigmoid gate (mLSTMsig); −∞ where ĩ = −∞ either way."""
    validate_gate_options(input_gate)
    vecI = vecI.astype(acc_dtype_of(vecI.dtype))
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
    return chunked(jax.nn.log_sigmoid(vecF.astype(acc_dtype_of(vecF.dtype))), chunk_size)


def compute_chunkwise_vecB(vecF: jax.Array, chunk_size: int) -> jax.Array:
    """vecB (B, NH, NC, L): the inclusive in-chunk cumsum of log σ(f̃), −∞ from a hard reset on."""
    return jnp.cumsum(chunk_log_forget(vecF, chunk_size), axis=-1)


def compute_chunkwise_log_gates_vecB_vecA(
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    chunk_size: int,
    return_vecB_only: bool = False,
    *,
    input_gate: str = "exponential",
):
    """In-chunk log gates: vecB = inclusive cumsum of log σ(f̃), vecA = reverse exclusive cumsum + ĩ.

    ĩ is `log_input_gate(vecI, input_gate)`: vecI itself for the exponential gate, log σ(vecI) for the sigmoid one.
    Both (B, NH, NC, L) in float32 (float64 for float64 gates); vecA is summed from the chunk end, never
    formed as g − b + ĩ. From a hard reset on, vecB is −∞ (the chunk's start state no longer reaches
    those tokens); vecA is −∞ for tokens before the chunk's last reset. With `return_vecB_only`, vecB alone.
    """
    validate_chunk_size(chunk_size, vecF.shape[-1])
    vecB = compute_chunkwise_vecB(vecF, chunk_size)  # (B, NH, NC, L)
    if return_vecB_only:
        return vecB
    log_f = chunk_log_forget(vecF, chunk_size)
    # Σ_{r > j} log σ(f̃_r): a reverse cumsum shifted by one position
    log_f_after = jnp.concatenate([log_f[..., 1:], jnp.zeros_like(log_f[..., :1])], axis=-1)
    vecA = jnp.cumsum(log_f_after[..., ::-1], axis=-1)[..., ::-1] + chunked(log_input_gate(vecI, input_gate).astype(log_f.dtype), chunk_size)
    return vecB, vecA


def compute_chunkwise_reset_gates(vecF: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """The in-chunk gates of the parallel kernels, exact across hard resets: (vecB, vecR), (B, NH, NC, L).

    vecB is the inclusive cumsum of log σ(f̃) with each reset counted as 0, so it stays finite;
    vecR (int32) is the in-chunk position of the last reset at or before t, −1 where there is none. Key j
    reaches query t inside a chunk iff vecR_t <= j <= t, with log decay vecB_t − vecB_j + ĩ_j; the chunk's
    start state reaches t iff vecR_t = −1, with log decay vecB_t.
    """
    log_f = chunk_log_forget(vecF, chunk_size)
    is_reset = jnp.isneginf(log_f)
    vecB = jnp.cumsum(jnp.where(is_reset, 0.0, log_f), axis=-1)
    position = lax.broadcasted_iota(jnp.int32, log_f.shape, log_f.ndim - 1)
    vecR = lax.cummax(jnp.where(is_reset, position, -1), axis=log_f.ndim - 1)
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
    vecR: jax.Array,  # (B, NH, NC, L) int32
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


def _explicit_sharding(x: jax.Array):
    """x's NamedSharding where its type is sharded over Explicit mesh axes, else None."""
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return None
    return sharding


def reset_at_document_starts(vecF: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """vecF (B, NH, S) with f̃ = −∞ (a hard reset before the token) wherever segment_ids (B, S) changes.

    Comparing neighbours needs the whole sequence axis: with Explicit mesh axes the ids (B·S integers) are
    gathered along S first, and the mask is laid out as vecF before it is applied."""
    ids_sharding, f_sharding = _explicit_sharding(segment_ids), _explicit_sharding(vecF)
    if ids_sharding is not None:
        batch_axes = ids_sharding.spec[0] if len(ids_sharding.spec) else None
        segment_ids = jax.sharding.reshard(segment_ids, NamedSharding(ids_sharding.mesh, PartitionSpec(batch_axes, None)))
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    starts = jnp.broadcast_to(starts[:, None, :], vecF.shape)  # (B, NH, S)
    if f_sharding is not None:
        starts = jax.sharding.reshard(starts, f_sharding)
    return jnp.where(starts, -jnp.inf, vecF)


def pad_steps(matQ, matK, matV, vecI, vecF, padded_len: int):
    """The inputs padded along S to padded_len with steps that neither write (ĩ = −∞, zero q, k, v) nor decay
    (f̃ = +∞, log σ = 0) the state: the last states and every real step's output are unchanged."""
    extra = padded_len - matQ.shape[2]
    pad = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3), constant_values=value)
    return pad(matQ, 0), pad(matK, 0), pad(matV, 0), pad(vecI, -jnp.inf), pad(vecF, jnp.inf)
