"""Decoding: `mlstm_recurrent_step` against the recurrent oracle, and prefill + steps against one chunkwise call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import mlstm_inputs, rel_err
from tests import flags as test_flags
from tests.helpers import case_key

B, NH, DHQK, DHHV = 2, 2, 24, 40  # head dims that are not powers of 2: the kernel pads them


def _backends():
    return list(test_flags.BACKEND.value)


def _skip_without_gpu(backend):
    if backend == "triton" and jax.default_backend() != "gpu":
        pytest.skip("the triton backend needs a GPU; run with --backend=triton on the GPU machine")


@pytest.mark.parametrize("prompt_len", [37, 64])
@pytest.mark.parametrize("backend", _backends())
def test_prefill_then_steps_equals_one_call(backend, prompt_len):
    """mlstm_chunkwise over a prompt (odd length too) and 9 steps in a jitted lax.scan equal mlstm_chunkwise over
    prompt + 9 tokens (float32, 1e-5), and each step's states are the oracle's."""
    _skip_without_gpu(backend)
    steps = 9
    q, k, v, i, f, *_ = mlstm_inputs(case_key("decoding", backend, prompt_len), B, NH, prompt_len + steps, DHQK, DHHV,
                                     jnp.float32)
    whole = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend=backend)
    prompt = lambda x: x[:, :, :prompt_len]
    _, states = pallas_mlstm.mlstm_chunkwise(*map(prompt, (q, k, v, i, f)), chunk_size=16, backend=backend,
                                             return_last_states=True)

    @jax.jit
    def generate(states, tokens):
        def step(states, token):
            h, states = pallas_mlstm.mlstm_recurrent_step(*token, *states, backend=backend)
            return states, h
        return jax.lax.scan(step, states, tokens)

    tokens = tuple(jnp.moveaxis(x[:, :, prompt_len:], 2, 0) for x in (q, k, v, i, f))  # (steps, B, NH, ...)
    last_states, h_steps = generate(states, tokens)
    assert rel_err(jnp.moveaxis(h_steps, 0, 2), whole[:, :, prompt_len:]) <= 1e-5
    _, last_ref = reference.mlstm_recurrent(q, k, v, i, f, return_last_states=True)
    true = lambda c, n, m: (c * jnp.exp(m)[..., None, None], n * jnp.exp(m)[..., None])  # without the stabiliser
    for actual, expected in zip(true(*last_states), true(*last_ref)):
        assert rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize("backend", _backends())
def test_step_shapes_dtypes_and_extreme_gates(backend):
    """bf16 q, k, v give bf16 h and float32 states; gates and m as (B, NH, 1) come back so; a reset (f̃ = −∞)
    and a silent token (ĩ = −∞) match the oracle; the xla twin matches the kernel."""
    _skip_without_gpu(backend)
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("step", backend), B, NH, 1, DHQK, DHHV, jnp.float32,
                                             with_initial=True)
    i = i.at[0, 0, 0].set(-jnp.inf)
    f = f.at[1, 1, 0].set(-jnp.inf)
    token = lambda x: x[:, :, 0]
    h_ref, states_ref = reference.mlstm_recurrent(q, k, v, i, f, c0, n0, m0, return_last_states=True)
    h, states = pallas_mlstm.mlstm_recurrent_step(*map(token, (q, k, v)), i, f, c0, n0, m0[..., None],
                                                  backend=backend)
    assert h.dtype == jnp.float32 and states[2].shape == (B, NH, 1)
    assert rel_err(h, h_ref[:, :, 0]) <= 1e-5
    for actual, expected in zip(states[:2], states_ref[:2]):  # same stabiliser here: one step from m0
        assert rel_err(actual, expected) <= 1e-5
    h16, states16 = pallas_mlstm.mlstm_recurrent_step(*(token(x).astype(jnp.bfloat16) for x in (q, k, v)),
                                                      token(i), token(f), c0, n0, m0, backend=backend)
    assert h16.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in states16)
    twin = pallas_mlstm.mlstm_recurrent_step(*(token(x).astype(jnp.bfloat16) for x in (q, k, v)), token(i),
                                             token(f), c0, n0, m0, backend="xla")
    for actual, expected in zip(jax.tree.leaves((h16, states16)), jax.tree.leaves(twin)):
        assert rel_err(actual, expected) <= 1e-2


BAD_STEPS = {
    "q rank": (lambda q, k, v, i, f, c, n, m: (q[:, :, None], k, v, i, f, c, n, m), "q must have shape"),
    "c shape": (lambda q, k, v, i, f, c, n, m: (q, k, v, i, f, c[..., :3], n, m), "c must have shape"),
    "n shape": (lambda q, k, v, i, f, c, n, m: (q, k, v, i, f, c, n[:1], m), "n must have shape"),
    "m shape": (lambda q, k, v, i, f, c, n, m: (q, k, v, i, f, c, n, m[:, :1]), "m must have shape"),
    "f shape": (lambda q, k, v, i, f, c, n, m: (q, k, v, i, f[..., None, None], c, n, m), "f must have shape"),
}


@pytest.mark.parametrize("case", BAD_STEPS)
def test_bad_step_inputs_raise_value_error(case):
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("bad-step"), B, NH, 1, DHQK, DHHV, jnp.float32,
                                             with_initial=True)
    make, message = BAD_STEPS[case]
    args = make(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], c0, n0, m0)
    with pytest.raises(ValueError, match=message):
        pallas_mlstm.mlstm_recurrent_step(*args, backend="xla")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", _backends())
def test_sigmoid_prefill_then_steps_equals_one_call(backend, normalize):
    """mLSTMsig: a chunkwise prefill of 37 tokens and 9 steps equal one call (float32, 1e-5); the states are (c, n)
    and the oracle's; m is refused with the sigmoid gate and required with the exponential one."""
    _skip_without_gpu(backend)
    prompt_len, steps = 37, 9
    q, k, v, i, f, *_ = mlstm_inputs(case_key("decoding-sigmoid", backend, normalize), B, NH, prompt_len + steps, DHQK,
                                     DHHV, jnp.float32)
    cell = dict(input_gate="sigmoid", normalize=normalize, backend=backend)
    whole = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, **cell)
    _, states = pallas_mlstm.mlstm_chunkwise(*(x[:, :, :prompt_len] for x in (q, k, v, i, f)), chunk_size=16,
                                             return_last_states=True, **cell)

    @jax.jit
    def generate(states, tokens):
        def step(states, token):
            h, states = pallas_mlstm.mlstm_recurrent_step(*token, *states, **cell)
            return states, h
        return jax.lax.scan(step, states, tokens)

    tokens = tuple(jnp.moveaxis(x[:, :, prompt_len:], 2, 0) for x in (q, k, v, i, f))  # (steps, B, NH, ...)
    last_states, h_steps = generate(states, tokens)
    assert rel_err(jnp.moveaxis(h_steps, 0, 2), whole[:, :, prompt_len:]) <= 1e-5
    _, last_ref = reference.mlstm_sigmoid_recurrent(q, k, v, i, f, normalize=normalize, return_last_states=True)
    assert len(last_states) == 2
    for actual, expected in zip(last_states, last_ref):
        assert rel_err(actual, expected) <= 1e-5
    token = tuple(x[0] for x in tokens)
    with pytest.raises(ValueError, match="m is not a state of the sigmoid input gate"):
        pallas_mlstm.mlstm_recurrent_step(*token, *last_states, jnp.zeros((B, NH)), **cell)
    with pytest.raises(ValueError, match="m .* is required with the exponential input gate"):
        pallas_mlstm.mlstm_recurrent_step(*token, *last_states, backend=backend)
