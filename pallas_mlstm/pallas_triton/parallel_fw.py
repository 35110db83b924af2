"""Parallel forward kernel: the outputs H of every chunk from the state at its start."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_mlstm import plan  # plan.validate_*, looked up at call time: plan may import this package
from pallas_mlstm.device import device_properties
from pallas_mlstm.gates import compute_chunkwise_reset_gates, compute_chunkwise_vecM, log_input_gate
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.pallas_triton import common, launch_defaults
from pallas_mlstm.pallas_triton.launch import TritonLaunch
from pallas_mlstm.states import acc_dtype
from pallas_mlstm.validation import kernel_seq_len, validate_kernel_arrays

NAME = "mlstm_chunkwise__parallel_fw_Hintra"  # the pallas_call's name, as upstream's kernel function


def _parallel_fw_kernel(
    q_ref,
    k_ref,
    v_ref,
    b_ref,
    i_ref,
    m_ref,
    r_ref,
    c_ref,
    n_ref,
    m_prev_ref,
    h_ref,
    den_ref,
    *,
    qk_scale: float,
    eps: float,
    normalize: bool,
    block_lkv: int,
    block_dhqk: int,
    precision,
):
    block_lq, dhqk = q_ref.shape
    dtype = acc_dtype(q_ref.dtype)
    q_start = pl.program_id(1) * block_lq  # position of the query tile inside its chunk
    q_rows = pl.ds(0, block_lq)
    vec_b_q = b_ref[pl.ds(q_start, block_lq)].astype(dtype)  # (bLQ,)
    vec_m = m_ref[...].astype(dtype)  # (bLQ,)
    vec_r = r_ref[...]  # (bLQ,) int32: last hard reset in the chunk, −1 if none
    m_prev = jnp.max(m_prev_ref[...].astype(dtype))  # () from (1,)

    # inter-chunk: q̄ C_{k-1} and q̄ · n_{k-1}, with q̄ = s·q·e^{b + m_{k-1} − m} (0 after a reset)
    q_inter_scale = qk_scale * common.inter_chunk_decay(vec_b_q, vec_r, m_prev, vec_m)  # (bLQ,)
    num = common.dot_nn_tiled(q_ref, q_rows, c_ref, dhqk, block_dhqk, precision)  # (bLQ, DHQK) @ (DHQK, bDHHV)
    num = num * q_inter_scale[:, None]
    den = jnp.zeros((block_lq,), dtype)  # (bLQ,): the normaliser q̄ · n, accumulated only with `normalize`
    if normalize:
        den = common.row_dot_tiled(q_ref, q_rows, n_ref, dhqk, block_dhqk) * q_inter_scale  # (bLQ,)

    def kv_step(kv_tile, carry):
        num, den = carry
        kv_start = common.tile_start(kv_tile, block_lkv)
        kv_rows = pl.ds(kv_start, block_lkv)
        scores = common.dot_nt_tiled(q_ref, q_rows, k_ref, kv_rows, dhqk, block_dhqk, precision)  # (bLQ, bLKV)
        vec_b_kv = b_ref[kv_rows].astype(dtype)  # (bLKV,)
        vec_i_kv = i_ref[kv_rows].astype(dtype)  # (bLKV,)
        decay = common.intra_chunk_decay(vec_b_q, vec_m, vec_r, q_start, vec_b_kv, vec_i_kv, kv_start)  # (bLQ, bLKV)
        weights = scores * qk_scale * decay
        v = v_ref[kv_rows, :]  # (bLKV, bDHHV)
        num = num + common.dot(weights.astype(v.dtype), v, precision)  # (bLQ, bLKV) @ (bLKV, bDHHV)
        return num, (den + jnp.sum(weights, axis=1)) if normalize else den

    num_kv_tiles = (q_start + block_lq + block_lkv - 1) // block_lkv  # tiles above the diagonal skipped
    num, den = lax.fori_loop(0, num_kv_tiles, kv_step, (num, den))

    if normalize:
        den = jnp.maximum(jnp.abs(den), jnp.exp(-vec_m))
        h_ref[...] = (num / (den + eps)[:, None]).astype(h_ref.dtype)
    else:  # h = q̄ C: e^{−m} only undoes the states' scale
        den = jnp.exp(-vec_m)
        h_ref[...] = (num / den[:, None]).astype(h_ref.dtype)

    @pl.when(pl.program_id(0) == 0)
    def _():
        den_ref[...] = den.astype(den_ref.dtype)


def parallel_fw_Hintra(call: KernelCall, matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all):
    """The launcher of `mlstm_chunkwise__parallel_fw_Hintra` (same arrays and outputs); trusts `call`
    (chunk_size, qk_scale, eps, output_dtype, input_gate, normalize, launch: siz_b_LQ / siz_b_LKV / siz_b_DHQK /
    siz_b_DHHV / num_warps / num_stages, allow_tf32, interpret)."""
    batch, heads, seq_len, dhqk = matQ.shape
    dhhv = matV.shape[-1]
    chunk_size = call.chunk_size
    num_chunks, bnh = seq_len // chunk_size, batch * heads
    dhqk_p, dhhv_p = common.padded_dim(dhqk), common.padded_dim(dhhv)
    shared_memory_kib = device_properties().shared_memory_kib
    launch = common.triton_launch(call)
    defaults = launch_defaults.parallel_tiles(launch_defaults.PARALLEL_FW_HINTRA, shared_memory_kib)
    block_lq = common.tile_size(launch.siz_b_LQ, chunk_size, defaults.siz_b_LQ, "siz_b_LQ")
    block_lkv = common.tile_size(launch.siz_b_LKV, chunk_size, defaults.siz_b_LKV, "siz_b_LKV")
    block_dhqk = common.tile_size(launch.siz_b_DHQK, dhqk_p, defaults.siz_b_DHQK, "siz_b_DHQK")
    block_dhhv = common.tile_size(launch.siz_b_DHHV, dhhv_p, defaults.siz_b_DHHV, "siz_b_DHHV")
    q_tiles = chunk_size // block_lq

    vecB, vecR = compute_chunkwise_reset_gates(vecF, chunk_size)  # (B, NH, NC, L): resets counted as 0, reset positions
    vecM_out = compute_chunkwise_vecM(vecB, vecR, vecI, scaM_all, input_gate=call.input_gate)
    q = common.pad_axis(matQ.reshape(bnh, seq_len, dhqk), 2, dhqk_p)
    k = common.pad_axis(matK.reshape(bnh, seq_len, dhqk), 2, dhqk_p)
    v = common.pad_axis(matV.reshape(bnh, seq_len, dhhv), 2, dhhv_p)
    c_all = common.states_to_kernel_layout(matC_all, dhqk, (dhqk_p, dhhv_p))  # (BNH, NC+1, DHQK_p, DHHV_p)
    n_all = common.states_to_kernel_layout(vecN_all, dhqk, (dhqk_p,))  # (BNH, NC+1, DHQK_p)
    m_all = scaM_all.reshape(bnh, num_chunks + 1, 1)

    # grid (iv, iq, chunk·BNH): chunk-major program index cb = b·NC + c
    chunk = lambda cb: (cb // num_chunks, cb % num_chunks)
    q_tile_spec = lambda width: pl.BlockSpec(
        (None, block_lq, width), lambda iv, iq, cb: (cb // num_chunks, (cb % num_chunks) * q_tiles + iq, 0)
    )
    gate_spec = pl.BlockSpec((None, chunk_size), lambda iv, iq, cb: chunk(cb))
    q_gate_spec = pl.BlockSpec(
        (None, block_lq), lambda iv, iq, cb: (cb // num_chunks, (cb % num_chunks) * q_tiles + iq)
    )
    kernel = functools.partial(
        _parallel_fw_kernel,
        qk_scale=call.scale_for(dhqk),
        eps=call.eps,
        normalize=bool(call.normalize),
        block_lkv=block_lkv,
        block_dhqk=block_dhqk,
        precision=common.matmul_precision(matQ.dtype, call.allow_tf32),
    )
    h, den = pl.pallas_call(
        kernel,
        grid=(dhhv_p // block_dhhv, q_tiles, num_chunks * bnh),
        in_specs=[
            q_tile_spec(dhqk_p),
            pl.BlockSpec((None, chunk_size, dhqk_p), lambda iv, iq, cb: (*chunk(cb), 0)),
            pl.BlockSpec((None, chunk_size, block_dhhv), lambda iv, iq, cb: (*chunk(cb), iv)),
            gate_spec,
            gate_spec,
            q_gate_spec,
            q_gate_spec,
            pl.BlockSpec((None, None, dhqk_p, block_dhhv), lambda iv, iq, cb: (*chunk(cb), 0, iv)),
            pl.BlockSpec((None, None, dhqk_p), lambda iv, iq, cb: (*chunk(cb), 0)),
            pl.BlockSpec((None, None, 1), lambda iv, iq, cb: (*chunk(cb), 0)),
        ],
        out_specs=[
            pl.BlockSpec(
                (None, block_lq, block_dhhv),
                lambda iv, iq, cb: (cb // num_chunks, (cb % num_chunks) * q_tiles + iq, iv),
            ),
            q_gate_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((bnh, seq_len, dhhv_p), call.output_dtype),
            jax.ShapeDtypeStruct((bnh, seq_len), vecB.dtype),
        ],
        compiler_params=common.compiler_params(
            launch.num_warps,
            launch.num_stages,
            default_warps=launch_defaults.parallel_num_warps(block_lq, block_dhhv),
            default_stages=launch_defaults.parallel_num_stages(shared_memory_kib),
        ),
        interpret=call.interpret,
        name=NAME,
    )(
        q,
        k,
        v,
        vecB.reshape(bnh, seq_len),
        log_input_gate(vecI, call.input_gate).reshape(bnh, seq_len),
        vecM_out.reshape(bnh, seq_len),
        vecR.reshape(bnh, seq_len),
        c_all,
        n_all,
        m_all,
    )
    matH_out = h[:, :, :dhhv].reshape(batch, heads, seq_len, dhhv)
    return matH_out, den.reshape(batch, heads, seq_len), vecM_out


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
    siz_b_LQ: int | None = 32,
    siz_b_LKV: int | None = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 1e-6,
    output_dtype=jnp.float32,
    *,
    input_gate: str = "exponential",
    normalize: bool = True,
    allow_tf32: bool = False,
    interpret: bool = False,
):
    """Outputs of every chunk: (matH_out (B,NH,S,DHHV), vecN_out (B,NH,S), vecM_out (B,NH,S)).

    The upstream-signature adapter over `parallel_fw_Hintra`: checks its arguments, then launches.
    vecN_out is the denominator max(|q̄·n + Σ S|, e^{-m}), vecM_out the running log-max m_t (computed
    from the gates before the launch). `input_gate` "sigmoid" runs mLSTMsig (σ(ĩ) as input gate, m not tracked:
    see `mlstm_chunkwise__recurrent_fw_C`); there `normalize=False` returns h = q̄·C unnormalised, with
    vecN_out = e^{−m} (eps unused: pass eps=0 to the backward kernels). Grid (DHHV/bDHHV, L/bLQ, NC·B·NH); key
    tiles loop in-kernel up to the causal diagonal, DHQK in tiles of bDHQK.

    Launch defaults: siz_b_LQ / siz_b_LKV take upstream's 32 when omitted; None there and in siz_b_DHQK /
    siz_b_DHHV takes launch_defaults.PARALLEL_FW_HINTRA (128 / 64 / 64 / 256), each clamped to its dim.
    num_warps None: launch_defaults.parallel_num_warps of the (bLQ, bDHHV) output tile (8 from 128 x 128
    elements, else 4); num_stages None: launch_defaults.parallel_num_stages (2; 1 on cards with less shared
    memory than Hopper's, which also cap the head-dim tiles at 128: launch_defaults.parallel_tiles).
    """
    arrays = dict(matQ=matQ, matK=matK, matV=matV, vecI=vecI, vecF=vecF, matC_all=matC_all, vecN_all=vecN_all)
    arrays.update(scaM_all=scaM_all)
    chunk_size = plan.validate_chunk_size(chunk_size, kernel_seq_len(arrays), minimum=common.MIN_TILE)
    validate_kernel_arrays(arrays, chunk_size)
    plan.validate_gate_options(input_gate, normalize)
    call = KernelCall(
        chunk_size=chunk_size,
        input_gate=input_gate,
        normalize=normalize,
        launch=TritonLaunch(
            siz_b_LQ=siz_b_LQ,
            siz_b_LKV=siz_b_LKV,
            siz_b_DHQK=siz_b_DHQK,
            siz_b_DHHV=siz_b_DHHV,
            num_warps=num_warps,
            num_stages=num_stages,
        ),
        interpret=common.checked_interpret(interpret, NAME),
        **plan.checked_kernel_options(qk_scale=qk_scale, eps=eps, output_dtype=output_dtype, allow_tf32=allow_tf32),
    )
    return parallel_fw_Hintra(call, matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all)
