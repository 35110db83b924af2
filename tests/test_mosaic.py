"""The Mosaic GPU parallel_fw_Hintra (pallas_mlstm/mosaic_gpu) against its jnp twin: in Mosaic GPU's interpret mode
(shared memory, TMA copies, barriers and warpgroups simulated on the CPU; the matmuls as jnp.dot), compiled on a
Hopper GPU, and lowered for one without it. `python -m pallas_mlstm.benchmarks.mosaic_check` also times it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_mlstm import xla_kernels
from pallas_mlstm.accuracy import KERNEL_TWIN_TOLERANCE, rel_err
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import parallel_fw
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
# "one-buffer-f32": float32 at DHQK 192 fits one buffer (stages=1): each C_{k-1} slice released before the next.
CASES = {
    "2wg-f32": (1, 2, 256, 64, 128, 128, jnp.float32, "exponential", True, False),
    "resets-padded-sigmoid-unnormalised-f32": (2, 1, 128, 48, 80, 64, jnp.float32, "sigmoid", False, True),
    "bf16-tiles": (1, 1, 512, 128, 512, 256, jnp.bfloat16, "exponential", True, False),
    "one-buffer-f32": (1, 1, 128, 192, 64, 64, jnp.float32, "exponential", True, False),
}


def _arrays(case: str):
    """The kernel's arrays: q, k, v, gates, and float32 states chained through the twin's recurrent_fw_C."""
    batch, heads, seq_len, dhqk, dhhv, chunk, dtype, input_gate, _, extreme = CASES[case]
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(
        case_key("mosaic", case), batch, heads, seq_len, dhqk, dhhv, jnp.float32, with_initial=True
    )
    if extreme:
        i, f = extreme_gates(i, f)
    gate = {} if input_gate == "exponential" else {"input_gate": input_gate}
    states = xla_kernels.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, c0, n0, m0, chunk_size=chunk, **gate)
    return (*(x.astype(dtype) for x in (q, k, v)), i, f, *states)


@needs_mosaic_flag
@pytest.mark.parametrize("mode", _MODES or ["mosaic_interpret"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_twin(case, mode):
    """Interpreted, the rounding points are the twin's: the interpreter's float32 bound for every case. Compiled,
    the backend's kernel-twin bound of the case's dtype (float32 inputs run as bf16 parts: split_operand)."""
    skip_unless_available(mode)
    *_, chunk, dtype, input_gate, normalize, _ = CASES[case]
    args = _arrays(case)
    interpret = mode == "mosaic_interpret"
    call = KernelCall(chunk_size=chunk, eps=1e-6, input_gate=input_gate, normalize=normalize, interpret=interpret)
    expected = jax.jit(lambda *a: xla_kernels.parallel_fw_Hintra(call, *a))(*args)
    actual = jax.jit(lambda *a: parallel_fw.parallel_fw_Hintra(call, *a))(*args)
    tolerance = KERNEL_TWIN_TOLERANCE[mode, "float32" if interpret else jnp.dtype(dtype).name]
    for name, out, ref in zip(("h", "vecN_out", "vecM_out"), actual, expected):
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        assert rel_err(out, ref) <= tolerance, f"{name}: {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_lowers_for_hopper(dtype):
    """The 7B head widths lower to one Mosaic GPU kernel for cuda without a GPU (compilation to sm_90a needs one):
    every run, as tests/test_lowering.py lowers the Triton kernels, so that a kernel that cannot lower fails CI."""
    batch, heads, seq_len, dhqk, dhhv, chunk = 1, 2, 512, 256, 512, 256
    num_chunks = seq_len // chunk
    spec = jax.ShapeDtypeStruct
    args = (
        spec((batch, heads, seq_len, dhqk), dtype),
        spec((batch, heads, seq_len, dhqk), dtype),
        spec((batch, heads, seq_len, dhhv), dtype),
        spec((batch, heads, seq_len), jnp.float32),
        spec((batch, heads, seq_len), jnp.float32),
        spec((batch, heads, (num_chunks + 1) * dhqk, dhhv), dtype),
        spec((batch, heads, (num_chunks + 1) * dhqk), jnp.float32),
        spec((batch, heads, num_chunks + 1), jnp.float32),
    )
    call = KernelCall(chunk_size=chunk, eps=1e-6, output_dtype=dtype)
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100)):
        lowered = jax.jit(lambda *a: parallel_fw.parallel_fw_Hintra(call, *a)).trace(*args)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert parallel_fw.NAME in text


@pytest.mark.parametrize(
    "chunk, dhqk, dtype, match",
    [(32, 64, jnp.bfloat16, "chunk_size"), (128, 320, jnp.bfloat16, "DHQK"), (128, 64, jnp.int8, "inputs")],
)
def test_refuses_unsupported_shapes(chunk, dhqk, dtype, match):
    with pytest.raises(ValueError, match=match):
        parallel_fw.check_shapes(chunk, dhqk, dtype)


@pytest.mark.parametrize("parts", [3, 2])
def test_float32_operand_parts_sum_to_the_input(parts):
    """The bf16 parts a float32 input is split into sum to it: exactly for 3 parts, to 16 bits for 2 (DHQK 256)."""
    x = jax.random.normal(case_key("mosaic", "split"), (4096,), jnp.float32) * jnp.logspace(-20, 20, 4096)
    stacked = jax.jit(parallel_fw.split_operand, static_argnums=(1, 2))(x, parts, jnp.bfloat16)
    assert stacked.shape == (parts, 4096) and stacked.dtype == jnp.bfloat16
    total = jnp.sum(stacked.astype(jnp.float32), axis=0)  # exact: the parts hold disjoint runs of x's bits
    assert rel_err(total, x) <= (0.0 if parts == 3 else 2.0**-16)
