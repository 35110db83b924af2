"""The Mosaic GPU kernels (pallas_mlstm/mosaic_gpu: recurrent_fw_C, parallel_fw_Hintra, recurrent_bw_dC,
parallel_bw_dV/dK/dQ) against their jnp twins: in Mosaic GPU's interpret mode (shared memory, TMA copies, barriers
and warpgroups simulated on the CPU; the matmuls as jnp.dot), compiled on a Hopper GPU, and lowered for one without
it. `python -m pallas_mlstm.benchmarks.mosaic_check` also times them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_mlstm import mosaic_gpu, xla_kernels
from pallas_mlstm.accuracy import KERNEL_TWIN_TOLERANCE, rel_err
from pallas_mlstm.device import device_properties
from pallas_mlstm.gates import chunk_max_state, chunk_max_states, chunkwise_log_gates, compute_chunkwise_reset_gates
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common as mosaic_common
from pallas_mlstm.mosaic_gpu import parallel_bw, parallel_bw_sliced, parallel_fw, recurrent_bw, recurrent_fw
from pallas_mlstm.states import state_buffer_dtype
from tests import flags as test_flags
from tests.helpers import case_key, extreme_gates, mlstm_inputs, skip_unless_available

# The kernel interpreted (slow) with --backend=mosaic_interpret, compiled on a Hopper GPU with --backend=mosaic.
_MODES = [mode for mode in ("mosaic_interpret", "mosaic") if mode in test_flags.BACKEND.value]
needs_mosaic_flag = pytest.mark.skipif(
    not _MODES, reason="pass --backend=mosaic_interpret (CPU, ~1 min) or --backend=mosaic (Hopper GPU)"
)

# (B, NH, S, DHQK, DHHV, chunk, dtype, input_gate, normalize, extreme gates). Tiles follow from kernel_tiles:
# "2wg": two compute warpgroups, two buffers for 3 steps (refills, and a warpgroup skipping the last key tile);
# "resets": one warpgroup, hard resets and masked tokens inside chunks, head dims padded to 64 and 128;
# "bf16-tiles": two query tiles and two DHHV tiles per chunk, three buffers for up to 6 steps;
# "one-buffer-f32": float32 at DHQK 192 fits one buffer (stages=1): each C_{k-1} slice released before the next;
# "wide-qk": DHQK 256, the 7B widths' (dK/dQ: two warpgroups, each Q or K tile in two column blocks);
# "7b-widths-f32": float32 at DHQK 256 x DHHV 512 (the parallel kernels: two bf16 parts, where three do not fit).
CASES = {
    "2wg-f32": (1, 2, 256, 64, 128, 128, jnp.float32, "exponential", True, False),
    "resets-padded-sigmoid-unnormalised-f32": (2, 1, 128, 48, 80, 64, jnp.float32, "sigmoid", False, True),
    "bf16-tiles": (1, 1, 512, 128, 512, 256, jnp.bfloat16, "exponential", True, False),
    "one-buffer-f32": (1, 1, 128, 192, 64, 64, jnp.float32, "exponential", True, False),
    "wide-qk": (1, 1, 256, 256, 128, 128, jnp.bfloat16, "exponential", True, False),
    "7b-widths-f32": (1, 1, 128, 256, 512, 64, jnp.float32, "exponential", False, False),
}


def _operand_parts(kernel: str, case: str) -> int:
    """The bf16 parts the kernel splits the case's float32 inputs into: its own tile choice."""
    *_, dhqk, dhhv, chunk, dtype, _, _, _ = CASES[case]
    dhqk_p, dhhv_p = mosaic_common.padded_dim(dhqk), mosaic_common.padded_dim(dhhv)
    parts = mosaic_common.operand_parts(dtype)
    if kernel.startswith("recurrent"):  # the case's states are stored in float32
        return recurrent_fw.kernel_tiles(dhqk_p, dhhv_p, parts, 4, recurrent_fw.compute_warpgroups(dhqk_p), chunk)[0]
    tiles = {"parallel_fw_Hintra": parallel_fw.kernel_tiles, "parallel_bw_dV": parallel_bw.kernel_tiles}
    return tiles.get(kernel, parallel_bw_sliced.kernel_tiles)(chunk, dhqk_p, dhhv_p, parts)[0]


def _inputs(case: str):
    """The case's q, k, v, i, f and initial states in float32 (its extreme gates where it has them)."""
    batch, heads, seq_len, dhqk, dhhv, *_, extreme = CASES[case]
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(
        case_key("mosaic", case), batch, heads, seq_len, dhqk, dhhv, jnp.float32, with_initial=True
    )
    i, f = extreme_gates(i, f) if extreme else (i, f)
    return q, k, v, i, f, c0, n0, m0


def _recurrent_arrays(case: str):
    """The states kernel's arrays: k, v in the case's dtype, the gates f, i and float32 initial states."""
    dtype = CASES[case][6]
    _, k, v, i, f, c0, n0, m0 = _inputs(case)
    return k.astype(dtype), v.astype(dtype), f, i, c0, n0, m0


def _arrays(case: str):
    """The kernel's arrays: q, k, v, gates, and float32 states chained through the twin's recurrent_fw_C."""
    *_, chunk, dtype, input_gate, _, _ = CASES[case]
    q, k, v, i, f, c0, n0, m0 = _inputs(case)
    gate = {} if input_gate == "exponential" else {"input_gate": input_gate}
    states = xla_kernels.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, c0, n0, m0, chunk_size=chunk, **gate)
    return (*(x.astype(dtype) for x in (q, k, v)), i, f, *states)


def _backward_chain(case: str):
    """The forward's arrays chained through the twins, with vecN_out, vecM_out, a dH and a last state's gradient."""
    *_, chunk, dtype, input_gate, normalize, _ = CASES[case]
    q, k, v, i, f, *states = _arrays(case)
    call = KernelCall(chunk_size=chunk, eps=1e-6, input_gate=input_gate, normalize=normalize)
    _, n_out, m_out = xla_kernels.parallel_fw_Hintra(call, q, k, v, i, f, *states)
    dh = jax.random.normal(case_key("mosaic-dh", case), v.shape, dtype)
    dc_last = jax.random.normal(case_key("mosaic-dc", case), states[0].shape[:2] + (q.shape[-1], v.shape[-1]))
    return q, k, v, i, f, states, n_out, m_out, dh, dc_last


def _states_backward_arrays(case: str):
    """The states backward kernel's arrays: q, f, the forward's m states, vecM_out, dH, vecN_out, the last state's
    gradient and the forward's float32 C states."""
    q, _, _, _, f, states, n_out, m_out, dh, dc_last = _backward_chain(case)
    return q, f, states[2], m_out, dh, n_out, dc_last, states[0]


def _backward_arrays(case: str):
    """The parallel backward kernels' arrays (as chunkwise's backward passes them), chained through the twins: q, k,
    v, i, (vecA, vecB, vecR), the forward's float32 states, vecN_out, vecM_out, dH and the dC states."""
    *_, chunk, _, input_gate, normalize, _ = CASES[case]
    q, k, v, i, f, states, n_out, m_out, dh, dc_last = _backward_chain(case)
    call = KernelCall(chunk_size=chunk, eps=1e-6, input_gate=input_gate, normalize=normalize)
    dc_states = xla_kernels.recurrent_bw_dC(call, q, f, states[2], m_out, dh, n_out, dc_last, states[0])[0]
    _, vec_a = chunkwise_log_gates(i, f, chunk, input_gate)
    vec_b, vec_r = compute_chunkwise_reset_gates(f, chunk)
    return q, k, v, i, (vec_a, vec_b, vec_r), tuple(states), n_out, m_out, dh, dc_states


# Each Mosaic GPU kernel: its launcher, the twin's, the arrays it takes, and whether it rounds 16-bit operands where
# the twin does. dV, dK and dQ, as the Triton kernels, round the gated scores times 1/(den + eps) once where the twin
# rounds each factor; the states backward rounds q·s·e^{b + m_{k-1} − m}/(den + eps) once where the twin rounds q̄ and
# dH/(den + eps) apart. At bf16 on "bf16-tiles", against float64, the kernel is the nearer for each gradient: dK and
# dQ 1.8e-3 (twins 2.4e-3), dC 5.9e-4 (twin 8.1e-4); <dC, C> 6.5e-4 (twin 2.7e-4).
KERNELS = {
    "recurrent_fw_C": (recurrent_fw.recurrent_fw_C, xla_kernels.recurrent_fw_C, _recurrent_arrays, True),
    "recurrent_bw_dC": (recurrent_bw.recurrent_bw_dC, xla_kernels.recurrent_bw_dC, _states_backward_arrays, False),
    "parallel_fw_Hintra": (parallel_fw.parallel_fw_Hintra, xla_kernels.parallel_fw_Hintra, _arrays, True),
    "parallel_bw_dV": (parallel_bw.parallel_bw_dV, xla_kernels.parallel_bw_dV, _backward_arrays, False),
    "parallel_bw_dK": (parallel_bw_sliced.parallel_bw_dK, xla_kernels.parallel_bw_dK, _backward_arrays, False),
    "parallel_bw_dQ": (parallel_bw_sliced.parallel_bw_dQ, xla_kernels.parallel_bw_dQ, _backward_arrays, False),
}


# Interpreted, a 16-bit output that rounds where the twin rounds can still land one rounding step from the twin's
# value wherever the float32 sums before the rounding (in another order than the twin's) straddle a rounding
# boundary: about 1e-7 / 2^-8, some 1e-5 of the values (the states kernel's bf16 C at "bf16-tiles", 128 steps a
# product: 8 of 196,608). Such outputs may differ from the twin's in at most this fraction of values, each by at
# most one rounding step of the larger of its magnitude and _NEAR_ZERO of the output's rms (sums that cancel near
# zero keep their absolute error, not their relative one).
_ROUNDING_STEP_FRACTION = 1e-3
_NEAR_ZERO = 2.0**-8


def _beyond_one_rounding_step(out: jax.Array, ref: jax.Array) -> tuple[int, float]:
    """(values of `out` more than one rounding step of its dtype from `ref`'s, fraction of values that differ)."""
    out64, ref64 = (np.asarray(x, np.float64) for x in (out, ref))
    floor = _NEAR_ZERO * np.sqrt(np.mean(ref64**2))
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref64), floor))) - jnp.finfo(out.dtype).nmant)
    diff = np.abs(out64 - ref64)
    return int(np.sum(diff > step)), float(np.mean(diff > 0))


@needs_mosaic_flag
@pytest.mark.parametrize("mode", _MODES or ["mosaic_interpret"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_twin(kernel, case, mode):
    """Interpreted, the interpreter's float32 bound where the rounding points are the twin's (float32 inputs in
    three parts, and 16-bit ones for a kernel that rounds as its twin), else the compiled bound of the case's
    dtype; 16-bit outputs where the rounding points are the twin's: at most one rounding step from the twin's
    values (_ROUNDING_STEP_FRACTION). Compiled, the backend's kernel-twin bound of the case's dtype (float32 inputs
    run as bf16 parts: split_operand)."""
    skip_unless_available(mode)
    *_, chunk, dtype, input_gate, normalize, _ = CASES[case]
    launcher, twin, arrays, rounds_as_twin = KERNELS[kernel]
    args = jax.jit(functools.partial(arrays, case))()
    interpret = mode == "mosaic_interpret"
    call = KernelCall(
        chunk_size=chunk,
        eps=1e-6,
        input_gate=input_gate,
        normalize=normalize,
        states_dtype=state_buffer_dtype(dtype),  # 16-bit inputs: C states stored in bf16, the last one in float32
        interpret=interpret,
    )
    expected = jax.tree.leaves(jax.jit(lambda *a: twin(call, *a))(*args))
    actual = jax.tree.leaves(jax.jit(lambda *a: launcher(call, *a))(*args))
    if dtype == jnp.float32:  # three bf16 parts carry float32's 24 bits; two, where three do not fit, carry 16
        rounds_as_twin = _operand_parts(kernel, case) == 3
    if interpret and rounds_as_twin:
        tolerance = KERNEL_TWIN_TOLERANCE["mosaic_interpret", "float32"]
    else:
        tolerance = KERNEL_TWIN_TOLERANCE["mosaic", jnp.dtype(dtype).name]
    assert len(actual) == len(expected)
    for index, (out, ref) in enumerate(zip(actual, expected)):
        assert out.shape == ref.shape and out.dtype == ref.dtype, (kernel, index)
        if interpret and rounds_as_twin and out.dtype.itemsize == 2:
            beyond, stepped = _beyond_one_rounding_step(out, ref)
            assert beyond == 0 and stepped <= _ROUNDING_STEP_FRACTION, (kernel, index, beyond, stepped)
        else:
            assert rel_err(out, ref) <= tolerance, f"{kernel} output {index}: {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_runs_in_three_parts_where_they_fit(kernel):
    """float32 inputs run as three bf16 parts (float32's 24 bits) in every float32 case but the parallel kernels' at
    the 7B widths, whose tiles fit only two. A tile choice that gives up a part for anything else fails here; the
    twin bound would not catch it (two parts land about 8e-6 from the twin at these shapes, under its 1e-5)."""
    for case, (*_, dtype, _, _, _) in CASES.items():
        if dtype == jnp.float32:
            expected = 2 if case == "7b-widths-f32" and kernel.startswith("parallel") else 3
            assert _operand_parts(kernel, case) == expected, case


_LOWERING_CHUNK = 256


def _lowering_args(dtype, dhqk: int = 256, dhhv: int = 512) -> dict:
    """Each kernel's argument shapes for lowering without a GPU: B 1, NH 2, S 512, chunk 256, the 7B head widths by
    default."""
    batch, heads, seq_len, chunk = 1, 2, 512, _LOWERING_CHUNK
    num_chunks = seq_len // chunk
    spec = jax.ShapeDtypeStruct
    seq = lambda *dims, dt=dtype: spec((batch, heads, seq_len, *dims), dt)
    gates = lambda dt=jnp.float32: spec((batch, heads, num_chunks, chunk), dt)
    states = (
        spec((batch, heads, (num_chunks + 1) * dhqk, dhhv), dtype),
        spec((batch, heads, (num_chunks + 1) * dhqk), jnp.float32),
        spec((batch, heads, num_chunks + 1), jnp.float32),
    )
    q, v, vec = seq(dhqk), seq(dhhv), seq(dt=jnp.float32)
    initial = (spec((batch, heads, dhqk, dhhv), jnp.float32), spec((batch, heads, dhqk), jnp.float32))
    backward = (q, q, v, vec, (gates(), gates(), gates(jnp.int32)), states, vec, vec, v, states[0])
    return {
        "recurrent_fw_C": (q, v, vec, vec, *initial, spec((batch, heads), jnp.float32)),
        "recurrent_bw_dC": (q, vec, states[2], vec, v, vec, initial[0], states[0]),
        "parallel_fw_Hintra": (q, q, v, vec, vec, *states),
        "parallel_bw_dV": backward,
        "parallel_bw_dK": backward,
        "parallel_bw_dQ": backward,
    }


def _lowered_for_h100(function, args) -> str:
    """StableHLO of `function` on `args` lowered for cuda under an H100 as JAX describes one, without a GPU."""
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100)):
        return jax.jit(function).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_lowers_for_hopper(kernel, dtype):
    """The 7B head widths lower to one Mosaic GPU kernel for cuda without a GPU (compilation to sm_90a needs one):
    every run, as tests/test_lowering.py lowers the Triton kernels, so that a kernel that cannot lower fails CI."""
    launcher = KERNELS[kernel][0]
    call = KernelCall(chunk_size=_LOWERING_CHUNK, eps=1e-6, output_dtype=dtype, states_dtype=state_buffer_dtype(dtype))
    text = _lowered_for_h100(lambda *a: launcher(call, *a), _lowering_args(dtype)[kernel])
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert f"mlstm_chunkwise__{kernel}" in text


@needs_mosaic_flag
@pytest.mark.parametrize("mode", _MODES or ["mosaic_interpret"])
@pytest.mark.parametrize("case", ["2wg-f32", "resets-padded-sigmoid-unnormalised-f32", "bf16-tiles"])
def test_dK_and_dQ_in_one_launch_equal_two_launches(case, mode):
    """parallel_bw_dK_dQ runs each program of parallel_bw_dK and parallel_bw_dQ as they do: the same values, bit
    for bit (16-bit outputs at "bf16-tiles")."""
    skip_unless_available(mode)
    *_, chunk, dtype, input_gate, normalize, _ = CASES[case]
    args = jax.jit(functools.partial(_backward_arrays, case))()
    call = KernelCall(
        chunk_size=chunk,
        eps=1e-6,
        input_gate=input_gate,
        normalize=normalize,
        output_dtype=dtype,
        interpret=mode == "mosaic_interpret",
    )
    one = jax.jit(lambda *a: parallel_bw_sliced.parallel_bw_dK_dQ(call, *a))(*args)
    two = jax.jit(
        lambda *a: (parallel_bw_sliced.parallel_bw_dK(call, *a), parallel_bw_sliced.parallel_bw_dQ(call, *a))
    )(*args)
    for out, ref in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        assert out.dtype == ref.dtype and np.array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize("dhqk, dhhv, launches", [(256, 512, 1), (96, 192, 2)], ids=["7b-widths", "padded"])
def test_dK_and_dQ_lower_to_one_launch_where_no_head_dim_is_padded(dhqk, dhhv, launches):
    """The backend's dK and dQ (bf16, lowered for cuda without a GPU): one Mosaic GPU kernel at the 7B head widths;
    two where a head dim is zero-padded (`parallel_bw_sliced.supports_one_launch`: peak memory)."""
    call = KernelCall(chunk_size=_LOWERING_CHUNK, eps=1e-6, output_dtype=jnp.bfloat16, states_dtype="bfloat16")
    args = _lowering_args(jnp.bfloat16, dhqk, dhhv)["parallel_bw_dK"]
    text = _lowered_for_h100(lambda *a: mosaic_gpu.KERNELS.dK_and_dQ(call, call, *a), args)
    assert text.count("stablehlo.custom_call @mosaic_gpu") == launches
    one_launch = "mlstm_chunkwise__parallel_bw_dK__mlstm_chunkwise__parallel_bw_dQ" in text
    assert one_launch == (launches == 1)


@pytest.mark.parametrize(
    "chunk, dhqk, dtype, match",
    [(32, 64, jnp.bfloat16, "chunk_size"), (128, 320, jnp.bfloat16, "DHQK"), (128, 64, jnp.int8, "inputs")],
)
def test_refuses_unsupported_shapes(chunk, dhqk, dtype, match):
    problem = parallel_fw.unsupported(chunk, dhqk, dtype)
    with pytest.raises(ValueError, match=match):  # as the launchers raise it
        mosaic_common.launch_dims(problem, (1, 1, 256, dhqk), 64, chunk)


def test_max_states_in_log_depth_match_the_scan_over_chunks():
    """The states launcher's m_k (gates.chunk_max_states, an associative scan) against the scan over the chunks of
    gates.chunk_max_state, on gates that decay by up to 40 a chunk, hard resets (g = −∞), chunks whose log input
    gates all lie below the floor, and initial m of either sign: equal up to the order of the sums of g."""
    key = jax.random.split(jax.random.PRNGKey(7), 3)
    scaG = -40.0 * jax.random.uniform(key[0], (2, 3, 37))
    scaG = scaG.at[:, :, ::5].set(-jnp.inf)  # a reset every fifth chunk
    vecA = 30.0 * jax.random.normal(key[1], (2, 3, 37, 16))
    vecA = vecA.at[:, :, 3::7].set(-jnp.inf)  # chunks with nothing above the floor
    m_initial = 50.0 * jax.random.normal(key[2], (2, 3))
    step = lambda m, x: (chunk_max_state(x[0], m, x[1]),) * 2
    _, expected = jax.lax.scan(step, m_initial, (jnp.moveaxis(scaG, 2, 0), jnp.moveaxis(vecA, 2, 0)))
    np.testing.assert_allclose(
        chunk_max_states(scaG, m_initial, vecA), jnp.moveaxis(expected, 0, 2), rtol=1e-6, atol=1e-5
    )


def test_last_resets_in_the_kernels_dtype_equal_the_int32_ones():
    """The parallel kernels take the last resets as common.RESETS_DTYPE (int16): every in-chunk position of the
    largest chunk fits, and H's launcher, which makes them in that dtype, gets the int32 positions, resets at a
    chunk's first and last step included."""
    chunk = max(mosaic_common.CHUNK_SIZES)
    assert chunk - 1 <= jnp.iinfo(mosaic_common.RESETS_DTYPE).max
    f = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 4 * chunk))
    f = f.at[0, :, jnp.array([0, 17, chunk - 1, chunk, 3 * chunk - 1])].set(-jnp.inf)  # no reset in chunk 3
    vec_b, vec_r = compute_chunkwise_reset_gates(f, chunk)
    vec_b_small, vec_r_small = compute_chunkwise_reset_gates(f, chunk, mosaic_common.RESETS_DTYPE)
    assert vec_r_small.dtype == mosaic_common.RESETS_DTYPE
    np.testing.assert_array_equal(vec_r_small.astype(jnp.int32), vec_r)
    np.testing.assert_array_equal(vec_b_small, vec_b)
    assert int(vec_r[0, 0, 0, -1]) == chunk - 1 and int(vec_r[0, 0, 3, -1]) == -1
    with pytest.raises(ValueError, match="reset_dtype int8"):
        compute_chunkwise_reset_gates(f, chunk, jnp.int8)
    # H's launcher makes them in that dtype: no int32 array converted on the way
    dims = mosaic_common.launch_dims(None, (2, 3, 4 * chunk, 64), 64, chunk)
    call = KernelCall(chunk_size=chunk)
    make_gates = lambda f, i, m: parallel_fw._kernel_gates(call, i, f, m, dims)
    jaxpr = jax.make_jaxpr(make_gates)(f, f, jnp.zeros((2, 3, 5)))
    gates, _ = jax.eval_shape(make_gates, f, f, jnp.zeros((2, 3, 5)))
    assert gates.resets.dtype == mosaic_common.RESETS_DTYPE
    converts = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"]
    assert not [e for e in converts if e.params["new_dtype"] == mosaic_common.RESETS_DTYPE], converts


def test_states_kernel_takes_any_head_dims_and_chunks_of_64_rows():
    """recurrent_fw_C runs 64 time steps per ring step: chunk · save_states_every_nth_chunk in multiples of 64, any
    head dims (tiles of 64 DHQK rows); the mosaic backend runs the Triton kernel for the rest."""
    assert recurrent_fw.unsupported(64 * 5, jnp.bfloat16) is None
    assert "multiples of 64" in recurrent_fw.unsupported(32, jnp.bfloat16)
    assert "inputs" in recurrent_fw.unsupported(128, jnp.float64)
    keys, values = jnp.zeros((1, 1, 128, 64), jnp.float32), jnp.zeros((1, 1, 128, 64), jnp.float32)
    interpreted = dict(chunk_size=32, interpret=True)  # interpreted, the grid's size does not matter
    assert recurrent_fw.supports(KernelCall(**interpreted, save_states_every_nth_chunk=2), keys, values)
    assert not recurrent_fw.supports(KernelCall(**interpreted), keys, values)


@pytest.mark.parametrize(
    "batch, heads, dhqk, dhhv, programs",
    [(8, 8, 256, 512, 512), (8, 16, 128, 256, 256), (4, 16, 128, 128, 64), (4, 8, 96, 192, 96)],
    ids=["7b", "tfla-paper", "small-heads", "odd-heads"],
)
def test_states_kernels_run_where_their_grid_fills_the_card(batch, heads, dhqk, dhhv, programs):
    """Compiled, both states kernels take a call whose grid has a program for each of an H100's or H200's 132 SMs
    (the card's count on a GPU, that count off one) and leave the others to Triton's kernel; interpreted, every
    call they can run."""
    qk = jax.ShapeDtypeStruct((batch, heads, 256, dhqk), jnp.bfloat16)
    vh = jax.ShapeDtypeStruct((batch, heads, 256, dhhv), jnp.bfloat16)
    for interpret in (False, True):
        call = KernelCall(chunk_size=128, interpret=interpret)
        expected = interpret or programs >= (device_properties().core_count or 132)
        assert recurrent_fw.supports(call, qk, vh) is expected, (interpret, programs)
        assert recurrent_bw.supports(call, qk, None, None, None, vh) is expected, (interpret, programs)


@pytest.mark.parametrize("parts", [3, 2])
def test_float32_operand_parts_sum_to_the_input(parts):
    """The bf16 parts a float32 input is split into sum to it: exactly for 3 parts, to 16 bits for 2 (DHQK 256)."""
    x = jax.random.normal(case_key("mosaic", "split"), (4096,), jnp.float32) * jnp.logspace(-20, 20, 4096)
    stacked = jax.jit(mosaic_common.split_operand, static_argnums=(1, 2))(x, parts, jnp.bfloat16)
    assert stacked.shape == (parts, 4096) and stacked.dtype == jnp.bfloat16
    total = jnp.sum(stacked.astype(jnp.float32), axis=0)  # exact: the parts hold disjoint runs of x's bits
    assert rel_err(total, x) <= (0.0 if parts == 3 else 2.0**-16)
