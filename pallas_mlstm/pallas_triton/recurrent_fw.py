"""Recurrent forward kernel: the C, n, m states at every chunk boundary."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_mlstm import plan  # plan.validate_*, looked up at call time: plan may import this package
from pallas_mlstm.device import device_properties
from pallas_mlstm.gates import MIN_LOG_SCALE, chunkwise_log_gates, tracks_max_state
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.pallas_triton import common, launch_defaults
from pallas_mlstm.pallas_triton.launch import TritonLaunch
from pallas_mlstm.states import acc_dtype, join_states
from pallas_mlstm.validation import kernel_seq_len, validate_kernel_arrays

NAME = "mlstm_chunkwise__recurrent_fw_C"  # the pallas_call's name, as upstream's kernel function


def _recurrent_fw_kernel(
    *refs, num_chunks: int, chunk_size: int, has_initial: bool, writes_last: bool, tracks_max: bool, precision
):
    k_ref, v_ref, a_ref, g_ref, *refs = refs
    c0_ref, n0_ref, m0_ref = refs[:3] if has_initial else (None, None, None)
    c_all_ref, n_all_ref, m_all_ref, *c_last_ref = refs[3:] if has_initial else refs
    dtype = acc_dtype(k_ref.dtype)
    block_dhqk, block_dhhv = c_all_ref.shape[1:]
    writes_n = pl.program_id(1) == 0  # every DHHV tile computes n; the first one stores it
    writes_m = jnp.logical_and(writes_n, pl.program_id(0) == 0)

    if has_initial:
        c = c0_ref[...].astype(dtype)  # (bDHQK, bDHHV)
        n = n0_ref[...].astype(dtype)  # (bDHQK,)
        m = jnp.max(m0_ref[...].astype(dtype))  # () from (1,)
    else:
        c = jnp.zeros((block_dhqk, block_dhhv), dtype)
        n = jnp.zeros((block_dhqk,), dtype)
        m = jnp.zeros((), dtype)

    def store(index, c, n, m):
        c_all_ref[index] = c.astype(c_all_ref.dtype)

        @pl.when(writes_n)
        def _():
            n_all_ref[index] = n.astype(n_all_ref.dtype)

        @pl.when(writes_m)
        def _():
            m_all_ref[index] = m.astype(m_all_ref.dtype)

    store(0, c, n, m)

    sub_tile = min(chunk_size, launch_defaults.RECURRENT_SUB_TILE)

    def chunk_step(chunk, carry):
        c, n, m = carry
        sca_g = g_ref[chunk].astype(dtype)  # ()
        # m_k = max(g + m_{k-1}, max a, MIN_LOG_SCALE); the floor keeps an empty state finite
        if tracks_max:  # a_ref[chunk]: (L,)
            m_next = jnp.maximum(jnp.maximum(sca_g + m, jnp.max(a_ref[chunk].astype(dtype))), MIN_LOG_SCALE)
        else:  # the sigmoid gate: m stays at its initial value
            m_next = m
        decay = jnp.exp(sca_g + m - m_next)

        def sub_tile_update(t):
            in_chunk = pl.ds(common.tile_start(t, sub_tile), sub_tile)
            rows = pl.ds(common.tile_start(chunk, chunk_size) + common.tile_start(t, sub_tile), sub_tile)
            k = k_ref[rows, :]  # (sL, bDHQK)
            v = v_ref[rows, :]  # (sL, bDHHV)
            k_weighted = k.astype(dtype) * jnp.exp(a_ref[chunk, in_chunk].astype(dtype) - m_next)[:, None]  # a: (sL,)
            # (bDHQK, sL) @ (sL, bDHHV)
            return common.dot(k_weighted.astype(k.dtype), v, precision, trans_a=True), jnp.sum(k_weighted, axis=0)

        c, n = common.sum_over_tiles(chunk_size // sub_tile, sub_tile_update, (decay * c, decay * n), unroll=True)
        store(chunk + 1, c, n, m_next)
        return c, n, m_next

    c, _, _ = lax.fori_loop(0, num_chunks, chunk_step, (c, n, m))
    if writes_last:  # the last state at full precision, when c_all_ref holds narrower copies
        c_last_ref[0][...] = c.astype(c_last_ref[0].dtype)  # (bDHQK, bDHHV)


def recurrent_fw_C(call: KernelCall, matK, matV, vecF, vecI, matC_initial, vecN_initial, scaMinter_initial):
    """The launcher of `mlstm_chunkwise__recurrent_fw_C` (same arrays and outputs); trusts `call` (chunk_size,
    save_states_every_nth_chunk, states_dtype, input_gate, launch: siz_b_DHQK / siz_b_DHHV / num_warps /
    num_stages, allow_tf32, interpret)."""
    batch, heads, seq_len, dhqk = matK.shape
    dhhv = matV.shape[-1]
    chunk_size = call.chunk_size * call.save_states_every_nth_chunk
    num_chunks = seq_len // chunk_size
    bnh = batch * heads
    dhqk_p, dhhv_p = common.padded_dim(dhqk), common.padded_dim(dhhv)
    launch, defaults = common.triton_launch(call), launch_defaults.RECURRENT_FW_C
    block_dhqk = common.tile_size(launch.siz_b_DHQK, dhqk_p, defaults.siz_b_DHQK, "siz_b_DHQK")
    block_dhhv = common.tile_size(
        launch.siz_b_DHHV,
        dhhv_p,
        launch_defaults.recurrent_dhhv_tile(dhqk_p // block_dhqk, dhhv_p, bnh, device_properties().core_count),
        "siz_b_DHHV",
    )
    state_dtype = acc_dtype(matK.dtype)
    c_dtype = state_dtype if call.states_dtype is None else jnp.dtype(call.states_dtype)
    writes_last = c_dtype != state_dtype

    vecB, vecA = chunkwise_log_gates(vecI, vecF, chunk_size, call.input_gate)
    k = common.pad_axis(matK.reshape(bnh, seq_len, dhqk), 2, dhqk_p)
    v = common.pad_axis(matV.reshape(bnh, seq_len, dhhv), 2, dhhv_p)
    inputs = [k, v, vecA.reshape(bnh, num_chunks, chunk_size), vecB[..., -1].reshape(bnh, num_chunks)]
    in_specs = [
        pl.BlockSpec((None, seq_len, block_dhqk), lambda iq, iv, b: (b, 0, iq)),
        pl.BlockSpec((None, seq_len, block_dhhv), lambda iq, iv, b: (b, 0, iv)),
        pl.BlockSpec((None, num_chunks, chunk_size), lambda iq, iv, b: (b, 0, 0)),
        pl.BlockSpec((None, num_chunks), lambda iq, iv, b: (b, 0)),
    ]
    has_initial = matC_initial is not None
    if has_initial:
        n0 = jnp.zeros((batch, heads, dhqk), state_dtype) if vecN_initial is None else vecN_initial
        m0 = jnp.zeros((batch, heads), state_dtype) if scaMinter_initial is None else scaMinter_initial
        inputs += [
            common.pad_axis(common.pad_axis(matC_initial.reshape(bnh, dhqk, dhhv), 1, dhqk_p), 2, dhhv_p),
            common.pad_axis(n0.reshape(bnh, dhqk), 1, dhqk_p),
            m0.reshape(bnh, 1),
        ]
        in_specs += [
            pl.BlockSpec((None, block_dhqk, block_dhhv), lambda iq, iv, b: (b, iq, iv)),
            pl.BlockSpec((None, block_dhqk), lambda iq, iv, b: (b, iq)),
            pl.BlockSpec((None, 1), lambda iq, iv, b: (b, 0)),
        ]

    kernel = functools.partial(
        _recurrent_fw_kernel,
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        has_initial=has_initial,
        writes_last=writes_last,
        tracks_max=tracks_max_state(call.input_gate),
        precision=common.matmul_precision(matK.dtype, call.allow_tf32),
    )
    out_specs = [
        pl.BlockSpec((None, num_chunks + 1, block_dhqk, block_dhhv), lambda iq, iv, b: (b, 0, iq, iv)),
        pl.BlockSpec((None, num_chunks + 1, block_dhqk), lambda iq, iv, b: (b, 0, iq)),
        pl.BlockSpec((None, num_chunks + 1), lambda iq, iv, b: (b, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((bnh, num_chunks + 1, dhqk_p, dhhv_p), c_dtype),
        jax.ShapeDtypeStruct((bnh, num_chunks + 1, dhqk_p), state_dtype),
        jax.ShapeDtypeStruct((bnh, num_chunks + 1), state_dtype),
    ]
    if writes_last:
        out_specs.append(pl.BlockSpec((None, block_dhqk, block_dhhv), lambda iq, iv, b: (b, iq, iv)))
        out_shape.append(jax.ShapeDtypeStruct((bnh, dhqk_p, dhhv_p), state_dtype))
    outs = pl.pallas_call(
        kernel,
        grid=(dhqk_p // block_dhqk, dhhv_p // block_dhhv, bnh),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=common.compiler_params(
            launch.num_warps, launch.num_stages, default_warps=defaults.num_warps, default_stages=defaults.num_stages
        ),
        interpret=call.interpret,
        name=NAME,
    )(*inputs)
    c_all, n_all, m_all = outs[:3]
    c_all = c_all[:, :, :dhqk, :dhhv].reshape(batch, heads, num_chunks + 1, dhqk, dhhv)
    n_all = n_all[:, :, :dhqk].reshape(batch, heads, num_chunks + 1, dhqk)
    states = (join_states(c_all), join_states(n_all), m_all.reshape(batch, heads, num_chunks + 1))
    if not writes_last:
        return states
    return (*states, outs[3][:, :dhqk, :dhhv].reshape(batch, heads, dhqk, dhhv))


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
    allow_tf32: bool = False,
    interpret: bool = False,
):
    """States at every chunk boundary: (matC_states, vecN_states, scaMinter_states), index 0 = initial.

    The upstream-signature adapter over `recurrent_fw_C`: checks its arguments, then launches.
    Shapes (B, NH, (NC+1)*DHQK, DHHV), (B, NH, (NC+1)*DHQK), (B, NH, NC+1), float32, with
    NC = S / (chunk_size · save_states_every_nth_chunk). Grid (DHQK/bDHQK, DHHV/bDHHV, B·NH), each
    program walking the chunks in order. `states_dtype` (None: float32) stores matC_states narrower, e.g.
    bfloat16, the dtype the parallel kernels round them to for their matmuls; the states are still computed
    in float32, and a fourth output holds the last C state in float32, (B, NH, DHQK, DHHV). `input_gate`
    "sigmoid" runs mLSTMsig: the input gate is σ(ĩ) (`gates.log_input_gate`), and m is not tracked: every
    scaMinter state is the initial one (0 when not given; `gates.tracks_max_state`).

    Launch defaults: siz_b_DHQK None takes launch_defaults.RECURRENT_FW_C.siz_b_DHQK (64); siz_b_DHHV None takes
    launch_defaults.recurrent_dhhv_tile (128 while the grid keeps 3 programs per SM, else 64); both
    clamped to their head dim. num_warps / num_stages None: launch_defaults.RECURRENT_FW_C (4 / 1).
    """
    arrays = dict(matK=matK, matV=matV, vecF=vecF, vecI=vecI, matC_initial=matC_initial, vecN_initial=vecN_initial)
    arrays.update(scaMinter_initial=scaMinter_initial)
    states_chunk = plan.validate_chunk_size(
        chunk_size * save_states_every_nth_chunk, kernel_seq_len(arrays), minimum=common.MIN_TILE
    )
    validate_kernel_arrays(arrays, states_chunk // save_states_every_nth_chunk, save_states_every_nth_chunk)
    plan.validate_gate_options(input_gate)
    call = KernelCall(
        chunk_size=chunk_size,
        save_states_every_nth_chunk=save_states_every_nth_chunk,
        input_gate=input_gate,
        launch=TritonLaunch(siz_b_DHQK=siz_b_DHQK, siz_b_DHHV=siz_b_DHHV, num_warps=num_warps, num_stages=num_stages),
        interpret=common.checked_interpret(interpret, NAME),
        **plan.checked_kernel_options(states_dtype=states_dtype, allow_tf32=allow_tf32),
    )
    return recurrent_fw_C(call, matK, matV, vecF, vecI, matC_initial, vecN_initial, scaMinter_initial)
