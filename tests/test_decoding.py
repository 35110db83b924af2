"""Decoding: `mlstm_recurrent_step` against the recurrent oracle, and prefill + steps against one chunkwise call,
for both cells (bad step inputs: tests/test_inputs.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import rel_err
from tests import flags as test_flags
from tests.helpers import case_key, mlstm_inputs

B, NH, DHQK, DHHV = 2, 2, 24, 40  # head dims that are not powers of 2: the kernel pads them


def _backends():
    return list(test_flags.BACKEND.value)


def _skip_without_gpu(backend):
    if backend == "triton" and jax.default_backend() != "gpu":
        pytest.skip("the triton backend needs a GPU; run with --backend=triton on the GPU machine")


# The cell: mLSTMexp (states (c, n, m)) or mLSTMsig (states (c, n), with or without the normaliser)
CELLS = {
    "exponential": dict(),
    "sigmoid": dict(input_gate="sigmoid"),
    "sigmoid-unnormalized": dict(input_gate="sigmoid", normalize=False),
}


def _prefill_params():
    """(backend, cell, prompt_len): the exponential cell after a prompt of odd length and of whole chunks, the
    sigmoid cells after the odd one."""
    return [
        pytest.param(backend, cell, prompt_len, id=f"{backend}-{cell}-prompt{prompt_len}")
        for backend in _backends()
        for cell in CELLS
        for prompt_len in ((37, 64) if cell == "exponential" else (37,))
    ]


def _true_states(states, cell):
    """The states without the max stabiliser (C·e^m, n·e^m) of the exponential cell; the sigmoid cell's (c, n)."""
    if cell != "exponential":
        return tuple(states)
    c, n, m = states
    return c * jnp.exp(m)[..., None, None], n * jnp.exp(m)[..., None]


@pytest.mark.parametrize("backend,cell,prompt_len", _prefill_params())
def test_prefill_then_steps_equals_one_call(backend, cell, prompt_len):
    """mlstm_chunkwise over a prompt (odd length too) and 9 steps in a jitted lax.scan equal mlstm_chunkwise over
    prompt + 9 tokens (float32, 1e-5), and the last states are the oracle's ((c, n) for the sigmoid gate)."""
    _skip_without_gpu(backend)
    steps = 9
    key = case_key("decoding", backend, prompt_len) if cell == "exponential" else case_key("decoding", backend, cell)
    q, k, v, i, f, *_ = mlstm_inputs(key, B, NH, prompt_len + steps, DHQK, DHHV, jnp.float32)
    options = dict(backend=backend, **CELLS[cell])
    whole = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, **options)
    prompt = lambda x: x[:, :, :prompt_len]
    _, states = pallas_mlstm.mlstm_chunkwise(
        *map(prompt, (q, k, v, i, f)), chunk_size=16, return_last_states=True, **options
    )

    @jax.jit
    def generate(states, tokens):
        def step(states, token):
            h, states = pallas_mlstm.mlstm_recurrent_step(*token, *states, **options)
            return states, h

        return jax.lax.scan(step, states, tokens)

    tokens = tuple(jnp.moveaxis(x[:, :, prompt_len:], 2, 0) for x in (q, k, v, i, f))  # (steps, B, NH, ...)
    last_states, h_steps = generate(states, tokens)
    assert rel_err(jnp.moveaxis(h_steps, 0, 2), whole[:, :, prompt_len:]) <= 1e-5
    if cell == "exponential":
        _, last_ref = reference.mlstm_recurrent(q, k, v, i, f, return_last_states=True)
    else:
        normalize = CELLS[cell].get("normalize", True)
        _, last_ref = reference.mlstm_sigmoid_recurrent(q, k, v, i, f, normalize=normalize, return_last_states=True)
    assert len(last_states) == len(last_ref) == (3 if cell == "exponential" else 2)
    for actual, expected in zip(_true_states(last_states, cell), _true_states(last_ref, cell)):
        assert rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize("backend", _backends())
def test_step_shapes_dtypes_and_extreme_gates(backend):
    """bf16 q, k, v give bf16 h and float32 states; gates and m as (B, NH, 1) come back so; a reset (f̃ = −∞)
    and a silent token (ĩ = −∞) match the oracle; the xla twin matches the kernel."""
    _skip_without_gpu(backend)
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(
        case_key("step", backend), B, NH, 1, DHQK, DHHV, jnp.float32, with_initial=True
    )
    i = i.at[0, 0, 0].set(-jnp.inf)
    f = f.at[1, 1, 0].set(-jnp.inf)
    token = lambda x: x[:, :, 0]
    h_ref, states_ref = reference.mlstm_recurrent(q, k, v, i, f, c0, n0, m0, return_last_states=True)
    h, states = pallas_mlstm.mlstm_recurrent_step(*map(token, (q, k, v)), i, f, c0, n0, m0[..., None], backend=backend)
    assert h.dtype == jnp.float32 and states[2].shape == (B, NH, 1)
    assert rel_err(h, h_ref[:, :, 0]) <= 1e-5
    for actual, expected in zip(states[:2], states_ref[:2]):  # same stabiliser here: one step from m0
        assert rel_err(actual, expected) <= 1e-5
    h16, states16 = pallas_mlstm.mlstm_recurrent_step(
        *(token(x).astype(jnp.bfloat16) for x in (q, k, v)), token(i), token(f), c0, n0, m0, backend=backend
    )
    assert h16.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in states16)
    twin = pallas_mlstm.mlstm_recurrent_step(
        *(token(x).astype(jnp.bfloat16) for x in (q, k, v)), token(i), token(f), c0, n0, m0, backend="xla"
    )
    for actual, expected in zip(jax.tree.leaves((h16, states16)), jax.tree.leaves(twin)):
        assert rel_err(actual, expected) <= 1e-2
