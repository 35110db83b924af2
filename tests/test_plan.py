"""The plan and the backend registry: per-kernel launch configs, the registered backends, the chunk clamp, and the
structure rule that keeps signatures short (the options' rules, each checked once at the API: tests/test_inputs.py)."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, use_abstract_mesh

import pallas_mlstm
from pallas_mlstm import mosaic_gpu
from pallas_mlstm.accuracy import rel_err
from pallas_mlstm.benchmarks.sweep import _backend_stages
from pallas_mlstm.config import TUNED_CONFIGS_ENV, ChunkwiseConfig, shape_class
from pallas_mlstm.kernel_call import CHUNKWISE_KERNELS
from pallas_mlstm.plan import launches_for, make_chunking
from pallas_mlstm.registry import get_backend, kernel_alternatives, registered, with_kernel_backends
from tests.helpers import CUDA_DEVICE, MOSAIC_KERNELS, MOSAIC_LAUNCHES_LOWERED, case_key, lower_for_cuda, mlstm_inputs

_PACKAGE = pathlib.Path(pallas_mlstm.__file__).parent


def test_backends_are_registered_objects_and_none_picks_by_priority():
    assert pallas_mlstm.BACKENDS == ("triton", "interpret", "xla", "mosaic", "mosaic_interpret")
    assert get_backend(None).name == ("triton" if jax.default_backend() == "gpu" else "xla")
    assert registered("interpret").kernels is registered("triton").kernels and registered("interpret").interpret
    # mosaic: Triton's kernels but those of MOSAIC_KERNELS, picked only when named; its interpreter runs
    # unpartitioned
    mosaic, triton = registered("mosaic").kernels, registered("triton").kernels
    assert [k for k in CHUNKWISE_KERNELS if getattr(mosaic, k) is not getattr(triton, k)] == MOSAIC_KERNELS
    assert registered("mosaic").priority is None and registered("mosaic_interpret").kernels is mosaic
    assert registered("mosaic_interpret").interpret and not registered("mosaic_interpret").partitionable
    assert registered("xla").launch_type is None and registered("triton").launch_type is pallas_mlstm.TritonLaunch
    assert {registered(name).min_chunk for name in ("triton", "interpret")} == {16} and registered("xla").min_chunk == 1
    with pytest.raises(ValueError, match="backend must be one of"):
        registered("cuda")


def test_a_kernel_entry_sets_that_kernel_only_and_wins_over_the_flat_fields():
    triton = registered("triton")
    config = ChunkwiseConfig(
        siz_b_L_parallel=64,
        num_warps_intra=4,
        kernels={"parallel_bw_dK": pallas_mlstm.TritonLaunch(siz_b_LKV=128, num_warps=8)},
    )
    launches = dict(launches_for(triton, dict(config.launch_items()), config.kernel_launches()))
    assert set(launches) == set(CHUNKWISE_KERNELS)
    assert launches["parallel_bw_dK"] == pallas_mlstm.TritonLaunch(siz_b_LKV=128, num_warps=8)  # its own entry wins
    assert launches["parallel_bw_dQ"] == pallas_mlstm.TritonLaunch(siz_b_LQ=64, num_warps=4)  # the flat fields
    assert launches["parallel_bw_dV"] == pallas_mlstm.TritonLaunch(siz_b_LKV=64, num_warps=4)
    assert launches["recurrent_fw_C"] == pallas_mlstm.TritonLaunch()
    assert launches_for(registered("xla"), dict(config.launch_items()), config.kernel_launches()) == ()
    assert hash(config) == hash(ChunkwiseConfig(**{**dataclasses.asdict(config), "kernels": config.kernel_launches()}))


@pytest.mark.parametrize(
    "kernels,message",
    [
        ({"parallel_fw": {"num_warps": 4}}, "unknown kernel 'parallel_fw'"),
        ({"parallel_fw_Hintra": {"warps": 4}}, r"sets \['warps'\], which the triton backend's parallel_fw_Hintra"),
        (
            {"recurrent_fw_C": {"siz_b_LQ": 64}},
            r"sets \['siz_b_LQ'\].*use num_stages, num_warps, siz_b_DHHV, siz_b_DHQK",
        ),
        ({"parallel_bw_dV": {"num_warps": 3}}, "TritonLaunch.num_warps must be one of 1, 2, 4, 8, 16, 32; got 3"),
        ({"parallel_bw_dQ": {"siz_b_DHQK": 48}}, r"TritonLaunch.siz_b_DHQK must be a power of 2 >= 16"),
    ],
)
def test_bad_kernel_entries_raise_value_error(kernels, message):
    with pytest.raises(ValueError, match=message):
        config = ChunkwiseConfig(kernels=kernels)
        launches_for(registered("triton"), {}, config.kernel_launches())


def test_kernel_entries_run_and_change_no_result():
    q, k, v, i, f, *_ = mlstm_inputs(case_key("kernel-entries"), 1, 2, 64, 16, 32)
    config = ChunkwiseConfig(
        chunk_size=32,
        kernels={"parallel_fw_Hintra": {"siz_b_LQ": 16, "siz_b_LKV": 16}, "recurrent_bw_dC": {"siz_b_DHHV": 16}},
    )
    loss = lambda config: lambda *a: jnp.sum(pallas_mlstm.mlstm_chunkwise(*a, backend="interpret", config=config) ** 2)
    ours = jax.jit(jax.value_and_grad(loss(config), argnums=(0, 1, 2)))(q, k, v, i, f)
    default = jax.jit(jax.value_and_grad(loss(ChunkwiseConfig(chunk_size=32)), argnums=(0, 1, 2)))(q, k, v, i, f)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(default)))


def test_chunk_longer_than_the_sequence_is_clamped():
    chunking, padded_len = make_chunking(registered("xla"), ChunkwiseConfig(), 4096, 64, None, None)
    assert chunking.chunk_size == 64 and padded_len == 64
    chunking, padded_len = make_chunking(registered("interpret"), ChunkwiseConfig(), 4096, 5, None, None)
    assert chunking.chunk_size == 16 and padded_len == 16  # the backend's smallest chunk
    q, k, v, i, f, *_ = mlstm_inputs(case_key("clamp"), 1, 1, 40, 8, 8)
    long, exact = (pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, backend="xla", chunk_size=c) for c in (4096, 64))
    assert rel_err(long, exact) == 0.0


# Upstream's signatures (pinned by test_contract.py) and Pallas kernel bodies (one ref per operand) may be long.
_LONG_SIGNATURES_ALLOWED = {
    "mlstm_chunkwise",  # the public entry point: every option a keyword
    "mlstm_chunkwise_fw",
    "mlstm_chunkwise_bw",
    "mlstm_chunkwise_max_triton",
    "mlstm_recurrent_step__triton_fw",
    *(f"mlstm_chunkwise__{name}" for name in CHUNKWISE_KERNELS),
}


def test_no_function_takes_more_than_12_parameters():
    too_long = []
    for path in _PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
            is_kernel_body = node.name.startswith("_") and node.name.endswith("_kernel")
            if count > 12 and node.name not in _LONG_SIGNATURES_ALLOWED and not is_kernel_body:
                too_long.append(f"{path.relative_to(_PACKAGE)}:{node.name} ({count})")
    assert not too_long


def test_kernel_backends_run_a_kernel_of_another_backend():
    """ChunkwiseConfig.kernel_backends, as given: checked where the call is planned (ValueError naming the entry);
    under a mesh of H100s (lowering without one) triton's parallel_fw_Hintra can come from mosaic, which tune
    tries."""
    config = ChunkwiseConfig(kernel_backends={"parallel_fw_Hintra": "mosaic"})
    assert config.kernel_backends == (("parallel_fw_Hintra", "mosaic"),)
    assert ChunkwiseConfig(**config.to_json()) == config and hash(config) == hash(ChunkwiseConfig(**config.to_json()))
    with pytest.raises(ValueError, match="kernel_backends names an unknown kernel 'parallel_fw'"):
        ChunkwiseConfig(kernel_backends={"parallel_fw": "mosaic"})
    with pytest.raises(ValueError, match=r"kernel_backends\['recurrent_fw_C'\] must be a backend name"):
        ChunkwiseConfig(kernel_backends={"recurrent_fw_C": 1})
    with pytest.raises(ValueError, match="names a kernel twice"):
        ChunkwiseConfig(kernel_backends=(("parallel_fw_Hintra", "mosaic"), ("parallel_fw_Hintra", "triton")))
    with pytest.raises(ValueError, match="must map kernel names to backend names"):
        ChunkwiseConfig(kernel_backends="mosaic")
    triton = registered("triton")
    hintra = (("parallel_fw_Hintra", "mosaic"),)
    if not mosaic_gpu.available():  # no Hopper GPU here
        with pytest.raises(ValueError, match=r"kernel_backends\['parallel_fw_Hintra'\] = 'mosaic': .*Hopper GPU"):
            with_kernel_backends(triton, hintra)
        assert with_kernel_backends(triton, hintra, tuned=True) is triton  # a tuned choice that cannot apply
    with pytest.raises(ValueError, match="'cuda': not a backend; use one of"):
        with_kernel_backends(triton, (("parallel_fw_Hintra", "cuda"),))
    q, k, v, i, f, *_ = mlstm_inputs(case_key("kernel-backends"), 1, 1, 32, 8, 8)
    with pytest.raises(ValueError, match="backend 'interpret' takes other launch configs than backend 'xla'"):
        pallas_mlstm.mlstm_chunkwise(
            q, k, v, i, f, backend="xla", config=ChunkwiseConfig(kernel_backends=(("parallel_fw_Hintra", "interpret"),))
        )
    assert with_kernel_backends(triton, (("parallel_fw_Hintra", "triton"),)) is triton
    alternatives = [(kernel, "mosaic") for kernel in MOSAIC_KERNELS]
    here = alternatives if mosaic_gpu.available() else []
    assert kernel_alternatives(triton) == here and len(_backend_stages("triton")) == len(here)
    mesh = AbstractMesh((1,), ("b",), axis_types=(AxisType.Explicit,), abstract_device=CUDA_DEVICE)
    with use_abstract_mesh(mesh):
        mixed = with_kernel_backends(triton, hintra)
        assert kernel_alternatives(triton) == alternatives
        stages = _backend_stages("triton")
    # tune's first stages: one per kernel, each switching that kernel's backend over the best so far, so that
    # switches add up (and a kernel the start config ran in Mosaic GPU is tried in Triton again)
    assert [name for name, _ in stages] == [f"{kernel}: triton or mosaic" for kernel, _ in alternatives]
    best = ChunkwiseConfig(chunk_size=64)
    for (_, candidates_of), choice in zip(stages, alternatives):
        (best,) = candidates_of(best, None)
        assert choice in best.kernel_backends and best.chunk_size == 64
    assert best.kernel_backends == tuple(sorted(alternatives))
    (back,) = stages[0][1](best, None)
    assert dict(back.kernel_backends) == dict(alternatives[1:])
    assert mixed.name == "triton (parallel_fw_Hintra: mosaic)" and mixed.priority is None
    assert mixed.kernels == dataclasses.replace(
        triton.kernels, parallel_fw_Hintra=mosaic_gpu.KERNELS.parallel_fw_Hintra
    )


def test_dK_and_dQ_run_in_one_launch_only_where_one_backend_runs_both():
    """KernelSet.parallel_bw_dK_dQ, the one launch of dK and dQ, follows the two kernels: a set whose dK and dQ are
    mosaic's has mosaic's, one that mixes them (or runs both in Triton) has none and launches them apart."""
    mosaic, triton = registered("mosaic"), registered("triton")
    assert mosaic.kernels.parallel_bw_dK_dQ is not None and triton.kernels.parallel_bw_dK_dQ is None
    mesh = AbstractMesh((1,), ("b",), axis_types=(AxisType.Explicit,), abstract_device=CUDA_DEVICE)
    with use_abstract_mesh(mesh):  # an H100 as lowering sees one: mosaic's kernels can stand in
        both = with_kernel_backends(triton, (("parallel_bw_dK", "mosaic"), ("parallel_bw_dQ", "mosaic")))
        one = with_kernel_backends(triton, (("parallel_bw_dK", "mosaic"),))
        mixed = with_kernel_backends(mosaic, (("parallel_bw_dQ", "triton"),))
        other = with_kernel_backends(mosaic, (("parallel_bw_dV", "triton"),))
    assert both.kernels.parallel_bw_dK_dQ is mosaic.kernels.parallel_bw_dK_dQ
    assert one.kernels.parallel_bw_dK_dQ is None and mixed.kernels.parallel_bw_dK_dQ is None
    assert other.kernels.parallel_bw_dK_dQ is mosaic.kernels.parallel_bw_dK_dQ


def test_mosaic_backend_runs_the_triton_kernels_for_shapes_its_own_do_not_take():
    """Chunk 32 is no Mosaic GPU kernel's: backend="mosaic" lowers (for an H100, without one) to Triton's kernels
    alone, as many as the Triton backend's."""
    if jax.default_backend() == "gpu" and not mosaic_gpu.available():
        pytest.skip("a GPU other than Hopper: backend='mosaic' cannot run on it")
    mesh = AbstractMesh((1,), ("b",), axis_types=(AxisType.Explicit,), abstract_device=CUDA_DEVICE)
    mosaic, triton = (lower_for_cuda(mesh, (None,), backend=b, chunk_size=32) for b in ("mosaic", "triton"))
    assert mosaic.count("stablehlo.custom_call @mosaic_gpu") == 0
    assert mosaic.count("__gpu$xla.gpu.triton") == triton.count("__gpu$xla.gpu.triton") > 0


def test_backend_none_follows_a_tuned_configs_kernel_backends(monkeypatch, tmp_path):
    """A tuned config that runs two kernels in Mosaic GPU (H and dV): backend=None on an H100 (lowered without one)
    takes it, so the program holds those two Mosaic GPU kernels; backend="mosaic", whose kernels they are, takes it
    too and runs its own (MOSAIC_KERNELS_LOWERED: the states kernels' grids are too small there);
    backend="triton", named, passes the entry over (it was measured with other kernels) and stays all Triton."""
    if jax.default_backend() == "gpu" and not mosaic_gpu.available():
        pytest.skip("a GPU other than Hopper: the tuned Mosaic GPU kernel cannot run on it")
    tuned = tmp_path / "tuned_configs.json"
    tuned_backends = {"parallel_fw_Hintra": "mosaic", "parallel_bw_dV": "mosaic"}
    stored = {"chunk_size": 64, "siz_b_L_parallel": 32, "kernel_backends": tuned_backends}
    # the lowering runs on this CPU, so the tuned entry is looked up for its device_kind
    configs = {jax.devices()[0].device_kind: {shape_class(512, 64, 128): {"config": stored}}}
    tuned.write_text(json.dumps({"configs": configs}))
    monkeypatch.setenv(TUNED_CONFIGS_ENV, str(tuned))
    planned = []  # the config each call planned with
    make_chunking = pallas_mlstm.api.make_chunking
    monkeypatch.setattr(pallas_mlstm.api, "make_chunking", lambda *a: planned.append(a[1]) or make_chunking(*a))
    mesh = AbstractMesh((1,), ("b",), axis_types=(AxisType.Explicit,), abstract_device=CUDA_DEVICE)
    for backend, mosaic_kernels, config in (
        (None, len(tuned_backends), ChunkwiseConfig(**stored)),
        ("mosaic", MOSAIC_LAUNCHES_LOWERED, ChunkwiseConfig(**stored)),
        ("triton", 0, ChunkwiseConfig()),
    ):
        planned.clear()
        text = lower_for_cuda(mesh, (None,), backend=backend)
        assert text.count("stablehlo.custom_call @mosaic_gpu") == mosaic_kernels, backend
        assert text.count("__gpu$xla.gpu.triton") > 0
        assert planned and all(p == config for p in planned), (backend, planned)
