"""Recurrent backward kernel: the gradients of the C states, from the last chunk to the first."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_mlstm import plan  # plan.validate_*, looked up at call time: plan may import this package
from pallas_mlstm.device import device_properties
from pallas_mlstm.gates import compute_chunkwise_vecB
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.pallas_triton import common, launch_defaults
from pallas_mlstm.pallas_triton.launch import TritonLaunch
from pallas_mlstm.states import acc_dtype, join_states
from pallas_mlstm.validation import kernel_seq_len, validate_kernel_arrays

NAME = "mlstm_chunkwise__recurrent_bw_dC"  # the pallas_call's name, as upstream's kernel function


def _recurrent_bw_kernel(
    *refs,
    num_chunks: int,
    chunk_size: int,
    qk_scale: float,
    eps: float,
    has_last: bool,
    has_states: bool,
    writes_first: bool,
    precision,
):
    q_ref, dh_ref, b_ref, g_ref, m_ref, den_ref, m_all_ref, *refs = refs
    dc_last_ref = refs.pop(0) if has_last else None
    c_all_ref = refs.pop(0) if has_states else None
    dc_first_ref = refs.pop() if writes_first else None
    dc_all_ref, *c_dc_refs = refs
    dtype = acc_dtype(q_ref.dtype)
    block_dhqk, block_dhhv = dc_all_ref.shape[1:]

    def store(index, dc):
        dc_all_ref[index] = dc.astype(dc_all_ref.dtype)
        if has_states:  # <dC, C> over this program's tile: (bDHQK, bDHHV) -> ()
            # one axis at a time: JAX's Triton lowering of a multi-axis reduce fails under an Explicit mesh
            row_sums = jnp.sum(dc * c_all_ref[index].astype(dtype), axis=1)  # (bDHQK,)
            c_dc_refs[0][index] = jnp.sum(row_sums).astype(c_dc_refs[0].dtype)

    if has_last:
        dc = dc_last_ref[...].astype(dtype)  # (bDHQK, bDHHV)
    else:
        dc = jnp.zeros((block_dhqk, block_dhhv), dtype)
    store(num_chunks, dc)

    sub_tile = min(chunk_size, launch_defaults.RECURRENT_SUB_TILE)

    def chunk_step(step, dc):
        chunk = num_chunks - 1 - step
        m_prev = m_all_ref[chunk].astype(dtype)  # ()
        m_next = m_all_ref[chunk + 1].astype(dtype)  # ()
        decay = jnp.exp(g_ref[chunk].astype(dtype) + m_prev - m_next)  # g: ()

        def sub_tile_update(t):
            in_chunk = pl.ds(common.tile_start(t, sub_tile), sub_tile)
            rows = pl.ds(common.tile_start(chunk, chunk_size) + common.tile_start(t, sub_tile), sub_tile)
            # q̄ / (den + eps): the denominator of dH̄ folded into the query weights, (sL,)
            log_weight = b_ref[chunk, in_chunk].astype(dtype) + m_prev - m_ref[chunk, in_chunk].astype(dtype)
            q_weight = qk_scale * jnp.exp(log_weight) / (den_ref[chunk, in_chunk].astype(dtype) + eps)  # den: (sL,)
            q = q_ref[rows, :]  # (sL, bDHQK)
            q_bar = (q.astype(dtype) * q_weight[:, None]).astype(q.dtype)
            dh = dh_ref[rows, :]  # (sL, bDHHV)
            return common.dot(q_bar, dh.astype(q.dtype), precision, trans_a=True)  # (bDHQK, sL) @ (sL, bDHHV)

        dc = common.sum_over_tiles(chunk_size // sub_tile, sub_tile_update, decay * dc)
        store(chunk, dc)
        return dc

    dc = lax.fori_loop(0, num_chunks, chunk_step, dc)
    if writes_first:  # dC_0 at full precision, when dc_all_ref holds narrower copies
        dc_first_ref[...] = dc.astype(dc_first_ref.dtype)  # (bDHQK, bDHHV)


def recurrent_bw_dC(
    call: KernelCall, matQ, vecF, scaM_inter, vecM_combine, matDeltaH, vecN_out, matDeltaC_last, matC_states
):
    """The launcher of `mlstm_chunkwise__recurrent_bw_dC` (same arrays and outputs); trusts `call` (chunk_size,
    save_states_every_nth_chunk, qk_scale, eps, states_dtype, launch: siz_b_DHQK / siz_b_DHHV / num_warps /
    num_stages, allow_tf32, interpret)."""
    batch, heads, seq_len, dhqk = matQ.shape
    dhhv = matDeltaH.shape[-1]
    chunk_size = call.chunk_size * call.save_states_every_nth_chunk
    num_chunks, bnh = seq_len // chunk_size, batch * heads
    dhqk_p, dhhv_p = common.padded_dim(dhqk), common.padded_dim(dhhv)
    launch, defaults = common.triton_launch(call), launch_defaults.RECURRENT_BW_DC
    block_dhqk = common.tile_size(launch.siz_b_DHQK, dhqk_p, defaults.siz_b_DHQK, "siz_b_DHQK")
    block_dhhv = common.tile_size(
        launch.siz_b_DHHV,
        dhhv_p,
        launch_defaults.recurrent_dhhv_tile(dhqk_p // block_dhqk, dhhv_p, bnh, device_properties().core_count),
        "siz_b_DHHV",
    )
    vecB = compute_chunkwise_vecB(vecF, chunk_size)  # (B, NH, NC, L)
    state_dtype = acc_dtype(matQ.dtype)
    dc_dtype = state_dtype if call.states_dtype is None else jnp.dtype(call.states_dtype)
    writes_first = dc_dtype != state_dtype

    per_chunk = lambda x: x.reshape(bnh, num_chunks, chunk_size)
    inputs = [
        common.pad_axis(matQ.reshape(bnh, seq_len, dhqk), 2, dhqk_p),
        common.pad_axis(matDeltaH.reshape(bnh, seq_len, dhhv), 2, dhhv_p),
        per_chunk(vecB),
        vecB[..., -1].reshape(bnh, num_chunks),
        per_chunk(vecM_combine),
        per_chunk(vecN_out),
        scaM_inter.reshape(bnh, num_chunks + 1),
    ]
    chunk_gate_spec = pl.BlockSpec((None, num_chunks, chunk_size), lambda iq, iv, b: (b, 0, 0))
    in_specs = [
        pl.BlockSpec((None, seq_len, block_dhqk), lambda iq, iv, b: (b, 0, iq)),
        pl.BlockSpec((None, seq_len, block_dhhv), lambda iq, iv, b: (b, 0, iv)),
        chunk_gate_spec,
        pl.BlockSpec((None, num_chunks), lambda iq, iv, b: (b, 0)),
        chunk_gate_spec,
        chunk_gate_spec,
        pl.BlockSpec((None, num_chunks + 1), lambda iq, iv, b: (b, 0)),
    ]
    has_last = matDeltaC_last is not None
    if has_last:
        dc_last = matDeltaC_last.reshape(bnh, dhqk, dhhv)
        inputs.append(common.pad_axis(common.pad_axis(dc_last, 1, dhqk_p), 2, dhhv_p))
        in_specs.append(pl.BlockSpec((None, block_dhqk, block_dhhv), lambda iq, iv, b: (b, iq, iv)))

    has_states = matC_states is not None
    state_spec = pl.BlockSpec((None, num_chunks + 1, block_dhqk, block_dhhv), lambda iq, iv, b: (b, 0, iq, iv))
    out_specs = [state_spec]
    out_shape = [jax.ShapeDtypeStruct((bnh, num_chunks + 1, dhqk_p, dhhv_p), dc_dtype)]
    grid = (dhqk_p // block_dhqk, dhhv_p // block_dhhv, bnh)
    if has_states:
        inputs.append(common.states_to_kernel_layout(matC_states, dhqk, (dhqk_p, dhhv_p)))
        in_specs.append(state_spec)
        # one partial <dC, C> per (DHQK tile, DHHV tile), summed below
        out_specs.append(pl.BlockSpec((None, None, num_chunks + 1), lambda iq, iv, b: (iq * grid[1] + iv, b, 0)))
        out_shape.append(jax.ShapeDtypeStruct((grid[0] * grid[1], bnh, num_chunks + 1), state_dtype))
    if writes_first:
        out_specs.append(pl.BlockSpec((None, block_dhqk, block_dhhv), lambda iq, iv, b: (b, iq, iv)))
        out_shape.append(jax.ShapeDtypeStruct((bnh, dhqk_p, dhhv_p), state_dtype))

    kernel = functools.partial(
        _recurrent_bw_kernel,
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        qk_scale=call.scale_for(dhqk),
        eps=call.eps,
        has_last=has_last,
        has_states=has_states,
        writes_first=writes_first,
        precision=common.matmul_precision(matQ.dtype, call.allow_tf32),
    )
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=common.compiler_params(
            launch.num_warps, launch.num_stages, default_warps=defaults.num_warps, default_stages=defaults.num_stages
        ),
        interpret=call.interpret,
        name=NAME,
    )(*inputs)
    results = [join_states(outs[0][:, :, :dhqk, :dhhv].reshape(batch, heads, num_chunks + 1, dhqk, dhhv))]
    if has_states:
        results.append(jnp.sum(outs[1], axis=0).reshape(batch, heads, num_chunks + 1))
    if writes_first:
        results.append(outs[-1][:, :dhqk, :dhhv].reshape(batch, heads, dhqk, dhhv))
    return results[0] if len(results) == 1 else tuple(results)


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
    allow_tf32: bool = False,
    interpret: bool = False,
):
    """Gradients of the chunk-boundary C states: matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV), float32.

    The upstream-signature adapter over `recurrent_bw_dC`: checks its arguments, then launches.
    dC_{k-1} = e^{g_k + m_{k-1} − m_k} dC_k + Σ_t q̄_tᵀ dH_t / (den_t + eps). Given the forward states
    `matC_states`, returns (matDeltaC_states, scaCdC_states (B, NH, NC+1) = <dC_k, C_k>). Grid
    (DHQK/bDHQK, DHHV/bDHHV, B·NH), each program walking the chunks backwards. `states_dtype` (None:
    float32) stores matDeltaC_states narrower, as for recurrent_fw_C; then a last output holds dC_0 (the
    initial state's gradient) in float32, (B, NH, DHQK, DHHV).

    Launch defaults: siz_b_DHQK None takes launch_defaults.RECURRENT_BW_DC.siz_b_DHQK (64); siz_b_DHHV None takes
    launch_defaults.recurrent_dhhv_tile (128 while the grid keeps 3 programs per SM, else 64); both
    clamped to their head dim. num_warps / num_stages None: launch_defaults.RECURRENT_BW_DC (4 / 1).
    """
    arrays = dict(matQ=matQ, vecF=vecF, scaM_inter=scaM_inter, vecM_combine=vecM_combine, matDeltaH=matDeltaH)
    arrays.update(vecN_out=vecN_out, matDeltaC_last=matDeltaC_last, matC_states=matC_states)
    states_chunk = plan.validate_chunk_size(
        chunk_size * save_states_every_nth_chunk, kernel_seq_len(arrays), minimum=common.MIN_TILE
    )
    validate_kernel_arrays(arrays, states_chunk // save_states_every_nth_chunk, save_states_every_nth_chunk)
    call = KernelCall(
        chunk_size=chunk_size,
        save_states_every_nth_chunk=save_states_every_nth_chunk,
        launch=TritonLaunch(siz_b_DHQK=siz_b_DHQK, siz_b_DHHV=siz_b_DHHV, num_warps=num_warps, num_stages=num_stages),
        interpret=common.checked_interpret(interpret, NAME),
        **plan.checked_kernel_options(qk_scale=qk_scale, eps=eps, states_dtype=states_dtype, allow_tf32=allow_tf32),
    )
    return recurrent_bw_dC(call, matQ, vecF, scaM_inter, vecM_combine, matDeltaH, vecN_out, matDeltaC_last, matC_states)
