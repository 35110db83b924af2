"""Parallel backward kernel for dV."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.pallas_triton import common, launch_defaults, parallel_bw_common
from pallas_mlstm.states import acc_dtype


def _parallel_bw_dv_kernel(
    q_ref,
    k_ref,
    dh_ref,
    b_ref,
    i_ref,
    a_ref,
    m_ref,
    r_ref,
    den_ref,
    dc_ref,
    m_next_ref,
    dv_ref,
    *,
    qk_scale: float,
    eps: float,
    block_lq: int,
    block_dhqk: int,
    precision,
):
    block_lkv, dhqk = k_ref.shape
    chunk_size = b_ref.shape[0]
    dtype = acc_dtype(q_ref.dtype)
    kv_start = pl.program_id(1) * block_lkv  # position of the key tile inside its chunk
    kv_tile = pl.ds(0, block_lkv)
    vec_b_kv = b_ref[pl.ds(kv_start, block_lkv)].astype(dtype)  # (bLKV,)
    vec_i_kv = i_ref[pl.ds(kv_start, block_lkv)].astype(dtype)  # (bLKV,)
    m_next = jnp.max(m_next_ref[...].astype(dtype))  # () from (1,)

    # inter-chunk: (K ⊙ e^{a − m_k}) dC_k, (bLKV, DHQK) @ (DHQK, bDHHV)
    dv = common.dot_nn_tiled(k_ref, kv_tile, dc_ref, dhqk, block_dhqk, precision)
    dv = dv * jnp.exp(a_ref[...].astype(dtype) - m_next)[:, None]  # a: (bLKV,)

    def q_step(q_tile, dv):
        q_start = common.tile_start(q_tile, block_lq)
        q_rows = pl.ds(q_start, block_lq)
        scores_t = common.dot_nt_tiled(k_ref, kv_tile, q_ref, q_rows, dhqk, block_dhqk, precision)  # (bLKV, bLQ)
        vec_b_q = b_ref[q_rows].astype(dtype)  # (bLQ,)
        vec_m_q = m_ref[q_rows].astype(dtype)  # (bLQ,)
        vec_r_q = r_ref[q_rows]  # (bLQ,) int32: last hard reset in the chunk, −1 if none
        den_q = den_ref[q_rows].astype(dtype)  # (bLQ,)
        decay_t = common.intra_chunk_decay(
            vec_b_q, vec_m_q, vec_r_q, q_start, vec_b_kv, vec_i_kv, kv_start, keys_on_rows=True
        )  # (bLKV, bLQ)
        weights = scores_t * decay_t * (qk_scale / (den_q + eps))[None, :]
        dh = dh_ref[q_rows, :]  # (bLQ, bDHHV)
        return dv + common.dot(weights.astype(dh.dtype), dh, precision)  # (bLKV, bLQ) @ (bLQ, bDHHV)

    # query tiles below the diagonal only
    dv = lax.fori_loop(kv_start // block_lq, chunk_size // block_lq, q_step, dv)
    dv_ref[...] = dv.astype(dv_ref.dtype)


DV = parallel_bw_common.BwKernel(
    name="mlstm_chunkwise__parallel_bw_dV",
    body=_parallel_bw_dv_kernel,
    defaults=launch_defaults.PARALLEL_BW_DV,
    grid=("DHHV", "LKV"),  # output tile (bLKV key rows, bDHHV); walks query tiles and DHQK
    reads=(
        ("q", "chunk"),
        ("k", "tile"),
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
    row_dots=False,
)


def parallel_bw_dV(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """The launcher of `mlstm_chunkwise__parallel_bw_dV`: dV (B, NH, S, DHHV).
    chunk_gates = (vecA, vecB, vecR or None), chunk_states = (matC_all, vecN_all, scaM_all); trusts
    `call` (chunk_size, qk_scale, eps, output_dtype, input_gate, launch: siz_b_LQ / siz_b_LKV / siz_b_DHQK /
    siz_b_DHHV / num_warps / num_stages, allow_tf32, interpret)."""
    arrays = parallel_bw_common.BwArrays(
        matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
    )
    return parallel_bw_common.launch(DV, call, arrays)


def mlstm_chunkwise__parallel_bw_dV(
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
    allow_tf32: bool = False,
    interpret: bool = False,
):
    """Gradient of v, (B, NH, S, DHHV): ((Q Kᵀ·s) ⊙ e^{D̃−m})ᵀ dH̄ + (K ⊙ e^{a−m_k}) dC_k.

    The upstream-signature adapter over `parallel_bw_dV`: checks its arguments, then launches.
    Grid (DHHV/bDHHV, L/bLKV, NC·B·NH); query tiles from the diagonal down and DHQK tiles loop
    in-kernel. vecN_out is the forward denominator, vecM_out the running log-max.
    With hard resets (f̃ = −∞), pass vecB and `vecR` from `compute_chunkwise_reset_gates`.
    `input_gate` ("exponential" or "sigmoid") reads vecI as `gates.log_input_gate` does; vecA must come from
    `compute_chunkwise_log_gates_vecB_vecA` with the same input_gate.

    Launch defaults: siz_b_LQ / siz_b_LKV take upstream's 32 when omitted; None there and in siz_b_DHQK /
    siz_b_DHHV takes launch_defaults.PARALLEL_BW_DV (64 / 128 / 64 / 256), each clamped to its dim.
    num_warps None: launch_defaults.parallel_num_warps of the (bLKV, bDHHV) output tile (8 from 128 x 128
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
        DV,
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
