"""The chunkwise core: six kernels chained into a forward and a backward pass, under one `Plan`.

`forward` and `backward` take a validated plan (pallas_mlstm.plan) and run its backend's launchers; nothing
here checks an option again. Upstream's `mlstm_chunkwise_fw` / `_bw` (pallas_mlstm.upstream) and the
differentiable op (pallas_mlstm.op) are built on them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_mlstm.gates import (
    chunked,
    chunkwise_log_gates,
    compute_chunkwise_reset_gates,
    input_gate_gradient,
    unchunked,
)
from pallas_mlstm.plan import Plan
from pallas_mlstm.states import States, split_states


class Inputs(NamedTuple):
    """The sequence inputs of one call: q, k (B, NH, S, DHQK), v (B, NH, S, DHHV), gates i, f (B, NH, S)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    i: jax.Array
    f: jax.Array


class ChunkStates(NamedTuple):
    """The states at every chunk boundary: c_all (B, NH, (NC+1)·DHQK, DHHV), n_all (B, NH, (NC+1)·DHQK), m_all
    (B, NH, NC+1); index 0 is the initial state."""

    c_all: jax.Array
    n_all: jax.Array
    m_all: jax.Array


class ForwardOutputs(NamedTuple):
    """What the backward reads of a forward: the chunk states (None: recompute them), the denominators
    n_out and the max states m_out (B, NH, S) (None: recompute them)."""

    chunk_states: ChunkStates | None
    n_out: jax.Array | None
    m_out: jax.Array | None


def chunk_states(plan: Plan, inputs: Inputs, initial: States) -> tuple[ChunkStates, jax.Array]:
    """The recurrent kernel's states at every chunk boundary and the last C state at full precision."""
    c_all, n_all, m_all, *c_last = plan.backend.kernels.recurrent_fw_C(
        plan.call("recurrent_fw_C"), inputs.k, inputs.v, inputs.f, inputs.i, *initial
    )
    dhqk = inputs.k.shape[-1]
    return ChunkStates(c_all, n_all, m_all), (c_last[0] if c_last else c_all[:, :, -dhqk:, :])


def last_states(states: ChunkStates, c_last: jax.Array) -> States:
    """The states after the last chunk."""
    dhqk = c_last.shape[-2]
    return States(c_last, states.n_all[:, :, -dhqk:], states.m_all[:, :, -1])


def forward(plan: Plan, inputs: Inputs, initial: States, output_dtype) -> tuple[jax.Array, ForwardOutputs, States]:
    """h (B, NH, S, DHHV) in output_dtype, what the backward reads, and the last states."""
    states, c_last = chunk_states(plan, inputs, initial)
    h, n_out, m_out = plan.backend.kernels.parallel_fw_Hintra(
        plan.call("parallel_fw_Hintra", output_dtype=output_dtype), *inputs, *states
    )
    return h, ForwardOutputs(states, n_out, m_out), last_states(states, c_last)


def _state_gradients(plan: Plan, inputs: Inputs, saved: ForwardOutputs, dh, dc_last):
    """The recurrent backward kernel: dC at every chunk boundary, <dC_k, C_k>, and dC_0 at full precision."""
    dc_states, cdc_states, *dc_first = plan.backend.kernels.recurrent_bw_dC(
        plan.call("recurrent_bw_dC"),
        inputs.q,
        inputs.f,
        saved.chunk_states.m_all,
        saved.m_out,
        dh,
        saved.n_out,
        dc_last,
        saved.chunk_states.c_all,
    )
    dhqk = inputs.q.shape[-1]
    return dc_states, cdc_states, (dc_first[0] if dc_first else dc_states[:, :, :dhqk, :])


def _input_gradients(plan: Plan, inputs: Inputs, saved: ForwardOutputs, dh, dc_states):
    """The three parallel backward kernels: dQ, dK, dV and the float32 row dots Σ_d q·dq, Σ_d k·dk."""
    chunk = plan.chunking.chunk_size
    _, vecA = chunkwise_log_gates(inputs.i, inputs.f, chunk, plan.cell.input_gate)
    vecB, vecR = compute_chunkwise_reset_gates(inputs.f, chunk)  # finite across hard resets, and where they are
    arrays = (
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.i,
        (vecA, vecB, vecR),
        saved.chunk_states,
        saved.n_out,
        saved.m_out,
        dh,
        dc_states,
    )
    kernels, dtype = plan.backend.kernels, inputs.q.dtype
    dv = kernels.parallel_bw_dV(plan.call("parallel_bw_dV", output_dtype=dtype), *arrays)
    # Σ_d k·dk and Σ_d q·dq come from the kernels' float32 accumulators: dĩ and df̃ are built from them, and
    # bf16-rounded dK / dQ would carry their rounding into df̃'s sums.
    dk_call = plan.call("parallel_bw_dK", output_dtype=dtype)
    dq_call = plan.call("parallel_bw_dQ", output_dtype=dtype)
    (dk, k_dk), (dq, q_dq) = kernels.dK_and_dQ(dk_call, dq_call, *arrays)
    return dq, dk, dv, q_dq, k_dk


def _last_n_cotangent(plan: Plan, inputs: Inputs, m_all, dn_last):
    """The n states feed only the last n state: dN_k = e^{Σ_{r>k} g_r + m_k − m_NC} dN_last for every boundary k,
    (B, NH, NC+1, DHQK), and the part of dK it adds, (B, NH, S, DHQK) float32."""
    vecB, vecA = chunkwise_log_gates(inputs.i, inputs.f, plan.chunking.chunk_size, plan.cell.input_gate)
    dtype = vecB.dtype
    scaG = vecB[..., -1]  # (B, NH, NC), −∞ for a chunk with a hard reset
    g_after = jnp.cumsum(jnp.concatenate([scaG, jnp.zeros_like(scaG[..., :1])], -1)[..., ::-1], -1)[..., ::-1]
    decay_to_last = jnp.exp(g_after + m_all - m_all[..., -1:])  # (B, NH, NC+1)
    dn_states = decay_to_last[..., None] * dn_last.astype(dtype)[:, :, None, :]
    dk_from_n = unchunked(jnp.exp(vecA - m_all[..., 1:, None])[..., None] * dn_states[:, :, 1:, None, :])
    return dn_states, dk_from_n


def _forget_gate_gradient(plan: Plan, inputs: Inputs, row_dots, cdc_states, dn_states, n_all):
    """df̃ (B, NH, S). df̃_t / σ(−f̃_t) sums the (q, k) pairs whose path crosses step t: Σ_{u≥t} (q·dq − k·dk)
    + <dC_S, C_S> + <dN_S, n_S>. It is summed to the end of t's chunk only, plus the state terms at that
    chunk's end boundary (= the pairs crossing it, end-state cotangents included), so that rounding does
    not accumulate over S."""
    q_dq, k_dk = row_dots
    boundary_terms = cdc_states[..., 1:]  # (B, NH, NC)
    if dn_states is not None:
        dhqk = inputs.q.shape[-1]
        boundary_terms += jnp.sum(dn_states[:, :, 1:] * split_states(n_all, dhqk)[:, :, 1:], axis=-1)
    per_step = chunked(q_dq - k_dk, plan.chunking.chunk_size)  # (B, NH, NC, L)
    in_chunk_suffix = jnp.cumsum(per_step[..., ::-1], axis=-1)[..., ::-1]
    df = unchunked(in_chunk_suffix + boundary_terms[..., None])
    # a hard reset (f̃ = −∞) cuts every path through it: its gradient is 0, whatever the rounding left
    return jnp.where(jnp.isneginf(inputs.f), 0.0, df * jax.nn.sigmoid(-inputs.f.astype(df.dtype)))


def _initial_state_gradients(dc_first, dn_states, initial: States, dtype) -> States:
    """The gradients of the given initial states (None for those not given). m_initial scales the true initial
    state C0·e^{m0}, n0·e^{m0}: dm0 = <dC0, C0> + <dn0, n0>."""
    dc0 = None if initial.c is None else dc_first
    dn0 = None
    if initial.n is not None:
        dn0 = jnp.zeros(initial.n.shape, dtype) if dn_states is None else dn_states[:, :, 0]
    dm0 = None
    if initial.m is not None:
        dm0 = jnp.zeros(initial.m.shape, dtype)
        if initial.c is not None:
            dm0 += jnp.sum(dc0 * initial.c.astype(dtype), axis=(-2, -1))
        if initial.n is not None:
            dm0 += jnp.sum(dn0 * initial.n.astype(dtype), axis=-1)
    return States(dc0, dn0, dm0)


def recomputed(plan: Plan, inputs: Inputs, initial: States, saved: ForwardOutputs) -> ForwardOutputs:
    """`saved` with what it lacks recomputed: the chunk states (recurrent kernel), n_out and m_out (parallel)."""
    states = saved.chunk_states
    if states is None:
        states = chunk_states(plan, inputs, initial)[0]
    n_out, m_out = saved.n_out, saved.m_out
    if n_out is None or m_out is None:
        _, n_out, m_out = plan.backend.kernels.parallel_fw_Hintra(plan.call("parallel_fw_Hintra"), *inputs, *states)
    return ForwardOutputs(states, n_out, m_out)


def backward(
    plan: Plan, inputs: Inputs, initial: States, saved: ForwardOutputs, dh, d_last: States, last_frame=None
) -> tuple[Inputs, States]:
    """The gradients of the inputs and of the initial states (None where no initial state was given).

    `d_last`: cotangents (dC, dN) of the last states (either None), stabilised by `last_frame` (B, NH), the m
    they are gradients of C·e^{−m}, n·e^{−m} in (None: the last state's own). den and m are held constant
    (docs/math.md §4). The gradient of m_initial is exact, df̃ includes the end-state terms <dC_last, C_last> +
    <dN_last, n_last>, and dN_last is propagated."""
    saved = recomputed(plan, inputs, initial, saved)
    m_all = saved.chunk_states.m_all
    dc_last, dn_last = d_last.c, d_last.n
    if last_frame is not None:  # into the frame of the last state: e^{m_NC − frame}
        rescale = jnp.exp(m_all[..., -1] - last_frame.astype(m_all.dtype))  # (B, NH)
        dc_last = None if dc_last is None else dc_last * rescale[..., None, None].astype(dc_last.dtype)
        dn_last = None if dn_last is None else dn_last * rescale[..., None].astype(dn_last.dtype)
    dc_states, cdc_states, dc_first = _state_gradients(plan, inputs, saved, dh, dc_last)
    dq, dk, dv, q_dq, k_dk = _input_gradients(plan, inputs, saved, dh, dc_states)
    dn_states = None
    if dn_last is not None:
        dn_states, dk_from_n = _last_n_cotangent(plan, inputs, m_all, dn_last)
        k_dk = k_dk + jnp.sum(inputs.k.astype(dk_from_n.dtype) * dk_from_n, axis=-1)
        dk = (dk.astype(dk_from_n.dtype) + dk_from_n).astype(dk.dtype)
    di = input_gate_gradient(k_dk, inputs.i, plan.cell.input_gate)  # k_dk: the gradient of the log input gate
    df = _forget_gate_gradient(plan, inputs, (q_dq, k_dk), cdc_states, dn_states, saved.chunk_states.n_all)
    return Inputs(dq, dk, dv, di, df), _initial_state_gradients(dc_first, dn_states, initial, di.dtype)
