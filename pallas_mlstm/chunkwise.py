"""The chunkwise orchestration: six kernels chained into a forward and a backward pass.

`mlstm_chunkwise_fw` / `mlstm_chunkwise_bw` take upstream's arguments (xlstm_jax's
`max_triton_fwbw_v5xlchunksize`, same names, positions and defaults) plus a keyword-only `backend`; every
backend runs this one orchestration over its own `KernelSet` (pallas_mlstm.backend). `ChunkwiseStatic` holds
the non-array arguments of one `mlstm_chunkwise` call; `fw_bw_kwargs` turns it into these functions' keywords.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_mlstm.backend import KernelSet, kernel_set, resolve_backend
from pallas_mlstm.gates import (
    chunked,
    compute_chunkwise_log_gates_vecB_vecA,
    compute_chunkwise_reset_gates,
    input_gate_gradient,
    unchunked,
)
from pallas_mlstm.launch_defaults import MIN_PALLAS_CHUNK, default_chunk_size
from pallas_mlstm.states import split_states
from pallas_mlstm.validation import validate_chunk_size, validate_gate_options


def _chunk_sizes(seq_len: int, chunk_size_inter, chunk_size_intra, backend: str) -> tuple[int, int]:
    """(inter, intra) chunk sizes: intra defaults to `default_chunk_size`, inter to intra."""
    minimum = 1 if backend == "xla" else MIN_PALLAS_CHUNK
    intra = default_chunk_size(seq_len, minimum) if chunk_size_intra is None else chunk_size_intra
    inter = intra if chunk_size_inter is None else chunk_size_inter
    validate_chunk_size(intra, seq_len, name="chunk_size_intra", minimum=minimum)
    validate_chunk_size(inter, seq_len, name="chunk_size_inter", minimum=minimum)
    if intra % inter:
        raise ValueError(f"chunk_size_intra={intra} must be a multiple of chunk_size_inter={inter}.")
    return inter, intra


def denominator_eps(eps: float, normalize: bool) -> float:
    """The eps added to the denominator: none with normalize=False, where h = q̄·C has no denominator."""
    return eps if normalize else 0.0


def mlstm_chunkwise_fw(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    qk_scale: float | None = None,
    return_last_states: bool = False,
    return_all_states: bool = False,
    chunk_size_inter: int | None = None,
    chunk_size_intra: int | None = None,
    siz_b_L_parallel: int | None = None,
    siz_b_L_loop: int | None = None,
    siz_b_DH_parallel: int | None = None,
    siz_b_DH_loop: int | None = None,
    num_warps_intra: int | None = None,
    num_warps_inter: int | None = None,
    num_stages_intra: int | None = None,
    num_stages_inter: int | None = None,
    output_dtype=jnp.float32,
    eps: float = 0.0,
    *,
    backend: str | None = None,
    allow_tf32: bool = False,
    states_dtype=None,
    input_gate: str = "exponential",
    normalize: bool = True,
):
    """Chunkwise forward: (matH_out, vecN_out, vecM_out, last_states | None, all_states | None).

    Upstream's arguments, plus `backend` ("triton", "interpret", "xla", or None: triton on a GPU, xla
    otherwise), `allow_tf32` and `states_dtype` (None: float32; bfloat16 stores the C states of
    all_states in the dtype the kernels' matmuls round them to, last_states stay float32), and the cell:
    `input_gate` "exponential" (mLSTMexp, upstream's) or "sigmoid" (mLSTMsig: σ(ĩ) as input gate, m not tracked,
    every m state is the initial one), with `normalize` (sigmoid only: False returns h = q̄·C, eps unused).
    chunk_size_intra defaults to the largest power of 2 <= 128 dividing S, chunk_size_inter to
    chunk_size_intra; launch fields left None take each kernel's measured default.
    """
    validate_gate_options(input_gate, normalize)
    backend = resolve_backend(backend)
    kernels = kernel_set(backend, allow_tf32)
    seq_len, dhqk = matQ.shape[2], matQ.shape[3]
    inter, intra = _chunk_sizes(seq_len, chunk_size_inter, chunk_size_intra, backend)
    qk_scale = dhqk**-0.5 if qk_scale is None else qk_scale

    matC_all, vecN_all, scaM_all, *matC_last = kernels.recurrent_fw_C(
        matK, matV, vecF, vecI, matC_initial, vecN_initial, scaM_initial,
        chunk_size=inter, num_stages=num_stages_inter, num_warps=num_warps_inter,
        save_states_every_nth_chunk=intra // inter, states_dtype=states_dtype, input_gate=input_gate,
    )
    matH_out, vecN_out, vecM_out = kernels.parallel_fw_Hintra(
        matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all,
        qk_scale=qk_scale, chunk_size=intra, siz_b_LQ=siz_b_L_parallel, siz_b_LKV=siz_b_L_loop,
        siz_b_DHQK=siz_b_DH_loop, siz_b_DHHV=siz_b_DH_parallel, num_warps=num_warps_intra,
        num_stages=num_stages_intra, eps=eps, output_dtype=output_dtype, input_gate=input_gate, normalize=normalize,
    )
    last_states = None
    if return_last_states:
        matC_last = matC_last[0] if matC_last else matC_all[:, :, -dhqk:, :]  # float32 either way
        last_states = (matC_last, vecN_all[:, :, -dhqk:], scaM_all[:, :, -1])
    all_states = (matC_all, vecN_all, scaM_all) if return_all_states else None
    return matH_out, vecN_out, vecM_out, last_states, all_states


@dataclasses.dataclass(frozen=True)
class _BwLaunch:
    """The chunk sizes and launch fields one backward pass runs with."""

    kernels: KernelSet
    inter: int
    intra: int
    qk_scale: float
    eps: float
    siz_b_L_parallel: int | None
    siz_b_L_loop: int | None
    siz_b_DH_parallel: int | None
    siz_b_DH_loop: int | None
    num_warps_intra: int | None
    num_warps_inter: int | None
    num_stages_intra: int | None
    num_stages_inter: int | None
    states_dtype: Any
    input_gate: str


def _kernel_chain_bw(launch: _BwLaunch, matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all, vecN_out,
                     vecM_out, matDeltaH, matDeltaC_last):
    """The four backward kernels: dC states (and <dC_k, C_k>, float32 dC_0), then dV, dK, dQ with their float32
    row dots."""
    kernels = launch.kernels
    matDeltaC_states, scaCdC_states, *matDeltaC_first = kernels.recurrent_bw_dC(
        matQ, vecF, scaM_all, vecM_out, matDeltaH, vecN_out, matDeltaC_last,
        qk_scale=launch.qk_scale, chunk_size=launch.inter, save_states_every_nth_chunk=launch.intra // launch.inter,
        num_warps=launch.num_warps_inter, num_stages=launch.num_stages_inter, eps=launch.eps, matC_states=matC_all,
        states_dtype=launch.states_dtype,
    )
    dhqk = matQ.shape[-1]
    matDeltaC_first = matDeltaC_first[0] if matDeltaC_first else matDeltaC_states[:, :, :dhqk, :]
    _, vecA = compute_chunkwise_log_gates_vecB_vecA(vecI, vecF, launch.intra, input_gate=launch.input_gate)
    vecB, vecR = compute_chunkwise_reset_gates(vecF, launch.intra)  # finite across hard resets, and where they are
    shared = (matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out,
              matDeltaH, matDeltaC_states)
    common = dict(qk_scale=launch.qk_scale, chunk_size=launch.intra, num_warps=launch.num_warps_intra,
                  num_stages=launch.num_stages_intra, eps=launch.eps, output_dtype=matQ.dtype, vecR=vecR,
                  input_gate=launch.input_gate)
    l_parallel, l_loop = launch.siz_b_L_parallel, launch.siz_b_L_loop
    dh_parallel, dh_loop = launch.siz_b_DH_parallel, launch.siz_b_DH_loop
    matDeltaV = kernels.parallel_bw_dV(*shared, siz_b_LQ=l_loop, siz_b_LKV=l_parallel, siz_b_DHQK=dh_loop,
                                       siz_b_DHHV=dh_parallel, **common)
    # Σ_d k·dk and Σ_d q·dq come from the kernels' float32 accumulators: dĩ and df̃ are built from them, and
    # bf16-rounded dK / dQ would carry their rounding into df̃'s sums.
    matDeltaK, vecKdK = kernels.parallel_bw_dK(*shared, siz_b_LQ=l_loop, siz_b_LKV=l_parallel,
                                               siz_b_DHQK=dh_parallel, siz_b_DHHV=dh_loop, return_row_dots=True,
                                               **common)
    matDeltaQ, vecQdQ = kernels.parallel_bw_dQ(*shared, siz_b_LQ=l_parallel, siz_b_LKV=l_loop,
                                               siz_b_DHQK=dh_parallel, siz_b_DHHV=dh_loop, return_row_dots=True,
                                               **common)
    return matDeltaC_first, scaCdC_states, matDeltaQ, matDeltaK, matDeltaV, vecQdQ, vecKdK


def _last_n_cotangent(vecI, vecF, matK, scaM_all, vecDeltaN_last, intra: int, input_gate: str):
    """The n states feed only the last n state: dN_k = e^{Σ_{r>k} g_r + m_k − m_NC} dN_last for every boundary k,
    (B, NH, NC+1, DHQK), and the part of dK it adds, (B, NH, S, DHQK) float32."""
    vecB, vecA = compute_chunkwise_log_gates_vecB_vecA(vecI, vecF, intra, input_gate=input_gate)
    dtype = vecB.dtype
    scaG = vecB[..., -1]  # (B, NH, NC), −∞ for a chunk with a hard reset
    g_after = jnp.cumsum(jnp.concatenate([scaG, jnp.zeros_like(scaG[..., :1])], -1)[..., ::-1], -1)[..., ::-1]
    decay_to_last = jnp.exp(g_after + scaM_all - scaM_all[..., -1:])  # (B, NH, NC+1)
    vecDeltaN_states = decay_to_last[..., None] * vecDeltaN_last.astype(dtype)[:, :, None, :]
    dk_from_n = unchunked(jnp.exp(vecA - scaM_all[..., 1:, None])[..., None] * vecDeltaN_states[:, :, 1:, None, :])
    return vecDeltaN_states, dk_from_n


def _forget_gate_gradient(vecF, vecQdQ, vecKdK, scaCdC_states, vecDeltaN_states, vecN_all, dhqk: int, intra: int):
    """df̃ (B, NH, S). df̃_t / σ(−f̃_t) sums the (q, k) pairs whose path crosses step t: Σ_{u≥t} (q·dq − k·dk)
    + <dC_S, C_S> + <dN_S, n_S>. It is summed to the end of t's chunk only, plus the state terms at that
    chunk's end boundary (= the pairs crossing it, end-state cotangents included), so that rounding does
    not accumulate over S."""
    boundary_terms = scaCdC_states[..., 1:]  # (B, NH, NC)
    if vecDeltaN_states is not None:
        boundary_terms += jnp.sum(vecDeltaN_states[:, :, 1:] * split_states(vecN_all, dhqk)[:, :, 1:], axis=-1)
    per_step = chunked(vecQdQ - vecKdK, intra)  # (B, NH, NC, L)
    in_chunk_suffix = jnp.cumsum(per_step[..., ::-1], axis=-1)[..., ::-1]
    vecDeltaFbar = unchunked(in_chunk_suffix + boundary_terms[..., None])
    # a hard reset (f̃ = −∞) cuts every path through it: its gradient is 0, whatever the rounding left
    return jnp.where(jnp.isneginf(vecF), 0.0, vecDeltaFbar * jax.nn.sigmoid(-vecF.astype(vecDeltaFbar.dtype)))


def _initial_state_gradients(matDeltaC_first, vecDeltaN_states, matC_initial, vecN_initial, scaM_initial, dtype):
    """(dC_initial, dN_initial, dM_initial), None for the states not given. m_initial scales the true initial
    state C0·e^{m0}, n0·e^{m0}: dm0 = <dC0, C0> + <dn0, n0>."""
    matDeltaC_initial = None if matC_initial is None else matDeltaC_first
    vecDeltaN_initial = None
    if vecN_initial is not None:
        vecDeltaN_initial = (jnp.zeros(vecN_initial.shape, dtype) if vecDeltaN_states is None
                             else vecDeltaN_states[:, :, 0])
    scaDeltaM_initial = None
    if scaM_initial is not None:
        scaDeltaM_initial = jnp.zeros(scaM_initial.shape, dtype)
        if matC_initial is not None:
            scaDeltaM_initial += jnp.sum(matDeltaC_initial * matC_initial.astype(dtype), axis=(-2, -1))
        if vecN_initial is not None:
            scaDeltaM_initial += jnp.sum(vecDeltaN_initial * vecN_initial.astype(dtype), axis=-1)
    return matDeltaC_initial, vecDeltaN_initial, scaDeltaM_initial


def mlstm_chunkwise_bw(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    matC_all: jax.Array | None = None,  # (B, NH, (NC+1)*DHQK, DHHV)
    vecN_all: jax.Array | None = None,  # (B, NH, (NC+1)*DHQK)
    scaM_all: jax.Array | None = None,  # (B, NH, NC+1)
    vecN_out: jax.Array | None = None,  # (B, NH, S)
    vecM_out: jax.Array | None = None,  # (B, NH, S)
    matDeltaH: jax.Array | None = None,  # (B, NH, S, DHHV)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    qk_scale: float | None = None,
    chunk_size_inter: int | None = None,
    chunk_size_intra: int | None = None,
    siz_b_L_parallel: int | None = None,
    siz_b_L_loop: int | None = None,
    siz_b_DH_parallel: int | None = None,
    siz_b_DH_loop: int | None = None,
    num_warps_intra: int | None = None,
    num_warps_inter: int | None = None,
    num_stages_intra: int | None = None,
    num_stages_inter: int | None = None,
    eps: float = 0.0,
    *,
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_last_frame: jax.Array | None = None,  # (B, NH)
    backend: str | None = None,
    allow_tf32: bool = False,
    states_dtype=None,
    input_gate: str = "exponential",
    normalize: bool = True,
):
    """Chunkwise backward: (dQ, dK, dV, dI, dF, dC_initial, dN_initial, dM_initial).

    Upstream's arguments, plus `vecDeltaN_last` (a cotangent on the last n state), `scaM_last_frame` (the m
    that matDeltaC_last and vecDeltaN_last are stabilised by, as the gradients of C·e^{−m}, n·e^{−m}; None: the
    last state's own, as upstream), and `backend`,
    `allow_tf32`, `states_dtype` (of the C and dC state buffers), `input_gate` and `normalize` as in
    `mlstm_chunkwise_fw` (with the sigmoid gate dI is the gradient of the pre-activation ĩ). den and m are held constant (docs/math.md §4). Unlike
    upstream, the gradient of scaM_initial is exact, df̃ includes the end-state terms <dC_last, C_last> +
    <dN_last, n_last>, and `vecDeltaN_last` is propagated. Missing states / outputs are recomputed.
    """
    if matDeltaH is None:
        raise ValueError("matDeltaH (the gradient of the output h, (B, NH, S, DHHV)) is required.")
    validate_gate_options(input_gate, normalize)
    backend = resolve_backend(backend)
    seq_len, dhqk = matQ.shape[2], matQ.shape[3]
    inter, intra = _chunk_sizes(seq_len, chunk_size_inter, chunk_size_intra, backend)
    launch = _BwLaunch(kernel_set(backend, allow_tf32), inter, intra, dhqk**-0.5 if qk_scale is None else qk_scale,
                       denominator_eps(eps, normalize), siz_b_L_parallel, siz_b_L_loop, siz_b_DH_parallel,
                       siz_b_DH_loop, num_warps_intra, num_warps_inter, num_stages_intra, num_stages_inter,
                       states_dtype, input_gate)
    if matC_all is None or vecN_all is None or scaM_all is None:
        matC_all, vecN_all, scaM_all, *_ = launch.kernels.recurrent_fw_C(
            matK, matV, vecF, vecI, matC_initial, vecN_initial, scaM_initial, chunk_size=inter,
            num_stages=num_stages_inter, num_warps=num_warps_inter, save_states_every_nth_chunk=intra // inter,
            states_dtype=states_dtype, input_gate=input_gate)
    if vecN_out is None or vecM_out is None:
        _, vecN_out, vecM_out = launch.kernels.parallel_fw_Hintra(
            matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all, qk_scale=launch.qk_scale, chunk_size=intra,
            siz_b_LQ=siz_b_L_parallel, siz_b_LKV=siz_b_L_loop, siz_b_DHQK=siz_b_DH_loop,
            siz_b_DHHV=siz_b_DH_parallel, num_warps=num_warps_intra, num_stages=num_stages_intra, eps=eps,
            input_gate=input_gate, normalize=normalize)

    if scaM_last_frame is not None:  # into the frame of the last state: e^{m_NC − frame}
        rescale = jnp.exp(scaM_all[..., -1] - scaM_last_frame.astype(scaM_all.dtype))  # (B, NH)
        if matDeltaC_last is not None:
            matDeltaC_last = matDeltaC_last * rescale[..., None, None].astype(matDeltaC_last.dtype)
        if vecDeltaN_last is not None:
            vecDeltaN_last = vecDeltaN_last * rescale[..., None].astype(vecDeltaN_last.dtype)
    matDeltaC_first, scaCdC_states, matDeltaQ, matDeltaK, matDeltaV, vecQdQ, vecKdK = _kernel_chain_bw(
        launch, matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all, vecN_out, vecM_out, matDeltaH,
        matDeltaC_last)
    vecDeltaN_states = None
    if vecDeltaN_last is not None:
        vecDeltaN_states, dk_from_n = _last_n_cotangent(vecI, vecF, matK, scaM_all, vecDeltaN_last, intra, input_gate)
        vecKdK = vecKdK + jnp.sum(matK.astype(dk_from_n.dtype) * dk_from_n, axis=-1)
        matDeltaK = (matDeltaK.astype(dk_from_n.dtype) + dk_from_n).astype(matDeltaK.dtype)
    vecDeltaI = input_gate_gradient(vecKdK, vecI, input_gate)  # vecKdK: the gradient of the log input gate
    vecDeltaF = _forget_gate_gradient(vecF, vecQdQ, vecKdK, scaCdC_states, vecDeltaN_states, vecN_all, dhqk, intra)
    initial_grads = _initial_state_gradients(matDeltaC_first, vecDeltaN_states, matC_initial, vecN_initial,
                                             scaM_initial, vecDeltaI.dtype)
    return (matDeltaQ, matDeltaK, matDeltaV, vecDeltaI, vecDeltaF, *initial_grads)


# ----------------------------------------------------------------------------- one call's static arguments


@dataclasses.dataclass(frozen=True)
class ChunkwiseStatic:
    """The non-array arguments of one `mlstm_chunkwise` call (hashable: a jit / custom_vjp static)."""

    backend: str
    chunk_size: int
    eps: float
    return_last_states: bool = False
    recompute_states_in_bw: bool | None = True  # None: decided by pallas_mlstm.sharding.run_partitioned
    allow_tf32: bool = False
    launch: tuple[tuple[str, Any], ...] = ()  # launch fields of mlstm_chunkwise_fw / _bw (ChunkwiseConfig)
    segment_len: int | None = None  # steps per segment (pallas_mlstm.segments); None: one pass
    input_gate: str = "exponential"  # or "sigmoid" (mLSTMsig)
    normalize: bool = True  # False (sigmoid only): h = q̄·C


def state_buffer_dtype(input_dtype):
    """The dtype of the C / dC state buffers passed between the kernels of one call: the inputs' dtype when it
    is 16-bit (the parallel kernels round the states to it for their matmuls anyway, so h and the gradients of
    q, k, v are unchanged, and the buffers' traffic and memory halve), else None (float32 / float64)."""
    return input_dtype if jnp.dtype(input_dtype).itemsize == 2 else None


def fw_bw_kwargs(static: ChunkwiseStatic, input_dtype):
    """The keyword arguments of `mlstm_chunkwise_fw` / `_bw` for one call on inputs of `input_dtype`."""
    return dict(chunk_size_inter=static.chunk_size, chunk_size_intra=static.chunk_size, eps=static.eps,
                backend=static.backend, allow_tf32=static.allow_tf32, states_dtype=state_buffer_dtype(input_dtype),
                input_gate=static.input_gate, normalize=static.normalize, **dict(static.launch))
