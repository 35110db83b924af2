"""Token-by-token decoding: `mlstm_recurrent_step`, one step of the cell from the states a prefill returned."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.plan import make_cell
from pallas_mlstm.registry import get_backend, registered
from pallas_mlstm.validation import validate_operand_dtypes


def _gate(name: str, x, batch: int, heads: int):
    """A gate or m state given as (B, NH) or upstream's (B, NH, 1), as (B, NH)."""
    shape = tuple(getattr(x, "shape", ()))
    if shape not in ((batch, heads), (batch, heads, 1)):
        raise ValueError(f"{name} must have shape (B, NH) = {(batch, heads)} or (B, NH, 1); got {shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}.")
    return x.reshape(batch, heads)


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
    if cell.tracks_max_state and m is None:
        raise ValueError(
            "m (the max state, (B, NH) or (B, NH, 1)) is required with the exponential input gate: "
            "pass the m that mlstm_chunkwise(..., return_last_states=True) or the previous step returned."
        )
    if not cell.tracks_max_state and m is not None:
        raise ValueError("m is not a state of the sigmoid input gate: its states are (c, n); drop m.")
    chosen = get_backend(backend)
    shape = lambda x: tuple(getattr(x, "shape", ()))
    if len(shape(q)) != 3:
        raise ValueError(f"q must have shape (B, NH, DHQK) for one token; got {shape(q)}.")
    batch, heads, dhqk = shape(q)
    if shape(k) != shape(q):
        raise ValueError(f"k must have the shape of q, {shape(q)}; got {shape(k)}.")
    if len(shape(v)) != 3 or shape(v)[:2] != (batch, heads):
        raise ValueError(f"v must have shape (B, NH, DHHV) = ({batch}, {heads}, DHHV); got {shape(v)}.")
    dhhv = shape(v)[2]
    for name, x, expected in (("c", c, (batch, heads, dhqk, dhhv)), ("n", n, (batch, heads, dhqk))):
        if shape(x) != expected:
            raise ValueError(
                f"{name} must have shape {expected} (from q and v); got {shape(x)}: pass the states "
                "mlstm_chunkwise(..., return_last_states=True) or the previous step returned."
            )
    for name, x in (("q", q), ("k", k), ("v", v), ("c", c), ("n", n)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}.")
    validate_operand_dtypes(q, k, v)
    if m is None:  # the sigmoid gate: its kernels keep m at 0
        m = jnp.zeros((batch, heads), jnp.float32)
    m_shape = shape(m)
    i, f, m = (_gate(name, x, batch, heads) for name, x in (("i", i), ("f", f), ("m", m)))
    states = tuple(x.astype(jnp.float32) for x in (c, n, m))
    call = KernelCall(
        chunk_size=1, eps=cell.eps, input_gate=cell.input_gate, normalize=cell.normalize, interpret=chosen.interpret
    )  # one step: a chunk of 1
    h, (c, n, m) = _differentiable_step(chosen.kernels.recurrent_step, call, q, k, v, i, f, *states)
    if not cell.tracks_max_state:
        return h, (c, n)
    return h, (c, n, m.reshape(m_shape))
