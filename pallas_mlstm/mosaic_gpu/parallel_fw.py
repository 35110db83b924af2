"""Parallel forward kernel in Pallas Mosaic GPU (Hopper): the outputs H of every chunk from the state at its start.

Same arrays, outputs and math as pallas_mlstm.pallas_triton.parallel_fw (its jnp twin: xla_kernels.parallel_fw_Hintra).

One program per (batch·head, chunk, query tile x DHHV tile), FlashAttention-3 style: `warpgroups` compute warpgroups
of 64 query rows each, and one memory warpgroup that streams tiles into shared memory with TMA, `stages` buffers deep.
Every matmul is a wgmma: bf16 / fp16 operands from shared memory (the gated scores from registers), float32
accumulators in registers. Per program, in shared memory:

    Q        (warpgroups, P, 64, DHQK)  the program's query rows, loaded once
    K        (stages, P, 64, DHQK)      a key tile per step
    V        (stages, P, 64, bDHHV)     a value tile per step, or a 64-row slice of the state C_{k-1}
    gates    (3, L) float32, (L,) int16 the chunk's gate rows (_GATE_ROWS) and last resets, loaded once
    n        (DHQK,) float32            the state n_{k-1}
    out      (warpgroups, 64, E)        the staging tile of h (E = 128 bytes of output dtype); den (warpgroups, 64)

In global memory the launcher passes Q, K, V as (P, B·NH·S, D) and the states C as (P, B·NH·(NC+1)·DHQK, DHHV)
(16-bit, 3-D: the TMA copies take rows of them), n (B·NH, NC+1, DHQK), the gate rows and last resets (B·NH, NC, L)
each, and the states' m (B·NH, NC+1).

The memory warpgroup fills two rings of buffers. The V ring holds DHQK/64 "state steps" (C_{k-1} in 64-row slices) and
then the value tiles of the key steps up to the causal diagonal; the K ring holds the key tiles. Each compute
warpgroup consumes them in the same order: acc = Q C_{k-1} (64-column slices of Q; with two or more buffers a slice's
products are issued before the previous slice's are awaited), scaled per row by the inter-chunk decay, then for each
key tile acc += (s·Q Kᵀ ⊙ e^{D̃ − m}) V. A key buffer is released as soon as its scores are computed, so the next key
tile loads while the gating and the product with V run; the next key tile is awaited while that product runs. (Tried
and dropped, on an H100: ping-pong scheduling of the two compute warpgroups, slower at 3 of the 4 timed shapes, and a
persistent grid of one program per SM prefetching its next item, 1.9x slower at 7b.) P (the operand parts) is 1 for
16-bit inputs; float32 inputs run as three bf16 parts that sum to them (`split_operand`, `split_parts`) and every
product as the six part products that carry float32's precision (`mma`), where wgmma's own float32 mode would be TF32
(two parts where three do not fit: DHQK 256, ~1e-5).
The launcher passes the gate arrays the Triton launcher passes (no stack of them: no more memory than Triton's);
the inter-chunk decay is computed in the kernel, as Triton's is. With 16-bit inputs the in-kernel exp and division
are the fast approximate ones (as Triton's).

Shapes: chunk 64, 128 or 256; head dims zero-padded to multiples of 64 (DHQK at most 256): odd-heads' DHQK 96 runs
as 128, its DHHV 192 as it is. Gates are float32 (float64 inputs are refused: ValueError). `KernelCall.launch` and
`allow_tf32` are ignored: the tiles are chosen here (`kernel_tiles`). Float32 states are rounded to the operand
dtype before the launch (a copy: pass 16-bit states with 16-bit inputs, as pallas_mlstm's forward does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_mlstm.gates import compute_chunkwise_reset_gates, compute_chunkwise_vecM, log_input_gate
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common
from pallas_mlstm.mosaic_gpu.common import ROWS
from pallas_mlstm.pallas_triton import common as triton_common

NAME = "mlstm_chunkwise__parallel_fw_Hintra"
_GATE_ROWS = ("b", "m", "i")  # float32: b_t, m_t, the log input gate; the last resets (int16) beside them
_B, _M, _I = range(len(_GATE_ROWS))


def kernel_tiles(chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...]) -> tuple[int, common.Tiles]:
    """The operand parts and the launch for padded head dims (`common.kernel_tiles`)."""
    return common.kernel_tiles(NAME, chunk, dhqk, dhhv, parts, len(_GATE_ROWS))


def unsupported(chunk: int, dhqk: int, dtype) -> str | None:
    """What this kernel does not run of the shape (chunks other than 64/128/256, DHQK > 256, float64), or None."""
    return common.unsupported(NAME, chunk, dhqk, dtype)


def supports(call: KernelCall, matQ, *arrays) -> bool:
    """True for the calls this kernel runs (it takes `parallel_fw_Hintra`'s arguments)."""
    return unsupported(call.chunk_size, matQ.shape[-1], matQ.dtype) is None


def _kernel(
    q_gmem,  # (P, BNH·S, DHQK_p)
    k_gmem,  # (P, BNH·S, DHQK_p)
    v_gmem,  # (P, BNH·S, DHHV_p)
    c_gmem,  # (P, BNH·(NC+1)·DHQK_p, DHHV_p): C_k of head bh at rows (bh·(NC+1) + k)·DHQK_p
    n_gmem,  # (BNH, NC+1, DHQK_p) float32
    gates_gmem,  # common.GateArrays: rows _GATE_ROWS, the last resets, the states' m
    h_gmem,  # (BNH, S, DHHV_p) out
    den_gmem,  # (BNH, S) float32
    q_smem,
    k_smem,
    v_smem,
    g_smem,
    r_smem,
    n_smem,
    o_smem,
    den_smem,
    q_bar,
    g_bar,
    n_bar,
    k_bar,
    v_bar,
    k_free_bar,
    v_free_bar,
    *,
    tiles: common.Tiles,
    chunk: int,
    num_chunks: int,
    qk_scale: float,
    eps: float,
    normalize: bool,
    interpret: bool,
):
    parts, dhqk = q_smem.shape[1], q_smem.shape[-1]
    block_v, stages, warpgroups = tiles.block_v, tiles.stages, tiles.warpgroups
    state_steps = dhqk // ROWS  # 64-row slices of C_{k-1}, the first steps of the V ring
    v_tiles = v_gmem.shape[-1] // block_v
    bh, c, qv = lax.axis_index("bh"), lax.axis_index("c"), lax.axis_index("qv")
    seq_row0 = (bh * num_chunks + c) * chunk  # row of the chunk's first step in Q, K, V
    iq, iv = qv // v_tiles, qv % v_tiles
    q_start = iq * (warpgroups * ROWS)  # in-chunk position of the program's first query row
    columns = pl.ds(iv * block_v, block_v)
    key_steps = q_start // ROWS + warpgroups  # key tiles up to the last row's diagonal
    v_steps = state_steps + key_steps  # the V ring: C_{k-1} slices, then value tiles
    wg = lax.axis_index("wg")

    @pl.when(wg == warpgroups)
    def _memory():
        plgpu.set_max_registers(common.MEMORY_REGISTERS, action="decrease")
        plgpu.copy_gmem_to_smem(n_gmem.at[bh, c], n_smem, n_bar.at[0])  # (DHQK_p,)
        for w in range(warpgroups):
            rows = pl.ds(seq_row0 + q_start + w * ROWS, ROWS)
            plgpu.copy_gmem_to_smem(q_gmem.at[:, rows], q_smem.at[w], q_bar.at[w])  # (P, 64, DHQK_p)
        common.load_gate_rows(gates_gmem, g_smem, r_smem, g_bar, bh, c)  # used after C_{k-1}

        def load_k(j):  # key tile j into its slot of the K ring
            kv_rows = pl.ds(seq_row0 + j * ROWS, ROWS)
            slot = j % stages
            plgpu.copy_gmem_to_smem(k_gmem.at[:, kv_rows], k_smem.at[slot], k_bar.at[slot])  # (P, 64, DHQK_p)

        def load_v(t):  # step t of the V ring: a 64-row slice of C_{k-1}, then value tiles
            slot = t % stages

            @pl.when(t < state_steps)
            def _state():
                state_rows = pl.ds((bh * (num_chunks + 1) + c) * dhqk + t * ROWS, ROWS)
                c_tile = c_gmem.at[:, state_rows, columns]  # (P, 64, bDHHV)
                plgpu.copy_gmem_to_smem(c_tile, v_smem.at[slot], v_bar.at[slot])

            @pl.when(t >= state_steps)
            def _value():
                v_tile = v_gmem.at[:, pl.ds(seq_row0 + (t - state_steps) * ROWS, ROWS), columns]  # (P, 64, bDHHV)
                plgpu.copy_gmem_to_smem(v_tile, v_smem.at[slot], v_bar.at[slot])

        common.stream_rings(load_k, load_v, key_steps, v_steps, state_steps, stages, (k_free_bar, v_free_bar))

    @pl.when(wg < warpgroups)
    def _compute():
        plgpu.set_max_registers(common.COMPUTE_REGISTERS, action="increase")
        row0 = q_start + wg * ROWS  # in-chunk position of this warpgroup's first query row
        own_steps = row0 // ROWS + 1  # key tiles up to this warpgroup's diagonal
        q_tile = lambda p: q_smem.at[wg, p]  # (64, DHQK_p): part p of this warpgroup's Q
        m_prev = gates_gmem.m_states[bh, c]  # m_{k-1}, a scalar: read first, used after the state's products
        plgpu.barrier_wait(n_bar.at[0])
        plgpu.barrier_wait(q_bar.at[wg])

        # inter-chunk: q̄ C_{k-1} and q̄ · n_{k-1}, with q̄ = q·inter (inter = s·e^{b + m_{k-1} − m}, 0 after a reset)
        q_dot_n = common.row_vector(jnp.zeros((ROWS,), jnp.float32))
        for e in range(state_steps):
            depth = pl.ds(e * ROWS, ROWS)
            n_e = plgpu.load(n_smem.at[depth], layout=plgpu.Layout.WGMMA.reduce(0))  # (64,) float32
            for p in range(parts):
                q_e = plgpu.load(q_tile(p).at[:, depth], layout=plgpu.Layout.WGMMA).astype(jnp.float32)  # (64, 64)
                q_dot_n = q_dot_n + jnp.sum(q_e * common.by_columns(n_e, q_e.shape), axis=1)
        q_cols = lambda e: lambda p: q_tile(p).at[:, pl.ds(e * ROWS, ROWS)]  # (64, 64): columns e of Q
        c_rows = lambda e: lambda p: v_smem.at[e % stages, p]  # (64, bDHHV): rows e of C_{k-1}
        acc = common.state_products(q_cols, c_rows, state_steps, block_v, parts, interpret, v_bar, v_free_bar, stages)
        common.await_gate_rows(g_bar, len(_GATE_ROWS))
        gate_row, gate_col = common.gate_readers(g_smem, r_smem)
        vec_b, vec_m = gate_row(_B, row0), gate_row(_M, row0)  # (64,)
        vec_r = gate_row(common.RESETS, row0)  # (64,) int32: last reset in the chunk, −1 if none
        vec_inter = qk_scale * common.start_state_decay(vec_b, vec_r, m_prev, vec_m)  # (64,)
        acc = acc * common.by_rows(vec_inter, acc.shape)
        den = q_dot_n * vec_inter

        plgpu.barrier_wait(k_bar.at[0])

        def key_step(j, carry):
            acc, den = carry
            k_slot, v_slot = j % stages, (state_steps + j) % stages
            k_t = lambda p: k_smem.at[k_slot, p].transpose((1, 0))  # (DHQK_p, 64)
            scores = common.mma(common.zeros(ROWS), q_tile, k_t, parts, interpret)  # (64, DHQK_p) @ (DHQK_p, 64)
            plgpu.barrier_arrive(k_free_bar.at[k_slot])
            vec_b_kv, vec_i_kv = gate_col(_B, j * ROWS), gate_col(_I, j * ROWS)  # (64,)
            shape = scores.shape
            log_decay = (
                common.by_rows(vec_b, shape) - common.by_columns(vec_b_kv, shape) + common.by_columns(vec_i_kv, shape)
            ) - common.by_rows(vec_m, shape)
            q_pos = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
            kv_pos = j * ROWS + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            valid = (kv_pos <= q_pos) & (kv_pos >= common.by_rows(vec_r, shape))
            weights = scores * qk_scale * jnp.exp(jnp.where(valid, log_decay, -jnp.inf))  # (64, 64) float32
            plgpu.barrier_wait(v_bar.at[v_slot])
            w_parts = common.split_parts(weights, parts, v_smem.dtype)
            v_tile = lambda p: v_smem.at[v_slot, p]  # (64, bDHHV)

            def next_key():  # awaited while this step's product runs
                pl.when(j + 1 < own_steps)(lambda: plgpu.barrier_wait(k_bar.at[(j + 1) % stages]))

            acc = common.mma(acc, w_parts.__getitem__, v_tile, parts, interpret, next_key)  # (64, 64) @ (64, bDHHV)
            plgpu.barrier_arrive(v_free_bar.at[v_slot])
            return acc, (den + jnp.sum(weights, axis=1)) if normalize else den

        acc, den = lax.fori_loop(0, own_steps, key_step, (acc, den))

        @pl.loop(own_steps, key_steps)
        def _skip(j):  # key tiles past this warpgroup's diagonal, loaded for the next one: awaited and released
            plgpu.barrier_wait(k_bar.at[j % stages])
            plgpu.barrier_arrive(k_free_bar.at[j % stages])
            plgpu.barrier_wait(v_bar.at[(state_steps + j) % stages])
            plgpu.barrier_arrive(v_free_bar.at[(state_steps + j) % stages])

        if normalize:
            den = jnp.maximum(jnp.abs(den), jnp.exp(-vec_m))
            h = acc / common.by_rows(den + eps, acc.shape)
        else:  # h = q̄ C: e^{−m} only undoes the states' scale
            den = jnp.exp(-vec_m)
            h = acc / common.by_rows(den, acc.shape)
        rows = pl.ds(c * chunk + row0, ROWS)
        out_cols = o_smem.shape[-1]
        for t in range(block_v // out_cols):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile has left o_smem
            o_smem[wg] = h[:, t * out_cols : (t + 1) * out_cols].astype(o_smem.dtype)  # (64, E)
            plgpu.commit_smem()  # then (64, E) to the H rows' columns iv·block_v + t·E on
            plgpu.copy_smem_to_gmem(o_smem.at[wg], h_gmem.at[bh, rows, pl.ds(iv * block_v + t * out_cols, out_cols)])

        @pl.when(iv == 0)
        def _den():
            den_smem[wg] = den  # (64,)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(den_smem.at[wg], den_gmem.at[bh, rows])  # (64,)

        plgpu.wait_smem_to_gmem(0)


def _kernel_gates(call: KernelCall, vecI, vecF, scaM_all, dims: common.LaunchDims):
    """The gate arrays of the kernel (`common.GateArrays`: the rows _GATE_ROWS, the last resets, the states' m) and
    vecM_out (B, NH, S)."""
    chunk = call.chunk_size
    vecB, vecR = compute_chunkwise_reset_gates(vecF, chunk, common.RESETS_DTYPE)  # (B, NH, NC, L)
    vecM_out = compute_chunkwise_vecM(vecB, vecR, vecI, scaM_all, input_gate=call.input_gate)
    rows = tuple(common.chunk_rows(x, dims) for x in (vecB, vecM_out, log_input_gate(vecI, call.input_gate)))
    m_states = scaM_all.reshape(dims.bnh, dims.num_chunks + 1).astype(jnp.float32)
    return common.GateArrays(rows, common.reset_rows(vecR, dims), m_states), vecM_out


def parallel_fw_Hintra(call: KernelCall, matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all):
    """The launcher of `mlstm_chunkwise__parallel_fw_Hintra` in Mosaic GPU (same arrays and outputs as the Triton
    launcher): (matH_out (B,NH,S,DHHV), vecN_out (B,NH,S), vecM_out (B,NH,S)). Trusts `call` (chunk_size,
    qk_scale, eps, output_dtype, input_gate, normalize, interpret); ValueError for what `unsupported` names."""
    chunk = call.chunk_size
    problem = unsupported(chunk, matQ.shape[-1], matQ.dtype)
    dims = common.launch_dims(problem, matQ.shape, matV.shape[-1], chunk)
    batch, heads, seq_len, dhqk, dhhv, num_chunks, bnh, dhqk_p, dhhv_p = dims
    operand_dtype = common.operand_dtype(matQ.dtype)
    parts, tiles = kernel_tiles(chunk, dhqk_p, dhhv_p, common.operand_parts(matQ.dtype))
    out_dtype = jnp.dtype(call.output_dtype)

    gates, vecM_out = _kernel_gates(call, vecI, vecF, scaM_all, dims)
    operand_of = lambda x, size: common.sequence_operand(x, size, parts, operand_dtype)  # (P, BNH·S, size)
    q, k, v = operand_of(matQ, dhqk_p), operand_of(matK, dhqk_p), operand_of(matV, dhhv_p)
    c_all = common.split_operand(common.states_rows(matC_all, dims), parts, operand_dtype)  # (P, rows, DHHV_p)
    n_all = triton_common.states_to_kernel_layout(vecN_all, dhqk, (dhqk_p,)).astype(jnp.float32)  # (BNH, NC+1, DHQK_p)

    operand = lambda shape: plgpu.SMEM(shape, operand_dtype, transforms=common.swizzled(operand_dtype))
    out_cols = 128 // out_dtype.itemsize
    w, stages = tiles.warpgroups, tiles.stages
    kernel = common.chunk_kernel(_kernel, call, dhqk, chunk, num_chunks, tiles=tiles, normalize=bool(call.normalize))
    h, den = common.launch(
        kernel,
        name=NAME,
        compute_warpgroups=w,
        parts=parts,
        interpret=call.interpret,
        out_type=(
            jax.ShapeDtypeStruct((bnh, seq_len, dhhv_p), out_dtype),
            jax.ShapeDtypeStruct((bnh, seq_len), jnp.float32),
        ),
        scratch_types=(
            operand((w, parts, ROWS, dhqk_p)),  # Q
            operand((stages, parts, ROWS, dhqk_p)),  # K
            operand((stages, parts, ROWS, tiles.block_v)),  # V or C_{k-1}
            plgpu.SMEM((len(_GATE_ROWS), chunk), jnp.float32),  # gate rows
            plgpu.SMEM((chunk,), common.RESETS_DTYPE),  # last resets
            plgpu.SMEM((dhqk_p,), jnp.float32),  # n_{k-1}
            plgpu.SMEM((w, ROWS, out_cols), out_dtype, transforms=common.swizzled(out_dtype)),  # h staging
            plgpu.SMEM((w, ROWS), jnp.float32),  # den staging
            plgpu.Barrier(num_barriers=w),  # Q loaded
            plgpu.Barrier(num_barriers=len(_GATE_ROWS) + 1),  # gate rows, last resets loaded
            plgpu.Barrier(num_barriers=1),  # n loaded
            plgpu.Barrier(num_barriers=stages),  # K loaded
            plgpu.Barrier(num_barriers=stages),  # V / C loaded
            plgpu.Barrier(num_arrivals=w, num_barriers=stages),  # K buffers free again
            plgpu.Barrier(num_arrivals=w, num_barriers=stages),  # V buffers free again
        ),
        grid=(bnh, num_chunks, (chunk // (w * ROWS)) * (dhhv_p // tiles.block_v)),
        grid_names=("bh", "c", "qv"),
    )(q, k, v, c_all, n_all, gates)
    matH_out = h[:, :, :dhhv].reshape(batch, heads, seq_len, dhhv)
    return matH_out, den.reshape(batch, heads, seq_len), vecM_out
