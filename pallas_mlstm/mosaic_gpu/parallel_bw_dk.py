"""The backward's dK kernel in Pallas Mosaic GPU (Hopper): the gradient of every chunk's keys.

Same arrays, outputs and math as pallas_mlstm.pallas_triton.parallel_bw_dK (its jnp twin: xla_kernels.parallel_bw_dK):

    dK = (V dC_kᵀ) ⊙ e^{a − m_k} + Σ_{query tiles at or below the diagonal} (V dHᵀ ⊙ e^{D̃ − m}ᵀ · s / (den + eps)) Q

and the row dots Σ_d k·dK of the unrounded gradient. The scores contract over DHHV (512 at the 7B widths), too wide
for the H and dV kernels' pipeline of whole 64-row tiles, so this one streams DHHV in slices: one program per
(batch·head, chunk, key tile), one compute warpgroup of 64 key rows (its V rows loaded once, slice by slice), and a
memory warpgroup that streams with TMA into one ring the (64, bS) slices of first dC_k (64 DHQK rows at a time) and
then each query tile's dH, and into the other the query tiles Q (64, DHQK). The compute warpgroup takes the
inter-chunk term one 64-column block of dK per dC_k row block, then for each query tile from its own diagonal to
the chunk's end sums the scores V dHᵀ over the slices, gates them as the dV kernel does, and adds (gated scores) Q.
Per program, in shared memory:

    V        (S, P, 64, bS)            the program's value rows, S = DHHV / bS slices, loaded once
    slices   (stages, P, 64, bS)       a 64-row slice of dC_k, or a query tile's dH slice
    Q        (stages, P, 64, DHQK)     a query tile per step
    gates    (6, L) float32            the chunk's gate rows (parallel_bw.GATE_ROWS), loaded once
    out      (64, E), (64,) float32    the staging of dK (E = 128 bytes of output dtype) and of the row dots
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common, parallel_bw
from pallas_mlstm.mosaic_gpu.common import ROWS
from pallas_mlstm.pallas_triton import common as triton_common

NAME = "mlstm_chunkwise__parallel_bw_dK"
_B, _M, _R, _I, _INTER, _DH_SCALE = range(len(parallel_bw.GATE_ROWS))


def _slice_width(dhhv: int) -> int:
    """The DHHV slice of the score contraction: 128 where it divides DHHV, else 64."""
    return 128 if dhhv % 128 == 0 else ROWS


def shared_bytes(stages: int, chunk: int, dhqk: int, dhhv: int, parts: int, out_itemsize: int) -> int:
    """Shared memory of one program: V's rows, the two rings, the gate rows and the staging."""
    del out_itemsize  # the dK staging is 128 bytes a row whatever the dtype
    owned = parts * ROWS * dhhv * 2
    rings = stages * parts * ROWS * (_slice_width(dhhv) + dhqk) * 2
    small = len(parallel_bw.GATE_ROWS) * chunk * 4 + ROWS * (128 + 4)
    return owned + rings + small + common.RESERVED_BYTES


def kernel_tiles(chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...]) -> tuple[int, int]:
    """(operand parts, stages) for padded head dims: the first of `parts` (float32's precision first, as
    `common.kernel_tiles`) and the most buffers (4 down to 1) that fit in shared memory; ValueError if none does."""
    for count in parts:
        for stages in range(4, 0, -1):
            if shared_bytes(stages, chunk, dhqk, dhhv, count, 2) <= common.SHARED_MEMORY_BYTES:
                return count, stages
    raise ValueError(f"no Mosaic GPU tiling of {NAME} fits in shared memory for DHQK={dhqk}, DHHV={dhhv}.")


def unsupported(chunk: int, dhqk: int, dhhv: int, dtype) -> str | None:
    """What this kernel does not run (`common.unsupported`'s shapes, and shapes whose rows do not fit in shared
    memory: float32 inputs at the 7B widths), or None."""
    problem = common.unsupported(NAME, chunk, dhqk, dtype)
    if problem is not None:
        return problem
    try:
        kernel_tiles(chunk, common.padded_dim(dhqk), common.padded_dim(dhhv), common.operand_parts(dtype))
    except ValueError as error:
        return str(error)
    return None


def supports(chunk: int, dhqk: int, dhhv: int, dtype) -> bool:
    """True for the shapes this kernel runs."""
    return unsupported(chunk, dhqk, dhhv, dtype) is None


def _kernel(
    v_gmem,  # (P, BNH·S, DHHV_p)
    dh_gmem,  # (P, BNH·S, DHHV_p)
    q_gmem,  # (P, BNH·S, DHQK_p)
    dc_gmem,  # (P, BNH·(NC+1)·DHQK_p, DHHV_p): dC_k of head bh at rows (bh·(NC+1) + k)·DHQK_p
    g_gmem,  # (BNH, NC, 6, L) float32
    k_gmem,  # (BNH·S, DHQK_p) the keys as given, for the row dots
    dk_gmem,  # (BNH·S, DHQK_p) out
    dots_gmem,  # (BNH, S) float32 out
    v_smem,
    sl_smem,
    q_smem,
    g_smem,
    o_smem,
    dots_smem,
    v_bar,
    g_bar,
    sl_bar,
    q_bar,
    sl_free_bar,
    q_free_bar,
    *,
    stages: int,
    chunk: int,
    num_chunks: int,
    interpret: bool,
):
    num_slices, parts, _, width = v_smem.shape
    dhqk = q_smem.shape[-1]
    state_steps = (dhqk // ROWS) * num_slices  # dC_k's slices: (64-row block, DHHV slice) pairs, first in the ring
    bh, c, kt = lax.axis_index("bh"), lax.axis_index("c"), lax.axis_index("kt")
    seq_row0 = (bh * num_chunks + c) * chunk  # row of the chunk's first step
    row0 = kt * ROWS  # in-chunk position of the program's key rows
    q_steps = chunk // ROWS - kt  # query tiles from the diagonal to the chunk's end
    slice_steps = state_steps + q_steps * num_slices
    wg = lax.axis_index("wg")

    @pl.when(wg == 1)
    def _memory():
        plgpu.set_max_registers(common.MEMORY_REGISTERS, action="decrease")
        plgpu.copy_gmem_to_smem(g_gmem.at[bh, c], g_smem, g_bar.at[0])  # (6, L)
        for u in range(num_slices):
            rows, cols = pl.ds(seq_row0 + row0, ROWS), pl.ds(u * width, width)
            plgpu.copy_gmem_to_smem(v_gmem.at[:, rows, cols], v_smem.at[u], v_bar.at[u])  # (P, 64, bS)

        def load_slice(s):  # ring step s: slice of dC_k (state steps), then of the query tiles' dH
            slot = s % stages

            @pl.when(s < state_steps)
            def _state():
                block, u = s // num_slices, s % num_slices
                rows = pl.ds((bh * (num_chunks + 1) + c + 1) * dhqk + block * ROWS, ROWS)
                tile = dc_gmem.at[:, rows, pl.ds(u * width, width)]  # (P, 64, bS)
                plgpu.copy_gmem_to_smem(tile, sl_smem.at[slot], sl_bar.at[slot])

            @pl.when(s >= state_steps)
            def _dh():
                j, u = (s - state_steps) // num_slices, (s - state_steps) % num_slices
                rows = pl.ds(seq_row0 + row0 + j * ROWS, ROWS)
                tile = dh_gmem.at[:, rows, pl.ds(u * width, width)]  # (P, 64, bS)
                plgpu.copy_gmem_to_smem(tile, sl_smem.at[slot], sl_bar.at[slot])

        def load_q(j):  # query tile kt + j
            rows = pl.ds(seq_row0 + row0 + j * ROWS, ROWS)
            plgpu.copy_gmem_to_smem(q_gmem.at[:, rows], q_smem.at[j % stages], q_bar.at[j % stages])  # (P, 64, DHQK)

        def refill_slice(s):  # once step s's slot is free again, load step s + stages into it
            @pl.when(s + stages < slice_steps)
            def _():
                plgpu.barrier_wait(sl_free_bar.at[s % stages])
                load_slice(s + stages)

        for s in range(stages):
            pl.when(s < slice_steps)(functools.partial(load_slice, s))
            pl.when(s < q_steps)(functools.partial(load_q, s))
        for s in range(state_steps):  # the consumer's order: dC_k's slices, then per query tile its dH slices and Q
            refill_slice(s)

        @pl.loop(0, q_steps)
        def _query(j):
            for u in range(num_slices):
                refill_slice(state_steps + j * num_slices + u)

            @pl.when(j + stages < q_steps)
            def _():
                plgpu.barrier_wait(q_free_bar.at[j % stages])
                load_q(j + stages)

        @pl.loop(jnp.maximum(slice_steps - stages, 0), slice_steps)
        def _drain_slices(s):
            plgpu.barrier_wait(sl_free_bar.at[s % stages])

        @pl.loop(jnp.maximum(q_steps - stages, 0), q_steps)
        def _drain_q(j):
            plgpu.barrier_wait(q_free_bar.at[j % stages])

    @pl.when(wg == 0)
    def _compute():
        plgpu.set_max_registers(common.COMPUTE_REGISTERS, action="increase")
        plgpu.barrier_wait(g_bar.at[0])
        for u in range(num_slices):
            plgpu.barrier_wait(v_bar.at[u])
        gate_row = lambda g, start: plgpu.load(g_smem.at[g, pl.ds(start, ROWS)], layout=plgpu.Layout.WGMMA.reduce(1))
        gate_col = lambda g, start: plgpu.load(g_smem.at[g, pl.ds(start, ROWS)], layout=plgpu.Layout.WGMMA.reduce(0))
        vec_b_kv, vec_i_kv, vec_inter = gate_row(_B, row0), gate_row(_I, row0), gate_row(_INTER, row0)  # (64,)
        v_slice = lambda u: lambda p: v_smem.at[u, p]  # (64, bS): slice u of the program's V rows
        slice_t = lambda slot: lambda p: sl_smem.at[slot, p].transpose((1, 0))  # (bS, 64)

        # inter-chunk: V dC_kᵀ, one 64-column block of dK per 64-row block of dC_k, over its DHHV slices
        blocks = []
        for block in range(dhqk // ROWS):
            acc_block = common.zeros(ROWS)
            for u in range(num_slices):
                slot = (block * num_slices + u) % stages
                plgpu.barrier_wait(sl_bar.at[slot])
                acc_block = common.mma(acc_block, v_slice(u), slice_t(slot), parts, interpret)  # (64, bS) @ (bS, 64)
                plgpu.barrier_arrive(sl_free_bar.at[slot])
            blocks.append(acc_block)
        acc = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)  # (64, DHQK_p)
        acc = acc * common.by_rows(vec_inter, acc.shape)

        def query_step(j, acc):
            q_start = row0 + j * ROWS  # in-chunk position of the query tile
            scores = common.zeros(ROWS)  # (key rows, query columns): V dHᵀ over the DHHV slices
            for u in range(num_slices):
                slot = (state_steps + j * num_slices + u) % stages
                plgpu.barrier_wait(sl_bar.at[slot])
                scores = common.mma(scores, v_slice(u), slice_t(slot), parts, interpret)  # (64, bS) @ (bS, 64)
                plgpu.barrier_arrive(sl_free_bar.at[slot])
            vec_b_q, vec_m_q = gate_col(_B, q_start), gate_col(_M, q_start)  # (64,)
            vec_r_q = gate_col(_R, q_start).astype(jnp.int32)  # (64,): last reset in the chunk, −1 if none
            dh_scale = gate_col(_DH_SCALE, q_start)  # (64,): s / (den + eps)
            shape = scores.shape
            log_decay = (
                common.by_columns(vec_b_q, shape) - common.by_rows(vec_b_kv, shape) + common.by_rows(vec_i_kv, shape)
            ) - common.by_columns(vec_m_q, shape)
            kv_pos = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
            q_pos = q_start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            valid = (kv_pos <= q_pos) & (kv_pos >= common.by_columns(vec_r_q, shape))
            decay = jnp.exp(jnp.where(valid, log_decay, -jnp.inf))
            weights = scores * common.by_columns(dh_scale, shape) * decay  # (64, 64) float32
            w_parts = common.split_parts(weights, parts, q_smem.dtype)
            q_slot = j % stages
            plgpu.barrier_wait(q_bar.at[q_slot])
            acc = common.mma(acc, w_parts.__getitem__, lambda p: q_smem.at[q_slot, p], parts, interpret)  # @ (64, DHQK)
            plgpu.barrier_arrive(q_free_bar.at[q_slot])
            return acc

        acc = lax.fori_loop(0, q_steps, query_step, acc)

        rows = pl.ds(seq_row0 + row0, ROWS)
        keys = plgpu.load(k_gmem.at[rows], layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float32)
        dots_smem[...] = jnp.sum(keys * acc, axis=1)  # (64,): Σ_d k·dk before dk is rounded
        out_cols = o_smem.shape[-1]
        for t in range(dhqk // out_cols):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile has left o_smem
            o_smem[...] = acc[:, t * out_cols : (t + 1) * out_cols].astype(o_smem.dtype)  # (64, E)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, dk_gmem.at[rows, pl.ds(t * out_cols, out_cols)])
        plgpu.copy_smem_to_gmem(dots_smem, dots_gmem.at[bh, pl.ds(c * chunk + row0, ROWS)])
        plgpu.wait_smem_to_gmem(0)


def parallel_bw_dK(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """The launcher of `mlstm_chunkwise__parallel_bw_dK` in Mosaic GPU (same arrays and outputs as the Triton
    launcher): (dK (B, NH, S, DHQK) in call.output_dtype, Σ_d k·dK (B, NH, S) float32 of the unrounded dK).
    Trusts `call` (chunk_size, qk_scale, eps, output_dtype, input_gate, interpret); ValueError for what
    `unsupported` names."""
    batch, heads, seq_len, dhqk = matQ.shape
    dhhv = matV.shape[-1]
    chunk = call.chunk_size
    problem = unsupported(chunk, dhqk, dhhv, matQ.dtype)
    if problem is not None:
        raise ValueError(problem)
    num_chunks, bnh = seq_len // chunk, batch * heads
    dhqk_p, dhhv_p = common.padded_dim(dhqk), common.padded_dim(dhhv)
    operand_dtype = common.operand_dtype(matQ.dtype)
    parts, stages = kernel_tiles(chunk, dhqk_p, dhhv_p, common.operand_parts(matQ.dtype))
    width = _slice_width(dhhv_p)
    out_dtype = jnp.dtype(call.output_dtype)

    gates = parallel_bw.kernel_gates(call, vecI, chunk_gates, chunk_states[2], vecN_out, vecM_out, call.scale_for(dhqk))
    rows = lambda x, size: triton_common.pad_axis(x.reshape(bnh * seq_len, x.shape[-1]), 1, size)
    stacked = lambda x: common.split_operand(x, parts, operand_dtype)  # (P, ...)
    v, q = stacked(rows(matV, dhhv_p)), stacked(rows(matQ, dhqk_p))
    dh = stacked(rows(matDeltaH.astype(matQ.dtype), dhhv_p))
    dc_all = stacked(
        triton_common.states_to_kernel_layout(matDeltaC_states, dhqk, (dhqk_p, dhhv_p)).reshape(-1, dhhv_p)
    )

    operand = lambda shape: plgpu.SMEM(shape, operand_dtype, transforms=common.swizzled(operand_dtype))
    kernel = functools.partial(_kernel, stages=stages, chunk=chunk, num_chunks=num_chunks, interpret=call.interpret)
    dk, dots = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((bnh * seq_len, dhqk_p), out_dtype),
            jax.ShapeDtypeStruct((bnh, seq_len), jnp.float32),
        ),
        scratch_types=(
            operand((dhhv_p // width, parts, ROWS, width)),  # V rows, slice by slice
            operand((stages, parts, ROWS, width)),  # dC_k / dH slices
            operand((stages, parts, ROWS, dhqk_p)),  # Q
            plgpu.SMEM((len(parallel_bw.GATE_ROWS), chunk), jnp.float32),  # gates
            plgpu.SMEM((ROWS, 128 // out_dtype.itemsize), out_dtype, transforms=common.swizzled(out_dtype)),  # dK
            plgpu.SMEM((ROWS,), jnp.float32),  # row dots
            plgpu.Barrier(num_barriers=dhhv_p // width),  # V slices loaded
            plgpu.Barrier(num_barriers=1),  # gates loaded
            plgpu.Barrier(num_barriers=stages),  # slice loaded
            plgpu.Barrier(num_barriers=stages),  # Q loaded
            plgpu.Barrier(num_barriers=stages),  # slice buffers free again
            plgpu.Barrier(num_barriers=stages),  # Q buffers free again
        ),
        grid=(bnh, num_chunks, chunk // ROWS),
        grid_names=("bh", "c", "kt"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=parts == 1),  # float32 inputs: IEEE exp and division
        interpret=plgpu.InterpretGPUParams() if call.interpret else None,
        kernel_name=NAME,
    )(v, dh, q, dc_all, gates, rows(matK, dhqk_p))
    dk = dk[:, :dhqk].reshape(batch, heads, seq_len, dhqk)
    return dk, dots.reshape(batch, heads, seq_len)
