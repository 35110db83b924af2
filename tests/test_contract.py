"""The drop-in contract: xlstm_jax's `max_triton_fwbw_v5xlchunksize` names, argument order and defaults.

UPSTREAM holds the signatures of that module's public functions as data (recorded from its API
documentation: NX-AI/xlstm-jax, xlstm_jax/kernels/mlstm_chunkwise/max_triton_fwbw_v5xlchunksize/). Each of
our functions must take exactly those parameters first, in that order, with those defaults; anything we
add comes after them and is keyword-only.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
from pallas_mlstm import xla_kernels
from pallas_mlstm.accuracy import rel_err
from tests.helpers import case_key, mlstm_inputs

_REQUIRED = inspect.Parameter.empty
_PARALLEL_BW = (
    ("matQ", _REQUIRED),
    ("matK", _REQUIRED),
    ("matV", _REQUIRED),
    ("vecI", _REQUIRED),
    ("vecA", _REQUIRED),
    ("vecB", _REQUIRED),
    ("matC_all", _REQUIRED),
    ("vecN_all", _REQUIRED),
    ("scaM_all", _REQUIRED),
    ("vecN_out", _REQUIRED),
    ("vecM_out", _REQUIRED),
    ("matDeltaH", _REQUIRED),
    ("matDeltaC_states", _REQUIRED),
    ("qk_scale", None),
    ("chunk_size", 64),
    ("siz_b_LQ", 32),
    ("siz_b_LKV", 32),
    ("siz_b_DHQK", None),
    ("siz_b_DHHV", None),
    ("num_warps", None),
    ("num_stages", None),
    ("eps", 0.0),
    ("output_dtype", jnp.float32),
)
_LAUNCH = (
    ("siz_b_L_parallel", None),
    ("siz_b_L_loop", None),
    ("siz_b_DH_parallel", None),
    ("siz_b_DH_loop", None),
    ("num_warps_intra", None),
    ("num_warps_inter", None),
    ("num_stages_intra", None),
    ("num_stages_inter", None),
)
_INPUTS = (
    ("matQ", _REQUIRED),
    ("matK", _REQUIRED),
    ("matV", _REQUIRED),
    ("vecI", _REQUIRED),
    ("vecF", _REQUIRED),
    ("matC_initial", None),
    ("vecN_initial", None),
    ("scaM_initial", None),
)
UPSTREAM = {
    "mlstm_chunkwise__recurrent_fw_C": (
        ("matK", _REQUIRED),
        ("matV", _REQUIRED),
        ("vecF", _REQUIRED),
        ("vecI", _REQUIRED),
        ("matC_initial", None),
        ("vecN_initial", None),
        ("scaMinter_initial", None),
        ("chunk_size", 64),
        ("num_stages", None),
        ("num_warps", None),
        ("save_states_every_nth_chunk", 1),
    ),
    "mlstm_chunkwise__parallel_fw_Hintra": (
        ("matQ", _REQUIRED),
        ("matK", _REQUIRED),
        ("matV", _REQUIRED),
        ("vecI", _REQUIRED),
        ("vecF", _REQUIRED),
        ("matC_all", _REQUIRED),
        ("vecN_all", _REQUIRED),
        ("scaM_all", _REQUIRED),
        ("qk_scale", None),
        ("chunk_size", 64),
        ("siz_b_LQ", 32),
        ("siz_b_LKV", 32),
        ("siz_b_DHQK", None),
        ("siz_b_DHHV", None),
        ("num_warps", None),
        ("num_stages", None),
        ("eps", 1e-6),
        ("output_dtype", jnp.float32),
    ),
    "mlstm_chunkwise__recurrent_bw_dC": (
        ("matQ", _REQUIRED),
        ("vecF", _REQUIRED),
        ("scaM_inter", _REQUIRED),
        ("vecM_combine", _REQUIRED),
        ("matDeltaH", _REQUIRED),
        ("vecN_out", _REQUIRED),
        ("matDeltaC_last", None),
        ("qk_scale", None),
        ("chunk_size", 64),
        ("save_states_every_nth_chunk", 1),
        ("num_warps", None),
        ("num_stages", None),
        ("eps", 0.0),
    ),
    "mlstm_chunkwise__parallel_bw_dQ": _PARALLEL_BW,
    "mlstm_chunkwise__parallel_bw_dK": _PARALLEL_BW,
    "mlstm_chunkwise__parallel_bw_dV": _PARALLEL_BW,
    "mlstm_chunkwise_fw": (
        *_INPUTS,
        ("qk_scale", None),
        ("return_last_states", False),
        ("return_all_states", False),
        ("chunk_size_inter", None),
        ("chunk_size_intra", None),
        *_LAUNCH,
        ("output_dtype", jnp.float32),
        ("eps", 0.0),
    ),
    "mlstm_chunkwise_bw": (
        *_INPUTS,
        ("matC_all", None),
        ("vecN_all", None),
        ("scaM_all", None),
        ("vecN_out", None),
        ("vecM_out", None),
        ("matDeltaH", None),
        ("matDeltaC_last", None),
        ("qk_scale", None),
        ("chunk_size_inter", None),
        ("chunk_size_intra", None),
        *_LAUNCH,
        ("eps", 0.0),
    ),
    "compute_chunkwise_log_gates_vecB_vecA": (
        ("vecI", _REQUIRED),
        ("vecF", _REQUIRED),
        ("chunk_size", _REQUIRED),
        ("return_vecB_only", False),
    ),
    "mlstm_chunkwise_max_triton": (
        ("q", _REQUIRED),
        ("k", _REQUIRED),
        ("v", _REQUIRED),
        ("i", _REQUIRED),
        ("f", _REQUIRED),
        ("c_initial", None),
        ("n_initial", None),
        ("m_initial", None),
        ("return_last_states", False),
        ("eps", 1e-6),
        ("chunk_size", 64),
        ("autocast_kernel_dtype", jnp.float32),
    ),
    # the decoding step, by the names xlstm_jax's decoding calls it with (mlstm_kernels' JAX step signature)
    "mlstm_recurrent_step__triton_fw": (
        ("matC_state", _REQUIRED),
        ("vecN_state", _REQUIRED),
        ("scaM_state", _REQUIRED),
        ("vecQ", _REQUIRED),
        ("vecK", _REQUIRED),
        ("vecV", _REQUIRED),
        ("scaI", _REQUIRED),
        ("scaF", _REQUIRED),
        ("matC_new", None),
        ("vecN_new", None),
        ("scaM_new", None),
        ("qk_scale", None),
        ("eps", 1e-6),
        ("dtype_state", jnp.float32),
    ),
}
KERNELS = [name for name in UPSTREAM if name.startswith("mlstm_chunkwise__")]


def _public_functions():
    """Every function of ours that carries an upstream name: the package's and the XLA backend's kernels."""
    functions = [pytest.param(getattr(pallas_mlstm, name), UPSTREAM[name], id=name) for name in UPSTREAM]
    functions += [
        pytest.param(getattr(xla_kernels, name), UPSTREAM[name], id=f"xla_kernels.{name}") for name in KERNELS
    ]
    return functions


@pytest.mark.parametrize("function,upstream", _public_functions())
def test_signature_starts_with_upstreams_and_adds_keyword_only(function, upstream):
    parameters = list(inspect.signature(function).parameters.values())
    ours = [(p.name, p.default) for p in parameters[: len(upstream)]]
    assert ours == list(upstream)
    for parameter in parameters[: len(upstream)]:
        assert parameter.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, parameter.name
    for parameter in parameters[len(upstream) :]:
        assert parameter.kind == inspect.Parameter.KEYWORD_ONLY, (
            f"extra parameter {parameter.name} must be keyword-only"
        )


def test_fw_and_bw_show_backend_and_no_kernel_set():
    for function in (pallas_mlstm.mlstm_chunkwise_fw, pallas_mlstm.mlstm_chunkwise_bw):
        names = inspect.signature(function).parameters
        assert "backend" in names and "allow_tf32" in names and "kernels" not in names
        assert "backend" in function.__doc__


# ---------------------------------------------------------------------------------------------- positional calls

_S, _CHUNK = 64, 16


@functools.cache
def _chain():
    """Every kernel's arguments, chained through the XLA backend, as (positional tuple, keyword dict) per kernel."""
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("contract"), 1, 2, _S, 16, 32, with_initial=True)
    dh = jax.random.normal(case_key("contract-dh"), v.shape)
    dc_last = jax.random.normal(case_key("contract-dc"), c0.shape)

    @jax.jit  # one compile, not one per operation
    def chained():
        states = xla_kernels.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, c0, n0, m0, chunk_size=_CHUNK)
        _, n_out, m_out = xla_kernels.mlstm_chunkwise__parallel_fw_Hintra(q, k, v, i, f, *states, chunk_size=_CHUNK)
        dc_states = xla_kernels.mlstm_chunkwise__recurrent_bw_dC(
            q, f, states[2], m_out, dh, n_out, dc_last, chunk_size=_CHUNK
        )
        return states, n_out, m_out, dc_states, pallas_mlstm.compute_chunkwise_log_gates_vecB_vecA(i, f, _CHUNK)

    states, n_out, m_out, dc_states, (vec_b, vec_a) = chained()
    scale = 16**-0.5
    bw = (q, k, v, i, vec_a, vec_b, *states, n_out, m_out, dh, dc_states, scale, _CHUNK, 16, 16)
    bw_names = [name for name, _ in _PARALLEL_BW[:17]]
    return {
        "mlstm_chunkwise__recurrent_fw_C": (
            (k, v, f, i, c0, n0, m0, _CHUNK),
            ["matK", "matV", "vecF", "vecI", "matC_initial", "vecN_initial", "scaMinter_initial", "chunk_size"],
        ),
        "mlstm_chunkwise__parallel_fw_Hintra": (
            (q, k, v, i, f, *states, scale, _CHUNK, 16, 16),
            [
                "matQ",
                "matK",
                "matV",
                "vecI",
                "vecF",
                "matC_all",
                "vecN_all",
                "scaM_all",
                "qk_scale",
                "chunk_size",
                "siz_b_LQ",
                "siz_b_LKV",
            ],
        ),
        "mlstm_chunkwise__recurrent_bw_dC": (
            (q, f, states[2], m_out, dh, n_out, dc_last, scale, _CHUNK),
            [
                "matQ",
                "vecF",
                "scaM_inter",
                "vecM_combine",
                "matDeltaH",
                "vecN_out",
                "matDeltaC_last",
                "qk_scale",
                "chunk_size",
            ],
        ),
        "mlstm_chunkwise__parallel_bw_dQ": (bw, bw_names),
        "mlstm_chunkwise__parallel_bw_dK": (bw, bw_names),
        "mlstm_chunkwise__parallel_bw_dV": (bw, bw_names),
    }


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("module", ["pallas_mlstm", "xla_kernels"])
def test_kernel_called_positionally_in_upstream_order_equals_keyword_call(name, module):
    args, names = _chain()[name]
    extra = dict(interpret=True) if module == "pallas_mlstm" else {}
    function = getattr(pallas_mlstm if module == "pallas_mlstm" else xla_kernels, name)
    # each call one compiled program (op by op, the twins compile every operation apart); the two calls' programs
    # are the same, so the second is loaded from the session's compilation cache
    call = lambda *a, **kw: jax.tree.leaves(jax.jit(lambda: function(*a, **kw, **extra))())
    positional = call(*args)
    by_name = call(**dict(zip(names, args)))
    for got, expected in zip(positional, by_name, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    if name.startswith("mlstm_chunkwise__parallel_bw"):  # vecA and vecB swapped by mistake: seen here
        swapped = dict(zip(names, args), vecA=args[5], vecB=args[4])
        assert rel_err(call(**swapped)[0], by_name[0]) > 1e-2


def test_fw_and_bw_positional_equal_keyword():
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("contract-fwbw"), 1, 2, _S, 16, 32, with_initial=True)
    fw_pos = pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, c0, n0, m0, None, True, True, _CHUNK, _CHUNK, backend="xla")
    fw_kw = pallas_mlstm.mlstm_chunkwise_fw(
        matQ=q,
        matK=k,
        matV=v,
        vecI=i,
        vecF=f,
        matC_initial=c0,
        vecN_initial=n0,
        scaM_initial=m0,
        return_last_states=True,
        return_all_states=True,
        chunk_size_inter=_CHUNK,
        chunk_size_intra=_CHUNK,
        backend="xla",
    )
    for got, expected in zip(jax.tree.leaves(fw_pos), jax.tree.leaves(fw_kw), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    h, n_out, m_out, _, (c_all, n_all, m_all) = fw_kw
    dh = jax.random.normal(case_key("contract-fwbw-dh"), h.shape)
    bw_pos = pallas_mlstm.mlstm_chunkwise_bw(
        q, k, v, i, f, c0, n0, m0, c_all, n_all, m_all, n_out, m_out, dh, None, None, _CHUNK, _CHUNK, backend="xla"
    )
    bw_kw = pallas_mlstm.mlstm_chunkwise_bw(
        matQ=q,
        matK=k,
        matV=v,
        vecI=i,
        vecF=f,
        matC_initial=c0,
        vecN_initial=n0,
        scaM_initial=m0,
        matC_all=c_all,
        vecN_all=n_all,
        scaM_all=m_all,
        vecN_out=n_out,
        vecM_out=m_out,
        matDeltaH=dh,
        chunk_size_inter=_CHUNK,
        chunk_size_intra=_CHUNK,
        backend="xla",
    )
    for got, expected in zip(jax.tree.leaves(bw_pos), jax.tree.leaves(bw_kw), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_max_triton_is_a_drop_in_for_upstreams_top_level():
    """Upstream's positional call; h in autocast_kernel_dtype; chunk_size ignored (the measured default chooses),
    as upstream's top level; backend keyword-only."""
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("contract-top"), 1, 2, _S, 16, 32, with_initial=True)
    h = pallas_mlstm.mlstm_chunkwise_max_triton(q, k, v, i, f)  # upstream's defaults: float32
    expected = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f)
    assert h.dtype == jnp.float32 and rel_err(h, expected) <= 1e-6
    h, (c, n, m) = pallas_mlstm.mlstm_chunkwise_max_triton(q, k, v, i, f, c0, n0, m0, True, 1e-6, _CHUNK, jnp.bfloat16)
    expected_h, expected_last = pallas_mlstm.mlstm_chunkwise(
        q, k, v, i, f, c0, n0, m0, return_last_states=True, autocast_kernel_dtype=jnp.bfloat16
    )
    assert h.dtype == jnp.bfloat16 and rel_err(h, expected_h) <= 1e-2
    for got, want in zip((c, n, m), expected_last, strict=True):
        assert rel_err(got, want) <= 1e-6
    # bf16 inputs, float32 kernels: h in float32, not rounded to bf16 on the way
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    h32 = pallas_mlstm.mlstm_chunkwise_max_triton(q16, k16, v16, i, f, backend="xla")
    assert h32.dtype == jnp.float32
    exact = pallas_mlstm.mlstm_chunkwise(*(x.astype(jnp.float32) for x in (q16, k16, v16)), i, f, backend="xla")
    assert rel_err(h32, exact) <= 1e-6
    loss = lambda q: jnp.sum(pallas_mlstm.mlstm_chunkwise_max_triton(q, k, v, i, f, chunk_size=_CHUNK))
    grads = jax.grad(loss)(q)
    assert grads.shape == q.shape and bool(jnp.all(jnp.isfinite(grads)))


def test_step_called_by_upstreams_keywords_equals_mlstm_recurrent_step():
    """xlstm_jax's decoding call (keywords, (B, NH, 1) gates and m, bf16 q, k, v) equals mlstm_recurrent_step, with
    the states in their given dtypes; a qk_scale other than the step's is refused."""
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("contract-step"), 2, 2, 1, 16, 32, with_initial=True)
    q, k, v = (x[:, :, 0].astype(jnp.bfloat16) for x in (q, k, v))
    i, f, m0 = i[..., :1], f[..., :1], m0[..., None]  # (B, NH, 1)
    h, (c, n, m) = pallas_mlstm.mlstm_recurrent_step__triton_fw(
        matC_state=c0, vecN_state=n0, scaM_state=m0, vecQ=q, vecK=k, vecV=v, scaI=i, scaF=f, eps=1e-6
    )
    expected_h, expected_states = pallas_mlstm.mlstm_recurrent_step(q, k, v, i, f, c0, n0, m0)
    assert h.dtype == jnp.bfloat16 and m.shape == m0.shape
    for got, want in zip((h, c, n, m), (expected_h, *expected_states), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="qk_scale must be None or DHQK"):
        pallas_mlstm.mlstm_recurrent_step__triton_fw(c0, n0, m0, q, k, v, i, f, qk_scale=1.0)
