"""The recurrent backward kernel in Pallas Mosaic GPU (Hopper): the gradients dC of the states at every chunk
boundary, last to first.

Same arrays, outputs and math as pallas_mlstm.pallas_triton.recurrent_bw (its jnp twin: xla_kernels.recurrent_bw_dC):

    dC_k = d_k dC_{k+1} + (Q_k ⊙ w)ᵀ dH_k,   w_t = s·e^{b_t + m_{k-1} − m_t} / (den_t + eps)
    d_k = e^{g_k + m_{k-1} − m_k}

and <dC_k, C_k> per boundary where the forward's states are given. The forward states kernel (recurrent_fw.py) run
backwards in time, with its tiles: one program per (batch·head, DHQK tile x DHHV tile), compute warpgroups of 64
DHQK rows each that carry dC in registers from the last chunk to the first, and a memory warpgroup that streams each
chunk's Q slices, dH tile and gate row with TMA, T time steps per ring slot (as the forward's). Per step a compute
warpgroup scales its Q slice's rows by w in shared memory (rounded to the operand dtype, as the Triton kernel rounds
q̄ before its dot), then takes dC += (Q ⊙ w)ᵀ dH with wgmma; at a chunk's last step it stores dC_k and the row sums
of dC_k ⊙ C_k (summed by XLA over the tiles). Per program, in shared memory:

    Q      (stages, warpgroups, P, T, 64)   each warpgroup's 64 DHQK columns of T time steps
    dH     (stages, P, T, bDHHV)            the same time steps' DHHV tile
    gates  (stages, T) float32              w of the steps (the chunk's decay d_k: a scalar read from global memory at
                                            its first step)
    out    (warpgroups, buffers, 64, E)     staging of dC_k (E = 128 bytes of the states dtype; buffers as forwards)
           (warpgroups, 64) float32         and of the row sums

The row sums reduce within each warp (over a row's columns), so, unlike the forward's n, the warpgroups need no
turns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_mlstm.gates import chunked, compute_chunkwise_vecB
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common, recurrent_fw
from pallas_mlstm.mosaic_gpu.common import ROWS
from pallas_mlstm.states import join_states

NAME = "mlstm_chunkwise__recurrent_bw_dC"


def unsupported(chunk: int, dtype) -> str | None:
    """What this kernel does not run (as recurrent_fw.unsupported), or None."""
    problem = recurrent_fw.unsupported(chunk, dtype)
    return None if problem is None else problem.replace(recurrent_fw.NAME, NAME)


def supports(call: KernelCall, matQ, vecF, scaM_inter, vecM_combine, matDeltaH, *arrays) -> bool:
    """True for the calls this kernel runs and where it pays (it takes `recurrent_bw_dC`'s arguments): the
    forward's rule, `recurrent_fw.takes_and_fills_the_card`."""
    return recurrent_fw.takes_and_fills_the_card(call, matQ, matDeltaH.shape[-1])


def _kernel(
    q_gmem,  # (P, BNH·S, DHQK_p)
    dh_gmem,  # (P, BNH·S, DHHV_p)
    g_gmem,  # (BNH·steps, T) float32: per ring step w of its time steps, in processing order (last chunk first)
    decay_gmem,  # (BNH, NC) float32: d_k of each chunk, in processing order
    *refs,  # dC_last (BNH, DHQK_p, DHHV_p) float32 and C states where given; outputs; scratch
    tiles: recurrent_fw.RecurrentTiles,
    steps_per_chunk: int,
    num_chunks: int,
    has_last: bool,
    has_states: bool,
    writes_first: bool,
    interpret: bool,
):
    last_gmem = refs[0] if has_last else None  # (BNH, DHQK_p, DHHV_p) float32
    c_gmem = refs[int(has_last)] if has_states else None  # (BNH·(NC+1)·DHQK_p, DHHV_p)
    refs = refs[has_last + has_states :]
    dc_gmem = refs[0]  # (BNH·(NC+1)·DHQK_p, DHHV_p) states dtype
    dots_gmem = refs[1] if has_states else None  # (BNH·(NC+1), DHHV_p / bDHHV, DHQK_p) float32
    first_gmem = refs[1 + has_states] if writes_first else None  # (BNH·DHQK_p, DHHV_p) float32
    refs = refs[1 + has_states + writes_first :]
    q_smem, dh_smem, g_smem, c_stage, dots_stage, *first_stage, q_bar, dh_bar, g_bar, free_bar = refs
    w, block_v, stages, t = tiles.warpgroups, tiles.block_v, tiles.stages, tiles.step_rows
    parts = q_smem.shape[2]
    pieces = block_v // c_stage.shape[-1]  # the TMA copies (copy groups) of a state's tile
    dhqk_size = q_gmem.shape[-1]
    steps = num_chunks * steps_per_chunk
    chunk = steps_per_chunk * t
    seq_len = steps * t
    bh, iq, iv = lax.axis_index("bh"), lax.axis_index("q"), lax.axis_index("v")
    columns = pl.ds(iv * block_v, block_v)
    wg = lax.axis_index("wg")

    def step_row(s):  # the sequence row of ring step s's first time step: the chunks from the last to the first
        return bh * seq_len + (num_chunks - 1 - s // steps_per_chunk) * chunk + (s % steps_per_chunk) * t

    @pl.when(wg == w)
    def _memory():
        plgpu.set_max_registers(common.MEMORY_REGISTERS, action="decrease")

        def load(s):  # ring step s: T time steps of Q (each warpgroup's columns), of dH, and their gate row
            slot = s % stages
            rows = pl.ds(step_row(s), t)
            plgpu.copy_gmem_to_smem(g_gmem.at[bh * steps + s], g_smem.at[slot], g_bar.at[slot])  # (T,)
            for u in range(w):
                q_tile = q_gmem.at[:, rows, pl.ds((iq * w + u) * ROWS, ROWS)]  # (P, T, 64)
                plgpu.copy_gmem_to_smem(q_tile, q_smem.at[slot, u], q_bar.at[slot * w + u])
            plgpu.copy_gmem_to_smem(dh_gmem.at[:, rows, columns], dh_smem.at[slot], dh_bar.at[slot])  # (P, T, bDHHV)

        common.stream_ring(load, free_bar, steps, stages)

    @pl.when(wg < w)
    def _compute():
        plgpu.set_max_registers(common.COMPUTE_REGISTERS, action="increase")
        dhqk_row0 = (iq * w + wg) * ROWS  # this warpgroup's first DHQK row

        def state_rows(index):  # the rows of this warpgroup's tile of state `index` in dC (and C)
            return pl.ds((bh * (num_chunks + 1) + index) * dhqk_size + dhqk_row0, ROWS)

        def store_state(index, dc):  # dC_index of this program's tile, and the row sums of dC_index ⊙ C_index
            rows, state = state_rows(index), bh * (num_chunks + 1) + index
            if has_states:  # C_index, in L2 since the chunk's first step: loaded first, used after dC's copies
                c = plgpu.load(c_gmem.at[rows, columns], layout=plgpu.Layout.WGMMA, optimized=False)  # (64, bDHHV)
            common.store_staged(dc_gmem.at[rows], c_stage.at[wg], dc, iv * block_v)
            if has_states:
                plgpu.wait_smem_to_gmem(pieces, wait_read_only=True)  # the last row sums' copy, not dC's, has read it
                dots_stage[wg] = jnp.sum(dc * c.astype(jnp.float32), axis=1)  # (64,)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(dots_stage.at[wg], dots_gmem.at[state, iv, pl.ds(dhqk_row0, ROWS)])  # (64,)

        if has_last:
            dc = plgpu.load(
                last_gmem.at[bh, pl.ds(dhqk_row0, ROWS), columns], layout=plgpu.Layout.WGMMA, optimized=False
            )  # (64, bDHHV)
        else:
            dc = common.zeros(block_v)
        store_state(num_chunks, dc)

        def step(s, dc):
            slot = s % stages
            chunk_index = num_chunks - 1 - s // steps_per_chunk
            first_step = s % steps_per_chunk == 0
            if has_states and not interpret:  # C_{chunk_index} into L2 at the chunk's first step, read at its last
                plgpu.async_prefetch(c_gmem.at[state_rows(chunk_index), columns], predicate=first_step)
            q_slice = lambda p: q_smem.at[slot, wg, p]  # (T steps, 64 DHQK columns)
            dc = dc * jnp.where(first_step, decay_gmem[bh, s // steps_per_chunk], 1.0)  # d_k at the chunk's start
            plgpu.barrier_wait(g_bar.at[slot])
            plgpu.barrier_wait(q_bar.at[slot * w + wg])
            for h in range(t // ROWS):  # Q ⊙ w, 64 time steps at a time
                steps_h = pl.ds(h * ROWS, ROWS)
                weights = plgpu.load(g_smem.at[slot, steps_h], layout=plgpu.Layout.WGMMA.reduce(1))  # (64,)
                common.weight_rows_in_place(lambda p, steps_h=steps_h: q_slice(p).at[steps_h], parts, weights)
            plgpu.barrier_wait(dh_bar.at[slot])
            q_t = lambda p: q_slice(p).transpose((1, 0))  # (64 DHQK, T steps)
            dc = common.mma(dc, q_t, lambda p: dh_smem.at[slot, p], parts, interpret)  # (64, T) @ (T, bDHHV)
            plgpu.barrier_arrive(free_bar.at[slot])
            last_step = s % steps_per_chunk == steps_per_chunk - 1
            pl.when(last_step)(lambda: store_state(chunk_index, dc))
            return dc

        dc = lax.fori_loop(0, steps, step, dc)
        if writes_first:  # dC_0 at full precision, when the states are stored narrower
            first_rows = first_gmem.at[pl.ds(bh * dhqk_size + dhqk_row0, ROWS)]
            common.store_staged(first_rows, first_stage[0].at[wg], dc, iv * block_v)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the copies have read their staging: safe to exit


def recurrent_bw_dC(
    call: KernelCall, matQ, vecF, scaM_inter, vecM_combine, matDeltaH, vecN_out, matDeltaC_last, matC_states
):
    """The launcher of `mlstm_chunkwise__recurrent_bw_dC` in Mosaic GPU (same arrays and outputs as the Triton
    launcher). Trusts `call` (chunk_size, save_states_every_nth_chunk, qk_scale, eps, states_dtype, interpret);
    ValueError for what `unsupported` names."""
    chunk = call.chunk_size * call.save_states_every_nth_chunk
    dims = common.launch_dims(unsupported(chunk, matQ.dtype), matQ.shape, matDeltaH.shape[-1], chunk)
    batch, heads, _, dhqk, dhhv, num_chunks, bnh, dhqk_p, dhhv_p = dims
    state_dtype, c_dtype, writes_first, operand_dtype, parts, tiles = recurrent_fw.states_launch(
        call, matQ.dtype, dims, recurrent_fw.compute_warpgroups(dims.dhqk_p)
    )

    vecB = compute_chunkwise_vecB(vecF, chunk).astype(jnp.float32)  # (B, NH, NC, L), −∞ from a reset on
    m_prev, m_next = (scaM_inter[..., :-1].astype(jnp.float32), scaM_inter[..., 1:].astype(jnp.float32))
    weights = (
        call.scale_for(dhqk)
        * jnp.exp(vecB + m_prev[..., None] - chunked(vecM_combine, chunk).astype(jnp.float32))
        / (chunked(vecN_out, chunk).astype(jnp.float32) + call.eps)
    )  # (B, NH, NC, L)
    decay = jnp.exp(vecB[..., -1] + m_prev - m_next)  # (B, NH, NC)
    gates = recurrent_fw.ring_gates(weights[:, :, ::-1], decay[:, :, ::-1], tiles.step_rows)  # the last chunk first
    operand_of = lambda x, size: common.sequence_operand(x, size, parts, operand_dtype)  # (P, BNH·S, size)
    inputs = [operand_of(matQ, dhqk_p), operand_of(matDeltaH.astype(matQ.dtype), dhhv_p), *gates]
    has_last, has_states = matDeltaC_last is not None, matC_states is not None
    if has_last:
        inputs.append(common.one_state(matDeltaC_last, dims))  # (BNH, DHQK_p, DHHV_p) float32
    if has_states:
        inputs.append(common.states_rows(matC_states, dims))  # (BNH·(NC+1)·DHQK_p, DHHV_p)

    out_type = [jax.ShapeDtypeStruct((bnh * (num_chunks + 1) * dhqk_p, dhhv_p), c_dtype)]
    if has_states:
        out_type.append(jax.ShapeDtypeStruct((bnh * (num_chunks + 1), dhhv_p // tiles.block_v, dhqk_p), jnp.float32))
    if writes_first:
        out_type.append(jax.ShapeDtypeStruct((bnh * dhqk_p, dhhv_p), jnp.float32))
    flags = dict(has_last=has_last, has_states=has_states, writes_first=writes_first)
    scratch = recurrent_fw.scratch_types(tiles, parts, operand_dtype, c_dtype, writes_first, turns=False)
    launch = recurrent_fw.launch_states_kernel(_kernel, NAME, dims, chunk, tiles, parts, scratch, out_type, call, flags)
    outs = launch(*inputs)
    dc_all = outs[0].reshape(bnh, num_chunks + 1, dhqk_p, dhhv_p)[:, :, :dhqk, :dhhv]
    results = [join_states(dc_all.reshape(batch, heads, num_chunks + 1, dhqk, dhhv))]
    if has_states:
        results.append(jnp.sum(outs[1], axis=(1, 2)).reshape(batch, heads, num_chunks + 1).astype(state_dtype))
    if writes_first:
        first = outs[-1].reshape(bnh, dhqk_p, dhhv_p)[:, :dhqk, :dhhv]
        results.append(first.reshape(batch, heads, dhqk, dhhv))
    return results[0] if len(results) == 1 else tuple(results)
