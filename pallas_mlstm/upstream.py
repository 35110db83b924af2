"""Upstream's signatures over the plan-based core: a façade, so that users of xlstm_jax's
`max_triton_fwbw_v5xlchunksize` switch by changing an import.

`mlstm_chunkwise_fw` / `_bw`, `mlstm_chunkwise_max_triton`, the gate helper and the decoding step keep upstream's names,
argument positions and defaults (tests/test_contract.py pins them); each turns its arguments into a `Plan`
once (pallas_mlstm.plan) and runs the core (pallas_mlstm.chunkwise). The six kernels are the backends' own
upstream-signature functions (pallas_mlstm.pallas_triton, re-exported by pallas_mlstm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_mlstm.api import mlstm_chunkwise
from pallas_mlstm.chunkwise import ChunkStates, ForwardOutputs, Inputs, backward, forward
from pallas_mlstm.decoding import mlstm_recurrent_step
from pallas_mlstm.gates import chunkwise_log_gates
from pallas_mlstm.plan import (
    Cell,
    Plan,
    checked_kernel_options,
    launches_for,
    make_cell,
    make_upstream_chunking,
    validate_bool,
    validate_chunk_size,
    validate_gate_options,
    validate_max_state,
)
from pallas_mlstm.registry import get_backend
from pallas_mlstm.states import States
from pallas_mlstm.validation import (
    UPSTREAM_INPUT_NAMES,
    validate_autocast_dtype,
    validate_float_dtype,
    validate_mlstm_inputs,
    validate_operand_dtypes,
    validate_optional_arrays,
)


def _upstream_plan(inputs: Inputs, initial: States, cell: Cell, chunk_sizes, launch: dict, options: dict) -> Plan:
    """The plan of one `mlstm_chunkwise_fw` / `_bw` call, after checking its inputs and initial states:
    chunk_sizes = (inter, intra), `launch` upstream's flat launch fields, `options` backend, qk_scale, allow_tf32
    and states_dtype."""
    validate_mlstm_inputs(*inputs, *initial, names=UPSTREAM_INPUT_NAMES)
    validate_operand_dtypes(inputs.q, inputs.k, inputs.v, UPSTREAM_INPUT_NAMES)
    validate_max_state(cell, initial.m, "scaM_initial")
    chosen = get_backend(options.pop("backend"))
    return Plan(
        chosen,
        cell,
        make_upstream_chunking(chosen, inputs.q.shape[2], *chunk_sizes),
        launches_for(chosen, {name: value for name, value in launch.items() if value is not None}, {}),
        **checked_kernel_options(**options),
    )


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

    Upstream's arguments, plus `backend` (one of `pallas_mlstm.BACKENDS`, or None: triton on a GPU, xla
    otherwise), `allow_tf32` and `states_dtype` (None: float32; bfloat16 stores the C states of
    all_states in the dtype the kernels' matmuls round them to, last_states stay float32), and the cell:
    `input_gate` "exponential" (mLSTMexp, upstream's) or "sigmoid" (mLSTMsig: σ(ĩ) as input gate, m not tracked,
    every m state 0, scaM_initial refused), with `normalize` (sigmoid only: False returns h = q̄·C, eps unused).
    chunk_size_intra defaults to the largest power of 2 <= 128 dividing S, chunk_size_inter to
    chunk_size_intra; launch fields left None take each kernel's measured default.
    """
    launch = dict(
        siz_b_L_parallel=siz_b_L_parallel,
        siz_b_L_loop=siz_b_L_loop,
        siz_b_DH_parallel=siz_b_DH_parallel,
        siz_b_DH_loop=siz_b_DH_loop,
        num_warps_intra=num_warps_intra,
        num_warps_inter=num_warps_inter,
        num_stages_intra=num_stages_intra,
        num_stages_inter=num_stages_inter,
    )
    inputs, initial = Inputs(matQ, matK, matV, vecI, vecF), States(matC_initial, vecN_initial, scaM_initial)
    options = dict(backend=backend, qk_scale=qk_scale, allow_tf32=allow_tf32, states_dtype=states_dtype)
    plan = _upstream_plan(
        inputs, initial, make_cell(input_gate, normalize, eps), (chunk_size_inter, chunk_size_intra), launch, options
    )
    return_last_states = validate_bool("return_last_states", return_last_states)
    return_all_states = validate_bool("return_all_states", return_all_states)
    h, saved, last = forward(plan, inputs, initial, validate_float_dtype("output_dtype", output_dtype))
    last_states = tuple(last) if return_last_states else None
    all_states = tuple(saved.chunk_states) if return_all_states else None
    return h, saved.n_out, saved.m_out, last_states, all_states


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
    last state's own, as upstream), and `backend`, `allow_tf32`, `states_dtype` (of the C and dC state
    buffers), `input_gate` and `normalize` as in `mlstm_chunkwise_fw` (with the sigmoid gate dI is the gradient
    of the pre-activation ĩ). den and m are held constant (docs/math.md §4). Unlike upstream, the gradient of
    scaM_initial is exact, df̃ includes the end-state terms <dC_last, C_last> + <dN_last, n_last>, and
    `vecDeltaN_last` is propagated. Missing states / outputs are recomputed.
    """
    if matDeltaH is None:
        raise ValueError("matDeltaH (the gradient of the output h, (B, NH, S, DHHV)) is required.")
    launch = dict(
        siz_b_L_parallel=siz_b_L_parallel,
        siz_b_L_loop=siz_b_L_loop,
        siz_b_DH_parallel=siz_b_DH_parallel,
        siz_b_DH_loop=siz_b_DH_loop,
        num_warps_intra=num_warps_intra,
        num_warps_inter=num_warps_inter,
        num_stages_intra=num_stages_intra,
        num_stages_inter=num_stages_inter,
    )
    inputs, initial = Inputs(matQ, matK, matV, vecI, vecF), States(matC_initial, vecN_initial, scaM_initial)
    options = dict(backend=backend, qk_scale=qk_scale, allow_tf32=allow_tf32, states_dtype=states_dtype)
    plan = _upstream_plan(
        inputs, initial, make_cell(input_gate, normalize, eps), (chunk_size_inter, chunk_size_intra), launch, options
    )
    batch, heads, seq_len, dhqk = matQ.shape
    dhhv = matV.shape[3]
    validate_optional_arrays(
        ("matDeltaH", matDeltaH, (batch, heads, seq_len, dhhv)),
        ("vecN_out", vecN_out, (batch, heads, seq_len)),
        ("vecM_out", vecM_out, (batch, heads, seq_len)),
        ("matDeltaC_last", matDeltaC_last, (batch, heads, dhqk, dhhv)),
        ("vecDeltaN_last", vecDeltaN_last, (batch, heads, dhqk)),
        ("scaM_last_frame", scaM_last_frame, (batch, heads)),
        source="matQ and matV",
    )
    given = (
        None if matC_all is None or vecN_all is None or scaM_all is None else ChunkStates(matC_all, vecN_all, scaM_all)
    )
    d_inputs, d_initial = backward(
        plan,
        inputs,
        initial,
        ForwardOutputs(given, vecN_out, vecM_out),
        matDeltaH,
        States(matDeltaC_last, vecDeltaN_last),
        scaM_last_frame,
    )
    return (*d_inputs, *d_initial)


def compute_chunkwise_log_gates_vecB_vecA(
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    chunk_size: int,
    return_vecB_only: bool = False,
    *,
    input_gate: str = "exponential",
):
    """In-chunk log gates: vecB = inclusive cumsum of log σ(f̃), vecA = reverse exclusive cumsum + ĩ.

    ĩ is `log_input_gate(vecI, input_gate)`: vecI itself for the exponential gate, log σ(vecI) for the sigmoid one.
    Both (B, NH, NC, L) in float32 (float64 for float64 gates); vecA is summed from the chunk end, never
    formed as g − b + ĩ. From a hard reset on, vecB is −∞ (the chunk's start state no longer reaches
    those tokens); vecA is −∞ for tokens before the chunk's last reset. With `return_vecB_only`, vecB alone.
    """
    chunk_size = validate_chunk_size(chunk_size, vecF.shape[-1])
    validate_gate_options(input_gate)
    vecB, vecA = chunkwise_log_gates(vecI, vecF, chunk_size, input_gate)
    return vecB if return_vecB_only else (vecB, vecA)


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
    *,
    backend: str | None = None,
):
    """xlstm_jax's `max_triton_fwbw_v5xlchunksize.mlstm_chunkwise_max_triton`, same arguments, on Pallas.

    Returns h (B, NH, S, DHHV) in `autocast_kernel_dtype`, or `(h, (c_last, n_last, m_last))` with
    `return_last_states`, as upstream. As upstream's, `chunk_size` is accepted and ignored: the chunk size is the
    measured default of `mlstm_chunkwise` (`pallas_mlstm.plan.padding_chunk_size`); pass `chunk_size` to
    `mlstm_chunkwise` to choose it. Differences: any S works; q, k and v are cast to `autocast_kernel_dtype`, the
    gates and states stay float32 (upstream casts i and the initial states too); `backend` (one of
    `pallas_mlstm.BACKENDS`, or None: triton on a GPU, xla otherwise) picks the kernels.
    """
    del chunk_size  # upstream's top level ignores it too
    validate_mlstm_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    kernel_dtype = validate_autocast_dtype(autocast_kernel_dtype)
    if kernel_dtype is not None:  # h then comes back in this dtype, as upstream's
        q, k, v = (x.astype(kernel_dtype) for x in (q, k, v))
    return mlstm_chunkwise(
        q,
        k,
        v,
        i,
        f,
        c_initial,
        n_initial,
        m_initial,
        return_last_states=return_last_states,
        eps=eps,
        backend=backend,
    )


def mlstm_recurrent_step__triton_fw(
    matC_state: jax.Array,  # (B, NH, DHQK, DHHV)
    vecN_state: jax.Array,  # (B, NH, DHQK)
    scaM_state: jax.Array,  # (B, NH, 1)
    vecQ: jax.Array,  # (B, NH, DHQK)
    vecK: jax.Array,  # (B, NH, DHQK)
    vecV: jax.Array,  # (B, NH, DHHV)
    scaI: jax.Array,  # (B, NH, 1)
    scaF: jax.Array,  # (B, NH, 1)
    matC_new: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    vecN_new: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_new: jax.Array | None = None,  # (B, NH, 1)
    qk_scale: float | None = None,
    eps: float = 1e-6,
    dtype_state=jnp.float32,
    *,
    backend: str | None = None,
):
    """The step function of xlstm_jax / mlstm_kernels' JAX decoding, same names and order, on Pallas:
    (vecH (B, NH, DHHV) in vecV's dtype, (matC, vecN, scaM) in the states' dtypes).

    The keyword call of xlstm_jax's decoding (`matC_state=..., vecQ=..., scaI=..., eps=...`) works unchanged.
    It runs `mlstm_recurrent_step` (exponential gate), so it is differentiable and takes any head dims.
    `matC_new`, `vecN_new` and `scaM_new` (upstream's output buffers) and `dtype_state` are accepted and unused:
    the new states are new arrays, and the step computes in float32. `qk_scale` must be None or DHQK^-1/2, the
    step's scale; `backend` as in `mlstm_recurrent_step`.
    """
    dhqk = getattr(vecQ, "shape", (None,))[-1]
    if qk_scale is not None and dhqk and abs(qk_scale * dhqk**0.5 - 1.0) > 1e-6:
        raise ValueError(
            f"qk_scale must be None or DHQK**-0.5 = {dhqk**-0.5:.6g}, the step's scale; got {qk_scale!r}: "
            "scale vecQ by qk_scale * DHQK**0.5 instead."
        )
    h, states = mlstm_recurrent_step(
        vecQ, vecK, vecV, scaI, scaF, matC_state, vecN_state, scaM_state, eps=eps, backend=backend
    )
    return h, tuple(new.astype(old.dtype) for new, old in zip(states, (matC_state, vecN_state, scaM_state)))
