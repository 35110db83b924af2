"""Parallel backward kernel for dK."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.pallas_triton import common, launch_defaults, parallel_bw_common
from pallas_mlstm.states import acc_dtype


def _parallel_bw_dk_kernel(
    q_ref,
    k_ref,
    v_ref,
    dh_ref,
    b_ref,
    i_ref,
    a_ref,
    m_ref,
    r_ref,
    den_ref,
    dc_ref,
    m_next_ref,
    dk_ref,
    k_dk_ref,
    *,
    qk_scale: float,
    eps: float,
    block_lq: int,
    block_dhhv: int,
    precision,
):
    block_lkv, dhhv = v_ref.shape
    chunk_size = b_ref.shape[0]
    dtype = acc_dtype(q_ref.dtype)
    kv_start = pl.program_id(1) * block_lkv  # position of the key tile inside its chunk
    kv_tile = pl.ds(0, block_lkv)
    vec_b_kv = b_ref[pl.ds(kv_start, block_lkv)].astype(dtype)  # (bLKV,)
    vec_i_kv = i_ref[pl.ds(kv_start, block_lkv)].astype(dtype)  # (bLKV,)
    m_next = jnp.max(m_next_ref[...].astype(dtype))  # () from (1,)

    # inter-chunk: (V dC_kᵀ) ⊙ e^{a − m_k}, (bLKV, DHHV) @ (DHHV, bDHQK)
    dk = common.dot_nt_tiled(v_ref, kv_tile, dc_ref, pl.ds(0, dc_ref.shape[0]), dhhv, block_dhhv, precision)
    dk = dk * jnp.exp(a_ref[...].astype(dtype) - m_next)[:, None]  # a: (bLKV,)

    def q_step(q_tile, dk):
        q_start = common.tile_start(q_tile, block_lq)
        q_rows = pl.ds(q_start, block_lq)
        d_scores_t = common.dot_nt_tiled(v_ref, kv_tile, dh_ref, q_rows, dhhv, block_dhhv, precision)  # (bLKV, bLQ)
        vec_b_q = b_ref[q_rows].astype(dtype)  # (bLQ,)
        vec_m_q = m_ref[q_rows].astype(dtype)  # (bLQ,)
        vec_r_q = r_ref[q_rows]  # (bLQ,) int32: last hard reset in the chunk, −1 if none
        den_q = den_ref[q_rows].astype(dtype)  # (bLQ,)
        decay_t = common.intra_chunk_decay(
            vec_b_q, vec_m_q, vec_r_q, q_start, vec_b_kv, vec_i_kv, kv_start, keys_on_rows=True
        )  # (bLKV, bLQ)
        weights = d_scores_t * decay_t * (qk_scale / (den_q + eps))[None, :]
        q = q_ref[q_rows, :]  # (bLQ, bDHQK)
        return dk + common.dot(weights.astype(q.dtype), q, precision)  # (bLKV, bLQ) @ (bLQ, bDHQK)

    # query tiles below the diagonal only
    dk = lax.fori_loop(kv_start // block_lq, chunk_size // block_lq, q_step, dk)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    # float32 Σ_d k·dk of this DHQK tile, before dk is rounded to its output dtype (for df̃ and dĩ)
    k_dk_ref[...] = jnp.sum(k_ref[...].astype(dtype) * dk, axis=1).astype(k_dk_ref.dtype)  # (bLKV, bDHQK) -> (bLKV,)


DK = parallel_bw_common.BwKernel(
    name="mlstm_chunkwise__parallel_bw_dK",
    body=_parallel_bw_dk_kernel,
    defaults=launch_defaults.PARALLEL_BW_DK,
    grid=("DHQK", "LKV"),  # output tile (bLKV key rows, bDHQK); walks query tiles and DHHV
    reads=(
        ("q", "chunk"),
        ("k", "tile"),
        ("v", "tile"),
        ("dh", "chunk"),
        ("vec_b", "chunk"),
        ("vec_i", "chunk"),
        ("vec_a", "tile"),
        ("vec_m", "chunk"),
        ("vec_r", "chunk"),
        ("den", "chunk"),
        ("dc_all", "end"),
        ("m_all", "end"),
    ),
    row_dots=True,
)


def parallel_bw_dK(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """The launcher of `mlstm_chunkwise__parallel_bw_dK`: (dK (B, NH, S, DHQK), Σ_d k·dk (B, NH, S) float32,
    summed before dK is rounded).
    chunk_gates = (vecA, vecB, vecR or None), chunk_states = (matC_all, vecN_all, scaM_all); trusts
    `call` (chunk_size, qk_scale, eps, output_dtype, input_gate, launch: siz_b_LQ / siz_b_LKV / siz_b_DHQK /
    siz_b_DHHV / num_warps / num_stages, allow_tf32, interpret)."""
    arrays = parallel_bw_common.BwArrays(
        matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
    )
    return parallel_bw_common.launch(DK, call, arrays)


def mlstm_chunkwise__parallel_bw_dK(
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
    """Gradient of k, (B, NH, S, DHQK): ((dH̄ Vᵀ) ⊙ e^{D̃−m})ᵀ Q·s + (V dC_kᵀ) ⊙ e^{a−m_k}.

    The upstream-signature adapter over `parallel_bw_dK`: checks its arguments, then launches.
    With `return_row_dots`, returns (dK, Σ_d k·dk (B, NH, S) float32, summed before dK is rounded).
    Grid (DHQK/bDHQK, L/bLKV, NC·B·NH); query tiles from the diagonal down and DHHV tiles loop in-kernel.
    With hard resets (f̃ = −∞), pass vecB and `vecR` from `compute_chunkwise_reset_gates`.
    `input_gate` ("exponential" or "sigmoid") reads vecI as `gates.log_input_gate` does; vecA must come from
    `compute_chunkwise_log_gates_vecB_vecA` with the same input_gate.

    Launch defaults: siz_b_LQ / siz_b_LKV take upstream's 32 when omitted; None there and in siz_b_DHQK /
    siz_b_DHHV takes launch_defaults.PARALLEL_BW_DK (64 / 128 / 256 / 64), each clamped to its dim.
    num_warps None: launch_defaults.parallel_num_warps of the (bLKV, bDHQK) output tile (8 from 128 x 128
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
        DK,
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
    dk, k_dk = parallel_bw_dK(
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
    return (dk, k_dk) if return_row_dots else dk
