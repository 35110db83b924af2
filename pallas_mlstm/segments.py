"""Long sequences in segments: the chunkwise forward and backward over pieces of the sequence in turn.

Each segment starts from the last states of the one before, and its backward passes the state gradients to
the one before, so that the chunk states of a long sequence (and their gradients) exist for one segment at a
time. `pallas_mlstm.op` runs these for `ChunkwiseStatic.segment_len`; `default_segment_len` is the policy.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_mlstm.backend import kernel_set
from pallas_mlstm.chunkwise import ChunkwiseStatic, fw_bw_kwargs, mlstm_chunkwise_bw, mlstm_chunkwise_fw
from pallas_mlstm.gates import acc_dtype_of

# A sequence of more than 2·SEGMENT_MAX_LEN steps runs in segments of at most SEGMENT_MAX_LEN steps
# (`default_segment_len`): the chunk-boundary states C and, in the backward, their gradients dC, (NC+1)·DHQK·DHHV
# per head, then exist for one segment at a time instead of for the whole sequence (for one pass at 16-bit inputs,
# chunk 128, DHQK 256 and DHHV 512, the C and dC buffers together are as large as q, k, v and dh). Segments do no
# extra matmuls (the backward recomputes the states either way), but each segment's inputs and outputs are copied
# out of and into the full-length arrays: forward + backward at (1, 8, 262144, 256, 512) took 54 ms in segments
# against 43 ms in one pass on an H200, for a peak of 1.93x the inputs' bytes instead of 2.35x. Segments shorter
# than SEGMENT_MIN_LEN would cost more launches than they save memory: then one pass.
SEGMENT_MAX_LEN = 32768
SEGMENT_MIN_LEN = 8192


def largest_segment_len(seq_len: int, chunk_size: int, max_len: int) -> int | None:
    """The largest multiple of chunk_size that divides seq_len and is at most max_len; None if there is none."""
    for segment_len in range(max_len - max_len % chunk_size, 0, -chunk_size):
        if seq_len % segment_len == 0:
            return segment_len
    return None


def default_segment_len(seq_len: int, chunk_size: int) -> int | None:
    """`mlstm_chunkwise`'s segment length when none is given: None (one pass) up to 2·SEGMENT_MAX_LEN steps, else
    the largest multiple of chunk_size that divides seq_len and is at most SEGMENT_MAX_LEN, unless that is below
    SEGMENT_MIN_LEN (then None)."""
    if seq_len <= 2 * SEGMENT_MAX_LEN:
        return None
    segment_len = largest_segment_len(seq_len, chunk_size, SEGMENT_MAX_LEN)
    return segment_len if segment_len is not None and segment_len >= SEGMENT_MIN_LEN else None


def segment_len_of(static: ChunkwiseStatic, seq_len: int) -> int | None:
    """The segment length a pass over seq_len steps runs with: None (one pass) when static.segment_len is None or
    >= seq_len; else static.segment_len where it divides seq_len (the API checks that it divides S), or, for a
    sequence shard it does not divide, the largest multiple of the chunk size that divides seq_len and is at most
    static.segment_len."""
    if static.segment_len is None or static.segment_len >= seq_len:
        return None
    return largest_segment_len(seq_len, static.chunk_size, static.segment_len)


def _segment(x, index, segment_len: int):
    """Steps [index·segment_len, (index+1)·segment_len) of x (B, NH, S, ...)."""
    return lax.dynamic_slice_in_dim(x, index * segment_len, segment_len, axis=2)


def _put_segment(buffer, x, index, segment_len: int):
    """buffer (B, NH, S, ...) with x, cast to its dtype, in steps [index·segment_len, (index+1)·segment_len)."""
    return lax.dynamic_update_slice_in_dim(buffer, x.astype(buffer.dtype), index * segment_len, axis=2)


def _states_or_zeros(q, v, c_initial, n_initial, m_initial):
    """The initial (C, n, m) in the states' dtype, zeros where not given: the kernels' own "no initial state"."""
    batch, heads, _, dhqk = q.shape
    shapes = ((batch, heads, dhqk, v.shape[-1]), (batch, heads, dhqk), (batch, heads))
    dtype = acc_dtype_of(q.dtype)
    return tuple(jnp.zeros(shape, dtype) if x is None else x.astype(dtype)
                 for x, shape in zip((c_initial, n_initial, m_initial), shapes))


def _no_starts(states, num_segments: int):
    """Buffers for (C, n, m) at each segment's start: (B, NH, NSEG, DHQK, DHHV), (B, NH, NSEG, DHQK), (B, NH, NSEG)."""
    return tuple(jnp.zeros((*x.shape[:2], num_segments, *x.shape[2:]), x.dtype) for x in states)


def _put_start(starts, states, index):
    return tuple(lax.dynamic_update_index_in_dim(buffer, x, index, axis=2) for buffer, x in zip(starts, states))


def segmented_forward(static: ChunkwiseStatic, segment_len: int, q, k, v, i, f, c_initial, n_initial, m_initial):
    """`mlstm_chunkwise_fw` over the segments of segment_len steps in turn, each from the last states of the one
    before: (h, vecN_out, vecM_out, the last states, (C, n, m) at each segment's start (`_no_starts`))."""
    batch, heads, seq_len, _ = q.shape
    states = _states_or_zeros(q, v, c_initial, n_initial, m_initial)
    dtype = states[0].dtype
    outputs = (jnp.zeros((batch, heads, seq_len, v.shape[-1]), q.dtype),  # h
               jnp.zeros((batch, heads, seq_len), dtype), jnp.zeros((batch, heads, seq_len), dtype))  # n_out, m_out
    kwargs = fw_bw_kwargs(static, q.dtype)

    def step(index, carry):
        states, starts, outputs = carry
        h, n_out, m_out, last_states, _ = mlstm_chunkwise_fw(
            *(_segment(x, index, segment_len) for x in (q, k, v, i, f)), *states, return_last_states=True,
            output_dtype=q.dtype, **kwargs)
        outputs = tuple(_put_segment(buffer, x, index, segment_len) for buffer, x in zip(outputs, (h, n_out, m_out)))
        return tuple(x.astype(dtype) for x in last_states), _put_start(starts, states, index), outputs

    carry = (states, _no_starts(states, seq_len // segment_len), outputs)
    last_states, starts, (h, n_out, m_out) = lax.fori_loop(0, seq_len // segment_len, step, carry)
    return h, n_out, m_out, last_states, starts


def segment_starts(static: ChunkwiseStatic, segment_len: int, k, v, i, f, states):
    """(C, n, m) at each segment's start as `segmented_forward` keeps them, recomputed from the first segment's
    `states` by the recurrent kernel alone: for the backward of a sequence shard, whose forward does not pass
    them on (pallas_mlstm.sharding)."""
    kernels = kernel_set(static.backend, static.allow_tf32)
    launch = dict(static.launch)
    dhqk, num_segments = k.shape[3], k.shape[2] // segment_len

    def step(index, carry):
        states, starts = carry
        c_all, n_all, m_all = kernels.recurrent_fw_C(
            *(_segment(x, index, segment_len) for x in (k, v, f, i)), *states, chunk_size=static.chunk_size,
            num_stages=launch.get("num_stages_inter"), num_warps=launch.get("num_warps_inter"),
            input_gate=static.input_gate)
        last_states = (c_all[:, :, -dhqk:, :], n_all[:, :, -dhqk:], m_all[:, :, -1])
        return tuple(x.astype(s.dtype) for x, s in zip(last_states, states)), _put_start(starts, states, index)

    return lax.fori_loop(0, num_segments, step, (states, _no_starts(states, num_segments)))[1]


def segmented_backward(static: ChunkwiseStatic, segment_len: int, residuals, dh, dc_last, dn_last, last_frame=None):
    """The gradients of (q, k, v, i, f, C, n, m initial) over the segments of `segmented_forward`, last to first.

    Each segment's `mlstm_chunkwise_bw` runs from its initial states (recomputing its chunk states) and takes
    the cotangents dC, dN of its last states from the segment after it (the last segment: the caller's, or
    zeros); its dC_initial, dN_initial go to the segment before it. This is exactly the one-pass backward:
    that chains dC (and dN) across every chunk boundary by the same recurrence, and what a segment does with
    dC_last, dN_last (dK, dV, dĩ and the terms <dC_last, C_last> + <dN_last, n_last> of df̃) is what one pass
    does at that boundary. The cotangent of m, dm_initial = <dC0, C0> + <dn0, n0>, is dropped between segments,
    as one pass never forms one within the sequence (and as the op drops the last state's): m only splits the
    true state C·e^m, n·e^m, which is all a segment depends on, into mantissa and scale, and the backward holds
    it constant. Only the first segment's is a gradient: m_initial's. `last_frame`: the m that dc_last, dn_last
    are stabilised by (None: the last state's); a segment's d_initial is in the m of its start, which is the
    last state's of the segment before.
    """
    q, k, v, i, f, c_initial, n_initial, m_initial, starts, n_out, m_out = residuals
    states = _states_or_zeros(q, v, c_initial, n_initial, m_initial)
    num_segments = q.shape[2] // segment_len
    if starts is None:
        starts = segment_starts(static, segment_len, k, v, i, f, states)
    kwargs = fw_bw_kwargs(static, q.dtype)

    def step(count, carry):
        (dc, dn, _), frame, grads = carry  # frame: the m of dc and dn (last_frame, then each segment's start m)
        index = num_segments - 1 - count
        segment = lambda x: _segment(x, index, segment_len)
        start = tuple(lax.dynamic_index_in_dim(x, index, axis=2, keepdims=False) for x in starts)
        dq, dk, dv, di, df, *d_start = mlstm_chunkwise_bw(
            *map(segment, (q, k, v, i, f)), *start, None, None, None, segment(n_out), segment(m_out), segment(dh),
            dc, vecDeltaN_last=None if dn_last is None else dn,
            scaM_last_frame=None if last_frame is None else frame, **kwargs)
        grads = tuple(_put_segment(buffer, g, index, segment_len) for buffer, g in zip(grads, (dq, dk, dv, di, df)))
        return tuple(d.astype(x.dtype) for d, x in zip(d_start, states)), start[2], grads

    d_last = tuple(jnp.zeros_like(x) if d is None else d.astype(x.dtype)
                   for x, d in zip(states, (dc_last, dn_last, None)))  # dC, dN, dm of the last states
    frame = states[2] if last_frame is None else last_frame.astype(states[2].dtype)  # read only with last_frame
    grads = tuple(jnp.zeros(x.shape, x.dtype) for x in (q, k, v, i, f))
    d_initial, _, grads = lax.fori_loop(0, num_segments, step, (d_last, frame, grads))
    return (*grads, *d_initial)
