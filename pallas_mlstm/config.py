"""Launch configuration: a frozen, hashable config checked at construction, and the tuned configs measured per card.

The defaults a None field falls back on live with the backend that launches the kernels (Triton:
pallas_mlstm/pallas_triton/launch_defaults.py); the chunk size's in pallas_mlstm/plan.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import pathlib
from collections.abc import Callable

from pallas_mlstm.kernel_call import CHUNKWISE_KERNELS

# The launch rules of upstream's flat fields, which are Triton launches (pallas_triton.launch.TritonLaunch shares them)
NUM_WARPS = (1, 2, 4, 8, 16, 32)
MIN_TILE = 16  # Triton's dot needs every side >= 16
_TILE_FIELDS = ("siz_b_L_parallel", "siz_b_L_loop", "siz_b_DH_parallel", "siz_b_DH_loop")
_WARP_FIELDS = ("num_warps_intra", "num_warps_inter")
_STAGE_FIELDS = ("num_stages_intra", "num_stages_inter")
ENTRY_FIELDS = ("kernels", "kernel_backends")  # per-kernel mappings, not launch fields


def is_power_of_2(value: int) -> bool:
    """Whether the int `value` is 1, 2, 4, 8, ..."""
    return value >= 1 and not value & (value - 1)


@dataclasses.dataclass(frozen=True)
class ChunkwiseConfig:
    """Tiles and launch parameters of one `mlstm_chunkwise` call; None means "use the default".

    `chunk_size` is shared by all kernels. Launch fields come two ways, and a kernel's own entry wins:
    - `kernels`: per kernel, a mapping {kernel name: launch fields}, e.g.
      `{"parallel_fw_Hintra": {"siz_b_LQ": 128, "num_warps": 8}}` (a dict, or the backend's launch config such
      as `pallas_mlstm.TritonLaunch`); the fields are the kernel's own arguments, checked by the backend when
      a call is planned. `python -m pallas_mlstm tune` writes this form.
    - the flat fields, named as upstream's `mlstm_chunkwise_fw` / `mlstm_chunkwise_bw` name them: `*_parallel`
      tiles are grid axes, `*_loop` tiles are walked inside a kernel; `intra` is the parallel kernels, `inter`
      the recurrent ones. A set field applies to every kernel it names.
    A None field lets each kernel use its own measured default (Triton: pallas_mlstm/pallas_triton/
    launch_defaults.py); the chunk size's default is `pallas_mlstm.plan.padding_chunk_size`.

    `kernel_backends`: per kernel, the registered backend that runs it instead of the call's, e.g.
    `{"parallel_fw_Hintra": "mosaic"}` under backend "triton" (both take the same launch configs). A config you
    pass applies as given (ValueError where the named backend cannot run here or beside the call's); a tuned
    config's entries (`python -m pallas_mlstm tune` writes them where another backend's kernel was faster)
    apply to `backend=None` only, and a backend you name takes no tuned entry measured with kernels it does not
    run (the card's next entry applies: a peer card's, else the kernels' defaults).

    Checked at construction (ValueError naming the field): every flat field is None or an int (NumPy integers
    are converted); chunk_size a power of 2 >= 1; the `siz_b_*` tiles powers of 2 >= 16; `num_warps_*` one
    of 1, 2, 4, 8, 16, 32; `num_stages_*` >= 1; `kernels` names known kernels.
    """

    chunk_size: int | None = None
    siz_b_L_parallel: int | None = None
    siz_b_L_loop: int | None = None
    siz_b_DH_parallel: int | None = None
    siz_b_DH_loop: int | None = None
    num_warps_intra: int | None = None
    num_warps_inter: int | None = None
    num_stages_intra: int | None = None
    num_stages_inter: int | None = None
    kernels: tuple[tuple[str, tuple[tuple[str, int | None], ...]], ...] = ()
    kernel_backends: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "kernels", _kernel_entries(self.kernels))
        object.__setattr__(self, "kernel_backends", _kernel_backend_entries(self.kernel_backends))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or field.name in ENTRY_FIELDS:
                continue
            name = f"ChunkwiseConfig.{field.name}"
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int or None; got {value!r} ({type(value).__name__}).")
            value = int(value)
            object.__setattr__(self, field.name, value)  # NumPy integers -> int, so configs hash and dump alike
            if field.name == "chunk_size" and not is_power_of_2(value):
                raise ValueError(f"{name} must be a power of 2 >= 1 (e.g. 64, 128); got {value}.")
            if field.name in _TILE_FIELDS and not (value >= MIN_TILE and is_power_of_2(value)):
                raise ValueError(f"{name} must be a power of 2 >= {MIN_TILE} (e.g. 32, 64, 128); got {value}.")
            if field.name in _WARP_FIELDS and value not in NUM_WARPS:
                raise ValueError(f"{name} must be one of {', '.join(map(str, NUM_WARPS))}; got {value}.")
            if field.name in _STAGE_FIELDS and value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value}.")

    def launch_items(self) -> tuple[tuple[str, int], ...]:
        """The set launch fields as hashable (name, value) pairs for `mlstm_chunkwise_fw` / `_bw`."""
        return tuple(
            (field.name, getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name not in ("chunk_size", *ENTRY_FIELDS) and getattr(self, field.name) is not None
        )

    def kernel_launches(self) -> dict[str, dict]:
        """The per-kernel launch fields: {kernel name: {field: value}}."""
        return {kernel: dict(fields) for kernel, fields in self.kernels}

    def to_json(self) -> dict:
        """This config as the JSON object tuned_configs.json stores: its set fields, per-kernel entries as a mapping."""
        data = {name: value for name, value in dataclasses.asdict(self).items() if value is not None and value != ()}
        if self.kernels:
            data["kernels"] = self.kernel_launches()
        if self.kernel_backends:
            data["kernel_backends"] = dict(self.kernel_backends)
        return data


def _kernel_entries(kernels) -> tuple:
    """`ChunkwiseConfig.kernels` as a hashable, sorted tuple of (kernel, ((field, value), ...))."""
    items = kernels.items() if isinstance(kernels, dict) else kernels
    entries = []
    for kernel, fields in items:
        if kernel not in CHUNKWISE_KERNELS:
            raise ValueError(
                f"ChunkwiseConfig.kernels names an unknown kernel {kernel!r}: use one of {CHUNKWISE_KERNELS}."
            )
        if dataclasses.is_dataclass(fields):
            fields = dataclasses.asdict(fields)
        fields = dict(fields)
        if not all(isinstance(name, str) for name in fields):
            raise ValueError(f"ChunkwiseConfig.kernels[{kernel!r}] must map launch field names to values.")
        entries.append((kernel, tuple(sorted((name, value) for name, value in fields.items() if value is not None))))
    return tuple(sorted(entries))


def _kernel_backend_entries(kernel_backends) -> tuple:
    """`ChunkwiseConfig.kernel_backends` as a hashable, sorted tuple of (kernel, backend name); the names are
    checked against the registry when a call is planned (pallas_mlstm.registry.with_kernel_backends)."""
    items = list(kernel_backends.items() if isinstance(kernel_backends, dict) else kernel_backends)
    if not all(isinstance(item, tuple | list) and len(item) == 2 for item in items):
        raise ValueError(
            "ChunkwiseConfig.kernel_backends must map kernel names to backend names, e.g. "
            f"{{'parallel_fw_Hintra': 'mosaic'}}; got {kernel_backends!r}."
        )
    kernels = [kernel for kernel, _ in items]
    if len(set(kernels)) < len(kernels):
        raise ValueError(f"ChunkwiseConfig.kernel_backends names a kernel twice: {kernels}.")
    entries = []
    for kernel, backend in items:
        if kernel not in CHUNKWISE_KERNELS:
            raise ValueError(
                f"ChunkwiseConfig.kernel_backends names an unknown kernel {kernel!r}: use one of {CHUNKWISE_KERNELS}."
            )
        if not isinstance(backend, str):
            raise ValueError(
                f"ChunkwiseConfig.kernel_backends[{kernel!r}] must be a backend name (pallas_mlstm.BACKENDS); "
                f"got {backend!r}."
            )
        entries.append((kernel, backend))
    return tuple(sorted(entries))


# Measured launch configs, shipped with the package; `python -m pallas_mlstm tune` writes the user's own.
PACKAGED_TUNED_CONFIGS_PATH = pathlib.Path(__file__).resolve().parent / "tuned_configs.json"
TUNED_CONFIGS_ENV = "PALLAS_MLSTM_TUNED_CONFIGS"
SHORT_SEQUENCE_MAX = 2048


def shape_class(seq_len: int, dhqk: int, dhhv: int) -> str:
    """The key tuned configs are stored under: the head dims and "short" (S <= 2048) or "long" sequences."""
    length = "short" if seq_len <= SHORT_SEQUENCE_MAX else "long"
    return f"dhqk{dhqk}-dhhv{dhhv}-{length}"


def user_tuned_configs_path() -> pathlib.Path:
    """The user's tuned configs: $PALLAS_MLSTM_TUNED_CONFIGS, else $XDG_CONFIG_HOME/pallas_mlstm/tuned_configs.json.

    Without XDG_CONFIG_HOME (or with a relative one, which the XDG spec says to ignore), ~/.config stands for it.
    """
    if os.environ.get(TUNED_CONFIGS_ENV):
        return pathlib.Path(os.environ[TUNED_CONFIGS_ENV]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(config_home):
        config_home = pathlib.Path.home() / ".config"
    return pathlib.Path(config_home) / "pallas_mlstm" / "tuned_configs.json"


@functools.lru_cache(maxsize=8)
def _read_tuned_file(
    path: str, modified_ns: int
) -> tuple[dict[str, dict[str, list[ChunkwiseConfig]]], dict[str, dict]]:
    """(each shape class's configs, best first, by device_kind and shape class; each tuned card's properties by
    device_kind)."""
    del modified_ns  # in the cache key only, so that a rewritten file is read again
    try:
        with open(path) as file:
            data = json.load(file)
        configs = {
            device_kind: {
                key: [ChunkwiseConfig(**entry["config"]) for entry in entry_list(stored)]
                for key, stored in entries.items()
            }
            for device_kind, entries in data["configs"].items()
        }
        cards = {
            kind: {"compute_capability": str(card["compute_capability"]), "core_count": int(card["core_count"])}
            for kind, card in data.get("cards", {}).items()
        }
        return configs, cards
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as error:
        raise ValueError(
            f"cannot read the tuned configs in {path} ({type(error).__name__}: {error}); fix its JSON or delete "
            "the file (`python -m pallas_mlstm tune` writes a new one)."
        ) from error


def entry_list(stored) -> list:
    """The entries stored for one card and shape class, best first: one entry object, or a list of them (a best
    one that runs kernels of other backends, then one that runs the caller's backend alone: `tune` keeps one entry
    per set of backends it names). ValueError for an empty list."""
    entries = stored if isinstance(stored, list) else [stored]
    if not entries:
        raise ValueError("a shape class holds an empty list of entries")
    return entries


def _tuned_file(path: str | os.PathLike) -> tuple[dict[str, dict[str, list[ChunkwiseConfig]]], dict[str, dict]]:
    path = pathlib.Path(path)
    if not path.exists():
        return {}, {}
    return _read_tuned_file(str(path), path.stat().st_mtime_ns)


def tuned_configs_in(path: str | os.PathLike) -> dict[str, dict[str, list[ChunkwiseConfig]]]:
    """The configs stored at `path` by device_kind and shape class, each class's best first ({} if no file is there).

    ValueError naming the file if it cannot be read or is not a tuned-configs JSON.
    """
    return _tuned_file(path)[0]


def tuned_config(
    device_kind: str,
    B: int,
    NH: int,
    S: int,
    DHQK: int,
    DHHV: int,
    *,
    path: str | os.PathLike | None = None,
    compute_capability: str | None = None,
    core_count: int | None = None,
    usable: Callable[[ChunkwiseConfig], bool] | None = None,
) -> ChunkwiseConfig | None:
    """The measured best config for this card (`jax.Device.device_kind`) and shape, or None if none was measured.

    Looked up by `shape_class(S, DHQK, DHHV)` (B and NH do not enter it) in `path` alone if given, else in the
    packaged tuned_configs.json and then the user's file (`user_tuned_configs_path`), whose entries win. A card
    without an entry of its own, given its `compute_capability` (e.g. "9.0"), takes the entry of a tuned card
    of the same compute capability, the one nearest in SM count (`core_count`). A shape class may hold several
    entries, best first; those for which `usable` is False are passed over as if absent (a named backend skips
    entries tuned with other backends' kernels and takes the next, else another card's). None
    too when the config's chunk size does not divide S. ValueError if a file is there but malformed.
    """
    del B, NH  # not part of the shape class
    by_card, cards = _entries_by_card(shape_class(S, DHQK, DHHV), path, usable)
    config = by_card.get(device_kind)
    if config is None and compute_capability is not None:
        like = _like_cards(by_card, cards, device_kind, compute_capability, core_count)
        config = by_card[like[0]] if like else None
    if config is None or (config.chunk_size is not None and S % config.chunk_size):
        return None
    return config


def like_cards_configs(
    device_kind: str, S: int, DHQK: int, DHHV: int, *, compute_capability: str | None, core_count: int | None = None
) -> list[ChunkwiseConfig]:
    """The tuned configs for this shape of the other cards of `compute_capability` (read as `tuned_config` reads
    them), the nearest in SM count first; [] for an unknown compute capability. Those whose chunk size does not
    divide S are left out."""
    if compute_capability is None:
        return []
    by_card, cards = _entries_by_card(shape_class(S, DHQK, DHHV), None, None)
    like = _like_cards(by_card, cards, device_kind, compute_capability, core_count)
    configs = [by_card[kind] for kind in like]
    return [config for config in configs if config.chunk_size is None or S % config.chunk_size == 0]


def _entries_by_card(key: str, path, usable) -> tuple[dict[str, ChunkwiseConfig], dict[str, dict]]:
    """({device_kind: its config for shape class `key`}, {device_kind: card properties}) from the file at `path`;
    for path None, from the packaged file and then the user's, whose entries win. Each card's config is the first
    of the class's entries that `usable` takes (the first, for usable None)."""
    paths = [PACKAGED_TUNED_CONFIGS_PATH, user_tuned_configs_path()] if path is None else [path]
    by_card, cards = {}, {}
    for config_path in paths:
        configs, file_cards = _tuned_file(config_path)
        cards.update(file_cards)
        for kind, entries in configs.items():
            taken = [config for config in entries.get(key, []) if usable is None or usable(config)]
            if taken:
                by_card[kind] = taken[0]
    return by_card, cards


def _like_cards(by_card: dict, cards: dict, device_kind: str, compute_capability, core_count) -> list[str]:
    """The cards of `by_card` other than `device_kind` whose compute capability is `compute_capability`, nearest in
    SM count to `core_count` first."""
    like = [
        kind
        for kind in by_card
        if kind != device_kind and cards.get(kind, {}).get("compute_capability") == str(compute_capability)
    ]
    return sorted(like, key=lambda kind: abs(cards[kind]["core_count"] - (core_count or 0)))
