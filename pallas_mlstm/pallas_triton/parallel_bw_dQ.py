"""Parallel backward kernel for dQ."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.pallas_triton import common, launch_defaults, parallel_bw_common
from pallas_mlstm.states import acc_dtype


def _parallel_bw_dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    dh_ref,
    b_ref,
    i_ref,
    m_ref,
    r_ref,
    den_ref,
    c_ref,
    m_prev_ref,
    dq_ref,
    q_dq_ref,
    *,
    qk_scale: float,
    eps: float,
    block_lkv: int,
    block_dhhv: int,
    precision,
):
    block_lq, dhhv = dh_ref.shape
    dtype = acc_dtype(k_ref.dtype)
    q_start = pl.program_id(1) * block_lq  # position of the query tile inside its chunk
    q_tile = pl.ds(0, block_lq)
    vec_b_q = b_ref[pl.ds(q_start, block_lq)].astype(dtype)  # (bLQ,)
    vec_m_q = m_ref[...].astype(dtype)  # (bLQ,)
    vec_r_q = r_ref[...]  # (bLQ,) int32: last hard reset in the chunk, −1 if none
    dh_scale = 1.0 / (den_ref[...].astype(dtype) + eps)  # (bLQ,): dH̄ = dH / (den + eps)
    m_prev = jnp.max(m_prev_ref[...].astype(dtype))  # () from (1,)

    # inter-chunk: (dH̄ ⊙ e^{b + m_{k-1} − m}) C_{k-1}ᵀ, (bLQ, DHHV) @ (DHHV, bDHQK)
    dq = common.dot_nt_tiled(dh_ref, q_tile, c_ref, pl.ds(0, c_ref.shape[0]), dhhv, block_dhhv, precision)
    dq = dq * (dh_scale * common.inter_chunk_decay(vec_b_q, vec_r_q, m_prev, vec_m_q))[:, None]

    def kv_step(kv_tile, dq):
        kv_start = common.tile_start(kv_tile, block_lkv)
        kv_rows = pl.ds(kv_start, block_lkv)
        d_scores = common.dot_nt_tiled(dh_ref, q_tile, v_ref, kv_rows, dhhv, block_dhhv, precision)  # (bLQ, bLKV)
        vec_b_kv = b_ref[kv_rows].astype(dtype)  # (bLKV,)
        vec_i_kv = i_ref[kv_rows].astype(dtype)  # (bLKV,)
        decay = common.intra_chunk_decay(
            vec_b_q, vec_m_q, vec_r_q, q_start, vec_b_kv, vec_i_kv, kv_start
        )  # (bLQ, bLKV)
        weights = d_scores * decay * dh_scale[:, None]
        k = k_ref[kv_rows, :]  # (bLKV, bDHQK)
        return dq + common.dot(weights.astype(k.dtype), k, precision)  # (bLQ, bLKV) @ (bLKV, bDHQK)

    num_kv_tiles = (q_start + block_lq + block_lkv - 1) // block_lkv  # tiles above the diagonal skipped
    dq = lax.fori_loop(0, num_kv_tiles, kv_step, dq)
    dq = dq * qk_scale
    dq_ref[...] = dq.astype(dq_ref.dtype)
    # float32 Σ_d q·dq of this DHQK tile, before dq is rounded to its output dtype (for df̃ and dĩ)
    q_dq_ref[...] = jnp.sum(q_ref[...].astype(dtype) * dq, axis=1).astype(q_dq_ref.dtype)  # (bLQ, bDHQK) -> (bLQ,)


DQ = parallel_bw_common.BwKernel(
    name="mlstm_chunkwise__parallel_bw_dQ",
    body=_parallel_bw_dq_kernel,
    defaults=launch_defaults.PARALLEL_BW_DQ,
    grid=("DHQK", "LQ"),  # output tile (bLQ query rows, bDHQK); walks key tiles and DHHV
    reads=(
        ("q", "tile"),
        ("k", "chunk"),
        ("v", "chunk"),
        ("dh", "tile"),
        ("vec_b", "chunk"),
        ("vec_i", "chunk"),
        ("vec_m", "tile"),
        ("vec_r", "tile"),
        ("den", "tile"),
        ("c_all", "start"),
        ("m_all", "start"),
    ),
    row_dots=True,
)


def parallel_bw_dQ(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """The launcher of `mlstm_chunkwise__parallel_bw_dQ`: (dQ (B, NH, S, DHQK), Σ_d q·dq (B, NH, S) float32,
    summed before dQ is rounded).
    chunk_gates = (vecA, vecB, vecR or None), chunk_states = (matC_all, vecN_all, scaM_all); trusts
    `call` (chunk_size, qk_scale, eps, output_dtype, input_gate, launch: siz_b_LQ / siz_b_LKV / siz_b_DHQK /
    siz_b_DHHV / num_warps / num_stages, allow_tf32, interpret)."""
    arrays = parallel_bw_common.BwArrays(
        matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
    )
    return parallel_bw_common.launch(DQ, call, arrays)


def mlstm_chunkwise__parallel_bw_dQ(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, S)
    vecA: jax.Array,  # (B, NH, NC, L)
    vecB: jax.Array,  # (B, NH, NC, L)
    matC_all: jax.Array,  # (B, NH, (NC+1)*DHQK, DHHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1)*DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    vecN_out: jax.Array,  # (B, NH, S)
    vecM_out: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHHV)
    matDeltaC_states: jax.Array,  # (B, NH, (NC+1)*DHQK, DHHV)
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int | None = 32,
    siz_b_LKV: int | None = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    output_dtype=jnp.float32,
    *,
    vecR: jax.Array | None = None,  # (B, NH, NC, L) int32
    input_gate: str = "exponential",
    return_row_dots: bool = False,
    allow_tf32: bool = False,
    interpret: bool = False,
):
    """Gradient of q, (B, NH, S, DHQK): ((dH̄ Vᵀ) ⊙ e^{D̃−m}) K·s + (dH̄ ⊙ e^{b+m_{k-1}−m}) C_{k-1}ᵀ·s.

    The upstream-signature adapter over `parallel_bw_dQ`: checks its arguments, then launches.
    With `return_row_dots`, returns (dQ, Σ_d q·dq (B, NH, S) float32, summed before dQ is rounded).
    Grid (DHQK/bDHQK, L/bLQ, NC·B·NH); key tiles up to the diagonal and DHHV tiles loop in-kernel.
    With hard resets (f̃ = −∞), pass vecB and `vecR` from `compute_chunkwise_reset_gates`.
    `input_gate` ("exponential" or "sigmoid") reads vecI as `gates.log_input_gate` does; vecA must come from
    `compute_chunkwise_log_gates_vecB_vecA` with the same input_gate.

    Launch defaults: siz_b_LQ / siz_b_LKV take upstream's 32 when omitted; None there and in siz_b_DHQK /
    siz_b_DHHV takes launch_defaults.PARALLEL_BW_DQ (128 / 64 / 256 / 64), each clamped to its dim.
    num_warps None: launch_defaults.parallel_num_warps of the (bLQ, bDHQK) output tile (8 from 128 x 128
    elements, else 4); num_stages None: launch_defaults.parallel_num_stages (2; 1 and head-dim tiles <= 128
    on cards with less shared memory than Hopper's).
    """
    launch = dict(
        siz_b_LQ=siz_b_LQ,
        siz_b_LKV=siz_b_LKV,
        siz_b_DHQK=siz_b_DHQK,
        siz_b_DHHV=siz_b_DHHV,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    arrays = (matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out, matDeltaH)
    call = parallel_bw_common.checked_call(
        DQ,
        (*arrays, matDeltaC_states, vecR),
        launch,
        chunk_size=chunk_size,
        qk_scale=qk_scale,
        eps=eps,
        output_dtype=output_dtype,
        input_gate=input_gate,
        allow_tf32=allow_tf32,
        interpret=interpret,
    )
    dq, q_dq = parallel_bw_dQ(
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
    return (dq, q_dq) if return_row_dots else dq
