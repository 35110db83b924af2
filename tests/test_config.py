"""ChunkwiseConfig's checks at construction, and the launch defaults of pallas_mlstm/launch_defaults.py:
their values, the chunk-size rule, and how each kernel resolves an omitted or None launch argument; tuned configs:
read by card and shape class from the packaged file and the user's, and used by the default config."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_mlstm import config as config_module
from pallas_mlstm import plan
from pallas_mlstm.config import ChunkwiseConfig, like_cards_configs, shape_class, tuned_config
from pallas_mlstm.device import DeviceProperties
from pallas_mlstm.pallas_triton import common, launch_defaults
from pallas_mlstm.pallas_triton.parallel_bw_dK import mlstm_chunkwise__parallel_bw_dK
from pallas_mlstm.pallas_triton.parallel_bw_dQ import mlstm_chunkwise__parallel_bw_dQ
from pallas_mlstm.pallas_triton.parallel_bw_dV import mlstm_chunkwise__parallel_bw_dV
from pallas_mlstm.pallas_triton.parallel_fw import mlstm_chunkwise__parallel_fw_Hintra
from pallas_mlstm.pallas_triton.recurrent_bw import mlstm_chunkwise__recurrent_bw_dC
from pallas_mlstm.pallas_triton.recurrent_fw import mlstm_chunkwise__recurrent_fw_C
from pallas_mlstm.plan import default_chunk_size, resolve_config
from pallas_mlstm.registry import registered, runs_tuned_kernels

TILE_FIELDS = ("siz_b_L_parallel", "siz_b_L_loop", "siz_b_DH_parallel", "siz_b_DH_loop")
WARP_FIELDS = ("num_warps_intra", "num_warps_inter")
STAGE_FIELDS = ("num_stages_intra", "num_stages_inter")
INT_FIELDS = ("chunk_size", *TILE_FIELDS, *WARP_FIELDS, *STAGE_FIELDS)
ALL_FIELDS = (*INT_FIELDS, "kernels", "kernel_backends")  # per-kernel entries: tests/test_plan.py


# --- ChunkwiseConfig --------------------------------------------------------------------------------------


def test_config_fields_are_the_checked_ones():
    assert tuple(field.name for field in dataclasses.fields(ChunkwiseConfig)) == ALL_FIELDS


def test_config_accepts_valid_fields():
    config = ChunkwiseConfig(
        chunk_size=1,
        siz_b_L_parallel=16,
        siz_b_L_loop=128,
        siz_b_DH_parallel=256,
        siz_b_DH_loop=64,
        num_warps_intra=1,
        num_warps_inter=32,
        num_stages_intra=1,
        num_stages_inter=5,
    )
    assert config.siz_b_DH_parallel == 256 and config.num_stages_inter == 5
    assert ChunkwiseConfig() == ChunkwiseConfig(**{name: None for name in INT_FIELDS})


def test_config_error_message_for_a_bad_tile():
    with pytest.raises(ValueError) as error:
        ChunkwiseConfig(siz_b_L_parallel=24)
    assert str(error.value) == (
        "ChunkwiseConfig.siz_b_L_parallel must be a power of 2 >= 16 (e.g. 32, 64, 128); got 24."
    )


@pytest.mark.parametrize("value", [0, -32, 3, 48, 96])
def test_config_rejects_non_power_of_2_chunk(value):
    with pytest.raises(ValueError, match=rf"ChunkwiseConfig\.chunk_size must be a power of 2 >= 1 .*got {value}\."):
        ChunkwiseConfig(chunk_size=value)


@pytest.mark.parametrize("field", TILE_FIELDS)
@pytest.mark.parametrize("value", [0, 8, 24, 96, -64])
def test_config_rejects_bad_tiles(field, value):
    with pytest.raises(ValueError, match=rf"ChunkwiseConfig\.{field} must be a power of 2 >= 16 .*got {value}\."):
        ChunkwiseConfig(**{field: value})


@pytest.mark.parametrize("field", WARP_FIELDS)
@pytest.mark.parametrize("value", [0, 3, 6, 64])
def test_config_rejects_bad_warps(field, value):
    with pytest.raises(ValueError, match=rf"ChunkwiseConfig\.{field} must be one of 1, 2, 4, 8, 16, 32; got {value}\."):
        ChunkwiseConfig(**{field: value})


@pytest.mark.parametrize("field", STAGE_FIELDS)
@pytest.mark.parametrize("value", [0, -1])
def test_config_rejects_bad_stages(field, value):
    with pytest.raises(ValueError, match=rf"ChunkwiseConfig\.{field} must be an int >= 1; got {value}\."):
        ChunkwiseConfig(**{field: value})


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, 64.0, "64", np.float32(64), [64]], ids=repr)
def test_config_rejects_non_ints(field, value):
    with pytest.raises(ValueError, match=rf"ChunkwiseConfig\.{field} must be an int or None; got "):
        ChunkwiseConfig(**{field: value})


@pytest.mark.parametrize("np_int", [np.int32, np.int64, np.uint16])
def test_config_accepts_numpy_ints_as_int(np_int):
    config = ChunkwiseConfig(
        chunk_size=np_int(64), siz_b_L_parallel=np_int(128), num_warps_intra=np_int(8), num_stages_inter=np_int(2)
    )
    assert config == ChunkwiseConfig(chunk_size=64, siz_b_L_parallel=128, num_warps_intra=8, num_stages_inter=2)
    assert hash(config) == hash(
        ChunkwiseConfig(chunk_size=64, siz_b_L_parallel=128, num_warps_intra=8, num_stages_inter=2)
    )
    assert all(
        type(getattr(config, name)) is int
        for name in ("chunk_size", "siz_b_L_parallel", "num_warps_intra", "num_stages_inter")
    )
    with pytest.raises(ValueError, match=r"ChunkwiseConfig\.siz_b_L_loop must be a power of 2 >= 16"):
        ChunkwiseConfig(siz_b_L_loop=np_int(24))


def test_config_checks_replace_too():
    with pytest.raises(ValueError, match=r"ChunkwiseConfig\.num_warps_inter"):
        dataclasses.replace(ChunkwiseConfig(chunk_size=64), num_warps_inter=5)


# --- chunk size -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq_len, minimum, expected",
    [
        (96, 1, 32),
        (4096, 1, 128),
        (128, 1, 128),
        (256, 16, 128),
        (192, 16, 64),
        (48, 16, 16),
        (7, 1, 1),
        (40, 1, 8),
        (1, 1, 1),
    ],
)
def test_default_chunk_size_rule(seq_len, minimum, expected):
    assert default_chunk_size(seq_len, minimum) == expected


def test_default_chunk_size_below_minimum():
    assert registered("triton").min_chunk == 16 and plan.DEFAULT_MAX_CHUNK == 128
    with pytest.raises(ValueError, match=r"S=40 must be a multiple of 16 .*pad S to 48"):
        default_chunk_size(40, registered("triton").min_chunk)


# --- launch defaults --------------------------------------------------------------------------------------


def test_launch_default_values():
    tiles = lambda d: (d.siz_b_LQ, d.siz_b_LKV, d.siz_b_DHQK, d.siz_b_DHHV)
    assert tiles(launch_defaults.PARALLEL_FW_HINTRA) == (128, 64, 64, 256)
    assert tiles(launch_defaults.PARALLEL_BW_DQ) == (128, 64, 256, 64)
    assert tiles(launch_defaults.PARALLEL_BW_DK) == (64, 128, 256, 64)
    assert tiles(launch_defaults.PARALLEL_BW_DV) == (64, 128, 64, 256)
    assert launch_defaults.PARALLEL_NUM_STAGES == 2
    for recurrent in (launch_defaults.RECURRENT_FW_C, launch_defaults.RECURRENT_BW_DC):
        assert (recurrent.siz_b_DHQK, recurrent.num_warps, recurrent.num_stages) == (64, 4, 1)
    assert launch_defaults.RECURRENT_SUB_TILE == 128 and launch_defaults.RECURRENT_MIN_PROGRAMS_PER_SM == 3


def test_launch_default_heuristics():
    # parallel kernels: 8 warps from 128 x 128 output elements on
    assert launch_defaults.parallel_num_warps(128, 256) == 8 and launch_defaults.parallel_num_warps(64, 256) == 8
    assert launch_defaults.parallel_num_warps(128, 128) == 8 and launch_defaults.parallel_num_warps(64, 128) == 4
    assert launch_defaults.parallel_num_warps(16, 32) == 4
    # recurrent kernels: 128-wide DHHV tiles only while the grid keeps 3 programs per SM (132 SMs off a GPU)
    assert launch_defaults.recurrent_dhhv_tile(dhqk_tiles=4, dhhv_p=512, bnh=64) == 128  # 7b: 1024 programs
    assert launch_defaults.recurrent_dhhv_tile(dhqk_tiles=2, dhhv_p=128, bnh=64) == 64  # small heads: 128 programs
    assert launch_defaults.recurrent_dhhv_tile(dhqk_tiles=2, dhhv_p=256, bnh=128) == 128  # tfla-paper: 512 programs
    assert launch_defaults.recurrent_dhhv_tile(2, 256, 128, core_count=200) == 64  # a bigger card: 512 < 600
    assert launch_defaults.recurrent_dhhv_tile(2, 128, 64, core_count=40) == 128  # a small card: 128 >= 120
    assert launch_defaults.recurrent_dhhv_tile(dhqk_tiles=1, dhhv_p=32, bnh=4096) == 128  # clamped at launch
    assert common.tile_size(None, 32, launch_defaults.recurrent_dhhv_tile(1, 32, 4096), "siz_b_DHHV") == 32
    assert (
        common.tile_size(256, 512, launch_defaults.recurrent_dhhv_tile(1, 512, 1), "siz_b_DHHV") == 256
    )  # a request wins
    with pytest.raises(ValueError, match="siz_b_DHHV must be a power of 2"):
        common.tile_size(96, 512, launch_defaults.recurrent_dhhv_tile(1, 512, 1), "siz_b_DHHV")


def _record_launches(monkeypatch):
    """Records, per call of a kernel, the tiles it resolves (by argument name) and its (warps, stages)."""
    launches = []
    tile_size, compiler_params = common.tile_size, common.compiler_params

    def recording_tile_size(requested, dim, default, name):
        size = tile_size(requested, dim, default, name)
        launches[-1][name] = size
        return size

    def recording_compiler_params(num_warps, num_stages, default_warps, default_stages):
        launches[-1]["warps"] = default_warps if num_warps is None else num_warps
        launches[-1]["stages"] = default_stages if num_stages is None else num_stages
        return compiler_params(num_warps, num_stages, default_warps, default_stages)

    monkeypatch.setattr(common, "tile_size", recording_tile_size)
    monkeypatch.setattr(common, "compiler_params", recording_compiler_params)

    def launch(kernel, *args, **kwargs):
        launches.append({})
        jax.eval_shape(lambda *a: kernel(*a, interpret=True, **kwargs), *args)
        return launches[-1]

    return launch


def _kernel_args(batch, heads, seq_len, dhqk, dhhv, chunk):
    """Abstract inputs of every kernel, by kernel (eval_shape only: nothing runs)."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    num_chunks = seq_len // chunk
    q, k, v = f32(batch, heads, seq_len, dhqk), f32(batch, heads, seq_len, dhqk), f32(batch, heads, seq_len, dhhv)
    gate, chunk_gate = f32(batch, heads, seq_len), f32(batch, heads, num_chunks, chunk)
    c_all, n_all = f32(batch, heads, (num_chunks + 1) * dhqk, dhhv), f32(batch, heads, (num_chunks + 1) * dhqk)
    m_all = f32(batch, heads, num_chunks + 1)
    bw = (q, k, v, gate, chunk_gate, chunk_gate, c_all, n_all, m_all, gate, gate, v, c_all)
    return dict(
        recurrent_fw_C=(k, v, gate, gate),
        parallel_fw_Hintra=(q, k, v, gate, gate, c_all, n_all, m_all),
        recurrent_bw_dC=(q, gate, m_all, gate, v, gate),
        parallel_bw_dQ=bw,
        parallel_bw_dK=bw,
        parallel_bw_dV=bw,
    )


KERNELS = dict(
    recurrent_fw_C=mlstm_chunkwise__recurrent_fw_C,
    parallel_fw_Hintra=mlstm_chunkwise__parallel_fw_Hintra,
    recurrent_bw_dC=mlstm_chunkwise__recurrent_bw_dC,
    parallel_bw_dQ=mlstm_chunkwise__parallel_bw_dQ,
    parallel_bw_dK=mlstm_chunkwise__parallel_bw_dK,
    parallel_bw_dV=mlstm_chunkwise__parallel_bw_dV,
)
NONE_LAUNCH = dict(siz_b_DHQK=None, siz_b_DHHV=None, num_warps=None, num_stages=None)
NONE_L_TILES = dict(siz_b_LQ=None, siz_b_LKV=None)

# What each kernel resolved to before launch_defaults existed, at a shape no default is clamped at (the 7b
# head dims, chunk 256); the recurrent grids have 4 DHQK tiles x 4 DHHV tiles of 128 x B·NH = 32 -> 512 programs.
EXPECTED_NONE = dict(
    recurrent_fw_C=dict(siz_b_DHQK=64, siz_b_DHHV=128, warps=4, stages=1),
    parallel_fw_Hintra=dict(siz_b_LQ=128, siz_b_LKV=64, siz_b_DHQK=64, siz_b_DHHV=256, warps=8, stages=2),
    recurrent_bw_dC=dict(siz_b_DHQK=64, siz_b_DHHV=128, warps=4, stages=1),
    parallel_bw_dQ=dict(siz_b_LQ=128, siz_b_LKV=64, siz_b_DHQK=256, siz_b_DHHV=64, warps=8, stages=2),
    parallel_bw_dK=dict(siz_b_LQ=64, siz_b_LKV=128, siz_b_DHQK=256, siz_b_DHHV=64, warps=8, stages=2),
    parallel_bw_dV=dict(siz_b_LQ=64, siz_b_LKV=128, siz_b_DHQK=64, siz_b_DHHV=256, warps=8, stages=2),
)


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_none_launch_resolves_to_measured_defaults(name, monkeypatch):
    launch = _record_launches(monkeypatch)
    args = _kernel_args(4, 8, 512, 256, 512, 256)[name]
    none = NONE_LAUNCH if name.startswith("recurrent") else {**NONE_L_TILES, **NONE_LAUNCH}
    assert launch(KERNELS[name], *args, chunk_size=256, **none) == EXPECTED_NONE[name]


@pytest.mark.parametrize("name", [name for name in KERNELS if name.startswith("parallel")])
def test_parallel_kernel_omitted_l_tiles_are_upstreams_32(name, monkeypatch):
    launch = _record_launches(monkeypatch)
    args = _kernel_args(4, 8, 512, 256, 512, 256)[name]
    resolved = launch(KERNELS[name], *args, chunk_size=256)
    assert (resolved["siz_b_LQ"], resolved["siz_b_LKV"]) == (32, 32)
    expected = EXPECTED_NONE[name]
    assert (resolved["siz_b_DHQK"], resolved["siz_b_DHHV"]) == (expected["siz_b_DHQK"], expected["siz_b_DHHV"])
    # warps follow the (now smaller) output tile: 32 rows x 256 columns = 8192 elements -> 4
    assert (resolved["warps"], resolved["stages"]) == (4, 2)


@pytest.mark.parametrize("name", [name for name in KERNELS if name.startswith("recurrent")])
def test_recurrent_kernel_narrow_grid_takes_64_wide_dhhv_tiles(name, monkeypatch):
    launch = _record_launches(monkeypatch)
    args = _kernel_args(1, 8, 512, 256, 512, 256)[name]  # 4 x 4 x 8 = 128 programs at 128-wide tiles
    assert launch(KERNELS[name], *args, chunk_size=256)["siz_b_DHHV"] == 64


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_defaults_clamp_to_small_dims(name, monkeypatch):
    launch = _record_launches(monkeypatch)
    args = _kernel_args(1, 2, 64, 24, 40, 32)[name]  # head dims padded to 32 and 64, chunk 32
    none = NONE_LAUNCH if name.startswith("recurrent") else {**NONE_L_TILES, **NONE_LAUNCH}
    resolved = launch(KERNELS[name], *args, chunk_size=32, **none)
    assert resolved["siz_b_DHQK"] == 32 and resolved["siz_b_DHHV"] == min(EXPECTED_NONE[name]["siz_b_DHHV"], 64)
    if not name.startswith("recurrent"):
        assert resolved["siz_b_LQ"] == resolved["siz_b_LKV"] == 32


def test_launch_defaults_adapt_to_shared_memory():
    """Hopper-class shared memory (and None, off a GPU) keeps the measured tiles and stages; less caps the head-dim
    tiles at 128 and loads unpipelined, which fit 99 KiB."""
    fw = launch_defaults.PARALLEL_FW_HINTRA
    for hopper in (None, 227):
        assert launch_defaults.parallel_tiles(fw, hopper) == fw
        assert launch_defaults.parallel_num_stages(hopper) == 2
    for small in (163, 99):
        tiles = launch_defaults.parallel_tiles(launch_defaults.PARALLEL_BW_DQ, small)
        assert (tiles.siz_b_LQ, tiles.siz_b_LKV, tiles.siz_b_DHQK, tiles.siz_b_DHHV) == (128, 64, 128, 64)
        assert launch_defaults.parallel_num_stages(small) == 1


def test_device_properties():
    from pallas_mlstm.device import device_properties

    assert DeviceProperties("NVIDIA H100 80GB HBM3", (9, 0), 132).shared_memory_kib == 227
    assert DeviceProperties("NVIDIA A100-SXM4-80GB", (8, 0), 108).shared_memory_kib == 163
    assert DeviceProperties("NVIDIA GeForce RTX 4090", (8, 9), 128).shared_memory_kib == 99
    assert DeviceProperties("cpu").shared_memory_kib is None
    here = device_properties()
    assert here.device_kind == jax.devices()[0].device_kind
    if jax.default_backend() == "gpu":
        assert here.compute_capability is not None and here.core_count > 0, here
    else:
        assert here.compute_capability is None


def test_untuned_card_borrows_a_tuned_card_of_its_compute_capability(tmp_path):
    path = tmp_path / "tuned.json"
    entry = lambda chunk: {"config": {"chunk_size": chunk}}
    path.write_text(
        json.dumps(
            {
                "configs": {
                    "Card A": {"dhqk256-dhhv512-long": entry(64)},
                    "Card B": {"dhqk256-dhhv512-long": entry(128)},
                    "Card C": {"dhqk256-dhhv512-long": entry(32)},
                },
                "cards": {
                    "Card A": {"compute_capability": "9.0", "core_count": 132},
                    "Card B": {"compute_capability": "9.0", "core_count": 114},
                    "Card C": {"compute_capability": "8.0", "core_count": 108},
                },
            }
        )
    )
    shape = (8, 8, 8192, 256, 512)
    assert tuned_config("Card B", *shape, path=path).chunk_size == 128  # its own entry
    assert tuned_config("Card D", *shape, path=path) is None  # no properties: exact names only
    assert tuned_config("Card D", *shape, path=path, compute_capability="9.0", core_count=120).chunk_size == 128
    assert tuned_config("Card D", *shape, path=path, compute_capability="9.0", core_count=130).chunk_size == 64
    assert tuned_config("Card D", *shape, path=path, compute_capability="8.0", core_count=84).chunk_size == 32
    assert tuned_config("Card D", *shape, path=path, compute_capability="8.9", core_count=128) is None
    # an entry the caller cannot use is passed over as if absent: Card B's own, then its nearest peer's
    not_128 = lambda config: config.chunk_size != 128
    assert tuned_config("Card B", *shape, path=path, usable=not_128) is None  # exact names only
    assert tuned_config("Card B", *shape, path=path, compute_capability="9.0", core_count=114, usable=not_128) == (
        ChunkwiseConfig(chunk_size=64)
    )


def test_a_named_backend_takes_the_first_entry_of_a_class_that_runs_its_kernels(tmp_path, monkeypatch):
    """A shape class may hold entries best first: backend=None (usable None) takes the first; backend="triton"
    passes over one that runs kernels in Mosaic GPU and takes the next; backend="mosaic" takes the first."""
    monkeypatch.setenv(config_module.TUNED_CONFIGS_ENV, str(tmp_path / "none.json"))  # no user file
    path = tmp_path / "tuned.json"
    in_mosaic = {"chunk_size": 256, "kernel_backends": {"parallel_fw_Hintra": "mosaic", "recurrent_fw_C": "mosaic"}}
    triton_alone = {"chunk_size": 128, "siz_b_L_parallel": 32}
    key = shape_class(8192, 256, 512)
    path.write_text(json.dumps({"configs": {"NVIDIA H200": {key: [{"config": in_mosaic}, {"config": triton_alone}]}}}))
    assert tuned_config(*H200_7B, path=path) == ChunkwiseConfig(**in_mosaic)
    for name, expected in (("triton", triton_alone), ("mosaic", in_mosaic)):
        usable = functools.partial(runs_tuned_kernels, registered(name))
        assert tuned_config(*H200_7B, path=path, usable=usable) == ChunkwiseConfig(**expected), name
    only_mosaic = {"configs": {"NVIDIA H200": {key: [{"config": in_mosaic}]}}}
    path.write_text(json.dumps(only_mosaic))
    assert tuned_config(*H200_7B, path=path, usable=functools.partial(runs_tuned_kernels, registered("triton"))) is None
    path.write_text(json.dumps({"configs": {"NVIDIA H200": {key: []}}}))
    with pytest.raises(ValueError, match="empty list of entries"):
        tuned_config(*H200_7B, path=path)
    # the packaged file keeps a Triton-tuned entry for backend="triton" on both tuned Hopper cards at 7b
    triton = functools.partial(runs_tuned_kernels, registered("triton"))
    for card in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
        packaged = config_module.PACKAGED_TUNED_CONFIGS_PATH
        taken = tuned_config(card, *H200_7B[1:], path=packaged, compute_capability="9.0", core_count=132, usable=triton)
        assert taken is not None and taken.chunk_size is not None and not taken.kernel_backends, card


def test_like_cards_configs_are_the_other_cards_of_the_compute_capability(tmp_path, monkeypatch):
    """tune's first candidates: the entries of the other cards of this card's compute capability, nearest in SM count
    first; none for an unknown capability, and none whose chunk size does not divide S."""
    path = tmp_path / "tuned.json"
    entry = lambda chunk: {"config": {"chunk_size": chunk}}
    configs = {
        "Card A": entry(64),
        "Card B": entry(128),
        "Card C": entry(32),
        "Card E": entry(8192 * 2),
        "Card F": entry(256),
    }
    cards = {"Card A": 132, "Card B": 114, "Card C": None, "Card E": 100, "Card F": 132}
    path.write_text(
        json.dumps(
            {
                "configs": {kind: {"dhqk256-dhhv512-long": config} for kind, config in configs.items()},
                "cards": {
                    kind: {"compute_capability": "8.0" if count is None else "9.0", "core_count": count or 108}
                    for kind, count in cards.items()
                },
            }
        )
    )
    monkeypatch.setattr(config_module, "PACKAGED_TUNED_CONFIGS_PATH", path)
    monkeypatch.setattr(config_module, "user_tuned_configs_path", lambda: tmp_path / "absent.json")
    like = lambda kind, capability, count=None: [
        config.chunk_size
        for config in like_cards_configs(kind, 8192, 256, 512, compute_capability=capability, core_count=count)
    ]
    assert like("Card B", "9.0", 114) == [64, 256]  # not its own; Card E's chunk does not divide S
    assert like("Card D", "9.0", 120) == [128, 64, 256]  # A and F as near: the first listed first
    assert like("Card D", "9.0", 132) == [64, 256, 128]
    assert like("Card D", "8.0") == [32] and like("Card D", "8.9") == [] and like("Card D", None) == []


def test_default_config_on_an_untuned_hopper_card(tmp_path, monkeypatch):
    """An H100 PCIe (no entry of its own) gets the packaged entry of a tuned compute-capability-9.0 card; a
    device_kind string alone matches exact names only."""
    monkeypatch.setenv(config_module.TUNED_CONFIGS_ENV, str(tmp_path / "none.json"))  # no user file
    q_shape, dhhv = (8, 8, 8192, 256), 512
    tuned_cards = [
        kind
        for kind, entries in config_module.tuned_configs_in(config_module.PACKAGED_TUNED_CONFIGS_PATH).items()
        if "dhqk256-dhhv512-long" in entries
    ]
    assert tuned_cards, "the packaged configs hold a 7b-class entry"
    pcie = DeviceProperties("NVIDIA H100 PCIe", (9, 0), 114)
    borrowed = resolve_config(registered("triton"), None, (*q_shape, dhhv), jnp.bfloat16, pcie)
    assert borrowed in [
        stored
        for kind in tuned_cards
        for stored in config_module.tuned_configs_in(config_module.PACKAGED_TUNED_CONFIGS_PATH)[kind][
            "dhqk256-dhhv512-long"
        ]
    ]
    assert (
        resolve_config(registered("triton"), None, (*q_shape, dhhv), jnp.bfloat16, "NVIDIA H100 PCIe")
        == ChunkwiseConfig()
    )
    assert (
        resolve_config(
            registered("triton"), None, (*q_shape, dhhv), jnp.bfloat16, DeviceProperties("NVIDIA A100", (8, 0), 108)
        )
        == ChunkwiseConfig()
    )  # no tuned card of capability 8.0: kernel defaults


# --- tuned configs: the packaged file, the user's, by card and shape class -------------------------------------

H200_7B = ("NVIDIA H200", 8, 8, 8192, 256, 512)


def _write_configs(path, device_kind, key, config):
    path.write_text(json.dumps({"configs": {device_kind: {key: {"config": config}}}}))


def test_tuned_config_reads_entry_by_card_and_shape_class(tmp_path):
    path = tmp_path / "configs.json"
    stored = {"chunk_size": 256, "siz_b_L_parallel": 128, "num_warps_intra": 8}
    _write_configs(path, "NVIDIA H200", shape_class(8192, 256, 512), stored)
    assert tuned_config("NVIDIA H200", 8, 8, 8192, 256, 512, path=path) == ChunkwiseConfig(**stored)
    assert tuned_config("NVIDIA H200", 1, 8, 65536, 256, 512, path=path) == ChunkwiseConfig(**stored)  # same class
    assert tuned_config("NVIDIA H100 80GB HBM3", 8, 8, 8192, 256, 512, path=path) is None  # other card
    assert tuned_config("NVIDIA H200", 32, 8, 2048, 256, 512, path=path) is None  # short sequences
    assert tuned_config("NVIDIA H200", 4, 16, 4096, 128, 128, path=path) is None  # other heads
    assert tuned_config("NVIDIA H200", 1, 8, 8320, 256, 512, path=path) is None  # chunk 256 does not divide S


def test_tuned_config_rereads_a_rewritten_file_and_tolerates_a_missing_one(tmp_path):
    path = tmp_path / "configs.json"
    assert tuned_config("NVIDIA H200", 8, 8, 8192, 256, 512, path=path) is None
    key = shape_class(8192, 256, 512)
    _write_configs(path, "NVIDIA H200", key, {"chunk_size": 64})
    assert tuned_config("NVIDIA H200", 8, 8, 8192, 256, 512, path=path).chunk_size == 64
    _write_configs(path, "NVIDIA H200", key, {"chunk_size": 128})
    os.utime(path, ns=(1, 10**18))  # a new modification time, whatever the file system's resolution
    assert tuned_config("NVIDIA H200", 8, 8, 8192, 256, 512, path=path).chunk_size == 128


def test_default_config_uses_tuned_configs_for_16_bit_triton_operands_only():
    tuned = tuned_config("NVIDIA H200", 8, 8, 8192, 256, 512)
    assert tuned is not None and tuned.chunk_size is not None  # the packaged H200 entry of the 7b class
    for dtype in (jnp.bfloat16, jnp.float16):
        assert resolve_config(registered("triton"), None, (8, 8, 8192, 256, 512), dtype, "NVIDIA H200") == tuned
    # float32 tiles take twice the shared memory the entry was measured with: the kernels' own defaults
    assert (
        resolve_config(registered("triton"), None, (8, 8, 8192, 256, 512), jnp.float32, "NVIDIA H200")
        == ChunkwiseConfig()
    )
    assert (
        resolve_config(registered("xla"), None, (8, 8, 8192, 256, 512), jnp.bfloat16, "NVIDIA H200")
        == ChunkwiseConfig()
    )
    assert resolve_config(registered("triton"), None, (8, 8, 8192, 256, 512), jnp.bfloat16, "cpu") == ChunkwiseConfig()


def _write_user_configs(path, configs_by_class):
    path.write_text(
        json.dumps({"configs": {"NVIDIA H200": {key: {"config": fields} for key, fields in configs_by_class.items()}}})
    )


def test_user_tuned_configs_override_packaged_entries(monkeypatch, tmp_path):
    user_file = tmp_path / "tuned_configs.json"
    monkeypatch.setenv(config_module.TUNED_CONFIGS_ENV, str(user_file))
    packaged_7b = tuned_config(*H200_7B, path=config_module.PACKAGED_TUNED_CONFIGS_PATH)
    packaged_short = tuned_config("NVIDIA H200", 32, 8, 2048, 256, 512, path=config_module.PACKAGED_TUNED_CONFIGS_PATH)
    assert packaged_7b is not None and packaged_short is not None
    assert tuned_config(*H200_7B) == packaged_7b  # no user file yet
    _write_user_configs(user_file, {shape_class(8192, 256, 512): {"chunk_size": 64}})
    assert tuned_config(*H200_7B) == ChunkwiseConfig(chunk_size=64)
    assert tuned_config("NVIDIA H200", 32, 8, 2048, 256, 512) == packaged_short  # other classes: packaged
    assert (
        tuned_config(*H200_7B, path=config_module.PACKAGED_TUNED_CONFIGS_PATH) == packaged_7b
    )  # an explicit path alone


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"configs": []}',
        '{"configs": {"NVIDIA H200": {"dhqk256-dhhv512-long": {"config": {"tile": 1}}}}}',
    ],
)
def test_malformed_user_tuned_configs_raise_a_value_error_naming_the_file(monkeypatch, tmp_path, content):
    user_file = tmp_path / "tuned_configs.json"
    user_file.write_text(content)
    monkeypatch.setenv(config_module.TUNED_CONFIGS_ENV, str(user_file))
    with pytest.raises(ValueError, match="fix its JSON or delete the file") as raised:
        tuned_config(*H200_7B)
    assert str(user_file) in str(raised.value)
