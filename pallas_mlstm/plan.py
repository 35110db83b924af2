"""One call's plan: every non-array choice of a chunkwise mLSTM call, resolved and validated in one place.

The rules here check the options of `mlstm_chunkwise` (pallas_mlstm/api.py) and of upstream's `mlstm_chunkwise_fw`
/ `_bw` (pallas_mlstm/upstream.py), ValueErrors that name the argument and the fix; each entry point builds from them
a frozen, hashable `Plan`: the cell, the chunking, the backend and a launch config per kernel. Everything below the
entry points takes the plan and checks nothing again.
The defaults of the chunk size (`padding_chunk_size`, `default_chunk_size`) and of the segment length
(`default_segment_len`) are owned here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_mlstm.backend import Backend
from pallas_mlstm.config import ChunkwiseConfig, is_power_of_2, like_cards_configs, tuned_config
from pallas_mlstm.device import DeviceProperties, device_properties
from pallas_mlstm.gates import tracks_max_state
from pallas_mlstm.kernel_call import CHUNKWISE_KERNELS, KernelCall
from pallas_mlstm.validation import validate_float_dtype

INPUT_GATES = ("exponential", "sigmoid")
# Largest chunk `default_chunk_size` and `padding_chunk_size` pick.
DEFAULT_MAX_CHUNK = 128


# ----------------------------------------------------------------------------- option rules, one each


def validate_gate_options(input_gate, normalize=True) -> None:
    """Checks the input-gate variant ("exponential": mLSTMexp, "sigmoid": mLSTMsig) and `normalize`, a bool
    that only the sigmoid gate may turn off (the exponential gate's states are unbounded without the normaliser)."""
    if input_gate not in INPUT_GATES:
        raise ValueError(f"input_gate must be one of {INPUT_GATES}; got {input_gate!r}.")
    validate_bool("normalize", normalize)
    if not normalize and input_gate == "exponential":
        raise ValueError(
            "normalize=False needs input_gate='sigmoid': with the exponential input gate the states grow without "
            "bound and h is only defined normalised; drop normalize, or pass input_gate='sigmoid'."
        )


def validate_bool(name: str, value, allow_none: bool = False) -> bool | None:
    """`value` as a Python bool (NumPy bools too); None passes where `allow_none`."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        choices = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"{name} must be a bool ({choices}); got {value!r}.")
    return bool(value)


def _finite_real(name: str, value, rule: str) -> float:
    """`value` as a float: a finite real scalar (Python, NumPy or concrete JAX); ValueError saying `rule` if not."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{name} must be a concrete number, not a traced value: pass a Python float.")
    array = np.asarray(value) if hasattr(value, "dtype") or isinstance(value, numbers.Number) else None
    if (
        array is None
        or array.shape != ()
        or array.dtype.kind not in "fiu"
        or isinstance(value, (bool, np.bool_))
        or not math.isfinite(float(array))
    ):
        raise ValueError(f"{name} must be {rule}; got {value!r}.")
    return float(array)


def validate_eps(eps) -> float:
    """`eps` as a float: a finite non-negative real scalar."""
    rule = "a non-negative finite float (e.g. 1e-6)"
    value = _finite_real("eps", eps, rule)
    if value < 0:
        raise ValueError(f"eps must be {rule}; got {eps!r}.")
    return value


def validate_qk_scale(qk_scale) -> float | None:
    """`qk_scale` as a float: None (DHQK^-1/2) or a positive finite real scalar."""
    if qk_scale is None:
        return None
    rule = "None (DHQK**-0.5) or a positive finite float"
    value = _finite_real("qk_scale", qk_scale, rule)
    if value <= 0:
        raise ValueError(f"qk_scale must be {rule}; got {qk_scale!r}.")
    return value


def checked_kernel_options(**options) -> dict:
    """The options of an upstream-signature function (any of qk_scale, eps, output_dtype, states_dtype, allow_tf32),
    each checked by its rule, as the `KernelCall` and `Plan` fields of those names take them."""
    rules = {
        "qk_scale": validate_qk_scale,
        "eps": validate_eps,
        "output_dtype": lambda value: validate_float_dtype("output_dtype", value),
        "states_dtype": lambda value: None if value is None else validate_float_dtype("states_dtype", value).name,
        "allow_tf32": lambda value: validate_bool("allow_tf32", value),
    }
    return {name: rules[name](value) for name, value in options.items()}


def _static_int(name: str, value) -> int:
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a static Python int (it sets the kernels' tiles), not a traced value: "
            "pass it as a constant, or mark it static (jax.jit(..., static_argnames=...))."
        )
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return int(value)


def validate_chunk_size(chunk_size, seq_len, *, name="chunk_size", minimum=1) -> int:
    """Checks that chunk_size (an int, NumPy integers too) is a power of 2, at least `minimum`, and divides
    seq_len (unless seq_len is None); returns it as a Python int."""
    chunk_size = _static_int(name, chunk_size)
    if not is_power_of_2(chunk_size):
        raise ValueError(f"{name} must be a power of 2 (e.g. 64, 128, 256); got {chunk_size}.")
    if chunk_size < minimum:
        raise ValueError(f"{name} must be at least {minimum} for this backend; got {chunk_size}.")
    if seq_len is not None and seq_len % chunk_size:
        raise ValueError(
            f"the sequence length S={seq_len} must be a multiple of {name}={chunk_size}: "
            f"pad S to {-(-seq_len // chunk_size) * chunk_size} or choose a {name} that divides it."
        )
    return chunk_size


# ----------------------------------------------------------------------------- chunk and segment policy


def default_chunk_size(seq_len: int, minimum: int = 1) -> int:
    """The largest power of 2 <= 128 that divides seq_len; ValueError if it is below `minimum`.

    The rule of the upstream-compatible `mlstm_chunkwise_fw` / `_bw`, which take S a multiple of the chunk.
    `mlstm_chunkwise` pads S instead: `padding_chunk_size`."""
    chunk = DEFAULT_MAX_CHUNK
    while chunk > 1 and seq_len % chunk:
        chunk //= 2
    if chunk < minimum:
        raise ValueError(
            f"the sequence length S={seq_len} must be a multiple of {minimum} for the Pallas backends: "
            f"pad S to {-(-seq_len // minimum) * minimum}, or use backend='xla'."
        )
    return chunk


def padding_chunk_size(seq_len: int, minimum: int = 1) -> int:
    """`mlstm_chunkwise`'s chunk size when none is configured, for any seq_len >= 1 (S is padded up to a multiple).

    cap = the next power of 2 >= seq_len, within [minimum, 128]; the largest power of 2 <= cap dividing seq_len
    where that is at least half the cap (no padding), else cap (padding costs less than one chunk of work, and
    keeps chunks large: S = 8208 runs 66 chunks of 128, not 513 of 16)."""
    cap = max(minimum, min(DEFAULT_MAX_CHUNK, 1 << max(0, seq_len - 1).bit_length()))
    divisor = cap
    while divisor > 1 and seq_len % divisor:
        divisor //= 2
    return divisor if divisor >= max(minimum, cap // 2) else cap


# A sequence of more than 2·SEGMENT_MAX_LEN steps runs in segments of at most SEGMENT_MAX_LEN steps
# (`default_segment_len`): the chunk-boundary states C and, in the backward, their gradients dC, (NC+1)·DHQK·DHHV
# per head, then exist for one segment at a time instead of for the whole sequence (for one pass at 16-bit inputs,
# chunk 128, DHQK 256 and DHHV 512, the C and dC buffers together are as large as q, k, v and dh). Segments do no
# extra matmuls (the backward recomputes the states either way), but each segment's inputs and outputs are copied
# out of and into the full-length arrays: forward + backward at (1, 8, 262144, 256, 512) took 54 ms in segments
# against 43 ms in one pass on an H200, for a peak of 1.93x the inputs' bytes instead of 2.35x. Segments shorter
# than SEGMENT_MIN_LEN would cost more launches than they save memory: then one pass.
SEGMENT_MAX_LEN = 32768
SEGMENT_MIN_LEN = 8192


def largest_segment_len(seq_len: int, chunk_size: int, max_len: int) -> int | None:
    """The largest multiple of chunk_size that divides seq_len and is at most max_len; None if there is none."""
    for segment_len in range(max_len - max_len % chunk_size, 0, -chunk_size):
        if seq_len % segment_len == 0:
            return segment_len
    return None


def default_segment_len(seq_len: int, chunk_size: int) -> int | None:
    """`mlstm_chunkwise`'s segment length when none is given: None (one pass) up to 2·SEGMENT_MAX_LEN steps, else
    the largest multiple of chunk_size that divides seq_len and is at most SEGMENT_MAX_LEN, unless that is below
    SEGMENT_MIN_LEN (then None)."""
    if seq_len <= 2 * SEGMENT_MAX_LEN:
        return None
    segment_len = largest_segment_len(seq_len, chunk_size, SEGMENT_MAX_LEN)
    return segment_len if segment_len is not None and segment_len >= SEGMENT_MIN_LEN else None


def validate_segment_len(segment_len, chunk_size: int, padded_len: int) -> int | None:
    """`segment_len` checked against the chunk size and the padded S; None: `default_segment_len`."""
    if segment_len is None:
        return default_segment_len(padded_len, chunk_size)
    if (
        not isinstance(segment_len, (int, np.integer))
        or isinstance(segment_len, (bool, np.bool_))
        or segment_len < 1
        or segment_len % chunk_size
        or padded_len % segment_len
    ):
        below = max(segment_len, chunk_size) if isinstance(segment_len, (int, np.integer)) else chunk_size
        raise ValueError(
            f"segment_len must be a positive int that is a multiple of chunk_size={chunk_size} and divides "
            f"S={padded_len} (the sequence length padded to a multiple of the chunk size), or None (the default); "
            f"got {segment_len!r}: pass e.g. {largest_segment_len(padded_len, chunk_size, below)}."
        )
    return int(segment_len)


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Cell:
    """The recurrent cell: its input gate ("exponential": mLSTMexp, states (C, n, m); "sigmoid": mLSTMsig,
    states (C, n)), whether h is normalised, and the denominator's eps."""

    input_gate: str
    normalize: bool
    eps: float

    @property
    def tracks_max_state(self) -> bool:
        """Whether the kernels track the max state m (`pallas_mlstm.gates.tracks_max_state`)."""
        return tracks_max_state(self.input_gate)

    @property
    def denominator_eps(self) -> float:
        """The eps added to the denominator: none with normalize=False, where h = q̄·C has no denominator."""
        return self.eps if self.normalize else 0.0


@dataclasses.dataclass(frozen=True)
class Chunking:
    """How the sequence is cut: `chunk_size` (the parallel kernels' chunk) and `inter_chunk_size` (the
    recurrent kernels', dividing it); `segment_len`: steps per segment (pallas_mlstm.segments), None for one
    pass; `recompute_states_in_bw`: False keeps the chunk states for the backward, None: decided where the
    inputs' sharding is known (pallas_mlstm.sharding)."""

    chunk_size: int
    inter_chunk_size: int
    segment_len: int | None = None
    recompute_states_in_bw: bool | None = True


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every non-array choice of one call, validated by the entry point that builds it with this module's rules:
    hashable, a static of jit and custom_vjp."""

    backend: Backend
    cell: Cell
    chunking: Chunking
    launches: tuple[tuple[str, Any], ...] = ()  # (kernel name, the backend's launch config or None)
    states_dtype: str | None = None  # of the C / dC state buffers; None: float32 (float64 for float64 inputs)
    qk_scale: float | None = None  # None: DHQK^-1/2
    allow_tf32: bool = False
    return_last_states: bool = False

    def call(self, kernel: str, **overrides) -> KernelCall:
        """The `KernelCall` of one kernel under this plan; `overrides` set its output_dtype and the like."""
        chunking = self.chunking
        recurrent = kernel.startswith("recurrent")
        fields = dict(
            chunk_size=chunking.inter_chunk_size if recurrent else chunking.chunk_size,
            qk_scale=self.qk_scale,
            eps=self.cell.denominator_eps if kernel != "parallel_fw_Hintra" else self.cell.eps,
            input_gate=self.cell.input_gate,
            normalize=self.cell.normalize,
            states_dtype=self.states_dtype,
            save_states_every_nth_chunk=chunking.chunk_size // chunking.inter_chunk_size,
            launch=dict(self.launches).get(kernel),
            allow_tf32=self.allow_tf32,
            interpret=self.backend.interpret,
        )
        return KernelCall(**{**fields, **overrides})

    def replace_chunking(self, **changes) -> Plan:
        """This plan with some `Chunking` fields changed."""
        return dataclasses.replace(self, chunking=dataclasses.replace(self.chunking, **changes))


def launches_for(backend: Backend, flat: dict, per_kernel: dict) -> tuple[tuple[str, Any], ...]:
    """Each kernel's launch config on `backend` from upstream's flat launch fields and per-kernel overrides."""
    if backend.resolve_launch is None:
        return ()
    return tuple((kernel, backend.launch(kernel, flat, per_kernel.get(kernel))) for kernel in CHUNKWISE_KERNELS)


def validate_max_state(cell: Cell, m, name: str, required: bool = False) -> None:
    """The max state `m` (named `name`) against the cell: never with the sigmoid gate, whose states are (C, n);
    given where `required` with the exponential gate (a decoding step continues from it)."""
    if not cell.tracks_max_state and m is not None:
        raise ValueError(
            f"{name} is not a state of the sigmoid input gate: its states are (C, n), bounded and unstabilised; drop "
            f"{name} (fold e^m into the C and n states if it came from an exponential-gate run)."
        )
    if required and cell.tracks_max_state and m is None:
        raise ValueError(
            f"{name} (the max state, (B, NH) or (B, NH, 1)) is required with the exponential input gate: pass the m "
            "that mlstm_chunkwise(..., return_last_states=True) or the previous step returned."
        )


def make_cell(input_gate, normalize, eps) -> Cell:
    """The validated cell options."""
    validate_gate_options(input_gate, normalize)
    return Cell(input_gate, bool(normalize), validate_eps(eps))


def resolve_config(
    backend: Backend,
    config,
    shape: tuple[int, ...],
    operand_dtype,
    device: str | DeviceProperties | None = None,
    usable: Callable[[ChunkwiseConfig], bool] | None = None,
) -> ChunkwiseConfig:
    """`config`, checked, or the default: on the triton backend with 16-bit operands, the one `tune` measured
    for this card and shape class (pallas_mlstm/tuned_configs.json, or the user's own file, see
    `pallas_mlstm.config`), else that of a tuned card of the same compute capability; otherwise ChunkwiseConfig()
    (the kernels' own defaults, which adapt to the card's SM count and shared memory). Tuned configs were measured
    with bfloat16 operands: float32 tiles take twice the shared memory, so float32 operands keep the defaults.
    `shape`: (B, NH, S, DHQK, DHHV); `device`: the card (a `DeviceProperties`, or a `device_kind` string: exact
    name only), None: this one; `usable`: which tuned entries may be taken (`tuned_config`)."""
    if config is not None:
        if not isinstance(config, ChunkwiseConfig):
            raise ValueError(f"config must be a pallas_mlstm.ChunkwiseConfig or None; got {type(config).__name__}.")
        return config
    if backend.launch_type is not None and not backend.interpret and jnp.dtype(operand_dtype).itemsize == 2:
        device = device_properties() if device is None else device
        properties = device if isinstance(device, DeviceProperties) else DeviceProperties(device)
        tuned = tuned_config_for(properties, *shape, usable=usable)
        if tuned is not None:
            return tuned
    return ChunkwiseConfig()


def tuned_config_for(
    properties: DeviceProperties, batch, heads, seq_len, dhqk, dhhv, usable=None
) -> ChunkwiseConfig | None:
    """The tuned config of the card `properties` describes for this shape, or None (`usable`: see `tuned_config`)."""
    return tuned_config(
        properties.device_kind,
        batch,
        heads,
        seq_len,
        dhqk,
        dhhv,
        compute_capability=properties.capability_text,
        core_count=properties.core_count,
        usable=usable,
    )


def like_cards_configs_for(properties: DeviceProperties, seq_len, dhqk, dhhv) -> list[ChunkwiseConfig]:
    """The tuned configs for this shape of the other cards of the compute capability of the card `properties`
    describes (`like_cards_configs`)."""
    return like_cards_configs(
        properties.device_kind,
        seq_len,
        dhqk,
        dhhv,
        compute_capability=properties.capability_text,
        core_count=properties.core_count,
    )


def make_chunking(
    backend: Backend,
    config: ChunkwiseConfig,
    chunk_size,
    seq_len: int,
    segment_len,
    recompute_states_in_bw,
    sequence_shards: int = 1,
) -> tuple[Chunking, int]:
    """`mlstm_chunkwise`'s chunking and the length S is padded to: `chunk_size`, else the config's, else
    `padding_chunk_size`; clamped to S rounded up to a power of 2 (a longer chunk would only pad). With S split
    into `sequence_shards` pieces (known when tracing) and no `chunk_size` argument, the config's chunk (tuned or
    given) or the default is halved until it divides a piece (a sequence shard is never padded), while it stays at
    least the backend's smallest chunk; a `chunk_size` argument is kept as given."""
    given = chunk_size
    chunk_size = config.chunk_size if chunk_size is None else chunk_size
    if chunk_size is None:
        chunk_size = padding_chunk_size(seq_len, backend.min_chunk)
    if given is None and sequence_shards > 1:
        piece = seq_len // sequence_shards
        while chunk_size // 2 >= backend.min_chunk and piece % chunk_size:
            chunk_size //= 2
    chunk_size = validate_chunk_size(chunk_size, None, minimum=backend.min_chunk)
    chunk_size = min(chunk_size, max(backend.min_chunk, 1 << (seq_len - 1).bit_length()))
    padded_len = -(-seq_len // chunk_size) * chunk_size  # S up to a multiple of the chunk size
    chunking = Chunking(
        chunk_size,
        chunk_size,
        validate_segment_len(segment_len, chunk_size, padded_len),
        validate_bool("recompute_states_in_bw", recompute_states_in_bw, allow_none=True),
    )
    return chunking, padded_len


def make_upstream_chunking(backend: Backend, seq_len: int, chunk_size_inter, chunk_size_intra) -> Chunking:
    """The chunking of upstream's `mlstm_chunkwise_fw` / `_bw` (S a multiple of both chunks): intra defaults to
    `default_chunk_size`, inter to intra, and intra must be a multiple of inter."""
    minimum = backend.min_chunk
    intra = default_chunk_size(seq_len, minimum) if chunk_size_intra is None else chunk_size_intra
    inter = intra if chunk_size_inter is None else chunk_size_inter
    intra = validate_chunk_size(intra, seq_len, name="chunk_size_intra", minimum=minimum)
    inter = validate_chunk_size(inter, seq_len, name="chunk_size_inter", minimum=minimum)
    if intra % inter:
        raise ValueError(f"chunk_size_intra={intra} must be a multiple of chunk_size_inter={inter}.")
    return Chunking(intra, inter)
