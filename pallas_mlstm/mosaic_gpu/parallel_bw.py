"""Parallel backward kernels in Pallas Mosaic GPU (Hopper), so far dV: the gradient of every chunk's values.

Same arrays, output and math as pallas_mlstm.pallas_triton.parallel_bw_dV (its jnp twin: xla_kernels.parallel_bw_dV):

    dV = (K ⊙ e^{a − m_k}) dC_k + Σ_{query tiles at or below the diagonal} (s·K Qᵀ ⊙ e^{D̃ − m}ᵀ / (den + eps)) dH

The forward's H kernel (parallel_fw.py) run backwards in time: one program per (batch·head, chunk, key tile x DHHV
tile), compute warpgroups of 64 key rows each (K, loaded once), and a memory warpgroup that streams, with TMA, the
query tiles Q into one ring and into the other first the 64-row slices of dC_k, then the query tiles' dH. Each
compute warpgroup takes acc = K dC_k slice by slice (`common.state_products`), scales its rows by e^{a − m_k}, then
for each query tile from its own diagonal to the chunk's end acc += (s·K Qᵀ ⊙ gates) dH. The rings start at the
program's first diagonal; a second warpgroup, one tile further down, awaits and releases the first query tile
unused. Per program, in shared memory:

    K        (warpgroups, P, 64, DHQK)  the program's key rows, loaded once
    Q        (stages, P, 64, DHQK)      a query tile per step
    dH       (stages, P, 64, bDHHV)     a query tile's dH per step, or a 64-row slice of the state dC_k
    gates    (5, L) float32, (L,) int16 the chunk's gate rows (GATE_ROWS) and last resets, loaded once
    out      (warpgroups, 64, E)        the staging tile of dV (E = 128 bytes of output dtype)

Shapes, dtypes and parts as the forward's kernel (`common.kernel_tiles`, float32 inputs as bf16 operand parts);
dH and dC_k are rounded to the operand dtype before the launch, as the Triton kernel rounds them before its dots.
The gates are the arrays the Triton launchers take (`kernel_gates`); the decays and s/(den + eps) made from them
are computed in the kernel (`key_decay`, `dh_scale`), as Triton's are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_mlstm.gates import log_input_gate
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common
from pallas_mlstm.mosaic_gpu.common import ROWS

NAME = "mlstm_chunkwise__parallel_bw_dV"
# float32 rows: b_t, m_t, the log input gate, a_t (a step's log decay to the chunk's end), den_t (vecN_out); the
# last resets (int16) beside them
GATE_ROWS = ("b", "m", "i", "a", "den")
B_ROW, M_ROW, I_ROW, A_ROW, DEN_ROW = range(len(GATE_ROWS))


def kernel_tiles(chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...]) -> tuple[int, common.Tiles]:
    """The operand parts and the launch for padded head dims (`common.kernel_tiles`)."""
    return common.kernel_tiles(NAME, chunk, dhqk, dhhv, parts, len(GATE_ROWS))


def supports(call: KernelCall, matQ, *arrays) -> bool:
    """True for the calls this kernel runs (it takes `parallel_bw_dV`'s arguments)."""
    return common.unsupported(NAME, call.chunk_size, matQ.shape[-1], matQ.dtype) is None


def _kernel(
    k_gmem,  # (P, BNH·S, DHQK_p)
    q_gmem,  # (P, BNH·S, DHQK_p)
    dh_gmem,  # (P, BNH·S, DHHV_p)
    dc_gmem,  # (P, BNH·(NC+1)·DHQK_p, DHHV_p): dC_k of head bh at rows (bh·(NC+1) + k)·DHQK_p
    gates_gmem,  # common.GateArrays: rows GATE_ROWS, the last resets, the states' m
    dv_gmem,  # (BNH, S, DHHV_p) out
    k_smem,
    q_smem,
    dh_smem,
    g_smem,
    r_smem,
    o_smem,
    k_bar,
    g_bar,
    q_bar,
    dh_bar,
    q_free_bar,
    dh_free_bar,
    *,
    tiles: common.Tiles,
    chunk: int,
    num_chunks: int,
    qk_scale: float,
    eps: float,
    interpret: bool,
):
    parts, dhqk = k_smem.shape[1], k_smem.shape[-1]
    block_v, stages, warpgroups = tiles.block_v, tiles.stages, tiles.warpgroups
    state_steps = dhqk // ROWS  # 64-row slices of dC_k, the first steps of the dH ring
    v_tiles = dh_gmem.shape[-1] // block_v
    bh, c, kv = lax.axis_index("bh"), lax.axis_index("c"), lax.axis_index("kv")
    seq_row0 = (bh * num_chunks + c) * chunk  # row of the chunk's first step in Q, K, dH
    ik, iv = kv // v_tiles, kv % v_tiles
    kv_start = ik * (warpgroups * ROWS)  # in-chunk position of the program's first key row
    first_q = kv_start // ROWS  # the first query tile: the first warpgroup's diagonal
    columns = pl.ds(iv * block_v, block_v)
    q_steps = chunk // ROWS - first_q  # query tiles from the first diagonal to the chunk's end
    dh_steps = state_steps + q_steps  # the dH ring: dC_k slices, then the query tiles' dH
    wg = lax.axis_index("wg")

    @pl.when(wg == warpgroups)
    def _memory():
        plgpu.set_max_registers(common.MEMORY_REGISTERS, action="decrease")
        for w in range(warpgroups):
            rows = pl.ds(seq_row0 + kv_start + w * ROWS, ROWS)
            plgpu.copy_gmem_to_smem(k_gmem.at[:, rows], k_smem.at[w], k_bar.at[w])  # (P, 64, DHQK_p)
        common.load_gate_rows(gates_gmem, g_smem, r_smem, g_bar, bh, c)  # used after dC_k's products

        def load_q(j):  # query tile first_q + j into its slot of the Q ring
            q_rows = pl.ds(seq_row0 + (first_q + j) * ROWS, ROWS)
            slot = j % stages
            plgpu.copy_gmem_to_smem(q_gmem.at[:, q_rows], q_smem.at[slot], q_bar.at[slot])  # (P, 64, DHQK_p)

        def load_dh(t):  # step t of the dH ring: a 64-row slice of dC_k, then the query tiles' dH
            slot = t % stages

            @pl.when(t < state_steps)
            def _state():
                state_rows = pl.ds((bh * (num_chunks + 1) + c + 1) * dhqk + t * ROWS, ROWS)
                dc_tile = dc_gmem.at[:, state_rows, columns]  # (P, 64, bDHHV)
                plgpu.copy_gmem_to_smem(dc_tile, dh_smem.at[slot], dh_bar.at[slot])

            @pl.when(t >= state_steps)
            def _dh():
                q_rows = pl.ds(seq_row0 + (first_q + t - state_steps) * ROWS, ROWS)
                plgpu.copy_gmem_to_smem(
                    dh_gmem.at[:, q_rows, columns], dh_smem.at[slot], dh_bar.at[slot]
                )  # (P, 64, bDHHV)

        common.stream_rings(load_q, load_dh, q_steps, dh_steps, state_steps, stages, (q_free_bar, dh_free_bar))

    @pl.when(wg < warpgroups)
    def _compute():
        plgpu.set_max_registers(common.COMPUTE_REGISTERS, action="increase")
        row0 = kv_start + wg * ROWS  # in-chunk position of this warpgroup's first key row
        k_tile = lambda p: k_smem.at[wg, p]  # (64, DHQK_p): part p of this warpgroup's K
        m_k = gates_gmem.m_states[bh, c + 1]  # a scalar: read first, used after the state's products
        plgpu.barrier_wait(k_bar.at[wg])

        # inter-chunk: (K ⊙ e^{a − m_k}) dC_k
        k_cols = lambda e: lambda p: k_tile(p).at[:, pl.ds(e * ROWS, ROWS)]  # (64, 64): columns e of K
        dc_rows = lambda e: lambda p: dh_smem.at[e % stages, p]  # (64, bDHHV): rows e of dC_k
        acc = common.state_products(
            k_cols, dc_rows, state_steps, block_v, parts, interpret, dh_bar, dh_free_bar, stages
        )
        common.await_gate_rows(g_bar, len(GATE_ROWS))
        gate_row, gate_col = common.gate_readers(g_smem, r_smem)
        vec_b_kv, vec_i_kv = gate_row(B_ROW, row0), gate_row(I_ROW, row0)  # (64,)
        acc = acc * common.by_rows(key_decay(gate_row(A_ROW, row0), m_k), acc.shape)

        @pl.loop(0, wg)
        def _skip(j):  # query tiles above this warpgroup's diagonal, loaded for the previous one
            plgpu.barrier_wait(q_bar.at[j % stages])
            plgpu.barrier_arrive(q_free_bar.at[j % stages])
            plgpu.barrier_wait(dh_bar.at[(state_steps + j) % stages])
            plgpu.barrier_arrive(dh_free_bar.at[(state_steps + j) % stages])

        plgpu.barrier_wait(q_bar.at[wg % stages])

        def query_step(j, acc):
            q_slot, dh_slot = j % stages, (state_steps + j) % stages
            q_start = (first_q + j) * ROWS  # in-chunk position of the query tile
            q_t = lambda p: q_smem.at[q_slot, p].transpose((1, 0))  # (DHQK_p, 64)
            scores = common.mma(common.zeros(ROWS), k_tile, q_t, parts, interpret)  # (64, DHQK_p) @ (DHQK_p, 64)
            plgpu.barrier_arrive(q_free_bar.at[q_slot])
            vec_b_q, vec_m_q = gate_col(B_ROW, q_start), gate_col(M_ROW, q_start)  # (64,)
            vec_r_q = gate_col(common.RESETS, q_start)  # (64,) int32: last reset in the chunk, −1 if none
            vec_dh_scale = dh_scale(gate_col(DEN_ROW, q_start), qk_scale, eps)  # (64,)
            shape = scores.shape  # (key rows, query columns)
            log_decay = (
                common.by_columns(vec_b_q, shape) - common.by_rows(vec_b_kv, shape) + common.by_rows(vec_i_kv, shape)
            ) - common.by_columns(vec_m_q, shape)
            kv_pos = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
            q_pos = q_start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            valid = (kv_pos <= q_pos) & (kv_pos >= common.by_columns(vec_r_q, shape))
            decay = jnp.exp(jnp.where(valid, log_decay, -jnp.inf))
            weights = scores * common.by_columns(vec_dh_scale, shape) * decay  # (64, 64) float32
            plgpu.barrier_wait(dh_bar.at[dh_slot])
            w_parts = common.split_parts(weights, parts, dh_smem.dtype)
            dh_tile = lambda p: dh_smem.at[dh_slot, p]  # (64, bDHHV)

            def next_query():  # awaited while this step's product runs
                pl.when(j + 1 < q_steps)(lambda: plgpu.barrier_wait(q_bar.at[(j + 1) % stages]))

            acc = common.mma(acc, w_parts.__getitem__, dh_tile, parts, interpret, next_query)  # (64, 64) @ (64, bDHHV)
            plgpu.barrier_arrive(dh_free_bar.at[dh_slot])
            return acc

        acc = lax.fori_loop(wg, q_steps, query_step, acc)

        rows = pl.ds(c * chunk + row0, ROWS)
        out_cols = o_smem.shape[-1]
        for t in range(block_v // out_cols):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile has left o_smem
            o_smem[wg] = acc[:, t * out_cols : (t + 1) * out_cols].astype(o_smem.dtype)  # (64, E)
            plgpu.commit_smem()  # then (64, E) to the dV rows' columns iv·block_v + t·E on
            plgpu.copy_smem_to_gmem(o_smem.at[wg], dv_gmem.at[bh, rows, pl.ds(iv * block_v + t * out_cols, out_cols)])
        plgpu.wait_smem_to_gmem(0)


def kernel_gates(call: KernelCall, vecI, chunk_gates, vecN_out, vecM_out, scaM_all, dims: common.LaunchDims):
    """The gate arrays of the backward kernels (`common.GateArrays`), those the Triton launchers take: the rows
    (GATE_ROWS), the last resets (no resets: −1, as Triton's) and the states' m."""
    vecA, vecB, vecR = chunk_gates  # (B, NH, NC, L)
    if vecR is None:
        vecR = jnp.full(vecB.shape, -1, common.RESETS_DTYPE)
    rows = (vecB, vecM_out, log_input_gate(vecI, call.input_gate), vecA, vecN_out)
    m_states = scaM_all.reshape(dims.bnh, dims.num_chunks + 1).astype(jnp.float32)
    return common.GateArrays(tuple(common.chunk_rows(x, dims) for x in rows), common.reset_rows(vecR, dims), m_states)


def key_decay(vec_a, m_k):
    """e^{a_j − m_k}, key j's decay to the chunk's end state: (64,) from the keys' a and m_k, a scalar."""
    return jnp.exp(vec_a - m_k)


def dh_scale(vec_den, qk_scale: float, eps: float):
    """s/(den_t + eps), a query's factor on its dH: (64,) from the queries' den (vecN_out)."""
    return qk_scale / (vec_den + eps)


def parallel_bw_dV(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """The launcher of `mlstm_chunkwise__parallel_bw_dV` in Mosaic GPU (same arrays and output as the Triton
    launcher): dV (B, NH, S, DHHV) in call.output_dtype. chunk_gates = (vecA, vecB, vecR or None), chunk_states =
    (matC_all, vecN_all, scaM_all) (only scaM_all read). Trusts `call` (chunk_size, qk_scale, eps, output_dtype,
    input_gate, interpret); ValueError for the shapes `common.unsupported` names."""
    chunk = call.chunk_size
    problem = common.unsupported(NAME, chunk, matQ.shape[-1], matQ.dtype)
    dims = common.launch_dims(problem, matQ.shape, matV.shape[-1], chunk)
    batch, heads, seq_len, dhqk, dhhv, num_chunks, bnh, dhqk_p, dhhv_p = dims
    operand_dtype = common.operand_dtype(matQ.dtype)
    parts, tiles = kernel_tiles(chunk, dhqk_p, dhhv_p, common.operand_parts(matQ.dtype))
    out_dtype = jnp.dtype(call.output_dtype)

    gates = kernel_gates(call, vecI, chunk_gates, vecN_out, vecM_out, chunk_states[2], dims)
    operand_of = lambda x, size: common.sequence_operand(x, size, parts, operand_dtype)  # (P, BNH·S, size)
    k, q, dh = operand_of(matK, dhqk_p), operand_of(matQ, dhqk_p), operand_of(matDeltaH.astype(matQ.dtype), dhhv_p)
    dc_all = common.split_operand(common.states_rows(matDeltaC_states, dims), parts, operand_dtype)  # (P, rows, DHHV_p)

    operand = lambda shape: plgpu.SMEM(shape, operand_dtype, transforms=common.swizzled(operand_dtype))
    out_cols = 128 // out_dtype.itemsize
    w, stages = tiles.warpgroups, tiles.stages
    kernel = common.chunk_kernel(_kernel, call, dhqk, chunk, num_chunks, tiles=tiles)
    dv = common.launch(
        kernel,
        name=NAME,
        compute_warpgroups=w,
        parts=parts,
        interpret=call.interpret,
        out_type=jax.ShapeDtypeStruct((bnh, seq_len, dhhv_p), out_dtype),
        scratch_types=(
            operand((w, parts, ROWS, dhqk_p)),  # K
            operand((stages, parts, ROWS, dhqk_p)),  # Q
            operand((stages, parts, ROWS, tiles.block_v)),  # dH or dC_k
            plgpu.SMEM((len(GATE_ROWS), chunk), jnp.float32),  # gate rows
            plgpu.SMEM((chunk,), common.RESETS_DTYPE),  # last resets
            plgpu.SMEM((w, ROWS, out_cols), out_dtype, transforms=common.swizzled(out_dtype)),  # dV staging
            plgpu.Barrier(num_barriers=w),  # K loaded
            plgpu.Barrier(num_barriers=len(GATE_ROWS) + 1),  # gate rows, last resets loaded
            plgpu.Barrier(num_barriers=stages),  # Q loaded
            plgpu.Barrier(num_barriers=stages),  # dH / dC_k loaded
            plgpu.Barrier(num_arrivals=w, num_barriers=stages),  # Q buffers free again
            plgpu.Barrier(num_arrivals=w, num_barriers=stages),  # dH buffers free again
        ),
        grid=(bnh, num_chunks, (chunk // (w * ROWS)) * (dhhv_p // tiles.block_v)),
        grid_names=("bh", "c", "kv"),
    )(k, q, dh, dc_all, gates)
    return dv[:, :, :dhhv].reshape(batch, heads, seq_len, dhhv)
