"""The public entry point `mlstm_chunkwise`: input checks, the plan, and the sharded differentiable op."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_mlstm.chunkwise import Inputs
from pallas_mlstm.config import ChunkwiseConfig
from pallas_mlstm.inputs import pad_steps, reset_at_document_starts, sequence_shards
from pallas_mlstm.op import HIGHER_ORDER_MESSAGE
from pallas_mlstm.plan import (
    Plan,
    launches_for,
    make_cell,
    make_chunking,
    resolve_config,
    validate_bool,
    validate_max_state,
)
from pallas_mlstm.registry import get_backend, runs_tuned_kernels, with_kernel_backends
from pallas_mlstm.sharding import run_partitioned
from pallas_mlstm.states import States, acc_dtype, state_buffer_dtype
from pallas_mlstm.validation import (
    validate_autocast_dtype,
    validate_mlstm_inputs,
    validate_operand_dtypes,
    validate_segment_ids,
)


def _empty_outputs(plan: Plan, q, v, out_dtype):
    """The outputs of an empty batch or head axis (B·NH = 0): arrays of the right shapes and dtypes."""
    batch, heads, seq_len, dhqk = q.shape
    h = jnp.zeros((batch, heads, seq_len, v.shape[3]), out_dtype)
    if not plan.return_last_states:
        return h
    states = States.zeros(batch, heads, dhqk, v.shape[3], acc_dtype(q.dtype))
    return h, states.as_tuple(plan.cell.tracks_max_state)


def mlstm_chunkwise(
    q: jax.Array,  # (B, NH, S, DHQK)
    k: jax.Array,  # (B, NH, S, DHQK)
    v: jax.Array,  # (B, NH, S, DHHV)
    i: jax.Array,  # (B, NH, S)
    f: jax.Array,  # (B, NH, S)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    *,
    return_last_states: bool = False,
    chunk_size: int | None = None,
    eps: float = 1e-6,
    autocast_kernel_dtype=None,
    backend: str | None = None,
    config: ChunkwiseConfig | None = None,
    allow_tf32: bool = False,
    recompute_states_in_bw: bool | None = None,
    segment_len: int | None = None,
    segment_ids: jax.Array | None = None,  # (B, S) int
    input_gate: str = "exponential",
    normalize: bool = True,
):
    """The mLSTM cell over a sequence, chunkwise (TFLA), differentiable through a custom VJP.

    q, k, v are cast to `autocast_kernel_dtype` when given (matmul operands); gates i, f and the initial states are
    cast to float32 (float64 when q is float64), whatever their dtype. `backend`: one of `pallas_mlstm.BACKENDS`
    ("triton" on a GPU, "mosaic" on a Hopper GPU, "interpret" / "mosaic_interpret" on the CPU, "xla" anywhere), or
    None for triton on GPU and xla otherwise (with a tuned config's `kernel_backends`, e.g. a kernel in Mosaic GPU on
    a Hopper card where `tune` found it faster). `config` defaults to the tuned config of the card and shape
    (`pallas_mlstm.plan.resolve_config`). `chunk_size` overrides `config.chunk_size`; without either,
    `pallas_mlstm.plan.padding_chunk_size`; where S is split over Explicit mesh axes and `chunk_size` is not given,
    the config's or the default chunk is halved until it divides a sequence shard; a chunk longer than S rounded up to
    a power of 2 is clamped to that (it would only add padding). Any S >= 1: S is padded up to a multiple of the chunk
    size with steps that neither write nor decay the state (ĩ = −∞, f̃ = +∞), so h, the last states and all gradients
    are those of the S steps given. `segment_ids` (B, S), an int array, packs documents: wherever the id changes the
    state is reset before that token (f̃ = −∞ there), so each document sees only itself; an initial state reaches the
    first document only, and the last states are the last document's. Returns h (B, NH, S, DHHV) in q's dtype, or `(h,
    (c_last, n_last, m_last))` with `return_last_states`. Gradients hold the normaliser and the max state constant
    (exact for the head-normalised outputs of an mLSTM block; docs/numerics.md); first-order reverse mode only
    (jax.grad, jax.vjp), no jax.jvp / jax.jacfwd or second derivatives. A NaN in k or v at step t makes h NaN from the
    start of t's chunk on, not from t (a chunk is one matmul; the recurrent step: from t).

    `input_gate` picks the cell: "exponential" (mLSTMexp, the xLSTM default: input gate e^ĩ, states (C, n, m) with
    the max state m) or "sigmoid" (mLSTMsig of the TFLA paper: input gate σ(ĩ), states (C, n), bounded, no max
    state). With the sigmoid gate, m_initial is an error and `return_last_states` gives `(c_last, n_last)`;
    `normalize=False` (sigmoid only) returns h = (s q)ᵀC without the denominator max(|(s q)ᵀn|, 1) + eps, and its
    gradients are then exact for any loss.

    `segment_len` bounds memory on long sequences: forward and backward run over segments of that many steps in turn
    (a multiple of the chunk size that divides S), so that the chunk states and their gradients exist for one
    segment at a time; the result is the same up to rounding. None: `pallas_mlstm.plan.default_segment_len` (one
    pass up to 65536 steps, else segments of at most 32768, or one pass where S has no divisor of 8192 to 32768 that
    the chunk size divides).

    `recompute_states_in_bw`: False keeps every chunk's states (in q's dtype when it is 16-bit) from the forward for
    the backward, which then skips one recurrent pass (about 12% of forward + backward at the 7b shape on an H100),
    at the cost of holding them in between (at chunk 128 with 256 x 512 heads, as many bytes as q, k and v
    together); True recomputes them (upstream's default, least memory). None (the default): False wherever the
    inputs' sharding is known when tracing (one device, shard_map, Explicit mesh axes), True on Auto mesh axes,
    where a sequence shard's states cannot be kept (nor False be passed with S sharded). With segments it has no
    effect (only each segment's initial states are kept, and the backward recomputes the rest per segment).
    """
    batch, heads, seq_len, dhqk, dhhv = validate_mlstm_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    cell = make_cell(input_gate, normalize, eps)
    validate_max_state(cell, m_initial, "m_initial")
    chosen = get_backend(backend)
    out_dtype = q.dtype
    if validate_autocast_dtype(autocast_kernel_dtype) is not None:
        q, k, v = (x.astype(autocast_kernel_dtype) for x in (q, k, v))
    validate_operand_dtypes(q, k, v)
    given_config = config
    # a backend you name takes no tuned entry measured with other backends' kernels
    usable = None if backend is None else functools.partial(runs_tuned_kernels, chosen)
    config = resolve_config(chosen, config, (batch, heads, seq_len, dhqk, dhhv), q.dtype, usable=usable)
    if given_config is not None or backend is None:  # a tuned config's kernel backends: for backend=None only
        chosen = with_kernel_backends(chosen, config.kernel_backends, tuned=given_config is None)
    chunking, padded_len = make_chunking(
        chosen, config, chunk_size, seq_len, segment_len, recompute_states_in_bw, sequence_shards(q)
    )
    if segment_ids is not None:
        validate_segment_ids(segment_ids, batch, seq_len)
    plan = Plan(
        chosen,
        cell,
        chunking,
        launches_for(chosen, dict(config.launch_items()), config.kernel_launches()),
        states_dtype=state_buffer_dtype(q.dtype),
        allow_tf32=validate_bool("allow_tf32", allow_tf32),
        return_last_states=validate_bool("return_last_states", return_last_states),
    )
    if batch * heads == 0:
        return _empty_outputs(plan, q, v, out_dtype)

    state_dtype = acc_dtype(q.dtype)  # gates and states: float32, float64 for float64 operands
    i, f, c_initial, n_initial, m_initial = (
        None if x is None else x.astype(state_dtype) for x in (i, f, c_initial, n_initial, m_initial)
    )
    if segment_ids is not None:
        f = reset_at_document_starts(f, segment_ids)
    if padded_len != seq_len:
        q, k, v, i, f = pad_steps(q, k, v, i, f, padded_len)
    try:
        out = run_partitioned(plan, Inputs(q, k, v, i, f), States(c_initial, n_initial, m_initial))
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise ValueError(
            HIGHER_ORDER_MESSAGE.format(what="forward-mode differentiation (jax.jvp, jax.jacfwd)")
        ) from None
    h, last_states = out if plan.return_last_states else (out, None)
    h = h[:, :, :seq_len].astype(out_dtype)
    return (h, last_states.as_tuple(cell.tracks_max_state)) if plan.return_last_states else h
