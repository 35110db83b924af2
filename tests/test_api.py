"""`pallas_mlstm.mlstm_chunkwise` end to end against the recurrent oracle, for every --backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import ORACLE_TOLERANCE, kernel_and_oracle_inputs, mlstm_inputs, rel_err
from tests import flags as test_flags
from tests.helpers import case_key, plain_loss, scale_blind_loss, to_dtype

GRAD_NAMES = ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")
# (B, NH, S, DHQK, DHHV, chunk)
SHAPES = {"S64-L16": (1, 2, 64, 16, 32, 16), "S128-L32-padded": (2, 1, 128, 24, 48, 32),
          # any S: padded inside mlstm_chunkwise to a multiple of the chunk (None: the default chunk)
          "S1": (1, 2, 1, 16, 32, 16), "S17-chunk+1": (1, 2, 17, 16, 32, 16), "S37-prime": (2, 1, 37, 24, 16, None)}


def _backend_dtype_params():
    params = []
    for backend in test_flags.BACKEND.value:
        for dtype in ([jnp.float32, jnp.bfloat16, jnp.float16] if backend == "triton" else [jnp.float32]):
            params.append(pytest.param(backend, dtype, id=f"{backend}-{jnp.dtype(dtype).name}"))
    return params


def _tolerance(backend, dtype):
    """(forward, gradient) bounds against the float64 oracle (pallas_mlstm.accuracy.ORACLE_TOLERANCE)."""
    return ORACLE_TOLERANCE[backend, jnp.dtype(dtype).name]


def _skip_without_gpu(backend):
    if backend == "triton" and jax.default_backend() != "gpu":
        pytest.skip("the triton backend needs a GPU; run with --backend=triton on the GPU machine")


def _grads(loss, inputs):
    argnums = tuple(idx for idx, x in enumerate(inputs) if x is not None)
    return dict(zip([GRAD_NAMES[idx] for idx in argnums], jax.grad(loss, argnums=argnums)(*inputs)))


# S is padded before any backend runs: the slow interpreter takes one odd length (S37), xla and triton all of them
_INTERPRETER_SKIPS = ("S1", "S17-chunk+1")


def _oracle_params():
    return [pytest.param(*param.values, shape, id=f"{param.id}-{shape}") for param in _backend_dtype_params()
            for shape in SHAPES if not (param.values[0] == "interpret" and shape in _INTERPRETER_SKIPS)]


@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("backend,dtype,shape", _oracle_params())
def test_forward_last_states_and_gradients_match_oracle(backend, dtype, with_initial, shape):
    _skip_without_gpu(backend)
    batch, heads, seq_len, dhqk, dhhv, chunk = SHAPES[shape]
    fw_tol, grad_tol = _tolerance(backend, dtype)
    key = case_key("api", backend, with_initial, shape)
    with jax.enable_x64(True):
        inputs, inputs64 = kernel_and_oracle_inputs(
            mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, jnp.float64, with_initial=with_initial), dtype)
        weights_key = jax.random.fold_in(key, 7)
        oracle = lambda *a: reference.mlstm_recurrent(*a, return_last_states=True, kernel_gradient_semantics=True)
        h_ref, last_ref = oracle(*inputs64)
        grads_ref = _grads(plain_loss(oracle, weights_key, True), inputs64)
    fn = jax.jit(lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=chunk, backend=backend,
                                                         return_last_states=True))
    h, last = fn(*inputs)
    assert h.dtype == dtype and h.shape == (batch, heads, seq_len, dhhv)
    assert rel_err(h, h_ref) <= fw_tol
    for part, actual, expected in zip("cnm", last, last_ref):
        assert actual.dtype == jnp.float32
        assert rel_err(actual, expected) <= fw_tol, part
    grads = _grads(plain_loss(fn, weights_key, True), inputs)
    for name, expected in grads_ref.items():
        assert grads[name].dtype == inputs[GRAD_NAMES.index(name)].dtype
        if name == "f" and not jnp.any(expected):
            # S = 1 from a zero state: df̃ is exactly 0, a cancellation of Σ q·dq − k·dk that leaves float32
            # rounding; bound it by the scale of dĩ, which sums the same products
            assert jnp.max(jnp.abs(grads[name])) <= grad_tol * jnp.max(jnp.abs(grads["i"])), name
            continue
        assert rel_err(grads[name], expected) <= grad_tol, name


@pytest.mark.parametrize("backend,dtype", _backend_dtype_params())
def test_chunk_1024_with_initial_states(backend, dtype):
    """Chunks far above 128 (upstream's backward is wrong there for S >= 2 chunks): forward and gradients."""
    _skip_without_gpu(backend)
    batch, heads, seq_len, dhqk, dhhv, chunk = 1, 2, 2048, 16, 32, 1024
    fw_tol, grad_tol = _tolerance(backend, dtype)
    key = case_key("chunk1024", backend)
    with jax.enable_x64(True):
        # forget gates ~ +6: a memory of ~400 steps, so that the initial state still matters at the end
        inputs, inputs64 = kernel_and_oracle_inputs(mlstm_inputs(
            key, batch, heads, seq_len, dhqk, dhhv, jnp.float64, with_initial=True, fgate_shift=6.0), dtype)
        weights_key = jax.random.fold_in(key, 7)
        oracle = lambda *a: reference.mlstm_recurrent(*a, return_last_states=True, kernel_gradient_semantics=True)
        h_ref, _ = oracle(*inputs64)
        grads_ref = _grads(plain_loss(oracle, weights_key, True), inputs64)
    config = pallas_mlstm.ChunkwiseConfig(chunk_size=chunk, siz_b_L_parallel=128, siz_b_L_loop=128)
    fn = jax.jit(lambda *a: pallas_mlstm.mlstm_chunkwise(*a, backend=backend, config=config,
                                                         return_last_states=True))
    assert rel_err(fn(*inputs)[0], h_ref) <= fw_tol
    grads = _grads(plain_loss(fn, weights_key, True), inputs)
    for name, expected in grads_ref.items():
        assert rel_err(grads[name], expected) <= grad_tol, name


@pytest.mark.parametrize("backend,dtype", _backend_dtype_params())
def test_gradients_exact_for_scale_blind_loss(backend, dtype):
    """Against plain autodiff of the recurrent cell (no gradient stopped), incl. m_initial and c_last."""
    _skip_without_gpu(backend)
    batch, heads, seq_len, dhqk, dhhv, chunk = SHAPES["S64-L16"]
    key = case_key("api-blind", backend)
    with jax.enable_x64(True):
        inputs, inputs64 = kernel_and_oracle_inputs(
            mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, jnp.float64, with_initial=True), dtype)
        weights_key = jax.random.fold_in(key, 7)
        oracle = lambda *a: reference.mlstm_recurrent(*a, return_last_states=True)
        grads_ref = _grads(scale_blind_loss(oracle, weights_key, True), inputs64)
    fn = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=chunk, backend=backend, return_last_states=True)
    grads = _grads(scale_blind_loss(fn, weights_key, True), inputs)
    for name, expected in grads_ref.items():
        if name != "n_initial":  # ~0 in both: n reaches h only through the normaliser
            assert rel_err(grads[name], expected) <= _tolerance(backend, dtype)[1], name


@pytest.mark.parametrize("backend", test_flags.BACKEND.value)
def test_jit_checkpoint_and_vmap(backend):
    _skip_without_gpu(backend)
    batch, heads, seq_len, dhqk, dhhv, chunk = SHAPES["S64-L16"]
    inputs = mlstm_inputs(case_key("transforms", backend), batch, heads, seq_len, dhqk, dhhv)[:5]
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=chunk, backend=backend)
    loss = lambda *a: jnp.sum(run(*a) ** 2)
    expected = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*inputs)
    checkpointed = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3, 4)))(*inputs)
    for name, a, e in zip(GRAD_NAMES, checkpointed, expected):
        assert rel_err(a, e) <= 1e-6, name
    # vmap over an extra leading axis == a loop over it
    stacked = [jnp.stack([x, x[::-1] * 0.5 + 0.1]) for x in inputs]
    batched = jax.jit(jax.vmap(run))(*stacked)
    for index in range(2):
        assert rel_err(batched[index], run(*[x[index] for x in stacked])) <= 1e-6
    batched_grads = jax.vmap(jax.grad(loss, argnums=(0, 4)))(*stacked)
    looped = jax.grad(loss, argnums=(0, 4))(*[x[1] for x in stacked])
    for a, e in zip(batched_grads, looped):
        assert rel_err(a[1], e) <= 1e-6


def test_autocast_keeps_output_dtype_and_accuracy():
    batch, heads, seq_len, dhqk, dhhv, chunk = SHAPES["S64-L16"]
    inputs = mlstm_inputs(case_key("autocast"), batch, heads, seq_len, dhqk, dhhv)[:5]
    h32 = pallas_mlstm.mlstm_chunkwise(*inputs, chunk_size=chunk, backend="xla")
    h16 = pallas_mlstm.mlstm_chunkwise(*inputs, chunk_size=chunk, backend="xla", autocast_kernel_dtype=jnp.bfloat16)
    assert h16.dtype == jnp.float32
    q, k, v = to_dtype(inputs[:3], jnp.bfloat16)
    pre_cast = pallas_mlstm.mlstm_chunkwise(q, k, v, *inputs[3:], chunk_size=chunk, backend="xla")
    np.testing.assert_array_equal(h16, pre_cast.astype(jnp.float32))
    assert 1e-4 < rel_err(h16, h32) <= 2e-2  # really computed from bf16 operands


def test_default_backend_and_chunk_size():
    inputs = mlstm_inputs(case_key("defaults"), 1, 2, 96, 16, 16)[:5]
    expected_backend = "triton" if jax.default_backend() == "gpu" else "xla"
    assert pallas_mlstm.resolve_backend(None) == expected_backend
    h = pallas_mlstm.mlstm_chunkwise(*inputs)  # S=96: default chunk 128, S padded to 128
    np.testing.assert_allclose(h, pallas_mlstm.mlstm_chunkwise(*inputs, chunk_size=32, backend="xla"), rtol=2e-5,
                               atol=2e-5)


def _good_inputs():
    return mlstm_inputs(case_key("bad"), 1, 2, 64, 16, 32, with_initial=True)


BAD_CALLS = {
    "q rank": (lambda q, k, v, i, f, c, n, m: ((q[0], k, v, i, f), {}), "q must have rank 4"),
    "k shape": (lambda q, k, v, i, f, c, n, m: ((q, k[:, :, :32], v, i, f), {}), "k must have the shape of q"),
    "v shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v[:, :1], i, f), {}), "v must have shape"),
    "i shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i[..., :5], f), {}), "i must have shape"),
    "f rank": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f[..., None]), {}), "f must have shape"),
    "c_initial shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f, c[..., :3], n, m), {}), "c_initial must have"),
    "m without c": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f, None, None, m), {}), "without c_initial"),
    "integer q": (lambda q, k, v, i, f, c, n, m: ((q.astype(jnp.int32), k, v, i, f), {}), "q must be a floating"),
    "integer f": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f.astype(jnp.int32)), {}), "f must be a floating"),
    "S not a multiple": (lambda *a: (a[:5], dict(chunk_size=48)), "power of 2"),
    "S = 0": (lambda q, k, v, i, f, c, n, m: ((q[:, :, :0], k[:, :, :0], v[:, :, :0], i[..., :0], f[..., :0]), {}),
              "at least one step"),
    "segment_ids dtype": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f), dict(segment_ids=i[:, 0])),
                          "segment_ids must be an integer array"),
    "segment_ids shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f), dict(
        segment_ids=jnp.zeros(i.shape, jnp.int32))), r"segment_ids must have shape \(B, S\)"),
    "segment_len": (lambda *a: (a[:5], dict(chunk_size=16, segment_len=24)), "segment_len must be a positive int"),
    "chunk not int": (lambda *a: (a[:5], dict(chunk_size=16.0)), "chunk_size must be a positive int"),
    "backend": (lambda *a: (a[:5], dict(backend="cuda")), "backend must be one of"),
    "autocast": (lambda *a: (a[:5], dict(autocast_kernel_dtype=jnp.int8)), "autocast_kernel_dtype must be"),
    "eps": (lambda *a: (a[:5], dict(eps=-1.0)), "eps must be a non-negative"),
    "pallas chunk < 16": (lambda *a: (a[:5], dict(chunk_size=8, backend="interpret")), "at least 16"),
    "mixed dtypes": (lambda q, k, v, i, f, c, n, m: ((q, k, v.astype(jnp.bfloat16), i, f), {}), "share a dtype"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_value_error_naming_the_argument(case):
    make_call, message = BAD_CALLS[case]
    args, kwargs = make_call(*_good_inputs())
    with pytest.raises(ValueError, match=message):
        pallas_mlstm.mlstm_chunkwise(*args, **kwargs)


def test_reference_validates_too():
    q, k, v, i, f, *_ = _good_inputs()
    with pytest.raises(ValueError, match="multiple of chunk_size_intra"):
        pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, chunk_size_intra=128, backend="xla")
    with pytest.raises(ValueError, match="q must have rank 4"):
        reference.mlstm_recurrent(q[0], k, v, i, f)


def test_any_sequence_length_and_chunk():
    """S = 40 runs on every backend, with the default chunk or one longer than S, as the xla backend at chunk 8
    (a divisor of 40, no padding) computes it; the per-kernel functions keep upstream's rule."""
    inputs = mlstm_inputs(case_key("odd-S"), 1, 1, 40, 16, 16)[:5]
    expected = pallas_mlstm.mlstm_chunkwise(*inputs, backend="xla", chunk_size=8)
    for backend, chunk in (("interpret", None), ("interpret", 64), ("xla", None), ("xla", 16)):
        h = pallas_mlstm.mlstm_chunkwise(*inputs, backend=backend, chunk_size=chunk)
        assert h.shape == (1, 1, 40, 16)
        assert rel_err(h, expected) <= 1e-5, (backend, chunk)
    with pytest.raises(ValueError, match="multiple of chunk_size_intra=16"):
        pallas_mlstm.mlstm_chunkwise_fw(*inputs, chunk_size_intra=16, backend="xla")


def test_states_kept_for_the_backward_by_default_on_one_device():
    """recompute_states_in_bw=None (the default) keeps the chunk states on one device: the backward runs the
    recurrent forward kernel no second time, as with False; True runs it again. Gradients agree."""
    if jax.device_count() != 1:
        pytest.skip("the default keeps states where the sequence axis is known to be whole: one device here")
    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(7), 1, 2, 64, 16, 16, jnp.float32)
    grads, launches = {}, {}
    for recompute in (None, False, True):
        loss = lambda *x, recompute=recompute: jnp.sum(pallas_mlstm.mlstm_chunkwise(
            *x, backend="interpret", chunk_size=16, recompute_states_in_bw=recompute) ** 2)
        grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
        launches[recompute] = str(jax.make_jaxpr(grad)(q, k, v, i, f)).count("mlstm_chunkwise__recurrent_fw_C")
        grads[recompute] = grad(q, k, v, i, f)
    assert launches[None] == launches[False] > 0 and launches[True] == 2 * launches[False]
    for recompute in (None, True):
        for a, b in zip(grads[recompute], grads[False]):
            assert rel_err(a, b) <= 1e-6
