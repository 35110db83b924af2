"""The XLA backend's kernels: each of the six chunkwise kernels in plain jnp, with the Pallas kernel's signature.

Each `mlstm_chunkwise__*` function here takes the arguments of the Pallas kernel of the same name
(docs/math.md §3.3), so the one orchestration (`pallas_mlstm.chunkwise`) runs either set; the launch
arguments (`siz_b_*`, `num_warps`, `num_stages`) are accepted and ignored. They run on any device, and the
kernel tests hold each Pallas kernel against its twin here.

Conventions: matmul operands in the input dtype, accumulation, gates and states in
`promote_types(input dtype, float32)`; state buffers are laid out as
`matC_all (B, NH, (NC+1)*DHQK, DHHV)`, `vecN_all (B, NH, (NC+1)*DHQK)`, `scaM_all (B, NH, NC+1)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_mlstm.gates import (
    MIN_LOG_SCALE,
    acc_dtype_of,
    chunk_log_forget,
    chunk_max_state,
    chunked,
    compute_chunkwise_log_gates_vecB_vecA,
    compute_chunkwise_reset_gates,
    compute_chunkwise_vecB,
    compute_chunkwise_vecM,
    log_input_gate,
    tracks_max_state,
    unchunked,
)
from pallas_mlstm.validation import validate_gate_options
from pallas_mlstm.states import join_states, split_states


def _einsum(subscripts: str, a: jax.Array, b: jax.Array, operand_dtype) -> jax.Array:
    """einsum with operands cast to `operand_dtype` and accumulation in float32 (or float64)."""
    operand_dtype = jnp.dtype(operand_dtype)
    wide = operand_dtype.itemsize >= 4
    return jnp.einsum(
        subscripts,
        a.astype(operand_dtype),
        b.astype(operand_dtype),
        preferred_element_type=acc_dtype_of(operand_dtype),
        precision=lax.Precision.HIGHEST if wide else lax.Precision.DEFAULT,
    )


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
    """
    del num_stages, num_warps, siz_b_DHQK, siz_b_DHHV
    batch, heads, seq_len, dhqk = matK.shape
    dhhv = matV.shape[-1]
    chunk_size = chunk_size * save_states_every_nth_chunk
    dtype = acc_dtype_of(matK.dtype)
    _, vecA = compute_chunkwise_log_gates_vecB_vecA(vecI, vecF, chunk_size, input_gate=input_gate)
    tracks_max = tracks_max_state(input_gate)
    scaG = jnp.sum(chunk_log_forget(vecF, chunk_size), axis=-1)  # (B, NH, NC)

    c = jnp.zeros((batch, heads, dhqk, dhhv), dtype) if matC_initial is None else matC_initial.astype(dtype)
    n = jnp.zeros((batch, heads, dhqk), dtype) if vecN_initial is None else vecN_initial.astype(dtype)
    m = jnp.zeros((batch, heads), dtype) if scaMinter_initial is None else scaMinter_initial.astype(dtype)

    def chunk_step(carry, xs):
        c, n, m = carry
        k, v, a, g = xs  # (B, NH, L, DHQK), (B, NH, L, DHHV), (B, NH, L), (B, NH)
        m_next = chunk_max_state(g, m, a) if tracks_max else m
        decay = jnp.exp(g + m - m_next)
        k_weighted = k.astype(dtype) * jnp.exp(a - m_next[..., None])[..., None]
        c_next = decay[..., None, None] * c + _einsum("bhld,bhle->bhde", k_weighted, v, matK.dtype)
        n_next = decay[..., None] * n + jnp.sum(k_weighted, axis=-2)
        return (c_next, n_next, m_next), (c_next, n_next, m_next)

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
    xs = (chunk_major(chunked(matK, chunk_size)), chunk_major(chunked(matV, chunk_size)),
          chunk_major(vecA), chunk_major(scaG))
    _, (c_all, n_all, m_all) = lax.scan(chunk_step, (c, n, m), xs)
    c_all = jnp.concatenate([c[:, :, None], jnp.moveaxis(c_all, 0, 2)], axis=2)  # (B, NH, NC+1, DHQK, DHHV)
    n_all = jnp.concatenate([n[:, :, None], jnp.moveaxis(n_all, 0, 2)], axis=2)  # (B, NH, NC+1, DHQK)
    m_all = jnp.concatenate([m[:, :, None], jnp.moveaxis(m_all, 0, 2)], axis=2)  # (B, NH, NC+1)
    if states_dtype is None or jnp.dtype(states_dtype) == dtype:
        return join_states(c_all), join_states(n_all), m_all
    return join_states(c_all.astype(states_dtype)), join_states(n_all), m_all, c_all[:, :, -1]


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
    """
    del siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    validate_gate_options(input_gate, normalize)
    dhqk = matQ.shape[-1]
    qk_scale = dhqk**-0.5 if qk_scale is None else qk_scale
    vecB, vecR = compute_chunkwise_reset_gates(vecF, chunk_size)  # (B, NH, NC, L)
    vecM_out = compute_chunkwise_vecM(vecB, vecR, vecI, scaM_all, input_gate=input_gate)
    dtype = vecB.dtype
    q, k, v = (chunked(x, chunk_size) for x in (matQ, matK, matV))  # (B, NH, NC, L, D)
    m = chunked(vecM_out, chunk_size)  # (B, NH, NC, L)
    m_prev = scaM_all[..., :-1, None].astype(dtype)  # (B, NH, NC, 1)
    c_prev = split_states(matC_all, dhqk)[:, :, :-1]  # (B, NH, NC, DHQK, DHHV)
    n_prev = split_states(vecN_all, dhqk)[:, :, :-1].astype(dtype)  # (B, NH, NC, DHQK)

    decay = _intra_chunk_decay(vecB, vecR, chunked(log_input_gate(vecI, input_gate), chunk_size), m)  # (B, NH, NC, L, L)
    scores = _einsum("bhcld,bhcjd->bhclj", q, k, matQ.dtype) * qk_scale * decay
    q_inter_scale = qk_scale * _inter_chunk_decay(vecB, vecR, m_prev, m)  # (B, NH, NC, L)
    num = _einsum("bhcld,bhcde->bhcle", q, c_prev, matQ.dtype) * q_inter_scale[..., None]
    num += _einsum("bhclj,bhcje->bhcle", scores, v, matQ.dtype)
    den = jnp.sum(q.astype(dtype) * n_prev[..., None, :], axis=-1) * q_inter_scale + jnp.sum(scores, axis=-1)
    if normalize:
        den = jnp.maximum(jnp.abs(den), jnp.exp(-m))
        matH_out = num / (den + eps)[..., None]
    else:  # h = q̄ C: e^{−m} only undoes the states' scale
        den = jnp.exp(-m)
        matH_out = num / den[..., None]
    return unchunked(matH_out).astype(output_dtype), unchunked(den), vecM_out


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
    """
    del num_warps, num_stages, siz_b_DHQK, siz_b_DHHV
    batch, heads, _, dhqk = matQ.shape
    dhhv = matDeltaH.shape[-1]
    chunk_size = chunk_size * save_states_every_nth_chunk
    qk_scale = dhqk**-0.5 if qk_scale is None else qk_scale
    vecB = compute_chunkwise_vecB(vecF, chunk_size)  # (B, NH, NC, L), −∞ from a reset on
    dtype = vecB.dtype
    m_prev = scaM_inter[..., :-1].astype(dtype)  # (B, NH, NC)
    m_next = scaM_inter[..., 1:].astype(dtype)
    q_bar = chunked(matQ, chunk_size).astype(dtype) * (
        qk_scale * jnp.exp(vecB + m_prev[..., None] - chunked(vecM_combine, chunk_size))
    )[..., None]  # (B, NH, NC, L, DHQK)
    dh_bar = chunked(matDeltaH, chunk_size) / (chunked(vecN_out, chunk_size) + eps)[..., None]
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
    narrow = states_dtype is not None and jnp.dtype(states_dtype) != dtype
    results = [join_states(dc_all.astype(states_dtype) if narrow else dc_all)]
    if matC_states is not None:
        results.append(jnp.sum(dc_all * split_states(matC_states, dhqk).astype(dtype), axis=(-2, -1)))  # (B, NH, NC+1)
    if narrow:
        results.append(dc_all[:, :, 0])
    return results[0] if len(results) == 1 else tuple(results)


def _parallel_bw_common(matQ, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
                        matDeltaC_states, qk_scale, chunk_size, eps, input_gate):
    """Per-chunk quantities the three parallel backward twins share (vecR None: no hard resets)."""
    dhqk = matQ.shape[-1]
    dtype = vecB.dtype
    m = chunked(vecM_out, chunk_size).astype(dtype)  # (B, NH, NC, L)
    vecR = jnp.full(vecB.shape, -1, jnp.int32) if vecR is None else vecR
    return dict(
        qk_scale=dhqk**-0.5 if qk_scale is None else qk_scale,
        decay=_intra_chunk_decay(vecB, vecR, chunked(log_input_gate(vecI, input_gate), chunk_size), m),  # (B, NH, NC, L, L)
        q_inter=_inter_chunk_decay(vecB, vecR, scaM_all[..., :-1, None].astype(dtype), m),  # (B, NH, NC, L)
        k_inter=jnp.exp(vecA - scaM_all[..., 1:, None].astype(dtype)),  # (B, NH, NC, L)
        dh_bar=chunked(matDeltaH, chunk_size) / (chunked(vecN_out, chunk_size) + eps)[..., None],
        c_prev=split_states(matC_all, dhqk)[:, :, :-1],  # (B, NH, NC, DHQK, DHHV)
        dc_next=split_states(matDeltaC_states, dhqk)[:, :, 1:],  # (B, NH, NC, DHQK, DHHV)
    )


def _with_row_dots(grad, x, output_dtype, return_row_dots):
    """grad in output_dtype, and with return_row_dots also Σ_d x·grad (B, NH, S) from the unrounded grad."""
    if not return_row_dots:
        return grad.astype(output_dtype)
    return grad.astype(output_dtype), jnp.sum(x.astype(grad.dtype) * grad, axis=-1)


_PARALLEL_BW_DOC = """

    Args follow `mlstm_chunkwise__parallel_bw_dV` of the upstream Triton kernels: the forward inputs, the
    chunk gates vecA / vecB (B, NH, NC, L), the forward states and outputs (vecN_out is the denominator,
    vecM_out the running log-max), matDeltaH (B, NH, S, DHHV) and matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV).
    With hard resets (f̃ = −∞), pass vecB and `vecR` from `compute_chunkwise_reset_gates`. `input_gate`
    "sigmoid" reads vecI as log σ(ĩ); vecA must come from `compute_chunkwise_log_gates_vecB_vecA` with the same.
    """


def mlstm_chunkwise__parallel_bw_dQ(
    matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out, matDeltaH,
    matDeltaC_states, qk_scale=None, chunk_size=64, siz_b_LQ=32, siz_b_LKV=32, siz_b_DHQK=None,
    siz_b_DHHV=None, num_warps=None, num_stages=None, eps=0.0, output_dtype=jnp.float32, *,
    return_row_dots=False, vecR=None, input_gate="exponential",
):
    del vecN_all, siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    g = _parallel_bw_common(matQ, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
                            matDeltaC_states, qk_scale, chunk_size, eps, input_gate)
    k, v = chunked(matK, chunk_size), chunked(matV, chunk_size)
    d_scores = _einsum("bhcle,bhcje->bhclj", g["dh_bar"], v, matQ.dtype) * g["decay"]  # (B, NH, NC, L, L)
    dq = _einsum("bhclj,bhcjd->bhcld", d_scores, k, matQ.dtype)
    dq += _einsum("bhcle,bhcde->bhcld", g["dh_bar"] * g["q_inter"][..., None], g["c_prev"], matQ.dtype)
    dq = unchunked(dq * g["qk_scale"])
    return _with_row_dots(dq, matQ, output_dtype, return_row_dots)


def mlstm_chunkwise__parallel_bw_dK(
    matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out, matDeltaH,
    matDeltaC_states, qk_scale=None, chunk_size=64, siz_b_LQ=32, siz_b_LKV=32, siz_b_DHQK=None,
    siz_b_DHHV=None, num_warps=None, num_stages=None, eps=0.0, output_dtype=jnp.float32, *,
    return_row_dots=False, vecR=None, input_gate="exponential",
):
    del vecN_all, siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    g = _parallel_bw_common(matQ, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
                            matDeltaC_states, qk_scale, chunk_size, eps, input_gate)
    q, v = chunked(matQ, chunk_size), chunked(matV, chunk_size)
    d_scores = _einsum("bhcle,bhcje->bhclj", g["dh_bar"], v, matQ.dtype) * g["decay"]  # (B, NH, NC, L, L)
    dk = _einsum("bhclj,bhcld->bhcjd", d_scores, q, matQ.dtype) * g["qk_scale"]
    dk += _einsum("bhcje,bhcde->bhcjd", v, g["dc_next"], matQ.dtype) * g["k_inter"][..., None]
    return _with_row_dots(unchunked(dk), matK, output_dtype, return_row_dots)


def mlstm_chunkwise__parallel_bw_dV(
    matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out, matDeltaH,
    matDeltaC_states, qk_scale=None, chunk_size=64, siz_b_LQ=32, siz_b_LKV=32, siz_b_DHQK=None,
    siz_b_DHHV=None, num_warps=None, num_stages=None, eps=0.0, output_dtype=jnp.float32, *, vecR=None,
    input_gate="exponential",
):
    del matV, vecN_all, siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    g = _parallel_bw_common(matQ, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
                            matDeltaC_states, qk_scale, chunk_size, eps, input_gate)
    q, k = chunked(matQ, chunk_size), chunked(matK, chunk_size)
    scores = _einsum("bhcld,bhcjd->bhclj", q, k, matQ.dtype) * g["qk_scale"] * g["decay"]  # (B, NH, NC, L, L)
    dv = _einsum("bhclj,bhcle->bhcje", scores, g["dh_bar"], matQ.dtype)
    dv += _einsum("bhcjd,bhcde->bhcje", k.astype(scores.dtype) * g["k_inter"][..., None], g["dc_next"], matQ.dtype)
    return unchunked(dv).astype(output_dtype)


_ROW_DOTS_DOC = "With `return_row_dots`, also returns Σ_d {0}·d{0} (B, NH, S) from the unrounded gradient."
mlstm_chunkwise__parallel_bw_dQ.__doc__ = "Gradient of q, (B, NH, S, DHQK). " + _ROW_DOTS_DOC.format("q") + _PARALLEL_BW_DOC
mlstm_chunkwise__parallel_bw_dK.__doc__ = "Gradient of k, (B, NH, S, DHQK). " + _ROW_DOTS_DOC.format("k") + _PARALLEL_BW_DOC
mlstm_chunkwise__parallel_bw_dV.__doc__ = "Gradient of v, (B, NH, S, DHHV)." + _PARALLEL_BW_DOC


def mlstm_recurrent_step(q, k, v, i, f, c, n, m, *, eps: float = 1e-6, input_gate: str = "exponential",
                         normalize: bool = True):
    """One step of the cell in jnp, the XLA backend of `pallas_mlstm.mlstm_recurrent_step`: shapes and math
    of the step kernel (pallas_triton/recurrent_step.py), (h (B, NH, DHHV) in q's dtype, (c, n, m) float32)."""
    dtype = c.dtype
    q_scaled = q.astype(dtype) * q.shape[-1] ** -0.5
    log_f = jax.nn.log_sigmoid(f.astype(dtype))  # (B, NH)
    log_i = log_input_gate(i, input_gate).astype(dtype)  # (B, NH)
    m_new = jnp.maximum(jnp.maximum(log_f + m, log_i), MIN_LOG_SCALE) if tracks_max_state(input_gate) else m
    decay = jnp.exp(log_f + m - m_new)[..., None]  # (B, NH, 1)
    weight = jnp.exp(log_i - m_new)[..., None]
    k = k.astype(dtype)
    c = decay[..., None] * c + (weight * k)[..., :, None] * v.astype(dtype)[..., None, :]  # (B, NH, DHQK, DHHV)
    n = decay * n + weight * k  # (B, NH, DHQK)
    num = jnp.einsum("bhd,bhde->bhe", q_scaled, c, precision=lax.Precision.HIGHEST)
    if normalize:
        den = jnp.maximum(jnp.abs(jnp.sum(q_scaled * n, axis=-1)), jnp.exp(-m_new)) + eps
    else:  # h = q C: e^{−m} only undoes the states' scale
        den = jnp.exp(-m_new)
    return (num / den[..., None]).astype(q.dtype), (c, n, m_new)
