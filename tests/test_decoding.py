"""Decoding: `mlstm_recurrent_step` against the recurrent oracle, and prefill + steps against one chunkwise call,
for both cells (bad step inputs: tests/test_inputs.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import ORACLE_TOLERANCE, rel_err
from tests import flags as test_flags
from tests.helpers import case_key, grid, mlstm_inputs, skip_unless_available

B, NH, DHQK, DHHV = 2, 2, 24, 40  # head dims that are not powers of 2: the kernel pads them


def _backends():
    return list(test_flags.BACKEND.value)


# The cell: mLSTMexp (states (c, n, m)) or mLSTMsig (states (c, n), with or without the normaliser)
CELLS = {
    "exponential": dict(),
    "sigmoid": dict(input_gate="sigmoid"),
    "sigmoid-unnormalized": dict(input_gate="sigmoid", normalize=False),
}


def _prefill_params():
    """(backend, cell, prompt_len): the exponential cell after a prompt of odd length and of whole chunks, the
    sigmoid cells after the odd one. The interpreter, whose step kernel starts from the prefill's states alike
    after either prompt, takes the odd one only."""
    return [
        pytest.param(backend, cell, prompt_len, id=f"{backend}-{cell}-prompt{prompt_len}")
        for backend in _backends()
        for cell in CELLS
        for prompt_len in ((37, 64) if cell == "exponential" and grid(backend) != "interpret" else (37,))
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
    skip_unless_available(backend)
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
    skip_unless_available(backend)
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


LAYERS, WIDTH = 3, DHHV  # a layer stack whose residual stream has the width of v


def _layer_stack(step):
    """A stack of LAYERS decoding layers in one jax.lax.scan: each projects the residual stream x (B, WIDTH) into
    q, k, v and the gates with its own weights, runs `step(q, k, v, i, f, c, n, m)` from its own states and adds
    the head-mean of h to x. Returns loss(params, states, x) -> (scalar, (final x, new states))."""

    def layer(x, scanned):
        (w_q, w_k, w_v, w_gates), (c, n, m) = scanned  # (WIDTH, NH·DHQK) ×2, (WIDTH, NH·DHHV), (WIDTH, 2·NH)
        q, k = ((x @ w).reshape(B, NH, DHQK) for w in (w_q, w_k))  # (B, NH, DHQK)
        v = (x @ w_v).reshape(B, NH, DHHV)  # (B, NH, DHHV)
        i, f = jnp.split(x @ w_gates, 2, axis=-1)  # (B, NH) each
        h, states = step(q, k, v, i, f, c, n, m)  # h (B, NH, DHHV)
        return x + h.mean(axis=1), states

    def loss(params, states, x):
        x, new_states = jax.lax.scan(layer, x, (params, states))
        return jnp.sum(jnp.sin(x)), (x, new_states)

    return loss


def _oracle_step(q, k, v, i, f, c, n, m):
    """One token of the float32 recurrent oracle, in the step's shapes."""
    token = lambda x: x[:, :, None]
    h, states = reference.mlstm_recurrent(*map(token, (q, k, v, i, f)), c, n, m, return_last_states=True)
    return h[:, :, 0], states


@pytest.mark.parametrize("backend", _backends())
def test_step_differentiable_in_a_scanned_layer_stack(backend):
    """mlstm_recurrent_step inside a jax.lax.scan over layers with per-layer weights and states, under jit: the
    values, jax.grad (weights and states) and jax.jvp equal the same stack built on the float64 recurrent oracle
    (from the same float32 values), within the backend's float32 bound against the oracle (ORACLE_TOLERANCE). The
    layers' projections run at full float32 precision (a GPU's default is TF32, ~1e-4 off on an H100)."""
    skip_unless_available(backend)
    with jax.default_matmul_precision("float32"):
        _check_scanned_layer_stack(backend)


def _check_scanned_layer_stack(backend):
    keys = jax.random.split(case_key("scanned-stack", backend), 8)
    init = lambda key, shape, scale: scale * jax.random.normal(key, (LAYERS, *shape), jnp.float32)
    params = (
        init(keys[0], (WIDTH, NH * DHQK), 0.3),
        init(keys[1], (WIDTH, NH * DHQK), 0.3),
        init(keys[2], (WIDTH, NH * DHHV), 0.3),
        init(keys[3], (WIDTH, 2 * NH), 1.0),
    )
    states = (
        init(keys[4], (B, NH, DHQK, DHHV), 0.5),
        init(keys[5], (B, NH, DHQK), 0.5),
        init(keys[6], (B, NH), 1.0),
    )
    x = jax.random.normal(keys[7], (B, WIDTH), jnp.float32)
    tangents = jax.tree.map(lambda a: jnp.cos(a), (params, states, x))
    ours = _layer_stack(functools.partial(pallas_mlstm.mlstm_recurrent_step, backend=backend))
    oracle = _layer_stack(_oracle_step)

    def run(loss, arrays, tangents):
        """(final stream and states, gradients of weights and states, jvp of the final stream and states), each
        one compiled program: the final values, not the scalar loss (a sum of terms of both signs, whose relative
        error can exceed the bound when the terms agree to 1e-7)."""
        values = jax.jit(lambda *a: loss(*a)[1])(*arrays)
        grads = jax.jit(jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2)))(*arrays)
        jvp = jax.jit(lambda a, t: jax.jvp(lambda *b: loss(*b)[1], a, t))(arrays, tangents)
        return values, grads, jvp

    got = run(ours, (params, states, x), tangents)
    with jax.enable_x64(True):
        wide = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
        expected = run(oracle, wide((params, states, x)), wide(tangents))
        expected = jax.tree.map(np.asarray, expected)
    value_bound, gradient_bound = ORACLE_TOLERANCE[(backend, "float32")]
    bounds = (value_bound, gradient_bound, value_bound)
    for part, bound, ours_part, oracle_part in zip(("values", "gradients", "jvp"), bounds, got, expected):
        for leaf, (a, e) in enumerate(zip(jax.tree.leaves(ours_part), jax.tree.leaves(oracle_part))):
            assert rel_err(a, e) <= bound, f"{part}, leaf {leaf}: rel err {rel_err(a, e):.2e}"


def test_xla_step_takes_the_calls_qk_scale_as_the_step_kernel():
    """The XLA backend's step (the jnp twin) scales q by `KernelCall.qk_scale` where one is given, as the Triton
    step kernel does (interpreted here), rather than by DHQK^-1/2."""
    from pallas_mlstm import xla_kernels
    from pallas_mlstm.kernel_call import KernelCall
    from pallas_mlstm.pallas_triton import recurrent_step as triton_step  # the launcher

    keys = jax.random.split(jax.random.key(3), 6)
    q, k = (jax.random.normal(key, (B, NH, DHQK), jnp.float32) for key in keys[:2])
    v = jax.random.normal(keys[2], (B, NH, DHHV), jnp.float32)
    i, f = (jax.random.normal(key, (B, NH), jnp.float32) for key in keys[3:5])
    c = jax.random.normal(keys[5], (B, NH, DHQK, DHHV), jnp.float32)
    n, m = jnp.ones((B, NH, DHQK), jnp.float32), jnp.zeros((B, NH), jnp.float32)
    scaled, unscaled = (KernelCall(chunk_size=1, qk_scale=s, eps=1e-6, interpret=True) for s in (0.3, None))
    kernel_h, _ = triton_step(scaled, q, k, v, i, f, c, n, m)
    twin_h, _ = xla_kernels.recurrent_step(scaled, q, k, v, i, f, c, n, m)
    default_h, _ = xla_kernels.recurrent_step(unscaled, q, k, v, i, f, c, n, m)
    bound, _ = ORACLE_TOLERANCE[("interpret", "float32")]
    assert rel_err(twin_h, kernel_h) < bound
    assert rel_err(default_h, kernel_h) > 1e-2  # the scale matters here: the check above can fail
