"""Public entry points: `mlstm_chunkwise` and upstream's `mlstm_chunkwise_max_triton`, with input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_mlstm.backend import resolve_backend
from pallas_mlstm.chunkwise import ChunkwiseStatic
from pallas_mlstm.op import HIGHER_ORDER_MESSAGE
from pallas_mlstm.segments import default_segment_len, largest_segment_len
from pallas_mlstm.config import ChunkwiseConfig, tuned_config
from pallas_mlstm.device import DeviceProperties, device_properties
from pallas_mlstm.gates import acc_dtype_of
from pallas_mlstm.gates import pad_steps, reset_at_document_starts
from pallas_mlstm.launch_defaults import MIN_PALLAS_CHUNK, padding_chunk_size
from pallas_mlstm.sharding import run_partitioned
from pallas_mlstm.validation import (validate_chunk_size, validate_gate_options, validate_mlstm_inputs,
                                     validate_segment_ids)

_AUTOCAST_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def default_config(backend: str, device: str | DeviceProperties, q_shape: tuple[int, ...], dhhv: int,
                   operand_dtype) -> ChunkwiseConfig:
    """The config used when none is given: on the triton backend with 16-bit operands, the one `tune`
    measured for this card (a `DeviceProperties`, or a `device_kind` string: exact name only) and shape class
    (pallas_mlstm/tuned_configs.json, or the user's own file, see `pallas_mlstm.config`), else that of a tuned
    card of the same compute capability; otherwise all None (the kernels' own defaults, which adapt to the
    card's SM count and shared memory). Tuned configs were measured with bfloat16 operands: float32 tiles
    take twice the shared memory, so float32 operands keep the kernel defaults, which the GPU tests run in
    float32."""
    if backend == "triton" and jnp.dtype(operand_dtype).itemsize == 2:
        batch, heads, seq_len, dhqk = q_shape
        properties = device if isinstance(device, DeviceProperties) else DeviceProperties(device)
        capability = None if properties.compute_capability is None else "{}.{}".format(*properties.compute_capability)
        tuned = tuned_config(properties.device_kind, batch, heads, seq_len, dhqk, dhhv,
                             compute_capability=capability, core_count=properties.core_count)
        if tuned is not None:
            return tuned
    return ChunkwiseConfig()


def _empty_outputs(q, v, return_last_states: bool, out_dtype, num_states: int):
    """The outputs of an empty batch or head axis (B·NH = 0): arrays of the right shapes and dtypes."""
    batch, heads, seq_len, dhqk = q.shape
    h = jnp.zeros((batch, heads, seq_len, v.shape[3]), out_dtype)
    if not return_last_states:
        return h
    state_dtype = acc_dtype_of(q.dtype)
    states = (jnp.zeros((batch, heads, dhqk, v.shape[3]), state_dtype), jnp.zeros((batch, heads, dhqk), state_dtype),
              jnp.zeros((batch, heads), state_dtype))
    return h, states[:num_states]


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

    q, k, v are cast to `autocast_kernel_dtype` when given (matmul operands); gates i, f and the initial
    states are cast to float32 (float64 when q is float64), whatever their dtype. `backend`: "triton" (GPU),
    "interpret" (Pallas interpreter, CPU), "xla" (plain jnp), or None for triton on GPU and xla otherwise.
    `config` defaults to `default_config`. `chunk_size` overrides `config.chunk_size`; without either,
    `launch_defaults.padding_chunk_size`. Any S >= 1: S is padded up to a multiple of the chunk size with
    steps that neither write nor decay the state (ĩ = −∞, f̃ = +∞), so h, the last states and all gradients
    are those of the S steps given. `segment_ids` (B, S), an int array, packs documents: wherever the id
    changes the state is reset before that token (f̃ = −∞ there), so each document sees only itself; an
    initial state reaches the first document only, and the last states are the last document's. Returns h (B, NH, S, DHHV) in q's dtype, or
    `(h, (c_last, n_last, m_last))` with `return_last_states`. Gradients hold the normaliser and the max
    state constant (exact for the head-normalised outputs of an mLSTM block; see README); first-order
    reverse mode only (jax.grad, jax.vjp), no jax.jvp / jax.jacfwd or second derivatives.

    `input_gate` picks the cell: "exponential" (mLSTMexp, the xLSTM default: input gate e^ĩ, states (C, n, m)
    with the max state m) or "sigmoid" (mLSTMsig of the TFLA paper: input gate σ(ĩ), states (C, n), bounded, no
    max state). With the sigmoid gate, m_initial is an error and `return_last_states` gives `(c_last, n_last)`;
    `normalize=False` (sigmoid only) returns h = (s q)ᵀC without the denominator max(|(s q)ᵀn|, 1) + eps, and
    its gradients are then exact for any loss.

    `segment_len` bounds memory on long sequences: forward and backward run over segments of that many steps
    in turn (a multiple of the chunk size that divides S), so that the chunk states and their gradients exist
    for one segment at a time; the result is the same up to rounding. None: `default_segment_len` (one pass up
    to 65536 steps, else segments of at most 32768, or one pass where S has no divisor of 8192 to 32768 that
    the chunk size divides).

    `recompute_states_in_bw`: False keeps every chunk's states (in q's dtype when it is 16-bit) from the forward
    for the backward, which then skips one recurrent pass (about 12% of forward + backward at the 7b shape on
    an H100), at the cost of holding them in between (at chunk 128 with 256 x 512 heads, as many bytes as q, k
    and v together); True recomputes them (upstream's default, least memory). None (the default): False wherever
    the inputs' sharding is known when tracing (one device, shard_map, Explicit mesh axes), True on Auto mesh
    axes, where a sequence shard's states cannot be kept (nor False be passed with S sharded). With segments it has no effect (only each
    segment's initial states are kept, and the backward recomputes the rest per segment).
    """
    batch, heads, seq_len, _, _ = validate_mlstm_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    validate_gate_options(input_gate, normalize)
    if input_gate == "sigmoid" and m_initial is not None:
        raise ValueError("m_initial is not a state of the sigmoid input gate: its states are (C, n), bounded and "
                         "unstabilised; drop m_initial (fold e^m into c_initial and n_initial if it came from "
                         "an exponential-gate run).")
    backend = resolve_backend(backend)
    out_dtype = q.dtype
    if autocast_kernel_dtype is not None:
        if jnp.dtype(autocast_kernel_dtype) not in [jnp.dtype(d) for d in _AUTOCAST_DTYPES]:
            raise ValueError(
                f"autocast_kernel_dtype must be float16, bfloat16, float32 or None; got {autocast_kernel_dtype!r}."
            )
        q, k, v = (x.astype(autocast_kernel_dtype) for x in (q, k, v))
    if v.dtype != q.dtype or k.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must share a dtype (got {q.dtype}, {k.dtype}, {v.dtype}); cast them or pass "
            "autocast_kernel_dtype."
        )
    if config is None:
        config = default_config(backend, device_properties(), q.shape, v.shape[3], q.dtype)
    if not isinstance(config, ChunkwiseConfig):
        raise ValueError(f"config must be a pallas_mlstm.ChunkwiseConfig or None; got {type(config).__name__}.")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative float; got {eps!r}.")
    minimum_chunk = 1 if backend == "xla" else MIN_PALLAS_CHUNK
    chunk_size = config.chunk_size if chunk_size is None else chunk_size
    if chunk_size is None:
        chunk_size = padding_chunk_size(seq_len, minimum_chunk)
    chunk_size = validate_chunk_size(chunk_size, None, minimum=minimum_chunk)
    padded_len = -(-seq_len // chunk_size) * chunk_size  # S up to a multiple of the chunk size
    if segment_len is None:
        segment_len = default_segment_len(padded_len, chunk_size)
    elif (not isinstance(segment_len, (int, np.integer)) or isinstance(segment_len, (bool, np.bool_))
          or segment_len < 1 or segment_len % chunk_size or padded_len % segment_len):
        below = max(segment_len, chunk_size) if isinstance(segment_len, (int, np.integer)) else chunk_size
        raise ValueError(
            f"segment_len must be a positive int that is a multiple of chunk_size={chunk_size} and divides "
            f"S={padded_len} (the sequence length padded to a multiple of the chunk size), or None (the default); "
            f"got {segment_len!r}: pass e.g. {largest_segment_len(padded_len, chunk_size, below)}."
        )
    if segment_ids is not None:
        validate_segment_ids(segment_ids, batch, seq_len)
    if batch * heads == 0:
        return _empty_outputs(q, v, return_last_states, out_dtype, 3 if input_gate == "exponential" else 2)

    state_dtype = acc_dtype_of(q.dtype)  # gates and states: float32, float64 for float64 operands
    i, f, c_initial, n_initial, m_initial = (None if x is None else x.astype(state_dtype)
                                             for x in (i, f, c_initial, n_initial, m_initial))
    if segment_ids is not None:
        f = reset_at_document_starts(f, segment_ids)
    if padded_len != seq_len:
        q, k, v, i, f = pad_steps(q, k, v, i, f, padded_len)
    static = ChunkwiseStatic(
        backend=backend,
        chunk_size=chunk_size,
        eps=float(eps),
        return_last_states=bool(return_last_states),
        recompute_states_in_bw=None if recompute_states_in_bw is None else bool(recompute_states_in_bw),
        allow_tf32=bool(allow_tf32),
        launch=config.launch_items(),
        segment_len=None if segment_len is None else int(segment_len),
        input_gate=input_gate,
        normalize=bool(normalize),
    )
    try:
        out = run_partitioned(static, q, k, v, i, f, c_initial, n_initial, m_initial)
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise ValueError(HIGHER_ORDER_MESSAGE.format(what="forward-mode differentiation (jax.jvp, jax.jacfwd)")) from None
    h, last_states = out if return_last_states else (out, None)
    if return_last_states and input_gate == "sigmoid":
        last_states = last_states[:2]  # (c, n): the kernels' m stayed 0
    h = h[:, :, :seq_len].astype(out_dtype)
    return (h, last_states) if return_last_states else h


def mlstm_chunkwise_max_triton(
    q: jax.Array,  # (B, NH, S, DHQK)
    k: jax.Array,  # (B, NH, S, DHQK)
    v: jax.Array,  # (B, NH, S, DHHV)
    i: jax.Array,  # (B, NH, S)
    f: jax.Array,  # (B, NH, S)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    return_last_states: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    autocast_kernel_dtype=jnp.float32,
):
    """xlstm_jax's `max_triton_fwbw_v5xlchunksize.mlstm_chunkwise_max_triton`, same arguments, on Pallas.

    Returns h (B, NH, S, DHHV), or `(h, (c_last, n_last, m_last))` with `return_last_states`, as upstream.
    Differences: `chunk_size` is honoured (upstream's top level ignores it), and S need not be a multiple of it;
    `autocast_kernel_dtype` casts q, k, v only, the gates stay float32; h comes back in q's dtype. The
    backend is the default one (triton on a GPU, xla otherwise); use `mlstm_chunkwise` to choose it.
    """
    return mlstm_chunkwise(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=return_last_states,
                           chunk_size=chunk_size, eps=eps, autocast_kernel_dtype=autocast_kernel_dtype)
