"""Each Pallas kernel against its jnp twin (the XLA backend's kernel) on identical inputs, for both cells (a failing
kernel is named by its test id)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import pallas_mlstm
from pallas_mlstm import xla_kernels
from pallas_mlstm.accuracy import KERNEL_TWIN_TOLERANCE, rel_err
from tests import flags as test_flags
from tests.helpers import case_key, mlstm_inputs, skip_unless_available

# (B, NH, S, DHQK, DHHV, chunk, tiles): head dims 16…256 (DHQK != DHHV, some not powers of 2),
# chunks 16…256, B·NH > 1, tile variants.
CASES = {
    "L16-d16x32": (1, 2, 64, 16, 32, 16, {}),
    "L32-d32x64-smallLtiles": (2, 1, 128, 32, 64, 32, dict(siz_b_LQ=16, siz_b_LKV=16)),
    # small L and head-dim tiles together (the recurrent kernels take the head-dim ones only)
    "L64-d64x48-smallLDtiles": (1, 2, 256, 64, 48, 64, dict(siz_b_LQ=16, siz_b_LKV=32, siz_b_DHQK=32, siz_b_DHHV=16)),
    "L128-d256x128-mixed": (1, 2, 256, 256, 128, 128, dict(siz_b_LQ=64, siz_b_LKV=32, siz_b_DHQK=64, siz_b_DHHV=64)),
    "L256-d128x256": (2, 1, 512, 128, 256, 256, {}),
    "L32-d24x40-padded": (2, 2, 64, 24, 40, 32, dict(siz_b_LQ=16, siz_b_LKV=32)),
    "L1024-d32x16-subtiled": (1, 2, 2048, 32, 16, 1024, dict(siz_b_LQ=128, siz_b_LKV=128)),
}
KERNELS = (
    "recurrent_fw_C",
    "parallel_fw_Hintra",
    "recurrent_bw_dC",
    "parallel_bw_dQ",
    "parallel_bw_dK",
    "parallel_bw_dV",
)


def _pallas_backends():
    return [b for b in test_flags.BACKEND.value if b in ("interpret", "triton")]


def _dtypes(backend):
    return [jnp.float32, jnp.bfloat16, jnp.float16] if backend == "triton" else [jnp.float32]


def _gate_kwargs(kernel_name: str, input_gate: str, normalize: bool) -> dict:
    """The cell options of one kernel: recurrent_bw_dC reads no input gate, only parallel_fw_Hintra normalises."""
    if kernel_name == "recurrent_bw_dC" or input_gate == "exponential":
        return {}
    return dict(input_gate=input_gate, **({"normalize": normalize} if kernel_name == "parallel_fw_Hintra" else {}))


@functools.cache
def _case_arrays(case: str, dtype, input_gate: str = "exponential"):
    """Inputs of every kernel for one case, from initial states, chained through the jnp twins (float32 states), in
    one jitted program (op by op, the twins compile each operation apart: 5x slower on a CPU). The chain runs the
    normalised cell: the unnormalised one only changes the forward's outputs (vecN_out, vecM_out), which only the
    backward kernels read, and its cell runs parallel_fw_Hintra alone (_kernel_params)."""
    return _chain(case_key("kernels", case), case, dtype, input_gate)


def _without_initial(x: dict) -> dict:
    """The case arrays without the initial states and the last state's gradient: the recurrent kernels' other path
    (the other kernels see initial states only through their inputs)."""
    return dict(x, c0=None, n0=None, m0=None, dc_last=None)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _chain(key, case: str, dtype, input_gate: str):
    batch, heads, seq_len, dhqk, dhhv, chunk, _ = CASES[case]
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, jnp.float32, with_initial=True)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    states = xla_kernels.mlstm_chunkwise__recurrent_fw_C(
        k, v, f, i, c0, n0, m0, chunk_size=chunk, **_gate_kwargs("recurrent_fw_C", input_gate, True)
    )
    _, n_out, m_out = xla_kernels.mlstm_chunkwise__parallel_fw_Hintra(
        q, k, v, i, f, *states, chunk_size=chunk, **_gate_kwargs("parallel_fw_Hintra", input_gate, True)
    )
    dkeys = jax.random.split(jax.random.fold_in(key, 1), 2)
    dh = jax.random.normal(dkeys[0], v.shape, dtype)
    dc_last = jax.random.normal(dkeys[1], (batch, heads, dhqk, dhhv), jnp.float32)
    dc_states = xla_kernels.mlstm_chunkwise__recurrent_bw_dC(
        q, f, states[2], m_out, dh, n_out, dc_last, chunk_size=chunk
    )
    vec_b, vec_a = pallas_mlstm.compute_chunkwise_log_gates_vecB_vecA(i, f, chunk, input_gate=input_gate)
    return dict(
        q=q,
        k=k,
        v=v,
        i=i,
        f=f,
        c0=c0,
        n0=n0,
        m0=m0,
        states=states,
        n_out=n_out,
        m_out=m_out,
        dh=dh,
        dc_last=dc_last,
        dc_states=dc_states,
        vec_b=vec_b,
        vec_a=vec_a,
    )


def _call(kernel_name, module, x, chunk, tiles, extra):
    """Calls kernel `kernel_name` of `module` (xla_kernels or pallas_mlstm) on the case arrays."""
    fn = getattr(module, f"mlstm_chunkwise__{kernel_name}")
    if kernel_name == "recurrent_fw_C":
        dh_tiles = {key: val for key, val in tiles.items() if key.startswith("siz_b_DH")}
        return fn(x["k"], x["v"], x["f"], x["i"], x["c0"], x["n0"], x["m0"], chunk_size=chunk, **dh_tiles, **extra)
    if kernel_name == "parallel_fw_Hintra":
        return fn(x["q"], x["k"], x["v"], x["i"], x["f"], *x["states"], chunk_size=chunk, **tiles, **extra)
    if kernel_name == "recurrent_bw_dC":
        dh_tiles = {key: val for key, val in tiles.items() if key.startswith("siz_b_DH")}
        return fn(
            x["q"],
            x["f"],
            x["states"][2],
            x["m_out"],
            x["dh"],
            x["n_out"],
            x["dc_last"],
            chunk_size=chunk,
            eps=1e-6,
            matC_states=x["states"][0],
            **dh_tiles,
            **extra,
        )
    if kernel_name in ("parallel_bw_dQ", "parallel_bw_dK"):
        extra = dict(extra, return_row_dots=True)  # also Σ_d x·dx from the float32 accumulators
    return fn(
        x["q"],
        x["k"],
        x["v"],
        x["i"],
        x["vec_a"],
        x["vec_b"],
        *x["states"],
        x["n_out"],
        x["m_out"],
        x["dh"],
        x["dc_states"],
        chunk_size=chunk,
        eps=1e-6,
        **tiles,
        **extra,
    )


def _jitted_call(kernel_name, module, x, chunk, tiles, extra):
    """`_call` as one compiled program (op by op, the twins compile each operation apart)."""
    return jax.jit(lambda x: _call(kernel_name, module, x, chunk, tiles, extra))(x)


# The cell: mLSTMexp, or mLSTMsig (input_gate="sigmoid") with and without the normaliser
CELLS = {"exponential": ("exponential", True), "sigmoid": ("sigmoid", True), "sigmoid-unnormalized": ("sigmoid", False)}
# The interpreter is slow (most of it is building each case's inputs through the twins): it runs the cases whose
# BlockSpecs and in-kernel loops differ (L and head-dim tiles together, padding, sub-tiled chunks; the plain one-tile
# case is a part of each); triton runs them all.
_INTERPRETER_CASES = ("L64-d64x48-smallLDtiles", "L32-d24x40-padded", "L1024-d32x16-subtiled")
# mLSTMsig: float32, on a case with padded head dims and several L tiles (interpreter), and on two more with triton
_SIGMOID_CASES = {"interpret": ("L32-d24x40-padded",), "triton": ("L16-d16x32", "L32-d24x40-padded", "L256-d128x256")}
_RECURRENT_KERNELS = ("recurrent_fw_C", "recurrent_bw_dC")  # their path without initial states is tested too


def _kernel_params():
    params = []
    for backend in _pallas_backends():
        for cell in CELLS:
            if cell == "exponential":
                dtypes, cases = _dtypes(backend), (_INTERPRETER_CASES if backend == "interpret" else CASES)
            else:
                dtypes, cases = [jnp.float32], _SIGMOID_CASES[backend]
            for dtype in dtypes:
                for case in cases:
                    for kernel_name in KERNELS:
                        if cell == "sigmoid-unnormalized" and kernel_name != "parallel_fw_Hintra":
                            # only parallel_fw_Hintra normalises; the others take "sigmoid"'s options (on other
                            # values, which tests/test_api.py's end-to-end sigmoid-unnormalized rows feed the xla
                            # twins and, on a GPU, the triton kernels)
                            continue
                        suffix = "" if cell == "exponential" else f"-{cell}"
                        params.append(
                            pytest.param(
                                backend,
                                dtype,
                                case,
                                kernel_name,
                                cell,
                                id=f"{kernel_name}-{case}-{backend}-{jnp.dtype(dtype).name}{suffix}",
                            )
                        )
    return params


@pytest.mark.parametrize("backend,dtype,case,kernel_name,cell", _kernel_params())
def test_kernel_matches_twin(backend, dtype, case, kernel_name, cell):
    skip_unless_available(backend)
    chunk, tiles = CASES[case][5], CASES[case][6]
    tolerance = KERNEL_TWIN_TOLERANCE[backend, jnp.dtype(dtype).name]
    input_gate, normalize = CELLS[cell]
    gate = _gate_kwargs(kernel_name, input_gate, normalize)
    arrays = _case_arrays(case, dtype, input_gate)
    for x in (_without_initial(arrays), arrays) if kernel_name in _RECURRENT_KERNELS else (arrays,):
        expected = _jitted_call(kernel_name, xla_kernels, x, chunk, tiles, gate)
        actual = _jitted_call(kernel_name, pallas_mlstm, x, chunk, tiles, dict(gate, interpret=backend == "interpret"))
        expected, actual = jax.tree.leaves(expected), jax.tree.leaves(actual)
        assert len(actual) == len(expected)
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert a.shape == e.shape, (kernel_name, index)
            err = rel_err(a, e)
            assert err <= tolerance, f"{kernel_name} output {index}: rel err {err:.2e}"


def test_sigmoid_gate_tracks_no_max_state():
    """Every m the kernels keep stays 0 with the sigmoid gate (not with the exponential one): the jnp twins and
    the orchestration here; test_kernel_matches_twin holds the Pallas kernels' m to the twins'."""
    q, k, v, i, f = mlstm_inputs(case_key("sigmoid-m"), 1, 1, 32, 16, 16)[:5]

    @functools.partial(jax.jit, static_argnums=0)  # one compile per gate, not one per operation
    def max_states(input_gate):
        *_, scaM_all = xla_kernels.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, chunk_size=16, input_gate=input_gate)
        _, _, vecM_out = pallas_mlstm.mlstm_chunkwise_fw(
            q, k, v, i, f, chunk_size_intra=16, backend="xla", input_gate=input_gate
        )[:3]
        return scaM_all, vecM_out

    for input_gate, stays_zero in (("sigmoid", True), ("exponential", False)):
        scaM_all, vecM_out = max_states(input_gate)
        assert bool(jnp.all(scaM_all == 0) & jnp.all(vecM_out == 0)) == stays_zero, input_gate


def test_kernel_rejects_bad_tiles():
    x = _case_arrays("L32-d24x40-padded", jnp.float32)
    with pytest.raises(ValueError, match="siz_b_LQ must be a power of 2"):
        _call("parallel_fw_Hintra", pallas_mlstm, x, 32, dict(siz_b_LQ=24), dict(interpret=True))
    with pytest.raises(ValueError, match="chunk_size must be at least 16"):
        _call("parallel_fw_Hintra", pallas_mlstm, x, 8, {}, dict(interpret=True))


# kernel -> (a change of the case arrays, a phrase of the ValueError it gets); each adapter checks its arrays
# against one another before launching (pallas_mlstm.validation.validate_kernel_arrays)
BAD_KERNEL_ARRAYS = {
    "recurrent_fw_C: integer matK": ("recurrent_fw_C", lambda x: dict(x, k=x["k"].astype(jnp.int32)), "matK must be"),
    "recurrent_fw_C: matV steps": ("recurrent_fw_C", lambda x: dict(x, v=x["v"][:, :, :16]), "matV must have shape"),
    "recurrent_fw_C: matC_initial": ("recurrent_fw_C", lambda x: dict(x, c0=x["c0"][..., :3]), "matC_initial must"),
    "parallel_fw_Hintra: vecF": ("parallel_fw_Hintra", lambda x: dict(x, f=x["f"][..., :5]), "vecF must have shape"),
    "parallel_fw_Hintra: matC_all of other chunks": (
        "parallel_fw_Hintra",
        lambda x: dict(x, states=(x["states"][0][:, :, 8:], *x["states"][1:])),
        r"matC_all must have shape \(B, NH, \(NC\+1\)·DHQK, DHHV\)",
    ),
    "recurrent_bw_dC: vecN_out": ("recurrent_bw_dC", lambda x: dict(x, n_out=x["n_out"][..., None]), "vecN_out must"),
    "parallel_bw_dV: vecA": ("parallel_bw_dV", lambda x: dict(x, vec_a=x["vec_a"][..., :8]), "vecA must have shape"),
    "parallel_bw_dK: matDeltaC_states": (
        "parallel_bw_dK",
        lambda x: dict(x, dc_states=x["dc_states"].astype(jnp.int8)),
        "matDeltaC_states must be a floating",
    ),
}


@pytest.mark.parametrize("case", BAD_KERNEL_ARRAYS)
def test_kernel_refuses_arrays_that_do_not_fit_together(case):
    kernel, change, message = BAD_KERNEL_ARRAYS[case]
    x = change(_case_arrays("L32-d24x40-padded", jnp.float32))
    with pytest.raises(ValueError, match=message):
        _call(kernel, pallas_mlstm, x, 32, {}, dict(interpret=True))


BAD_KERNEL_OPTIONS = {
    "parallel_fw_Hintra: qk_scale": ("parallel_fw_Hintra", dict(qk_scale=-1.0), "qk_scale must be None"),
    "parallel_fw_Hintra: output_dtype": ("parallel_fw_Hintra", dict(output_dtype=jnp.int32), "output_dtype must be"),
    "recurrent_fw_C: states_dtype": ("recurrent_fw_C", dict(states_dtype=jnp.int8), "states_dtype must be"),
    "recurrent_bw_dC: qk_scale": ("recurrent_bw_dC", dict(qk_scale="s"), "qk_scale must be None"),
    "parallel_bw_dV: allow_tf32": ("parallel_bw_dV", dict(allow_tf32="yes"), "allow_tf32 must be a bool"),
}


@pytest.mark.parametrize("case", BAD_KERNEL_OPTIONS)
def test_kernel_refuses_bad_options(case):
    kernel, options, message = BAD_KERNEL_OPTIONS[case]
    x = _case_arrays("L32-d24x40-padded", jnp.float32)
    with pytest.raises(ValueError, match=message):
        _call(kernel, pallas_mlstm, x, 32, {}, dict(interpret=True, **options))


def test_kernel_refuses_float_reset_positions():
    x = _case_arrays("L32-d24x40-padded", jnp.float32)
    with pytest.raises(ValueError, match="vecR must be an integer array"):
        _call("parallel_bw_dQ", pallas_mlstm, x, 32, {}, dict(interpret=True, vecR=x["vec_b"]))


def _narrow_backends():
    return ["xla", *_pallas_backends()]


@pytest.mark.parametrize("backend", _narrow_backends())
def test_narrow_state_buffers(backend):
    """states_dtype=bfloat16: the recurrent kernels store their state buffers rounded from the same float32
    values, and return the last C state / dC_0 at full precision; the chained orchestration gives the same h
    and q, k, v gradients bit for bit (the parallel kernels round states to bf16 for their matmuls anyway). The
    orchestration is the same whatever the kernels: the interpreter checks its kernels only."""
    skip_unless_available(backend)
    module = xla_kernels if backend == "xla" else pallas_mlstm
    launch = {} if backend == "xla" else dict(interpret=backend == "interpret")
    x = _case_arrays("L32-d24x40-padded", jnp.bfloat16)
    wide = _jitted_call("recurrent_fw_C", module, x, 32, {}, launch)
    narrow = _jitted_call("recurrent_fw_C", module, x, 32, {}, dict(launch, states_dtype=jnp.bfloat16))
    assert len(wide) == 3 and len(narrow) == 4
    assert narrow[0].dtype == jnp.bfloat16 and narrow[3].dtype == jnp.float32
    assert jnp.array_equal(narrow[0], wide[0].astype(jnp.bfloat16))
    assert jnp.array_equal(narrow[3], wide[0][:, :, -24:, :])
    for a, b in zip(narrow[1:3], wide[1:3]):
        assert jnp.array_equal(a, b)
    wide_dc = _jitted_call("recurrent_bw_dC", module, x, 32, {}, launch)
    narrow_dc = _jitted_call("recurrent_bw_dC", module, x, 32, {}, dict(launch, states_dtype=jnp.bfloat16))
    assert len(wide_dc) == 2 and len(narrow_dc) == 3
    assert jnp.array_equal(narrow_dc[0], wide_dc[0].astype(jnp.bfloat16))
    assert jnp.array_equal(narrow_dc[2], wide_dc[0][:, :, :24, :])
    assert jnp.array_equal(narrow_dc[1], wide_dc[1])
    if backend == "interpret":
        return

    q, k, v, i, f, c0, n0, m0 = (x[name] for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0"))
    kwargs = dict(chunk_size_inter=32, chunk_size_intra=32, eps=1e-6, backend=backend)

    @functools.partial(jax.jit, static_argnums=0)  # one compile per states_dtype, not one per operation
    def forward_backward(states_dtype):
        h, n_out, m_out, last, _ = pallas_mlstm.mlstm_chunkwise_fw(
            q,
            k,
            v,
            i,
            f,
            c0,
            n0,
            m0,
            return_last_states=True,
            output_dtype=q.dtype,
            states_dtype=states_dtype,
            **kwargs,
        )
        grads = pallas_mlstm.mlstm_chunkwise_bw(
            q,
            k,
            v,
            i,
            f,
            c0,
            n0,
            m0,
            None,
            None,
            None,
            n_out,
            m_out,
            x["dh"],
            x["dc_last"],
            states_dtype=states_dtype,
            **kwargs,
        )
        return h, last, grads

    runs = {states_dtype: forward_backward(states_dtype) for states_dtype in (None, jnp.bfloat16)}
    (h_wide, last_wide, grads_wide), (h_narrow, last_narrow, grads_narrow) = runs[None], runs[jnp.bfloat16]
    assert jnp.array_equal(h_narrow, h_wide)
    for a, b in zip(last_narrow, last_wide):
        assert a.dtype == b.dtype and jnp.array_equal(a, b)
    for name, a, b in zip(("dq", "dk", "dv", "di", "df", "dc0", "dn0", "dm0"), grads_narrow, grads_wide):
        assert a.dtype == b.dtype, name
        if name != "df":  # the state buffers enter these as bf16 matmul operands only
            assert jnp.array_equal(a, b), name
        else:  # df̃ sums <dC_k, C_k> over each state in float32, now from rounded states
            assert 0 < rel_err(a, b) <= 1e-2, f"{name}: rel err {rel_err(a, b):.2e}"
