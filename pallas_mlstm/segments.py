"""Long sequences in segments: the chunkwise forward and backward over pieces of the sequence in turn.

Each segment starts from the last states of the one before, and its backward passes the state gradients to
the one before, so that the chunk states of a long sequence (and their gradients) exist for one segment at a
time. `pallas_mlstm.op` runs these for a plan's `segment_len`; `pallas_mlstm.plan.default_segment_len` is the
policy.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_mlstm.chunkwise import ForwardOutputs, Inputs, backward, chunk_states, forward, last_states
from pallas_mlstm.plan import Plan, largest_segment_len
from pallas_mlstm.states import States, acc_dtype


def segment_len_of(plan: Plan, seq_len: int) -> int | None:
    """The segment length a pass over seq_len steps runs with: None (one pass) when the plan's segment_len is
    None or >= seq_len; else the plan's where it divides seq_len (the plan checks that it divides S), or, for a
    sequence shard it does not divide, the largest multiple of the chunk size that divides seq_len and is at
    most the plan's."""
    segment_len = plan.chunking.segment_len
    if segment_len is None or segment_len >= seq_len:
        return None
    return largest_segment_len(seq_len, plan.chunking.chunk_size, segment_len)


def _segment(x, index, segment_len: int):
    """Steps [index·segment_len, (index+1)·segment_len) of x (B, NH, S, ...)."""
    return lax.dynamic_slice_in_dim(x, index * segment_len, segment_len, axis=2)


def _put_segment(buffer, x, index, segment_len: int):
    """buffer (B, NH, S, ...) with x, cast to its dtype, in steps [index·segment_len, (index+1)·segment_len)."""
    return lax.dynamic_update_slice_in_dim(buffer, x.astype(buffer.dtype), index * segment_len, axis=2)


def _zero_states(inputs: Inputs, lead: tuple[int, ...] = ()) -> States:
    batch, heads, _, dhqk = inputs.q.shape
    return States.zeros(batch, heads, dhqk, inputs.v.shape[-1], acc_dtype(inputs.q.dtype), lead)


def _put_start(starts: States, states: States, index) -> States:
    return States(*(lax.dynamic_update_index_in_dim(buffer, x, index, axis=2) for buffer, x in zip(starts, states)))


def segmented_forward(plan: Plan, segment_len: int, inputs: Inputs, initial: States):
    """The chunkwise forward over the segments of segment_len steps in turn, each from the last states of the one
    before: (h, n_out, m_out, the last states, (C, n, m) at each segment's start, (B, NH, NSEG, ...))."""
    batch, heads, seq_len, _ = inputs.q.shape
    states = initial.or_zeros(_zero_states(inputs))
    dtype = states.c.dtype
    outputs = (
        jnp.zeros((batch, heads, seq_len, inputs.v.shape[-1]), inputs.q.dtype),  # h
        jnp.zeros((batch, heads, seq_len), dtype),
        jnp.zeros((batch, heads, seq_len), dtype),
    )  # n_out, m_out

    def step(index, carry):
        states, starts, outputs = carry
        segment = Inputs(*(_segment(x, index, segment_len) for x in inputs))
        h, saved, last = forward(plan, segment, states, inputs.q.dtype)
        outputs = tuple(
            _put_segment(buffer, x, index, segment_len) for buffer, x in zip(outputs, (h, saved.n_out, saved.m_out))
        )
        return States(*(x.astype(dtype) for x in last)), _put_start(starts, states, index), outputs

    num_segments = seq_len // segment_len
    carry = (states, _zero_states(inputs, (num_segments,)), outputs)
    last, starts, (h, n_out, m_out) = lax.fori_loop(0, num_segments, step, carry)
    return h, n_out, m_out, last, starts


def segment_starts(plan: Plan, segment_len: int, inputs: Inputs, states: States) -> States:
    """(C, n, m) at each segment's start as `segmented_forward` keeps them, recomputed from the first segment's
    `states` by the recurrent kernel alone: for the backward of a sequence shard, whose forward does not pass
    them on (pallas_mlstm.sharding)."""
    num_segments = inputs.k.shape[2] // segment_len

    def step(index, carry):
        states, starts = carry
        segment = Inputs(*(_segment(x, index, segment_len) for x in inputs))
        boundaries, c_last = chunk_states(plan, segment, states)
        last = last_states(boundaries, c_last)
        return States(*(x.astype(s.dtype) for x, s in zip(last, states))), _put_start(starts, states, index)

    return lax.fori_loop(0, num_segments, step, (states, _zero_states(inputs, (num_segments,))))[1]


def segmented_backward(plan: Plan, segment_len: int, residuals, dh, d_last: States, last_frame=None):
    """The gradients of the inputs and initial states over the segments of `segmented_forward`, last to first.

    Each segment's backward runs from its initial states (recomputing its chunk states) and takes the
    cotangents dC, dN of its last states from the segment after it (the last segment: the caller's, or
    zeros); its dC_initial, dN_initial go to the segment before it. This is exactly the one-pass backward:
    that chains dC (and dN) across every chunk boundary by the same recurrence, and what a segment does with
    dC_last, dN_last (dK, dV, dĩ and the terms <dC_last, C_last> + <dN_last, n_last> of df̃) is what one pass
    does at that boundary. The cotangent of m, dm_initial = <dC0, C0> + <dn0, n0>, is dropped between segments,
    as one pass never forms one within the sequence (and as the op drops the last state's): m only splits the
    true state C·e^m, n·e^m, which is all a segment depends on, into mantissa and scale, and the backward holds
    it constant. Only the first segment's is a gradient: m_initial's. `last_frame`: the m that d_last is
    stabilised by (None: the last state's); a segment's d_initial is in the m of its start, which is the last
    state's of the segment before.
    """
    inputs, initial, starts, n_out, m_out = residuals
    states = initial.or_zeros(_zero_states(inputs))
    num_segments = inputs.q.shape[2] // segment_len
    starts = segment_starts(plan, segment_len, inputs, states) if starts is None else States(*starts)

    def step(count, carry):
        (dc, dn, _), frame, grads = carry  # frame: the m of dc and dn (last_frame, then each segment's start m)
        index = num_segments - 1 - count
        segment = lambda x: _segment(x, index, segment_len)
        start = States(*(lax.dynamic_index_in_dim(x, index, axis=2, keepdims=False) for x in starts))
        saved = ForwardOutputs(None, segment(n_out), segment(m_out))
        d_inputs, d_start = backward(
            plan,
            Inputs(*map(segment, inputs)),
            start,
            saved,
            segment(dh),
            States(dc, None if d_last.n is None else dn),
            None if last_frame is None else frame,
        )
        grads = tuple(_put_segment(buffer, g, index, segment_len) for buffer, g in zip(grads, d_inputs))
        return States(*(d.astype(x.dtype) for d, x in zip(d_start, states))), start.m, grads

    d_end = States(
        *(jnp.zeros_like(x) if d is None else d.astype(x.dtype) for x, d in zip(states, (d_last.c, d_last.n, None)))
    )  # dC, dN, dm of the last states
    frame = states.m if last_frame is None else last_frame.astype(states.m.dtype)  # read only with last_frame
    grads = tuple(jnp.zeros(x.shape, x.dtype) for x in inputs)
    d_initial, _, grads = lax.fori_loop(0, num_segments, step, (d_end, frame, grads))
    return Inputs(*grads), d_initial
