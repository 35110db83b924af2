"""Token-by-token decoding: `mlstm_recurrent_step`, one step of the cell from the states a prefill returned."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.plan import make_cell, validate_max_state
from pallas_mlstm.registry import get_backend, registered
from pallas_mlstm.validation import validate_step_gate, validate_step_inputs


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _differentiable_step(kernel, call: KernelCall, *arrays):
    """`kernel(call, *arrays)` (a backend's step launcher) with the derivatives of the jnp step (the xla
    backend's): differentiable in forward and reverse mode on every backend. It also lets flax's nn.scan over a
    layer stack take the step (a bare Pallas call there fails nn.scan's check of broadcast variables)."""
    return kernel(call, *arrays)


@_differentiable_step.defjvp
def _step_jvp(kernel, call, primals, tangents):
    _, tangents_out = jax.jvp(functools.partial(registered("xla").kernels.recurrent_step, call), primals, tangents)
    return kernel(call, *primals), tangents_out


def mlstm_recurrent_step(
    q,
    k,
    v,
    i,
    f,
    c,
    n,
    m=None,
    *,
    eps: float = 1e-6,
    backend: str | None = None,
    input_gate: str = "exponential",
    normalize: bool = True,
):
    """One token of the mLSTM cell: (h, (c, n, m)), the state after it; (h, (c, n)) with input_gate="sigmoid".

    q, k (B, NH, DHQK), v (B, NH, DHHV); gates i, f and the max state m as (B, NH) or (B, NH, 1) (m comes back
    in the shape it was given); c (B, NH, DHQK, DHHV), n (B, NH, DHQK) float32 whatever q's dtype; h comes back
    in q's dtype. The states are those `mlstm_chunkwise(..., return_last_states=True)` returns, so a prefill
    followed by steps equals one call over the whole sequence. backend: "triton" / "interpret" (and "mosaic" /
    "mosaic_interpret", whose step is Triton's) run the Pallas step kernel, "xla" the same math in jnp; None:
    triton on a GPU, xla otherwise. `input_gate` and `normalize` pick the cell as in `mlstm_chunkwise`: the
    sigmoid gate's states are (c, n), and m must not be given.
    Differentiable on every backend (jax.grad, jax.jvp; derivatives from the jnp step), and usable inside
    jax.lax.scan / flax nn.scan over a stack of layers.
    """
    cell = make_cell(input_gate, normalize, eps)
    validate_max_state(cell, m, "m", required=True)
    chosen = get_backend(backend)
    batch, heads, _, _ = validate_step_inputs(q, k, v, c, n)
    if m is None:  # the sigmoid gate: its kernels keep m at 0
        m = jnp.zeros((batch, heads), jnp.float32)
    m_shape = tuple(getattr(m, "shape", ()))
    i, f, m = (validate_step_gate(name, x, batch, heads) for name, x in (("i", i), ("f", f), ("m", m)))
    states = tuple(x.astype(jnp.float32) for x in (c, n, m))
    call = KernelCall(
        chunk_size=1, eps=cell.eps, input_gate=cell.input_gate, normalize=cell.normalize, interpret=chosen.interpret
    )  # one step: a chunk of 1
    h, (c, n, m) = _differentiable_step(chosen.kernels.recurrent_step, call, q, k, v, i, f, *states)
    if not cell.tracks_max_state:
        return h, (c, n)
    return h, (c, n, m.reshape(m_shape))
