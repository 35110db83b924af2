"""The differentiable op: `run_chunkwise`, a custom VJP over the chunkwise forward and backward.

`run_chunkwise` is the op behind `pallas_mlstm.mlstm_chunkwise`; `chunkwise_forward` / `chunkwise_backward` are
its two halves, which the sharded op (pallas_mlstm.sharding) runs per shard; with `ChunkwiseStatic.segment_len`
both run over segments of the sequence in turn (pallas_mlstm.segments).
"""

from __future__ import annotations

import functools

import jax

from pallas_mlstm.chunkwise import ChunkwiseStatic, fw_bw_kwargs, mlstm_chunkwise_bw, mlstm_chunkwise_fw
from pallas_mlstm.segments import segment_len_of, segmented_backward, segmented_forward

HIGHER_ORDER_MESSAGE = (
    "pallas_mlstm.mlstm_chunkwise supports first-order reverse-mode differentiation (jax.grad, jax.vjp, "
    "jax.jacrev, jax.value_and_grad, under jit / vmap / checkpoint); {what} is not supported: its kernels "
    "define a custom VJP only. For a Hessian-vector product, use finite differences of jax.grad."
)


def first_order_only(function):
    """`function(static, *arrays)` made opaque to differentiation: taking a derivative of it, as a second
    derivative of the op does, raises a ValueError that says what is supported, instead of failing inside
    a kernel or a partitioning rule."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def guarded(static, *arrays):
        return function(static, *arrays)

    def refuse(static, residuals, cotangents):
        raise ValueError(HIGHER_ORDER_MESSAGE.format(what="a second derivative (grad of grad, jax.hessian)"))

    guarded.defvjp(lambda static, *arrays: (function(static, *arrays), None), refuse)
    return guarded


def chunkwise_forward(static: ChunkwiseStatic, q, k, v, i, f, c_initial, n_initial, m_initial):
    """The forward half: (h or (h, last states), residuals for `chunkwise_backward`). The saved states among the
    residuals are: with segments, (C, n, m) at each segment's start; else every chunk's states, or None (to be
    recomputed) with `recompute_states_in_bw`."""
    segment_len = segment_len_of(static, q.shape[2])
    if segment_len is not None:
        h, n_out, m_out, last_states, saved_states = segmented_forward(
            static, segment_len, q, k, v, i, f, c_initial, n_initial, m_initial)
    else:
        h, n_out, m_out, last_states, all_states = mlstm_chunkwise_fw(
            q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=static.return_last_states,
            return_all_states=True, output_dtype=q.dtype, **fw_bw_kwargs(static, q.dtype))
        saved_states = None if static.recompute_states_in_bw else all_states
    residuals = (q, k, v, i, f, c_initial, n_initial, m_initial, saved_states, n_out, m_out)
    return (h, last_states) if static.return_last_states else h, residuals


def _backward(static: ChunkwiseStatic, residuals, cotangents, last_frame=None):
    q, k, v, i, f, c_initial, n_initial, m_initial, saved_states, n_out, m_out = residuals
    dh, d_last = (cotangents if static.return_last_states else (cotangents, None))
    dc_last = dn_last = None
    if d_last is not None:
        dc_last, dn_last, _ = d_last  # m is held constant: its cotangent has no effect
    segment_len = segment_len_of(static, q.shape[2])
    if segment_len is not None:
        grads = segmented_backward(static, segment_len, residuals, dh, dc_last, dn_last, last_frame)
    else:
        c_all, n_all, m_all = (None, None, None) if saved_states is None else saved_states
        grads = mlstm_chunkwise_bw(
            q, k, v, i, f, c_initial, n_initial, m_initial, c_all, n_all, m_all, n_out, m_out, dh, dc_last,
            vecDeltaN_last=dn_last, scaM_last_frame=last_frame, **fw_bw_kwargs(static, q.dtype))
    cast = lambda g, x: None if x is None else g.astype(x.dtype)
    return tuple(cast(g, x) for g, x in zip(grads, (q, k, v, i, f, c_initial, n_initial, m_initial)))


_first_order_backward = first_order_only(_backward)


def chunkwise_backward(static: ChunkwiseStatic, residuals, cotangents, last_frame=None):
    """The backward half: the gradients of (q, k, v, i, f, c_initial, n_initial, m_initial). `last_frame` (B, NH):
    the m that the last states' cotangents are stabilised by (`mlstm_chunkwise_bw`'s scaM_last_frame)."""
    return _first_order_backward(static, residuals, cotangents, last_frame)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def run_chunkwise(static: ChunkwiseStatic, q, k, v, i, f, c_initial, n_initial, m_initial):
    """The differentiable chunkwise mLSTM for validated inputs; `static` picks the backend and launch."""
    return chunkwise_forward(static, q, k, v, i, f, c_initial, n_initial, m_initial)[0]


run_chunkwise.defvjp(first_order_only(chunkwise_forward), chunkwise_backward)
