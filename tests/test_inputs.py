"""Input rules. Accepted: gates of any float dtype, empty batches, NumPy ints, c_initial alone. Refused with a
ValueError that names the argument: one table of bad calls of `mlstm_chunkwise` (shapes, dtypes, options, the
cell's options, segment_len), of the upstream-compatible `mlstm_chunkwise_fw` and of `mlstm_recurrent_step`; a
missing GPU; the transformations that are not supported (forward mode, second derivatives)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import rel_err
from tests.helpers import case_key, mlstm_inputs

_NO_GPU = jax.default_backend() != "gpu"
# The rules of this file hold before any backend runs (mlstm_chunkwise casts the gates and states, answers an empty
# batch and refuses forward mode and second derivatives in front of the kernels, whichever they are): the xla
# backend checks them for all.
BACKEND = "xla"


@pytest.mark.parametrize("gate_dtype", ["float64", "bfloat16", "float16"])
def test_gates_of_any_float_dtype_are_computed_in_float32(gate_dtype):
    backend = BACKEND
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("gate-dtypes", backend), 1, 2, 64, 16, 32, with_initial=True)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend=backend, return_last_states=True)
    with jax.enable_x64(True):
        i_cast, f_cast, c_cast, n_cast, m_cast = (x.astype(gate_dtype) for x in (i, f, c0, n0, m0))
        h, (c, n, m) = jax.jit(run)(q, k, v, i_cast, f_cast, c_cast, n_cast, m_cast)
        grads = jax.grad(lambda i, f: jnp.sum(run(q, k, v, i, f)[0].astype(jnp.float32)), argnums=(0, 1))(
            i_cast, f_cast
        )
    # the same as float32 gates holding the same values
    expected_h, expected_last = run(q, k, v, *(x.astype(jnp.float32) for x in (i_cast, f_cast, c_cast, n_cast, m_cast)))
    assert h.dtype == jnp.bfloat16 and c.dtype == n.dtype == m.dtype == jnp.float32
    assert rel_err(h, expected_h) == 0.0
    assert all(rel_err(a, e) == 0.0 for a, e in zip((c, n, m), expected_last))
    assert grads[0].dtype == grads[1].dtype == jnp.dtype(gate_dtype)  # gradients come back in the gates' dtype
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)


@pytest.mark.parametrize("batch,heads", [(0, 2), (2, 0)])
def test_empty_batch_or_heads_give_empty_outputs(batch, heads):
    backend = BACKEND
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("empty"), batch, heads, 32, 16, 24, with_initial=True)
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend=backend, return_last_states=True)
    h, (c, n, m) = jax.jit(run)(q, k, v, i, f, c0, n0, m0)
    assert h.shape == (batch, heads, 32, 24) and h.dtype == q.dtype
    assert (c.shape, n.shape, m.shape) == ((batch, heads, 16, 24), (batch, heads, 16), (batch, heads))
    grads = jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=tuple(range(8)))(q, k, v, i, f, c0, n0, m0)
    assert [g.shape for g in grads] == [x.shape for x in (q, k, v, i, f, c0, n0, m0)]


def test_numpy_integer_chunk_size_is_accepted():
    q, k, v, i, f, *_ = mlstm_inputs(case_key("np-chunk"), 1, 2, 64, 16, 16)
    expected = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="xla")
    for chunk in (np.int64(16), np.int32(16)):
        np.testing.assert_array_equal(
            pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk, backend="xla"), expected
        )
    assert pallas_mlstm.ChunkwiseConfig(chunk_size=np.int64(16)).chunk_size == 16


def test_c_initial_alone_means_zero_n_and_m():
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("c-alone"), 1, 2, 64, 16, 16, with_initial=True)
    alone = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, c0, chunk_size=16, backend="xla")
    zeros = pallas_mlstm.mlstm_chunkwise(
        q, k, v, i, f, c0, jnp.zeros_like(n0), jnp.zeros_like(m0), chunk_size=16, backend="xla"
    )
    np.testing.assert_array_equal(alone, zeros)


@pytest.mark.skipif(not _NO_GPU, reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("operand", ["k", "v"])
def test_a_nan_in_k_or_v_reaches_back_to_its_chunk_start_only(operand):
    """The documented reach of a NaN at step t in k or v: h is NaN from the start of t's chunk on (one matmul per
    chunk), and exactly the clean h before that chunk."""
    chunk, t = 16, 40
    q, k, v, i, f, *_ = mlstm_inputs(case_key("nan-input", operand), 1, 2, 64, 16, 16)
    operands = dict(k=k, v=v)
    clean = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk, backend=BACKEND)
    operands[operand] = operands[operand].at[:, :, t].set(jnp.nan)
    h = pallas_mlstm.mlstm_chunkwise(q, operands["k"], operands["v"], i, f, chunk_size=chunk, backend=BACKEND)
    chunk_start = t // chunk * chunk
    np.testing.assert_array_equal(h[:, :, :chunk_start], clean[:, :, :chunk_start])
    assert bool(jnp.all(jnp.isnan(h[:, :, chunk_start:])))


def test_triton_backend_without_a_gpu_names_the_alternatives():
    q, k, v, i, f, *_ = mlstm_inputs(case_key("no-gpu"), 1, 1, 32, 16, 16)
    with pytest.raises(ValueError, match="backend='xla'.*backend='interpret'"):
        pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, backend="triton")
    with pytest.raises(ValueError, match="backend='xla'"):
        pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, backend="triton")


@pytest.mark.skipif(not _NO_GPU, reason="checks the error on a machine without a GPU")
def test_kernel_compiled_without_a_gpu_says_interpret_true():
    q, k, v, i, f, *_ = mlstm_inputs(case_key("no-gpu-kernel"), 1, 1, 32, 16, 16)
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_mlstm.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, chunk_size=16)
    states = pallas_mlstm.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, chunk_size=16, interpret=True)
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_mlstm.mlstm_chunkwise__parallel_fw_Hintra(q, k, v, i, f, *states, chunk_size=16)


def test_forward_mode_and_second_derivatives_are_refused_clearly():
    backend = BACKEND
    q, k, v, i, f, *_ = mlstm_inputs(case_key("higher-order"), 1, 1, 32, 16, 16)
    loss = lambda q: jnp.sum(pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend=backend) ** 2)
    with pytest.raises(ValueError, match="forward-mode differentiation.*not supported"):
        jax.jacfwd(loss)(q)
    with pytest.raises(ValueError, match="forward-mode differentiation.*not supported"):
        jax.jvp(loss, (q,), (q,))
    with pytest.raises(ValueError, match="second derivative.*not supported"):
        jax.grad(lambda q: jnp.sum(jax.grad(loss)(q) ** 2))(q)
    assert jax.grad(loss)(q).shape == q.shape  # first order still works


# --- bad calls ---------------------------------------------------------------------------------------------


def _good_inputs():
    return mlstm_inputs(case_key("bad"), 1, 2, 64, 16, 32, with_initial=True)


_BAD_EPS = {"-1": -1.0, "inf": float("inf"), "nan": float("nan"), "str": "x", "array": jnp.ones(2)}
_SEGMENT_LEN_MESSAGE = "segment_len must be a positive int that is a multiple of chunk_size=16"
# make_call(q, k, v, i, f, c, n, m) -> (args, kwargs) of a call of mlstm_chunkwise; a phrase of its ValueError
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
    "S = 0": (
        lambda q, k, v, i, f, c, n, m: ((q[:, :, :0], k[:, :, :0], v[:, :, :0], i[..., :0], f[..., :0]), {}),
        "at least one step",
    ),
    "segment_ids dtype": (
        lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f), dict(segment_ids=i[:, 0])),
        "segment_ids must be an integer array",
    ),
    "segment_ids shape": (
        lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f), dict(segment_ids=jnp.zeros(i.shape, jnp.int32))),
        r"segment_ids must have shape \(B, S\)",
    ),
    # segment_len (S = 64, chunk 16): not a multiple of the chunk, not dividing S, not positive, longer than S,
    # not an int
    **{
        f"segment_len={value!r}": (
            lambda *a, value=value: (a[:5], dict(chunk_size=16, segment_len=value)),
            _SEGMENT_LEN_MESSAGE,
        )
        for value in (40, 48, 0, -64, 512, 64.0, True, "64")
    },
    "chunk not int": (lambda *a: (a[:5], dict(chunk_size=16.0)), "chunk_size must be a positive int"),
    "q a list": (lambda q, *a: ((q.tolist(), *a[:4]), {}), r"q must be an array .* got a list: pass jnp.asarray\(q\)"),
    "backend": (lambda *a: (a[:5], dict(backend="cuda")), "backend must be one of"),
    "autocast": (lambda *a: (a[:5], dict(autocast_kernel_dtype=jnp.int8)), "autocast_kernel_dtype must be"),
    # the options: one rule each, checked once (eps: the step's rule too, BAD_STEPS)
    **{
        f"eps={name}": (lambda *a, value=value: (a[:5], dict(eps=value)), "eps must be a non-negative finite float")
        for name, value in _BAD_EPS.items()
    },
    "return_last_states": (
        lambda *a: (a[:5], dict(return_last_states="no")),
        r"return_last_states must be a bool \(True or False\)",
    ),
    "allow_tf32": (lambda *a: (a[:5], dict(allow_tf32="no")), r"allow_tf32 must be a bool \(True or False\)"),
    "recompute_states_in_bw": (
        lambda *a: (a[:5], dict(recompute_states_in_bw="x")),
        r"recompute_states_in_bw must be a bool \(True, False or None\)",
    ),
    "pallas chunk < 16": (lambda *a: (a[:5], dict(chunk_size=8, backend="interpret")), "at least 16"),
    "mixed dtypes": (lambda q, k, v, i, f, c, n, m: ((q, k, v.astype(jnp.bfloat16), i, f), {}), "share a dtype"),
    # the cell's options (the sigmoid gate's states are (c, n))
    "m_initial with sigmoid": (
        lambda *a: (a, dict(input_gate="sigmoid", backend="xla")),
        "m_initial is not a state of the sigmoid",
    ),
    "normalize with exponential": (
        lambda *a: (a[:7], dict(normalize=False, backend="xla")),
        "normalize=False needs input_gate='sigmoid'",
    ),
    "unknown gate": (lambda *a: (a[:7], dict(input_gate="sigmod", backend="xla")), "input_gate must be one of"),
    "normalize not bool": (
        lambda *a: (a[:7], dict(input_gate="sigmoid", normalize="no", backend="xla")),
        "normalize must be a bool",
    ),
}
# the upstream-compatible orchestration checks the cell's options as the op does
_CELL_OPTION_CASES = ("normalize with exponential", "unknown gate", "normalize not bool")


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_value_error_naming_the_argument(case):
    make_call, message = BAD_CALLS[case]
    args, kwargs = make_call(*_good_inputs())
    with pytest.raises(ValueError, match=message):
        pallas_mlstm.mlstm_chunkwise(*args, **kwargs)


@pytest.mark.parametrize("case", _CELL_OPTION_CASES)
def test_fw_refuses_bad_cell_options(case):
    make_call, message = BAD_CALLS[case]
    args, kwargs = make_call(*_good_inputs())
    cell = {key: value for key, value in kwargs.items() if key in ("input_gate", "normalize")}
    with pytest.raises(ValueError, match=message):
        pallas_mlstm.mlstm_chunkwise_fw(*args[:5], chunk_size_intra=16, backend="xla", **cell)


def test_chunk_size_must_be_static():
    q, k, v, i, f, *_ = mlstm_inputs(case_key("lists"), 1, 1, 16, 8, 8)
    with pytest.raises(ValueError, match="chunk_size must be a static Python int"):
        jax.jit(lambda q, c: pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, backend="xla", chunk_size=c))(q, 16)


@pytest.mark.parametrize("eps", [np.float32(1e-6), jnp.array(1e-6), np.float64(0.0), 0, 1e-3])
def test_eps_accepts_any_finite_non_negative_real_scalar(eps):
    q, k, v, i, f, *_ = mlstm_inputs(case_key("eps"), 1, 1, 16, 8, 8)
    assert jnp.all(jnp.isfinite(pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, backend="xla", eps=eps)))


def test_fw_and_reference_validate_too():
    """The per-kernel orchestration keeps upstream's rule (S a multiple of the chunk: mlstm_chunkwise pads
    instead, tests/test_api.py), and the oracles check their inputs."""
    q, k, v, i, f, *_ = mlstm_inputs(case_key("odd-S"), 1, 1, 40, 16, 16)
    with pytest.raises(ValueError, match="multiple of chunk_size_intra=16"):
        pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, chunk_size_intra=16, backend="xla")
    with pytest.raises(ValueError, match="q must have rank 4"):
        reference.mlstm_recurrent(q[0], k, v, i, f)


# make(q, k, v, i, f, c, n, m) -> (args, kwargs) of a call of upstream's mlstm_chunkwise_fw and of _bw (with
# matDeltaH); its arrays and options follow the op's rules, named as upstream names them
BAD_UPSTREAM_CALLS = {
    "matK shape": (lambda q, k, *a: ((q, k[:, :, :32], *a[:3]), {}), "matK must have the shape of matQ"),
    "matC_initial shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f, c[..., :3], n, m), {}), "matC_initial must"),
    "vecN_initial alone": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f, None, n), {}), "without matC_initial"),
    "mixed dtypes": (lambda q, k, *a: ((q, k.astype(jnp.bfloat16), *a[:3]), {}), "matQ, matK and matV must share"),
    "integer vecF": (lambda q, k, v, i, f, *_: ((q, k, v, i, f.astype(jnp.int32)), {}), "vecF must be a floating"),
    "states_dtype": (lambda *a: (a[:5], dict(states_dtype=jnp.int8)), "states_dtype must be a floating-point dtype"),
    **{
        f"qk_scale={value!r}": (
            lambda *a, value=value: (a[:5], dict(qk_scale=value)),
            r"qk_scale must be None \(DHQK\*\*-0.5\) or a positive finite float",
        )
        for value in (-1.0, 0.0, float("nan"), "a", jnp.ones(2))
    },
    "allow_tf32": (lambda *a: (a[:5], dict(allow_tf32="no")), r"allow_tf32 must be a bool"),
    "scaM_initial with sigmoid": (
        lambda *a: (a, dict(input_gate="sigmoid")),
        "scaM_initial is not a state of the sigmoid input gate",
    ),
}
# the forward's own options, then the backward's own arrays
BAD_UPSTREAM_FW_OPTIONS = {
    "output_dtype": (dict(output_dtype=jnp.int32), "output_dtype must be a floating-point dtype"),
    "return_last_states": (dict(return_last_states="no"), r"return_last_states must be a bool"),
    "return_all_states": (dict(return_all_states=1), r"return_all_states must be a bool"),
}
BAD_UPSTREAM_BW_ARRAYS = {
    "matDeltaH": lambda dh, q: dh[:, :, :32],
    "vecN_out": lambda dh, q: q[..., 0, :],
    "vecM_out": lambda dh, q: q[..., 0].astype(jnp.int32),
    "matDeltaC_last": lambda dh, q: dh,
    "vecDeltaN_last": lambda dh, q: q[..., 0],
    "scaM_last_frame": lambda dh, q: q[..., 0],
}


@pytest.mark.parametrize("direction", ["fw", "bw"])
@pytest.mark.parametrize("case", BAD_UPSTREAM_CALLS)
def test_upstream_fw_and_bw_refuse_bad_inputs_naming_them(case, direction):
    make_call, message = BAD_UPSTREAM_CALLS[case]
    q, *rest = _good_inputs()
    args, kwargs = make_call(q, *rest)
    kwargs = dict(chunk_size_intra=16, backend="xla", **kwargs)
    if direction == "bw":
        kwargs["matDeltaH"] = jnp.ones(q.shape[:3] + (rest[1].shape[-1],), q.dtype)
    function = pallas_mlstm.mlstm_chunkwise_fw if direction == "fw" else pallas_mlstm.mlstm_chunkwise_bw
    with pytest.raises(ValueError, match=message):
        function(*args, **kwargs)


def test_upstream_fw_takes_qk_scale_as_any_positive_real_scalar():
    q, k, v, i, f, *_ = _good_inputs()
    run = lambda scale: pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, qk_scale=scale, chunk_size_intra=16)[0]
    h = run(0.3)
    for scale in (np.float32(0.3), np.float64(0.3), jnp.float32(0.3)):
        np.testing.assert_array_equal(run(scale), h)
    assert not np.allclose(run(None), h)  # the scale is applied: None is DHQK^-1/2 = 0.25 here


@pytest.mark.parametrize("case", BAD_UPSTREAM_FW_OPTIONS)
def test_upstream_fw_refuses_bad_output_options(case):
    options, message = BAD_UPSTREAM_FW_OPTIONS[case]
    q, k, v, i, f, *_ = _good_inputs()
    with pytest.raises(ValueError, match=message):
        pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, chunk_size_intra=16, backend="xla", **options)


@pytest.mark.parametrize("name", BAD_UPSTREAM_BW_ARRAYS)
def test_upstream_bw_refuses_bad_gradient_and_output_arrays(name):
    q, k, v, i, f, *_ = _good_inputs()
    dh = jnp.ones(v.shape, v.dtype)
    arrays = {"matDeltaH": dh, name: BAD_UPSTREAM_BW_ARRAYS[name](dh, q)}
    with pytest.raises(ValueError, match=f"{name} must"):
        pallas_mlstm.mlstm_chunkwise_bw(q, k, v, i, f, chunk_size_intra=16, backend="xla", **arrays)


# make(q, k, v, i, f, c, n, m) of one token -> (args, kwargs) of a call of mlstm_recurrent_step
BAD_STEPS = {
    "q rank": (lambda q, k, v, i, f, c, n, m: ((q[:, :, None], k, v, i, f, c, n, m), {}), "q must have shape"),
    "c shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f, c[..., :3], n, m), {}), "c must have shape"),
    "n shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f, c, n[:1], m), {}), "n must have shape"),
    "m shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f, c, n, m[:, :1]), {}), "m must have shape"),
    "f shape": (lambda q, k, v, i, f, c, n, m: ((q, k, v, i, f[..., None, None], c, n, m), {}), "f must have shape"),
    # the sigmoid gate's states are (c, n); the exponential gate's (c, n, m)
    "m with sigmoid": (lambda *a: (a, dict(input_gate="sigmoid")), "m is not a state of the sigmoid input gate"),
    "no m with exponential": (lambda *a: (a[:7], {}), "m .* is required with the exponential input gate"),
    "mixed dtypes": (lambda q, k, *a: ((q, k.astype(jnp.float16), *a), {}), "q, k and v must share a dtype"),
    **{
        f"eps={name}": (lambda *a, value=value: (a, dict(eps=value)), "eps must be a non-negative finite float")
        for name, value in _BAD_EPS.items()
    },
}


@pytest.mark.parametrize("case", BAD_STEPS)
def test_bad_step_inputs_raise_value_error(case):
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("bad-step"), 2, 2, 1, 24, 40, jnp.float32, with_initial=True)
    make, message = BAD_STEPS[case]
    args, kwargs = make(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], c0, n0, m0)
    with pytest.raises(ValueError, match=message):
        pallas_mlstm.mlstm_recurrent_step(*args, backend="xla", **kwargs)
