"""`mlstm_chunkwise` on sharded inputs: batch, heads and sequence over 4 CPU devices, vs one device, for both cells,
with segments inside shards; packed documents and decoding steps under sharded jit.

The sharded cases need 4 devices before JAX starts, so they run in a subprocess of their own
(tests/sharding_cases.py, one per session, shared by the pytest-xdist workers); the tests here read its per-run
JSON. The Triton lowering of the per-shard program for a 2- and 4-GPU mesh runs here, deviceless, and the mosaic
backend's for a 4-GPU mesh.
"""

import fcntl
import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh, AxisType

from pallas_mlstm.accuracy import ORACLE_TOLERANCE, SHARDED_TOLERANCE
from tests import flags as test_flags
from tests.helpers import CUDA_DEVICE, MOSAIC_LAUNCHES_LOWERED, lower_for_cuda
from tests.sharding_cases import CASES, DHHV, DHQK

_REPO = pathlib.Path(__file__).resolve().parents[1]
# The interpreter is slow: one case, the Pallas kernels under batch and sequence sharding over Explicit axes (Auto
# axes, remat and the user's shard_map run the same partitioning whatever the kernels: xla covers them). xla runs
# every other case, and that one too where the interpreter does not (the partitioning is the same).
_INTERPRET_CASES = ("batch_seq_explicit",)
_RUNS = [
    ("xla", name) for name in CASES if name not in _INTERPRET_CASES or "interpret" not in test_flags.BACKEND.value
] + [("interpret", name) for name in _INTERPRET_CASES]

# Sharded vs one-device float32 results: within SHARDED_TOLERANCE. Where float32 itself is noisier than
# that (a gradient that is the exp of a sequence-long sum, or a reverse cumulative sum of differences: either
# result is then 1e-7 to 5e-6 from float64, and which of the two is closer depends on the seed), the sharded
# result passes if it keeps the op's float32 accuracy bound against float64 (ORACLE_TOLERANCE of xla, float32:
# the bound one device meets). A sharding defect (a state not passed, combined or placed right) moves results
# by orders of magnitude more.
FLOAT32_BOUND = dict(zip(("forward", "gradient"), ORACLE_TOLERANCE[("xla", "float32")]))


def _four_device_environment():
    return dict(
        os.environ,
        XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]).strip(),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
    )


def _selected_runs() -> list[str]:
    """The runs of tests/sharding_cases.py this session's --backend selects: BACKEND/CASE, and documents_and_steps
    (xla)."""
    runs = [f"{backend}/{name}" for backend, name in _RUNS if backend in test_flags.BACKEND.value]
    return runs + (["documents_and_steps"] if "xla" in test_flags.BACKEND.value else [])


def _run_all() -> dict:
    """Every selected run in one 4-device subprocess: {run: result}."""
    runs = _selected_runs()
    command = [sys.executable, "-m", "tests.sharding_cases", str(test_flags.SEED.value), *runs]
    done = subprocess.run(
        command, cwd=_REPO, env=_four_device_environment(), capture_output=True, text=True, timeout=1200
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["run"]] = result
    if done.returncode:  # every run it did not reach fails with its error (run once, not once per run)
        results = {run: results.get(run, {"crash": done.stderr[-6000:]}) for run in runs}
    return results


@functools.cache
def _results(shared_dir: pathlib.Path) -> dict:
    """_run_all(), once per pytest session: the first xdist worker to ask runs it, under a file lock in the session's
    shared temporary folder, and the others wait for its JSON (tests/conftest.py orders these tests first, so that
    under xdist one worker takes them all)."""
    path = shared_dir / f"sharding-seed{test_flags.SEED.value}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            path.write_text(json.dumps(_run_all()))
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A folder of this pytest session that every xdist worker sees (the base temp folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.mark.parametrize("backend,name", _RUNS, ids=[f"{b}-{n}" for b, n in _RUNS])
def test_sharded_matches_one_device(backend, name, shared_dir):
    if backend not in test_flags.BACKEND.value:
        pytest.skip(f"backend {backend} not selected by --backend")
    case, result = CASES[name], _results(shared_dir)[f"{backend}/{name}"]
    assert "crash" not in result, f"tests/sharding_cases.py failed:\n{result['crash']}"
    if case.expect_error is not None:
        assert case.expect_error in result.get("error", ""), result
        return
    for quantity, error in result["errors"].items():
        if case.tolerance is not None:
            assert error <= case.tolerance, (quantity, error, name, backend)
            continue
        if error <= SHARDED_TOLERANCE:
            continue
        exact_error, one_device_exact_error = result["errors_f64"][quantity], result["one_device_errors_f64"][quantity]
        bound = FLOAT32_BOUND["gradient" if quantity.startswith("d") else "forward"]
        assert exact_error <= bound, (
            f"{quantity}: relative error {error:.2e} vs one device (> {SHARDED_TOLERANCE:.0e}), {exact_error:.2e} vs "
            f"float64 (> {bound:.0e}; one device: {one_device_exact_error:.2e}) ({name}, {backend})"
        )
    for quantity, (got, expected) in result["shardings"].items():
        assert got == expected, f"{quantity} is sharded as {got}, expected {expected} ({name}, {backend})"
    collectives = result["collectives"]
    if "s" in case.axis_names:  # only states move: (..., DHQK, DHHV), (..., DHQK) or (...) over B, NH and shards
        assert collectives and all(_is_state_shaped(shape) for _, shape in collectives), (
            f"more than states move between devices: {collectives}"
        )
    else:  # nothing but the loss's scalar sums
        assert all(shape == [] for _, shape in collectives), f"arrays move between devices: {collectives}"


def _is_state_shaped(shape: list[int]) -> bool:
    """A state, its scalars or a stack of them: leading dims no larger than 8 (B, NH, the 4 shards, a vmap of 2),
    then (DHQK, DHHV), (DHQK,) or nothing. Every sequence-shaped array has a dim of at least 32 (S / 4)."""
    for tail in ((DHQK, DHHV), (DHQK,), ()):
        lead = shape[: len(shape) - len(tail)]
        if tuple(shape[len(lead) :]) == tail and all(d <= 8 for d in lead):
            return True
    return False


@functools.cache
def _single_gpu_kernel_count() -> int:
    mesh = AbstractMesh((1,), ("b",), axis_types=(AxisType.Auto,), abstract_device=CUDA_DEVICE)
    return lower_for_cuda(mesh, (None,)).count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize(
    "mesh_shape,axis_names,lead_spec",
    [
        ((2,), ("b",), ("b",)),
        ((2, 2), ("b", "h"), ("b", "h")),
        ((2, 2), ("b", "s"), ("b", None, "s")),
    ],
    ids=["2gpu-batch", "4gpu-batch-heads", "4gpu-batch-seq"],
)
def test_triton_lowers_on_gpu_mesh(mesh_shape, axis_names, lead_spec):
    """The per-shard program (the one XLA runs per GPU) lowers to Triton for a multi-GPU mesh, with the kernels of
    one GPU's program."""
    mesh = AbstractMesh(
        mesh_shape, axis_names, axis_types=(AxisType.Explicit,) * len(axis_names), abstract_device=CUDA_DEVICE
    )
    text = lower_for_cuda(mesh, lead_spec)
    kernels = text.count("__gpu$xla.gpu.triton")
    single = _single_gpu_kernel_count()
    # as many kernel launches as on one GPU: a sequence shard repeats no pass (Explicit axes keep the chunk states)
    assert kernels == single > 0, (kernels, single)
    assert "sdy.manual_computation" in text  # the kernels run per shard


def test_mosaic_lowers_on_gpu_mesh():
    """backend="mosaic" under batch and sequence sharding over 4 GPUs: the per-shard program holds the Mosaic GPU
    kernels its grids take (MOSAIC_KERNELS_LOWERED, dK and dQ in one launch) and Triton's others: one launch fewer
    than the Triton backend's."""
    mesh = AbstractMesh((2, 2), ("b", "s"), axis_types=(AxisType.Explicit,) * 2, abstract_device=CUDA_DEVICE)
    text = lower_for_cuda(mesh, ("b", None, "s"), backend="mosaic")
    mosaic, triton = text.count("stablehlo.custom_call @mosaic_gpu"), text.count("__gpu$xla.gpu.triton")
    assert mosaic == MOSAIC_LAUNCHES_LOWERED and mosaic + triton == _single_gpu_kernel_count() - 1, (mosaic, triton)
    assert "sdy.manual_computation" in text


def test_documents_and_steps_under_sharded_jit(shared_dir):
    """Packed documents (`segment_ids`) under batch x sequence sharding, with documents that straddle the shard edge
    and one that starts on it; decoding steps with B and NH sharded; unsplit inputs inside jax.set_mesh (Explicit
    and Auto axes): equal to one device (4 CPU devices, in the sharded cases' process:
    tests/sharding_cases.py:documents_and_steps)."""
    if "xla" not in test_flags.BACKEND.value:
        pytest.skip("backend xla not selected by --backend")
    result = _results(shared_dir)["documents_and_steps"]
    assert result.get("passed") and "crash" not in result, result.get("crash", result)
