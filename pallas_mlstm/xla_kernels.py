"""The XLA backend's kernels: the six chunkwise kernels and the recurrent step in plain jnp.

Two layers. The *launchers* (`recurrent_fw_C`, `parallel_fw_Hintra`, `recurrent_bw_dC`, `parallel_bw_dQ`,
`parallel_bw_dK`, `parallel_bw_dV`, `recurrent_step`) take a `KernelCall` (pallas_mlstm.kernel_call) and the
arrays in the upstream kernel's order, with the Triton backend's launchers' signatures, and trust them: they
check nothing. `KERNELS` (a `KernelSet`) collects them for the orchestration (`pallas_mlstm.chunkwise`).
The parallel backward launchers take the chunk gates as one tuple `(vecA, vecB, vecR)` and the forward states
as one `(matC_all, vecN_all, scaM_all)`, and return `(grad, row_dots)` for dQ / dK. `KernelCall.launch`,
`allow_tf32` and `interpret` mean nothing here and are ignored.

The *twins* `mlstm_chunkwise__*` take the arguments of the Pallas kernel of the same name (docs/math.md §3.3),
check them (chunk size, gate options), and run the launcher; the launch arguments (`siz_b_*`, `num_warps`,
`num_stages`) are accepted and ignored. `mlstm_recurrent_step` is the same for the step. They run on any
device, and the kernel tests hold each Pallas kernel against its twin here.

Conventions: matmul operands in the input dtype, accumulation, gates and states in
`promote_types(input dtype, float32)` (`pallas_mlstm.states.acc_dtype`); state buffers are laid out as
`matC_all (B, NH, (NC+1)*DHQK, DHHV)`, `vecN_all (B, NH, (NC+1)*DHQK)`, `scaM_all (B, NH, NC+1)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_mlstm.gates import (
    MIN_LOG_SCALE,
    chunk_log_forget,
    chunk_max_state,
    chunked,
    chunkwise_log_gates,
    compute_chunkwise_reset_gates,
    compute_chunkwise_vecB,
    compute_chunkwise_vecM,
    log_input_gate,
    tracks_max_state,
    unchunked,
)
from pallas_mlstm.kernel_call import KernelCall, KernelSet
from pallas_mlstm.plan import validate_chunk_size, validate_gate_options
from pallas_mlstm.states import States, acc_dtype, join_states, split_states


def _einsum(subscripts: str, a: jax.Array, b: jax.Array, operand_dtype) -> jax.Array:
    """einsum with operands cast to `operand_dtype` and accumulation in float32 (or float64)."""
    operand_dtype = jnp.dtype(operand_dtype)
    wide = operand_dtype.itemsize >= 4
    return jnp.einsum(
        subscripts,
        a.astype(operand_dtype),
        b.astype(operand_dtype),
        preferred_element_type=acc_dtype(operand_dtype),
        precision=lax.Precision.HIGHEST if wide else lax.Precision.DEFAULT,
    )


def _dtype_name(dtype) -> str | None:
    """A dtype argument as `KernelCall.states_dtype` holds it: its name, or None."""
    return None if dtype is None else jnp.dtype(dtype).name


# ----------------------------------------------------------------------------------------------------- launchers


def recurrent_fw_C(call: KernelCall, matK, matV, vecF, vecI, matC_initial, vecN_initial, scaMinter_initial):
    """States at every chunk boundary: (matC_states, vecN_states, scaMinter_states), index 0 = initial.

    matK (B, NH, S, DHQK), matV (B, NH, S, DHHV), vecF / vecI (B, NH, S); the initial states (B, NH, DHQK, DHHV),
    (B, NH, DHQK), (B, NH) or None (zeros). Outputs (B, NH, (NC+1)*DHQK, DHHV), (B, NH, (NC+1)*DHQK),
    (B, NH, NC+1) with NC = S / (call.chunk_size · call.save_states_every_nth_chunk): saving every n-th state
    of chunk L is the state sequence of chunk n·L. A narrower `call.states_dtype` stores matC_states in it and
    adds the last C state at full precision. `call.input_gate` "sigmoid": σ(ĩ) as input gate, m not tracked
    (stays at its initial value).
    """
    batch, heads, _, dhqk = matK.shape
    dhhv = matV.shape[-1]
    chunk_size = call.chunk_size * call.save_states_every_nth_chunk
    dtype = acc_dtype(matK.dtype)
    _, vecA = chunkwise_log_gates(vecI, vecF, chunk_size, call.input_gate)
    tracks_max = tracks_max_state(call.input_gate)
    scaG = jnp.sum(chunk_log_forget(vecF, chunk_size), axis=-1)  # (B, NH, NC)

    initial = States(matC_initial, vecN_initial, scaMinter_initial)
    c, n, m = initial.or_zeros(States.zeros(batch, heads, dhqk, dhhv, dtype))

    def chunk_step(carry, xs):
        c, n, m = carry
        k, v, a, g = xs  # (B, NH, L, DHQK), (B, NH, L, DHHV), (B, NH, L), (B, NH)
        m_next = chunk_max_state(g, m, a) if tracks_max else m
        decay = jnp.exp(g + m - m_next)
        k_weighted = k.astype(dtype) * jnp.exp(a - m_next[..., None])[..., None]
        # (B, NH, DHQK, DHHV)
        c_next = decay[..., None, None] * c + _einsum("bhld,bhle->bhde", k_weighted, v, matK.dtype)
        n_next = decay[..., None] * n + jnp.sum(k_weighted, axis=-2)
        return (c_next, n_next, m_next), (c_next, n_next, m_next)

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
    xs = (
        chunk_major(chunked(matK, chunk_size)),
        chunk_major(chunked(matV, chunk_size)),
        chunk_major(vecA),
        chunk_major(scaG),
    )
    _, (c_all, n_all, m_all) = lax.scan(chunk_step, (c, n, m), xs)
    c_all = jnp.concatenate([c[:, :, None], jnp.moveaxis(c_all, 0, 2)], axis=2)  # (B, NH, NC+1, DHQK, DHHV)
    n_all = jnp.concatenate([n[:, :, None], jnp.moveaxis(n_all, 0, 2)], axis=2)  # (B, NH, NC+1, DHQK)
    m_all = jnp.concatenate([m[:, :, None], jnp.moveaxis(m_all, 0, 2)], axis=2)  # (B, NH, NC+1)
    states_dtype = call.states_dtype
    if states_dtype is None or jnp.dtype(states_dtype) == dtype:
        return join_states(c_all), join_states(n_all), m_all
    return join_states(c_all.astype(states_dtype)), join_states(n_all), m_all, c_all[:, :, -1]


def parallel_fw_Hintra(call: KernelCall, matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all):
    """Outputs of every chunk from its start state: (matH_out (B,NH,S,DHHV), vecN_out (B,NH,S), vecM_out (B,NH,S)).

    matH_out is in `call.output_dtype`; vecN_out is the denominator max(|q̄·n + Σ S|, e^{-m}) and vecM_out the
    running log-max m_t. `call.input_gate` "sigmoid": σ(ĩ) as input gate, m not tracked; there
    `call.normalize` False gives h = q̄·C, vecN_out = e^{−m}. The qk scale is `call.scale_for(DHQK)`.
    """
    chunk_size = call.chunk_size
    dhqk = matQ.shape[-1]
    qk_scale = call.scale_for(dhqk)
    vecB, vecR = compute_chunkwise_reset_gates(vecF, chunk_size)  # (B, NH, NC, L)
    vecM_out = compute_chunkwise_vecM(vecB, vecR, vecI, scaM_all, input_gate=call.input_gate)
    dtype = vecB.dtype
    q, k, v = (chunked(x, chunk_size) for x in (matQ, matK, matV))  # (B, NH, NC, L, D)
    m = chunked(vecM_out, chunk_size)  # (B, NH, NC, L)
    m_prev = scaM_all[..., :-1, None].astype(dtype)  # (B, NH, NC, 1)
    c_prev = split_states(matC_all, dhqk)[:, :, :-1]  # (B, NH, NC, DHQK, DHHV)
    n_prev = split_states(vecN_all, dhqk)[:, :, :-1].astype(dtype)  # (B, NH, NC, DHQK)

    log_i = chunked(log_input_gate(vecI, call.input_gate), chunk_size)
    decay = _intra_chunk_decay(vecB, vecR, log_i, m)  # (B, NH, NC, L, L)
    scores = _einsum("bhcld,bhcjd->bhclj", q, k, matQ.dtype) * qk_scale * decay  # (B, NH, NC, L, L)
    q_inter_scale = qk_scale * _inter_chunk_decay(vecB, vecR, m_prev, m)  # (B, NH, NC, L)
    num = _einsum("bhcld,bhcde->bhcle", q, c_prev, matQ.dtype) * q_inter_scale[..., None]  # (B, NH, NC, L, DHHV)
    num += _einsum("bhclj,bhcje->bhcle", scores, v, matQ.dtype)  # (B, NH, NC, L, DHHV)
    den = jnp.sum(q.astype(dtype) * n_prev[..., None, :], axis=-1) * q_inter_scale + jnp.sum(scores, axis=-1)
    if call.normalize:
        den = jnp.maximum(jnp.abs(den), jnp.exp(-m))
        matH_out = num / (den + call.eps)[..., None]
    else:  # h = q̄ C: e^{−m} only undoes the states' scale
        den = jnp.exp(-m)
        matH_out = num / den[..., None]
    return unchunked(matH_out).astype(call.output_dtype), unchunked(den), vecM_out


def _intra_chunk_decay(vecB, vecR, vecI_chunked, vecM_chunked):
    """exp(D̃_tj − m_t) for vecR_t ≤ j ≤ t, else 0: (B, NH, NC, L, L) from (B, NH, NC, L) gates."""
    chunk_size = vecB.shape[-1]
    log_d = vecB[..., :, None] - vecB[..., None, :] + vecI_chunked.astype(vecB.dtype)[..., None, :]
    key = jnp.arange(chunk_size)
    valid = (key[None, :] <= key[:, None]) & (key >= vecR[..., :, None])  # (B, NH, NC, L, L)
    return jnp.where(valid, jnp.exp(jnp.where(valid, log_d - vecM_chunked[..., None], 0.0)), 0.0)


def _inter_chunk_decay(vecB, vecR, m_prev, vecM_chunked):
    """exp(b_t + m_{k-1} − m_t) where the chunk's start state reaches t (no reset before it), else 0."""
    return jnp.where(vecR < 0, jnp.exp(vecB + m_prev - vecM_chunked), 0.0)


def recurrent_bw_dC(
    call: KernelCall, matQ, vecF, scaM_inter, vecM_combine, matDeltaH, vecN_out, matDeltaC_last, matC_states
):
    """Gradients of the chunk-boundary C states, last to first: matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV).

    matDeltaC_last (B, NH, DHQK, DHHV) or None (zeros). Given the forward states `matC_states`
    (B, NH, (NC+1)*DHQK, DHHV), returns (matDeltaC_states, scaCdC_states) with scaCdC_states (B, NH, NC+1) =
    <dC_k, C_k> per boundary (the f̃ gradient's term for pairs crossing it). A narrower `call.states_dtype`
    stores matDeltaC_states in it and adds dC_0 at full precision as a last output. Uses call.chunk_size,
    call.save_states_every_nth_chunk, call.scale_for(DHQK) and call.eps.
    """
    batch, heads, _, dhqk = matQ.shape
    dhhv = matDeltaH.shape[-1]
    chunk_size = call.chunk_size * call.save_states_every_nth_chunk
    qk_scale = call.scale_for(dhqk)
    vecB = compute_chunkwise_vecB(vecF, chunk_size)  # (B, NH, NC, L), −∞ from a reset on
    dtype = vecB.dtype
    m_prev = scaM_inter[..., :-1].astype(dtype)  # (B, NH, NC)
    m_next = scaM_inter[..., 1:].astype(dtype)
    q_bar = (
        chunked(matQ, chunk_size).astype(dtype)
        * (qk_scale * jnp.exp(vecB + m_prev[..., None] - chunked(vecM_combine, chunk_size)))[..., None]
    )  # (B, NH, NC, L, DHQK)
    dh_bar = chunked(matDeltaH, chunk_size) / (chunked(vecN_out, chunk_size) + call.eps)[..., None]
    contributions = _einsum("bhcld,bhcle->bhcde", q_bar, dh_bar, matQ.dtype)  # (B, NH, NC, DHQK, DHHV)
    decay = jnp.exp(vecB[..., -1] + m_prev - m_next)  # (B, NH, NC)

    d_last = jnp.zeros((batch, heads, dhqk, dhhv), dtype) if matDeltaC_last is None else matDeltaC_last.astype(dtype)

    def chunk_step(dc_next, xs):
        contribution, chunk_decay = xs
        dc = chunk_decay[..., None, None] * dc_next + contribution
        return dc, dc

    xs = (jnp.moveaxis(contributions, 2, 0), jnp.moveaxis(decay, 2, 0))
    _, dc_all = lax.scan(chunk_step, d_last, xs, reverse=True)
    dc_all = jnp.concatenate([jnp.moveaxis(dc_all, 0, 2), d_last[:, :, None]], axis=2)  # (B, NH, NC+1, DHQK, DHHV)
    states_dtype = call.states_dtype
    narrow = states_dtype is not None and jnp.dtype(states_dtype) != dtype
    results = [join_states(dc_all.astype(states_dtype) if narrow else dc_all)]
    if matC_states is not None:
        results.append(jnp.sum(dc_all * split_states(matC_states, dhqk).astype(dtype), axis=(-2, -1)))  # (B, NH, NC+1)
    if narrow:
        results.append(dc_all[:, :, 0])
    return results[0] if len(results) == 1 else tuple(results)


class _BwCommon(NamedTuple):
    """Per-chunk quantities of the parallel backward launchers, (B, NH, NC, ...) with L = chunk length."""

    qk_scale: float
    decay: jax.Array  # (B, NH, NC, L, L): exp(D̃_tj − m_t) within the chunk, 0 outside
    q_inter: jax.Array  # (B, NH, NC, L): decay from the chunk's start state to row t
    k_inter: jax.Array  # (B, NH, NC, L): decay from key j to the chunk's end state
    dh_bar: jax.Array  # (B, NH, NC, L, DHHV): dh / (denominator + eps)
    c_prev: jax.Array  # (B, NH, NC, DHQK, DHHV): each chunk's start state
    dc_next: jax.Array  # (B, NH, NC, DHQK, DHHV): the gradient of each chunk's end state


def _parallel_bw_common(
    call: KernelCall, matQ, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """Per-chunk quantities the three parallel backward launchers share (vecR None: no hard resets)."""
    vecA, vecB, vecR = chunk_gates
    matC_all, _, scaM_all = chunk_states
    chunk_size = call.chunk_size
    dhqk = matQ.shape[-1]
    dtype = vecB.dtype
    m = chunked(vecM_out, chunk_size).astype(dtype)  # (B, NH, NC, L)
    vecR = jnp.full(vecB.shape, -1, jnp.int32) if vecR is None else vecR
    log_i = chunked(log_input_gate(vecI, call.input_gate), chunk_size)
    return _BwCommon(
        qk_scale=call.scale_for(dhqk),
        decay=_intra_chunk_decay(vecB, vecR, log_i, m),
        q_inter=_inter_chunk_decay(vecB, vecR, scaM_all[..., :-1, None].astype(dtype), m),
        k_inter=jnp.exp(vecA - scaM_all[..., 1:, None].astype(dtype)),
        dh_bar=chunked(matDeltaH, chunk_size) / (chunked(vecN_out, chunk_size) + call.eps)[..., None],
        c_prev=split_states(matC_all, dhqk)[:, :, :-1],
        dc_next=split_states(matDeltaC_states, dhqk)[:, :, 1:],
    )


def _with_row_dots(grad, x, output_dtype):
    """grad in output_dtype, and Σ_d x·grad (B, NH, S) from the unrounded grad."""
    return grad.astype(output_dtype), jnp.sum(x.astype(grad.dtype) * grad, axis=-1)


_PARALLEL_BW_LAUNCHER_DOC = """

    Arrays in the order of upstream's `mlstm_chunkwise__parallel_bw_dV`, grouped: the forward inputs,
    chunk_gates = (vecA, vecB, vecR) (B, NH, NC, L) with vecR None where there are no hard resets (else vecB and
    vecR from `compute_chunkwise_reset_gates`), chunk_states = (matC_all, vecN_all, scaM_all), the forward
    outputs vecN_out (the denominator) and vecM_out (the running log-max), matDeltaH (B, NH, S, DHHV) and
    matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV). Uses call.chunk_size, call.scale_for(DHQK), call.eps,
    call.output_dtype and call.input_gate ("sigmoid" reads vecI as log σ(ĩ); vecA must come from
    `compute_chunkwise_log_gates_vecB_vecA` with the same).
    """


def parallel_bw_dQ(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    shared = _parallel_bw_common(
        call, matQ, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
    )
    k, v = chunked(matK, call.chunk_size), chunked(matV, call.chunk_size)
    d_scores = _einsum("bhcle,bhcje->bhclj", shared.dh_bar, v, matQ.dtype) * shared.decay  # (B, NH, NC, L, L)
    dq = _einsum("bhclj,bhcjd->bhcld", d_scores, k, matQ.dtype)  # (B, NH, NC, L, DHQK)
    # (B, NH, NC, L, DHQK)
    dq += _einsum("bhcle,bhcde->bhcld", shared.dh_bar * shared.q_inter[..., None], shared.c_prev, matQ.dtype)
    dq = unchunked(dq * shared.qk_scale)
    return _with_row_dots(dq, matQ, call.output_dtype)


def parallel_bw_dK(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    shared = _parallel_bw_common(
        call, matQ, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
    )
    q, v = chunked(matQ, call.chunk_size), chunked(matV, call.chunk_size)
    d_scores = _einsum("bhcle,bhcje->bhclj", shared.dh_bar, v, matQ.dtype) * shared.decay  # (B, NH, NC, L, L)
    dk = _einsum("bhclj,bhcld->bhcjd", d_scores, q, matQ.dtype) * shared.qk_scale  # (B, NH, NC, L, DHQK)
    # (B, NH, NC, L, DHQK)
    dk += _einsum("bhcje,bhcde->bhcjd", v, shared.dc_next, matQ.dtype) * shared.k_inter[..., None]
    return _with_row_dots(unchunked(dk), matK, call.output_dtype)


def parallel_bw_dV(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    del matV
    shared = _parallel_bw_common(
        call, matQ, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
    )
    q, k = chunked(matQ, call.chunk_size), chunked(matK, call.chunk_size)
    scores = _einsum("bhcld,bhcjd->bhclj", q, k, matQ.dtype) * shared.qk_scale * shared.decay  # (B, NH, NC, L, L)
    dv = _einsum("bhclj,bhcle->bhcje", scores, shared.dh_bar, matQ.dtype)  # (B, NH, NC, L, DHHV)
    # (B, NH, NC, L, DHHV)
    dv += _einsum("bhcjd,bhcde->bhcje", k.astype(scores.dtype) * shared.k_inter[..., None], shared.dc_next, matQ.dtype)
    return unchunked(dv).astype(call.output_dtype)


_LAUNCHER_ROW_DOTS_DOC = "Returns (d{0}, Σ_d {0}·d{0} (B, NH, S) from the unrounded gradient)."
parallel_bw_dQ.__doc__ = (
    "Gradient of q, (B, NH, S, DHQK). " + _LAUNCHER_ROW_DOTS_DOC.format("q") + _PARALLEL_BW_LAUNCHER_DOC
)
parallel_bw_dK.__doc__ = (
    "Gradient of k, (B, NH, S, DHQK). " + _LAUNCHER_ROW_DOTS_DOC.format("k") + _PARALLEL_BW_LAUNCHER_DOC
)
parallel_bw_dV.__doc__ = "Gradient of v, (B, NH, S, DHHV)." + _PARALLEL_BW_LAUNCHER_DOC


def recurrent_step(call: KernelCall, q, k, v, i, f, c, n, m):
    """One step of the cell in jnp: shapes and math of the step kernel (pallas_triton/recurrent_step.py),
    (h (B, NH, DHHV) in q's dtype, (c, n, m) in c's dtype). q, k (B, NH, DHQK), v (B, NH, DHHV), i, f (B, NH),
    c (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH). Uses call.eps, call.input_gate, call.normalize and the qk
    scale `call.scale_for(DHQK)`, as the step kernel does (call.chunk_size is not read)."""
    dtype = c.dtype
    q_scaled = q.astype(dtype) * call.scale_for(q.shape[-1])
    log_f = jax.nn.log_sigmoid(f.astype(dtype))  # (B, NH)
    log_i = log_input_gate(i, call.input_gate).astype(dtype)  # (B, NH)
    m_new = jnp.maximum(jnp.maximum(log_f + m, log_i), MIN_LOG_SCALE) if tracks_max_state(call.input_gate) else m
    decay = jnp.exp(log_f + m - m_new)[..., None]  # (B, NH, 1)
    weight = jnp.exp(log_i - m_new)[..., None]
    k = k.astype(dtype)
    c = decay[..., None] * c + (weight * k)[..., :, None] * v.astype(dtype)[..., None, :]  # (B, NH, DHQK, DHHV)
    n = decay * n + weight * k  # (B, NH, DHQK)
    num = jnp.einsum("bhd,bhde->bhe", q_scaled, c, precision=lax.Precision.HIGHEST)  # (B, NH, DHHV)
    if call.normalize:
        den = jnp.maximum(jnp.abs(jnp.sum(q_scaled * n, axis=-1)), jnp.exp(-m_new)) + call.eps
    else:  # h = q C: e^{−m} only undoes the states' scale
        den = jnp.exp(-m_new)
    return (num / den[..., None]).astype(q.dtype), (c, n, m_new)


# ----------------------------------------------------------------------------- twins with the upstream signatures


def mlstm_chunkwise__recurrent_fw_C(
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecF: jax.Array,  # (B, NH, S)
    vecI: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaMinter_initial: jax.Array | None = None,  # (B, NH)
    chunk_size: int = 64,
    num_stages: int | None = None,
    num_warps: int | None = None,
    save_states_every_nth_chunk: int = 1,
    *,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    states_dtype=None,
    input_gate: str = "exponential",
):
    """States at every chunk boundary: (matC_states, vecN_states, scaMinter_states), index 0 = initial.

    Shapes (B, NH, (NC+1)*DHQK, DHHV), (B, NH, (NC+1)*DHQK), (B, NH, NC+1) with NC = S / (chunk_size
    · save_states_every_nth_chunk): saving every n-th state of chunk L is the state sequence of chunk n·L.
    A narrower `states_dtype` stores matC_states in it and adds the last C state at full precision.
    `input_gate` "sigmoid": σ(ĩ) as input gate, m not tracked (stays at its initial value).
    Checks chunk_size · save_states_every_nth_chunk and input_gate, then runs `recurrent_fw_C`.
    """
    del num_stages, num_warps, siz_b_DHQK, siz_b_DHHV
    validate_chunk_size(chunk_size * save_states_every_nth_chunk, matK.shape[2])
    validate_gate_options(input_gate)
    call = KernelCall(
        chunk_size,
        input_gate=input_gate,
        states_dtype=_dtype_name(states_dtype),
        save_states_every_nth_chunk=save_states_every_nth_chunk,
    )
    return recurrent_fw_C(call, matK, matV, vecF, vecI, matC_initial, vecN_initial, scaMinter_initial)


def mlstm_chunkwise__parallel_fw_Hintra(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_all: jax.Array,  # (B, NH, (NC+1)*DHQK, DHHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1)*DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 1e-6,
    output_dtype=jnp.float32,
    *,
    input_gate: str = "exponential",
    normalize: bool = True,
):
    """Outputs of every chunk from its start state: (matH_out (B,NH,S,DHHV), vecN_out (B,NH,S), vecM_out (B,NH,S)).

    vecN_out is the denominator max(|q̄·n + Σ S|, e^{-m}) and vecM_out the running log-max m_t. `input_gate`
    "sigmoid": σ(ĩ) as input gate, m not tracked; there `normalize=False` gives h = q̄·C, vecN_out = e^{−m}.
    Checks chunk_size, input_gate and normalize, then runs `parallel_fw_Hintra`.
    """
    del siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    validate_chunk_size(chunk_size, matQ.shape[2])
    validate_gate_options(input_gate, normalize)
    call = KernelCall(
        chunk_size, qk_scale=qk_scale, eps=eps, input_gate=input_gate, normalize=normalize, output_dtype=output_dtype
    )
    return parallel_fw_Hintra(call, matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all)


def mlstm_chunkwise__recurrent_bw_dC(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    vecF: jax.Array,  # (B, NH, S)
    scaM_inter: jax.Array,  # (B, NH, NC+1)
    vecM_combine: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHHV)
    vecN_out: jax.Array,  # (B, NH, S)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    qk_scale: float | None = None,
    chunk_size: int = 64,
    save_states_every_nth_chunk: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    *,
    matC_states: jax.Array | None = None,  # (B, NH, (NC+1)*DHQK, DHHV)
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    states_dtype=None,
):
    """Gradients of the chunk-boundary C states, last to first: matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV).

    Given the forward states `matC_states`, returns (matDeltaC_states, scaCdC_states) with
    scaCdC_states (B, NH, NC+1) = <dC_k, C_k> per boundary (the f̃ gradient's term for pairs crossing it).
    A narrower `states_dtype` stores matDeltaC_states in it and adds dC_0 at full precision as a last output.
    Checks chunk_size · save_states_every_nth_chunk, then runs `recurrent_bw_dC`.
    """
    del num_warps, num_stages, siz_b_DHQK, siz_b_DHHV
    validate_chunk_size(chunk_size * save_states_every_nth_chunk, matQ.shape[2])
    call = KernelCall(
        chunk_size,
        qk_scale=qk_scale,
        eps=eps,
        states_dtype=_dtype_name(states_dtype),
        save_states_every_nth_chunk=save_states_every_nth_chunk,
    )
    return recurrent_bw_dC(call, matQ, vecF, scaM_inter, vecM_combine, matDeltaH, vecN_out, matDeltaC_last, matC_states)


def _parallel_bw_call(matQ, chunk_size, qk_scale, eps, output_dtype, input_gate) -> KernelCall:
    """The checked `KernelCall` of a parallel backward twin."""
    validate_chunk_size(chunk_size, matQ.shape[2])
    validate_gate_options(input_gate)
    return KernelCall(chunk_size, qk_scale=qk_scale, eps=eps, input_gate=input_gate, output_dtype=output_dtype)


_PARALLEL_BW_DOC = """

    Args follow `mlstm_chunkwise__parallel_bw_dV` of the upstream Triton kernels: the forward inputs, the
    chunk gates vecA / vecB (B, NH, NC, L), the forward states and outputs (vecN_out is the denominator,
    vecM_out the running log-max), matDeltaH (B, NH, S, DHHV) and matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV).
    With hard resets (f̃ = −∞), pass vecB and `vecR` from `compute_chunkwise_reset_gates`. `input_gate`
    "sigmoid" reads vecI as log σ(ĩ); vecA must come from `compute_chunkwise_log_gates_vecB_vecA` with the same.
    Checks chunk_size and input_gate, then runs the launcher of the same name without the prefix.
    """


def mlstm_chunkwise__parallel_bw_dQ(
    matQ,
    matK,
    matV,
    vecI,
    vecA,
    vecB,
    matC_all,
    vecN_all,
    scaM_all,
    vecN_out,
    vecM_out,
    matDeltaH,
    matDeltaC_states,
    qk_scale=None,
    chunk_size=64,
    siz_b_LQ=32,
    siz_b_LKV=32,
    siz_b_DHQK=None,
    siz_b_DHHV=None,
    num_warps=None,
    num_stages=None,
    eps=0.0,
    output_dtype=jnp.float32,
    *,
    return_row_dots=False,
    vecR=None,
    input_gate="exponential",
):
    del siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    call = _parallel_bw_call(matQ, chunk_size, qk_scale, eps, output_dtype, input_gate)
    dq, row_dots = parallel_bw_dQ(
        call,
        matQ,
        matK,
        matV,
        vecI,
        (vecA, vecB, vecR),
        (matC_all, vecN_all, scaM_all),
        vecN_out,
        vecM_out,
        matDeltaH,
        matDeltaC_states,
    )
    return (dq, row_dots) if return_row_dots else dq


def mlstm_chunkwise__parallel_bw_dK(
    matQ,
    matK,
    matV,
    vecI,
    vecA,
    vecB,
    matC_all,
    vecN_all,
    scaM_all,
    vecN_out,
    vecM_out,
    matDeltaH,
    matDeltaC_states,
    qk_scale=None,
    chunk_size=64,
    siz_b_LQ=32,
    siz_b_LKV=32,
    siz_b_DHQK=None,
    siz_b_DHHV=None,
    num_warps=None,
    num_stages=None,
    eps=0.0,
    output_dtype=jnp.float32,
    *,
    return_row_dots=False,
    vecR=None,
    input_gate="exponential",
):
    del siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    call = _parallel_bw_call(matQ, chunk_size, qk_scale, eps, output_dtype, input_gate)
    dk, row_dots = parallel_bw_dK(
        call,
        matQ,
        matK,
        matV,
        vecI,
        (vecA, vecB, vecR),
        (matC_all, vecN_all, scaM_all),
        vecN_out,
        vecM_out,
        matDeltaH,
        matDeltaC_states,
    )
    return (dk, row_dots) if return_row_dots else dk


def mlstm_chunkwise__parallel_bw_dV(
    matQ,
    matK,
    matV,
    vecI,
    vecA,
    vecB,
    matC_all,
    vecN_all,
    scaM_all,
    vecN_out,
    vecM_out,
    matDeltaH,
    matDeltaC_states,
    qk_scale=None,
    chunk_size=64,
    siz_b_LQ=32,
    siz_b_LKV=32,
    siz_b_DHQK=None,
    siz_b_DHHV=None,
    num_warps=None,
    num_stages=None,
    eps=0.0,
    output_dtype=jnp.float32,
    *,
    vecR=None,
    input_gate="exponential",
):
    del siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    call = _parallel_bw_call(matQ, chunk_size, qk_scale, eps, output_dtype, input_gate)
    return parallel_bw_dV(
        call,
        matQ,
        matK,
        matV,
        vecI,
        (vecA, vecB, vecR),
        (matC_all, vecN_all, scaM_all),
        vecN_out,
        vecM_out,
        matDeltaH,
        matDeltaC_states,
    )


_ROW_DOTS_DOC = "With `return_row_dots`, also returns Σ_d {0}·d{0} (B, NH, S) from the unrounded gradient."
mlstm_chunkwise__parallel_bw_dQ.__doc__ = (
    "Gradient of q, (B, NH, S, DHQK). " + _ROW_DOTS_DOC.format("q") + _PARALLEL_BW_DOC
)
mlstm_chunkwise__parallel_bw_dK.__doc__ = (
    "Gradient of k, (B, NH, S, DHQK). " + _ROW_DOTS_DOC.format("k") + _PARALLEL_BW_DOC
)
mlstm_chunkwise__parallel_bw_dV.__doc__ = "Gradient of v, (B, NH, S, DHHV)." + _PARALLEL_BW_DOC


def mlstm_recurrent_step(
    q, k, v, i, f, c, n, m, *, eps: float = 1e-6, input_gate: str = "exponential", normalize: bool = True
):
    """One step of the cell in jnp, the XLA backend of `pallas_mlstm.mlstm_recurrent_step`: shapes and math
    of the step kernel (pallas_triton/recurrent_step.py), (h (B, NH, DHHV) in q's dtype, (c, n, m) float32).
    Checks input_gate and normalize, then runs `recurrent_step`."""
    validate_gate_options(input_gate, normalize)
    call = KernelCall(chunk_size=1, eps=eps, input_gate=input_gate, normalize=normalize)  # a step has no chunks
    return recurrent_step(call, q, k, v, i, f, c, n, m)


KERNELS = KernelSet(
    recurrent_fw_C=recurrent_fw_C,
    parallel_fw_Hintra=parallel_fw_Hintra,
    recurrent_bw_dC=recurrent_bw_dC,
    parallel_bw_dQ=parallel_bw_dQ,
    parallel_bw_dK=parallel_bw_dK,
    parallel_bw_dV=parallel_bw_dV,
    recurrent_step=recurrent_step,
)
