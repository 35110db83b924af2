"""The differentiable op: `run_chunkwise`, a custom VJP over the chunkwise forward and backward.

`run_chunkwise` is the op behind `pallas_mlstm.mlstm_chunkwise`; `chunkwise_forward` / `chunkwise_backward` are
its two halves, which the sharded op (pallas_mlstm.sharding) runs per shard; with a plan's `segment_len` both
run over segments of the sequence in turn (pallas_mlstm.segments).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax

from pallas_mlstm.chunkwise import ChunkStates, ForwardOutputs, Inputs, backward, forward
from pallas_mlstm.plan import Plan
from pallas_mlstm.segments import segment_len_of, segmented_backward, segmented_forward
from pallas_mlstm.states import States

HIGHER_ORDER_MESSAGE = (
    "pallas_mlstm.mlstm_chunkwise supports first-order reverse-mode differentiation (jax.grad, jax.vjp, "
    "jax.jacrev, jax.value_and_grad, under jit / vmap / checkpoint); {what} is not supported: its kernels "
    "define a custom VJP only. For a Hessian-vector product, use finite differences of jax.grad."
)


class Residuals(NamedTuple):
    """What the forward half keeps for the backward half. `saved_states`: with segments, (C, n, m) at each
    segment's start, (B, NH, NSEG, ...); else every chunk's states (`ChunkStates`), or None (recompute them)."""

    inputs: Inputs
    initial: States
    saved_states: tuple | None
    n_out: jax.Array
    m_out: jax.Array


def first_order_only(function):
    """`function(plan, *arrays)` made opaque to differentiation: taking a derivative of it, as a second
    derivative of the op does, raises a ValueError that says what is supported, instead of failing inside
    a kernel or a partitioning rule."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def guarded(plan, *arrays):
        return function(plan, *arrays)

    def refuse(plan, residuals, cotangents):
        raise ValueError(HIGHER_ORDER_MESSAGE.format(what="a second derivative (grad of grad, jax.hessian)"))

    guarded.defvjp(lambda plan, *arrays: (function(plan, *arrays), None), refuse)
    return guarded


def chunkwise_forward(plan: Plan, inputs: Inputs, initial: States):
    """The forward half: (h or (h, last `States`), `Residuals`)."""
    segment_len = segment_len_of(plan, inputs.q.shape[2])
    if segment_len is not None:
        h, n_out, m_out, last, saved_states = segmented_forward(plan, segment_len, inputs, initial)
    else:
        h, saved, last = forward(plan, inputs, initial, inputs.q.dtype)
        n_out, m_out = saved.n_out, saved.m_out
        saved_states = None if plan.chunking.recompute_states_in_bw else saved.chunk_states
    residuals = Residuals(inputs, initial, saved_states, n_out, m_out)
    return (h, last) if plan.return_last_states else h, residuals


def _backward(plan: Plan, residuals: Residuals, cotangents, last_frame=None):
    dh, d_last = cotangents if plan.return_last_states else (cotangents, None)
    d_last = States(None, None) if d_last is None else States(d_last.c, d_last.n)  # m is held constant
    segment_len = segment_len_of(plan, residuals.inputs.q.shape[2])
    if segment_len is not None:
        d_inputs, d_initial = segmented_backward(plan, segment_len, residuals, dh, d_last, last_frame)
    else:
        states = None if residuals.saved_states is None else ChunkStates(*residuals.saved_states)
        saved = ForwardOutputs(states, residuals.n_out, residuals.m_out)
        d_inputs, d_initial = backward(plan, residuals.inputs, residuals.initial, saved, dh, d_last, last_frame)
    cast = lambda g, x: None if x is None else g.astype(x.dtype)
    return (Inputs(*map(cast, d_inputs, residuals.inputs)), States(*map(cast, d_initial, residuals.initial)))


_first_order_backward = first_order_only(_backward)


def chunkwise_backward(plan: Plan, residuals: Residuals, cotangents, last_frame=None) -> tuple[Inputs, States]:
    """The backward half: the gradients of the inputs and of the initial states (None where not given).
    `last_frame` (B, NH): the m that the last states' cotangents are stabilised by (None: the last state's)."""
    return _first_order_backward(plan, residuals, cotangents, last_frame)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def run_chunkwise(plan: Plan, inputs: Inputs, initial: States):
    """The differentiable chunkwise mLSTM for validated inputs under `plan`."""
    return chunkwise_forward(plan, inputs, initial)[0]


run_chunkwise.defvjp(first_order_only(chunkwise_forward), chunkwise_backward)
