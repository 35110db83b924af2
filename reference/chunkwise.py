"""Chunkwise mLSTM in plain jnp: a twin of every kernel, and the one orchestration both kernel sets use.

Each `mlstm_chunkwise__*` function here has the signature of the Pallas kernel of the same
name (docs/math.md §3.3); the launch arguments (`siz_b_*`, `num_warps`, `num_stages`) are accepted
and ignored. `mlstm_chunkwise_fw` / `mlstm_chunkwise_bw` chain six kernels taken from a
`KernelSet` (these twins by default), and `mlstm_chunkwise` wraps them in a `jax.custom_vjp`.

Conventions: matmul operands in the input dtype, accumulation, gates and states in
`promote_types(input dtype, float32)`; state buffers are laid out as
`matC_all (B, NH, (NC+1)*DHQK, DHHV)`, `vecN_all (B, NH, (NC+1)*DHQK)`, `scaM_all (B, NH, NC+1)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

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
    unchunked,
)
from pallas_mlstm.states import join_states, split_states
from pallas_mlstm.validation import validate_chunk_size, validate_mlstm_inputs


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


# ----------------------------------------------------------------------------- kernel twins


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
):
    """States at every chunk boundary: (matC_states, vecN_states, scaMinter_states), index 0 = initial.

    Shapes (B, NH, (NC+1)*DHQK, DHHV), (B, NH, (NC+1)*DHQK), (B, NH, NC+1) with NC = S / (chunk_size
    · save_states_every_nth_chunk): saving every n-th state of chunk L is the state sequence of chunk n·L.
    """
    del num_stages, num_warps, siz_b_DHQK, siz_b_DHHV
    batch, heads, seq_len, dhqk = matK.shape
    dhhv = matV.shape[-1]
    chunk_size = chunk_size * save_states_every_nth_chunk
    dtype = acc_dtype_of(matK.dtype)
    _, vecA = compute_chunkwise_log_gates_vecB_vecA(vecI, vecF, chunk_size)
    scaG = jnp.sum(chunk_log_forget(vecF, chunk_size), axis=-1)  # (B, NH, NC)

    c = jnp.zeros((batch, heads, dhqk, dhhv), dtype) if matC_initial is None else matC_initial.astype(dtype)
    n = jnp.zeros((batch, heads, dhqk), dtype) if vecN_initial is None else vecN_initial.astype(dtype)
    m = jnp.zeros((batch, heads), dtype) if scaMinter_initial is None else scaMinter_initial.astype(dtype)

    def chunk_step(carry, xs):
        c, n, m = carry
        k, v, a, g = xs  # (B, NH, L, DHQK), (B, NH, L, DHHV), (B, NH, L), (B, NH)
        m_next = chunk_max_state(g, m, a)
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
    return join_states(c_all), join_states(n_all), m_all


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
):
    """Outputs of every chunk from its start state: (matH_out (B,NH,S,DHHV), vecN_out (B,NH,S), vecM_out (B,NH,S)).

    vecN_out is the denominator max(|q̄·n + Σ S|, e^{-m}) and vecM_out the running log-max m_t.
    """
    del siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    dhqk = matQ.shape[-1]
    qk_scale = dhqk**-0.5 if qk_scale is None else qk_scale
    vecB, vecR = compute_chunkwise_reset_gates(vecF, chunk_size)  # (B, NH, NC, L)
    vecM_out = compute_chunkwise_vecM(vecB, vecR, vecI, scaM_all)
    dtype = vecB.dtype
    q, k, v = (chunked(x, chunk_size) for x in (matQ, matK, matV))  # (B, NH, NC, L, D)
    m = chunked(vecM_out, chunk_size)  # (B, NH, NC, L)
    m_prev = scaM_all[..., :-1, None].astype(dtype)  # (B, NH, NC, 1)
    c_prev = split_states(matC_all, dhqk)[:, :, :-1]  # (B, NH, NC, DHQK, DHHV)
    n_prev = split_states(vecN_all, dhqk)[:, :, :-1].astype(dtype)  # (B, NH, NC, DHQK)

    decay = _intra_chunk_decay(vecB, vecR, chunked(vecI, chunk_size), m)  # (B, NH, NC, L, L)
    scores = _einsum("bhcld,bhcjd->bhclj", q, k, matQ.dtype) * qk_scale * decay
    q_inter_scale = qk_scale * _inter_chunk_decay(vecB, vecR, m_prev, m)  # (B, NH, NC, L)
    num = _einsum("bhcld,bhcde->bhcle", q, c_prev, matQ.dtype) * q_inter_scale[..., None]
    num += _einsum("bhclj,bhcje->bhcle", scores, v, matQ.dtype)
    den = jnp.sum(q.astype(dtype) * n_prev[..., None, :], axis=-1) * q_inter_scale + jnp.sum(scores, axis=-1)
    den = jnp.maximum(jnp.abs(den), jnp.exp(-m))
    matH_out = num / (den + eps)[..., None]
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
):
    """Gradients of the chunk-boundary C states, last to first: matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV).

    Given the forward states `matC_states`, returns (matDeltaC_states, scaCdC_states) with
    scaCdC_states (B, NH, NC+1) = <dC_k, C_k> per boundary (the f̃ gradient's term for pairs crossing it).
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
    if matC_states is None:
        return join_states(dc_all)
    c_dc = jnp.sum(dc_all * split_states(matC_states, dhqk).astype(dtype), axis=(-2, -1))  # (B, NH, NC+1)
    return join_states(dc_all), c_dc


def _parallel_bw_common(matQ, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
                        matDeltaC_states, qk_scale, chunk_size, eps):
    """Per-chunk quantities the three parallel backward twins share (vecR None: no hard resets)."""
    dhqk = matQ.shape[-1]
    dtype = vecB.dtype
    m = chunked(vecM_out, chunk_size).astype(dtype)  # (B, NH, NC, L)
    vecR = jnp.full(vecB.shape, -1, jnp.int32) if vecR is None else vecR
    return dict(
        qk_scale=dhqk**-0.5 if qk_scale is None else qk_scale,
        decay=_intra_chunk_decay(vecB, vecR, chunked(vecI, chunk_size), m),  # (B, NH, NC, L, L)
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
    With hard resets (f̃ = −∞), pass vecB and `vecR` from `compute_chunkwise_reset_gates`.
    """


def mlstm_chunkwise__parallel_bw_dQ(
    matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out, matDeltaH,
    matDeltaC_states, qk_scale=None, chunk_size=64, siz_b_LQ=32, siz_b_LKV=32, siz_b_DHQK=None,
    siz_b_DHHV=None, num_warps=None, num_stages=None, eps=0.0, output_dtype=jnp.float32, *,
    return_row_dots=False, vecR=None,
):
    del vecN_all, siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    g = _parallel_bw_common(matQ, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
                            matDeltaC_states, qk_scale, chunk_size, eps)
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
    return_row_dots=False, vecR=None,
):
    del vecN_all, siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    g = _parallel_bw_common(matQ, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
                            matDeltaC_states, qk_scale, chunk_size, eps)
    q, v = chunked(matQ, chunk_size), chunked(matV, chunk_size)
    d_scores = _einsum("bhcle,bhcje->bhclj", g["dh_bar"], v, matQ.dtype) * g["decay"]  # (B, NH, NC, L, L)
    dk = _einsum("bhclj,bhcld->bhcjd", d_scores, q, matQ.dtype) * g["qk_scale"]
    dk += _einsum("bhcje,bhcde->bhcjd", v, g["dc_next"], matQ.dtype) * g["k_inter"][..., None]
    return _with_row_dots(unchunked(dk), matK, output_dtype, return_row_dots)


def mlstm_chunkwise__parallel_bw_dV(
    matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out, matDeltaH,
    matDeltaC_states, qk_scale=None, chunk_size=64, siz_b_LQ=32, siz_b_LKV=32, siz_b_DHQK=None,
    siz_b_DHHV=None, num_warps=None, num_stages=None, eps=0.0, output_dtype=jnp.float32, *, vecR=None,
):
    del matV, vecN_all, siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages
    g = _parallel_bw_common(matQ, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
                            matDeltaC_states, qk_scale, chunk_size, eps)
    q, k = chunked(matQ, chunk_size), chunked(matK, chunk_size)
    scores = _einsum("bhcld,bhcjd->bhclj", q, k, matQ.dtype) * g["qk_scale"] * g["decay"]  # (B, NH, NC, L, L)
    dv = _einsum("bhclj,bhcle->bhcje", scores, g["dh_bar"], matQ.dtype)
    dv += _einsum("bhcjd,bhcde->bhcje", k.astype(scores.dtype) * g["k_inter"][..., None], g["dc_next"], matQ.dtype)
    return unchunked(dv).astype(output_dtype)


_ROW_DOTS_DOC = "With `return_row_dots`, also returns Σ_d {0}·d{0} (B, NH, S) from the unrounded gradient."
mlstm_chunkwise__parallel_bw_dQ.__doc__ = "Gradient of q, (B, NH, S, DHQK). " + _ROW_DOTS_DOC.format("q") + _PARALLEL_BW_DOC
mlstm_chunkwise__parallel_bw_dK.__doc__ = "Gradient of k, (B, NH, S, DHQK). " + _ROW_DOTS_DOC.format("k") + _PARALLEL_BW_DOC
mlstm_chunkwise__parallel_bw_dV.__doc__ = "Gradient of v, (B, NH, S, DHHV)." + _PARALLEL_BW_DOC


# ----------------------------------------------------------------------------- orchestration


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """The six chunkwise kernels one orchestration chains; each has its upstream signature (docs/math.md §3.3)."""

    name: str
    recurrent_fw_C: Callable[..., Any]
    parallel_fw_Hintra: Callable[..., Any]
    recurrent_bw_dC: Callable[..., Any]
    parallel_bw_dQ: Callable[..., Any]
    parallel_bw_dK: Callable[..., Any]
    parallel_bw_dV: Callable[..., Any]


JNP_KERNELS = KernelSet(
    name="xla",
    recurrent_fw_C=mlstm_chunkwise__recurrent_fw_C,
    parallel_fw_Hintra=mlstm_chunkwise__parallel_fw_Hintra,
    recurrent_bw_dC=mlstm_chunkwise__recurrent_bw_dC,
    parallel_bw_dQ=mlstm_chunkwise__parallel_bw_dQ,
    parallel_bw_dK=mlstm_chunkwise__parallel_bw_dK,
    parallel_bw_dV=mlstm_chunkwise__parallel_bw_dV,
)


def _chunk_sizes(seq_len, chunk_size_inter, chunk_size_intra):
    intra = min(128, seq_len) if chunk_size_intra is None else chunk_size_intra
    inter = intra if chunk_size_inter is None else chunk_size_inter
    validate_chunk_size(intra, seq_len, name="chunk_size_intra")
    validate_chunk_size(inter, seq_len, name="chunk_size_inter")
    if intra % inter:
        raise ValueError(f"chunk_size_intra={intra} must be a multiple of chunk_size_inter={inter}.")
    return inter, intra


def mlstm_chunkwise_fw(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    qk_scale: float | None = None,
    return_last_states: bool = False,
    return_all_states: bool = False,
    chunk_size_inter: int | None = None,
    chunk_size_intra: int | None = None,
    siz_b_L_parallel: int | None = None,
    siz_b_L_loop: int | None = None,
    siz_b_DH_parallel: int | None = None,
    siz_b_DH_loop: int | None = None,
    num_warps_intra: int | None = None,
    num_warps_inter: int | None = None,
    num_stages_intra: int | None = None,
    num_stages_inter: int | None = None,
    output_dtype=jnp.float32,
    eps: float = 0.0,
    *,
    kernels: KernelSet = JNP_KERNELS,
):
    """Chunkwise forward: (matH_out, vecN_out, vecM_out, last_states | None, all_states | None)."""
    seq_len, dhqk = matQ.shape[2], matQ.shape[3]
    inter, intra = _chunk_sizes(seq_len, chunk_size_inter, chunk_size_intra)
    l_parallel, l_loop = siz_b_L_parallel, siz_b_L_loop  # None: each kernel's own default
    qk_scale = dhqk**-0.5 if qk_scale is None else qk_scale

    matC_all, vecN_all, scaM_all = kernels.recurrent_fw_C(
        matK, matV, vecF, vecI, matC_initial, vecN_initial, scaM_initial,
        chunk_size=inter, num_stages=num_stages_inter, num_warps=num_warps_inter,
        save_states_every_nth_chunk=intra // inter,
    )
    matH_out, vecN_out, vecM_out = kernels.parallel_fw_Hintra(
        matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all,
        qk_scale=qk_scale, chunk_size=intra, siz_b_LQ=l_parallel, siz_b_LKV=l_loop,
        siz_b_DHQK=siz_b_DH_loop, siz_b_DHHV=siz_b_DH_parallel, num_warps=num_warps_intra,
        num_stages=num_stages_intra, eps=eps, output_dtype=output_dtype,
    )
    last_states = None
    if return_last_states:
        last_states = (matC_all[:, :, -dhqk:, :], vecN_all[:, :, -dhqk:], scaM_all[:, :, -1])
    all_states = (matC_all, vecN_all, scaM_all) if return_all_states else None
    return matH_out, vecN_out, vecM_out, last_states, all_states


def mlstm_chunkwise_bw(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    matC_all: jax.Array | None = None,  # (B, NH, (NC+1)*DHQK, DHHV)
    vecN_all: jax.Array | None = None,  # (B, NH, (NC+1)*DHQK)
    scaM_all: jax.Array | None = None,  # (B, NH, NC+1)
    vecN_out: jax.Array | None = None,  # (B, NH, S)
    vecM_out: jax.Array | None = None,  # (B, NH, S)
    matDeltaH: jax.Array | None = None,  # (B, NH, S, DHHV)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    qk_scale: float | None = None,
    chunk_size_inter: int | None = None,
    chunk_size_intra: int | None = None,
    siz_b_L_parallel: int | None = None,
    siz_b_L_loop: int | None = None,
    siz_b_DH_parallel: int | None = None,
    siz_b_DH_loop: int | None = None,
    num_warps_intra: int | None = None,
    num_warps_inter: int | None = None,
    num_stages_intra: int | None = None,
    num_stages_inter: int | None = None,
    eps: float = 0.0,
    *,
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
    kernels: KernelSet = JNP_KERNELS,
):
    """Chunkwise backward: (dQ, dK, dV, dI, dF, dC_initial, dN_initial, dM_initial).

    den and m are held constant (docs/math.md §4). Unlike upstream, the gradient of scaM_initial is
    exact, df̃ includes the end-state terms <dC_last, C_last> + <dN_last, n_last>, and a cotangent on
    the last n state (`vecDeltaN_last`) is propagated. Missing states / outputs are recomputed.
    """
    if matDeltaH is None:
        raise ValueError("matDeltaH (the gradient of the output h, (B, NH, S, DHHV)) is required.")
    seq_len, dhqk = matQ.shape[2], matQ.shape[3]
    inter, intra = _chunk_sizes(seq_len, chunk_size_inter, chunk_size_intra)
    l_parallel, l_loop = siz_b_L_parallel, siz_b_L_loop  # None: each kernel's own default
    qk_scale = dhqk**-0.5 if qk_scale is None else qk_scale

    if matC_all is None or vecN_all is None or scaM_all is None:
        matC_all, vecN_all, scaM_all = kernels.recurrent_fw_C(
            matK, matV, vecF, vecI, matC_initial, vecN_initial, scaM_initial,
            chunk_size=inter, num_stages=num_stages_inter, num_warps=num_warps_inter,
            save_states_every_nth_chunk=intra // inter,
        )
    if vecN_out is None or vecM_out is None:
        _, vecN_out, vecM_out = kernels.parallel_fw_Hintra(
            matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all,
            qk_scale=qk_scale, chunk_size=intra, siz_b_LQ=l_parallel, siz_b_LKV=l_loop,
            siz_b_DHQK=siz_b_DH_loop, siz_b_DHHV=siz_b_DH_parallel, num_warps=num_warps_intra,
            num_stages=num_stages_intra, eps=eps,
        )

    matDeltaC_states, scaCdC_states = kernels.recurrent_bw_dC(
        matQ, vecF, scaM_all, vecM_out, matDeltaH, vecN_out, matDeltaC_last,
        qk_scale=qk_scale, chunk_size=inter, save_states_every_nth_chunk=intra // inter,
        num_warps=num_warps_inter, num_stages=num_stages_inter, eps=eps, matC_states=matC_all,
    )
    vecB, vecA = compute_chunkwise_log_gates_vecB_vecA(vecI, vecF, intra)
    vecB_reset_free, vecR = compute_chunkwise_reset_gates(vecF, intra)
    shared = (matQ, matK, matV, vecI, vecA, vecB_reset_free, matC_all, vecN_all, scaM_all, vecN_out, vecM_out,
              matDeltaH, matDeltaC_states)
    common = dict(qk_scale=qk_scale, chunk_size=intra, num_warps=num_warps_intra,
                  num_stages=num_stages_intra, eps=eps, output_dtype=matQ.dtype, vecR=vecR)
    matDeltaV = kernels.parallel_bw_dV(*shared, siz_b_LQ=l_loop, siz_b_LKV=l_parallel,
                                       siz_b_DHQK=siz_b_DH_loop, siz_b_DHHV=siz_b_DH_parallel, **common)
    # Σ_d k·dk and Σ_d q·dq come from the kernels' float32 accumulators: df̃ is a reverse cumsum of their
    # difference over the whole sequence, which would amplify the rounding of bf16 dK / dQ.
    matDeltaK, vecKdK = kernels.parallel_bw_dK(*shared, siz_b_LQ=l_loop, siz_b_LKV=l_parallel,
                                               siz_b_DHQK=siz_b_DH_parallel, siz_b_DHHV=siz_b_DH_loop,
                                               return_row_dots=True, **common)
    matDeltaQ, vecQdQ = kernels.parallel_bw_dQ(*shared, siz_b_LQ=l_parallel, siz_b_LKV=l_loop,
                                               siz_b_DHQK=siz_b_DH_parallel, siz_b_DHHV=siz_b_DH_loop,
                                               return_row_dots=True, **common)

    dtype = vecB.dtype
    vecDeltaN_states = None
    if vecDeltaN_last is not None:
        # dN_k = e^{Σ_{r>k} g_r + m_k − m_NC} dN_last: the n states feed only the last n state.
        scaG = vecB[..., -1]  # (B, NH, NC)
        g_after = jnp.cumsum(jnp.concatenate([scaG, jnp.zeros_like(scaG[..., :1])], -1)[..., ::-1], -1)[..., ::-1]
        decay_to_last = jnp.exp(g_after + scaM_all - scaM_all[..., -1:])  # (B, NH, NC+1)
        vecDeltaN_states = decay_to_last[..., None] * vecDeltaN_last.astype(dtype)[:, :, None, :]
        dk_from_n = unchunked(jnp.exp(vecA - scaM_all[..., 1:, None])[..., None] * vecDeltaN_states[:, :, 1:, None, :])
        vecKdK = vecKdK + jnp.sum(matK.astype(dtype) * dk_from_n, axis=-1)
        matDeltaK = (matDeltaK.astype(dtype) + dk_from_n).astype(matDeltaK.dtype)

    vecDeltaI = vecKdK
    # df̃_t / σ(−f̃_t) sums the (q, k) pairs whose path crosses step t: Σ_{u≥t} (q·dq − k·dk) + <dC_S, C_S>
    # + <dN_S, n_S>. Summed to the end of t's chunk only, plus the state terms at that chunk's end boundary
    # (= the pairs crossing it, end-state cotangents included), so errors do not accumulate over S.
    boundary_terms = scaCdC_states[..., 1:]  # (B, NH, NC)
    if vecDeltaN_states is not None:
        boundary_terms = boundary_terms + jnp.sum(vecDeltaN_states[:, :, 1:] * split_states(vecN_all, dhqk)[:, :, 1:],
                                                  axis=-1)
    per_step = chunked(vecQdQ - vecKdK, intra)  # (B, NH, NC, L)
    in_chunk_suffix = jnp.cumsum(per_step[..., ::-1], axis=-1)[..., ::-1]
    vecDeltaFbar = unchunked(in_chunk_suffix + boundary_terms[..., None])
    # a hard reset (f̃ = −∞) cuts every path through it: its gradient is 0, whatever the rounding left
    vecDeltaF = jnp.where(jnp.isneginf(vecF), 0.0, vecDeltaFbar * jax.nn.sigmoid(-vecF.astype(dtype)))

    matDeltaC_initial = None if matC_initial is None else matDeltaC_states[:, :, :dhqk, :]
    vecDeltaN_initial = None
    if vecN_initial is not None:
        vecDeltaN_initial = jnp.zeros(vecN_initial.shape, dtype) if vecDeltaN_states is None else vecDeltaN_states[:, :, 0]
    scaDeltaM_initial = None
    if scaM_initial is not None:
        # m_initial scales the true initial state C0·e^{m0}, n0·e^{m0}: dm0 = <dC0, C0> + <dn0, n0>
        scaDeltaM_initial = jnp.zeros(scaM_initial.shape, dtype)
        if matC_initial is not None:
            scaDeltaM_initial += jnp.sum(matDeltaC_initial * matC_initial.astype(dtype), axis=(-2, -1))
        if vecN_initial is not None:
            scaDeltaM_initial += jnp.sum(vecDeltaN_initial * vecN_initial.astype(dtype), axis=-1)
    return (matDeltaQ, matDeltaK, matDeltaV, vecDeltaI, vecDeltaF,
            matDeltaC_initial, vecDeltaN_initial, scaDeltaM_initial)


# ----------------------------------------------------------------------------- custom_vjp


@dataclasses.dataclass(frozen=True)
class ChunkwiseStatic:
    """The non-array arguments of one `mlstm_chunkwise` call (hashable: a jit / custom_vjp static)."""

    kernels: KernelSet = JNP_KERNELS
    chunk_size: int = 64
    eps: float = 1e-6
    return_last_states: bool = False
    recompute_states_in_bw: bool = True
    launch: tuple[tuple[str, Any], ...] = ()  # extra mlstm_chunkwise_fw/bw keyword arguments


def _fw_kwargs(static: ChunkwiseStatic):
    return dict(chunk_size_inter=static.chunk_size, chunk_size_intra=static.chunk_size, eps=static.eps,
                kernels=static.kernels, **dict(static.launch))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunkwise(static: ChunkwiseStatic, q, k, v, i, f, c_initial, n_initial, m_initial):
    return _chunkwise_fwd(static, q, k, v, i, f, c_initial, n_initial, m_initial)[0]


def _chunkwise_fwd(static, q, k, v, i, f, c_initial, n_initial, m_initial):
    h, n_out, m_out, last_states, all_states = mlstm_chunkwise_fw(
        q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=static.return_last_states,
        return_all_states=True, output_dtype=q.dtype, **_fw_kwargs(static))
    saved_states = None if static.recompute_states_in_bw else all_states
    residuals = (q, k, v, i, f, c_initial, n_initial, m_initial, saved_states, n_out, m_out)
    return (h, last_states) if static.return_last_states else h, residuals


def _chunkwise_bwd(static, residuals, cotangents):
    q, k, v, i, f, c_initial, n_initial, m_initial, saved_states, n_out, m_out = residuals
    dh, d_last = (cotangents if static.return_last_states else (cotangents, None))
    dc_last = dn_last = None
    if d_last is not None:
        dc_last, dn_last, _ = d_last  # m is held constant: its cotangent has no effect
    c_all, n_all, m_all = (None, None, None) if saved_states is None else saved_states
    grads = mlstm_chunkwise_bw(
        q, k, v, i, f, c_initial, n_initial, m_initial, c_all, n_all, m_all, n_out, m_out, dh, dc_last,
        vecDeltaN_last=dn_last, **_fw_kwargs(static))
    dq, dk, dv, di, df, dc0, dn0, dm0 = grads
    cast = lambda g, x: None if x is None else g.astype(x.dtype)
    return (cast(dq, q), cast(dk, k), cast(dv, v), cast(di, i), cast(df, f),
            cast(dc0, c_initial), cast(dn0, n_initial), cast(dm0, m_initial))


_chunkwise.defvjp(_chunkwise_fwd, _chunkwise_bwd)


def run_chunkwise(static: ChunkwiseStatic, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None):
    """The differentiable chunkwise mLSTM for pre-validated inputs; `static` picks kernels and launch."""
    return _chunkwise(static, q, k, v, i, f, c_initial, n_initial, m_initial)


def mlstm_chunkwise(
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
    chunk_size: int = 64,
    eps: float = 1e-6,
):
    """Chunkwise mLSTM from the jnp kernel twins, with the kernels' custom backward (`jax.custom_vjp`).

    Returns `h` (B, NH, S, DHHV) in q's dtype, or `(h, (c_last, n_last, m_last))`.
    """
    _, _, seq_len, _, _ = validate_mlstm_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    validate_chunk_size(chunk_size, seq_len)
    static = ChunkwiseStatic(chunk_size=chunk_size, eps=eps, return_last_states=return_last_states)
    return run_chunkwise(static, q, k, v, i, f, c_initial, n_initial, m_initial)
