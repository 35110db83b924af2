"""`python -m pallas_mlstm tune`: measure launch configs of the triton backend; keep the best per card and shape class.

A coordinate descent in stages, each varying a few fields of the best config so far (a pruned grid, not the
full product). The first tries, whole, the entries tuned for the shape class on other cards of this card's compute
capability (`like_cards_configs_for`: an H200 without Mosaic GPU entries of its own gets the H100's, which switch
every kernel at once where the next stages switch one at a time). The next ones, one per kernel that another
backend can run in the same call (on a Hopper GPU: those backend="mosaic" runs in Mosaic GPU), switch that
kernel's backend (`ChunkwiseConfig.kernel_backends`), which `backend=None` then follows on this card; these come
early because they move the time most and a time budget may end the search early. The next four set the shared
knobs, upstream's flat launch fields, for all kernels at once:

1. chunk size {64, 128, 256} with the sequence tiles (siz_b_L_parallel, siz_b_L_loop) of L_TILE_PAIRS;
2. head tiles siz_b_DH_parallel × siz_b_DH_loop in {32, 64, 128}², up to the padded head dims;
3. num_warps_intra {4, 8} × num_stages_intra {1, 2, 3};
4. num_warps_inter {4, 8} × num_stages_inter {1, 2, 3}.
Every field may also stay None (each kernel's own default), and stage 1 first tries each chunk size alone (the
kernels' own sequence tiles), then the tile pairs: Mosaic GPU kernels ignore those tiles, and with the backends
chosen the chunk size itself can move the time most (an H100 at tfla-paper, every kernel in Mosaic GPU: chunk 256
took 0.56x of Triton's time, where chunk 128 had been tuned while Triton's states forward was faster;
results/h100-mosaic-ops-by-chunk.json), so a time budget should not end the stage before every chunk size ran.
Then one stage per kernel tries that kernel's own launches (`kernel_times.LAUNCH_CANDIDATES`) in the config's
per-kernel entries (`ChunkwiseConfig.kernels`), since the kernels differ in their best tiles; a kernel that
another backend runs by then keeps its launch (the other backend picks its own tiles).

The search starts from the config `mlstm_chunkwise` runs on this card today (its tuned entry, a tuned card's of the same
compute capability, or else ChunkwiseConfig(), the heuristics), so that a search the time budget ends early still cannot
store worse than that. The start's forward output must pass the bench's check against the float32 reference; every other
candidate's output and gradients must agree with the start's within the bench's tolerance before its time counts, and a
candidate whose programs equal those of a config already timed (`_program_key`: with every kernel in Mosaic GPU, for
one, the Triton tiles change nothing) is not timed again. The score is the forward+backward time per call of `--calls`
calls issued back to back (`fwbw_ms`), or more where the start takes under MIN_TIMED_MS / calls a call (small shapes); a
faster candidate that needs more than TEMP_MEMORY_SLACK above the start's temporary device memory (XLA's memory analysis
of the compiled forward+backward) is not kept, so a tuned entry trades at most that much memory for speed. The winner
and the start are timed once more at the end, and the winner goes, with both times (`fwbw_ms`, `default_fwbw_ms`: the
start's), to `--configs_out` (by default the user's file, `pallas_mlstm.config.user_tuned_configs_path`, which
`tuned_config` reads over the packaged configs) under the card's `device_kind` and `pallas_mlstm.config.shape_class`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import pathlib
import shlex
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_mlstm
from pallas_mlstm import accuracy, registry
from pallas_mlstm.benchmarks import impls, kernel_times, runner, timing
from pallas_mlstm.benchmarks.shapes import Shape, cpu_shape_warning, resolve_shapes
from pallas_mlstm.config import (
    ENTRY_FIELDS,
    TUNED_CONFIGS_ENV,
    ChunkwiseConfig,
    entry_list,
    shape_class,
    tuned_configs_in,
    user_tuned_configs_path,
)
from pallas_mlstm.device import device_properties
from pallas_mlstm.pallas_triton.common import padded_dim
from pallas_mlstm.plan import like_cards_configs_for, tuned_config_for

CHUNK_SIZES = (64, 128, 256)
# (parallel, loop); None: the kernels' own defaults
L_TILE_PAIRS = ((None, None), (32, 32), (64, 32), (64, 64), (128, 32), (128, 64), (128, 128))
DH_TILES = (None, 32, 64, 128)
NUM_WARPS = (None, 4, 8)
NUM_STAGES = (None, 1, 2, 3)
NUM_INPUT_SETS = 2
CONFIGS_COMMENT = (
    "Launch configs measured by `python -m pallas_mlstm tune` (pallas_mlstm/benchmarks/sweep.py), keyed by jax "
    "device_kind and pallas_mlstm.config.shape_class; read by pallas_mlstm.config.tuned_config."
)

TUNE_BACKEND = flags.DEFINE_enum(
    "tune_backend",
    "triton",
    ["triton", "interpret"],
    "Backend whose configs are timed: triton (needs a GPU); interpret only smoke-tests the sweep on a CPU and "
    "needs --configs_out.",
)
CONFIGS_OUT = flags.DEFINE_string(
    "configs_out",
    str(user_tuned_configs_path()),
    "The tuned-configs JSON to update (created if missing). The "
    f"default, which pallas_mlstm reads over its packaged configs, is ${TUNED_CONFIGS_ENV} if set, else "
    "$XDG_CONFIG_HOME/pallas_mlstm/tuned_configs.json, else ~/.config/pallas_mlstm/tuned_configs.json.",
)
TIME_BUDGET_S = flags.DEFINE_integer(
    "time_budget_s",
    480,
    "No new candidate starts after this many seconds; the best so far is stored, marked incomplete. Each shape "
    "gets an equal share of what is left when it starts.",
    lower_bound=1,
)

flags.declare_key_flag("shapes")  # the bench's flags that tune reads too
flags.declare_key_flag("calls")


class CandidateRejected(Exception):
    """A candidate whose results differ from the start config's."""


def _sequence_stage(best: ChunkwiseConfig, shape: Shape) -> list[ChunkwiseConfig]:
    return [
        dataclasses.replace(best, chunk_size=chunk, siz_b_L_parallel=parallel, siz_b_L_loop=loop)
        for parallel, loop in L_TILE_PAIRS
        for chunk in CHUNK_SIZES
        if shape.S % chunk == 0 and (parallel is None or parallel <= chunk)
    ]


def _head_stage(best: ChunkwiseConfig, shape: Shape) -> list[ChunkwiseConfig]:
    largest = min(padded_dim(shape.DHQK), padded_dim(shape.DHHV))
    tiles = [tile for tile in DH_TILES if tile is None or tile <= largest]
    return [dataclasses.replace(best, siz_b_DH_parallel=p, siz_b_DH_loop=loop) for p in tiles for loop in tiles]


def _intra_stage(best: ChunkwiseConfig, shape: Shape) -> list[ChunkwiseConfig]:
    del shape
    return [
        dataclasses.replace(best, num_warps_intra=w, num_stages_intra=s)
        for w in NUM_WARPS
        for s in NUM_STAGES
        if (w is None) == (s is None)
    ]


def _inter_stage(best: ChunkwiseConfig, shape: Shape) -> list[ChunkwiseConfig]:
    del shape
    return [
        dataclasses.replace(best, num_warps_inter=w, num_stages_inter=s)
        for w in NUM_WARPS
        for s in NUM_STAGES
        if (w is None) == (s is None)
    ]


def _kernel_stage(kernel: str):
    """The stage that tries `kernel`'s own launches (kernel_times.LAUNCH_CANDIDATES) over the best so far."""

    def candidates(best: ChunkwiseConfig, shape: Shape) -> list[ChunkwiseConfig]:
        del shape
        if kernel in dict(best.kernel_backends):
            return []
        launches = best.kernel_launches()
        return [
            dataclasses.replace(best, kernels={**launches, kernel: {**launches.get(kernel, {}), **launch}})
            for launch in kernel_times.LAUNCH_CANDIDATES[kernel]
            if launch
        ]

    return candidates


def _like_cards_stage(configs: list[ChunkwiseConfig]):
    """The tuned entries of cards like this one (`like_cards_configs_for`), each tried whole."""

    def candidates(best: ChunkwiseConfig, shape: Shape) -> list[ChunkwiseConfig]:
        del shape
        return [config for config in configs if config != best]

    return candidates


def _backend_stages(backend: str) -> list[tuple[str, Callable]]:
    """One stage per kernel that another backend can run under `backend` (`registry.kernel_alternatives`: on a
    Hopper GPU the triton backend's kernels that backend="mosaic" runs in Mosaic GPU), each trying the best so far
    with that kernel's backend switched (to the other one, or back where the start config had it there), so that
    every kernel ends on the faster of the two, given the kernels before it."""

    def switch(kernel: str, other: str):
        def candidates(best: ChunkwiseConfig, shape: Shape) -> list[ChunkwiseConfig]:
            del shape
            choices = dict(best.kernel_backends)
            back = choices.get(kernel) == other  # the start config ran it there: try it in `backend` again
            switched = {k: b for k, b in choices.items() if k != kernel} if back else {**choices, kernel: other}
            return [dataclasses.replace(best, kernel_backends=switched)]

        return candidates

    alternatives = registry.kernel_alternatives(registry.registered(backend))
    return [(f"{kernel}: {backend} or {other}", switch(kernel, other)) for kernel, other in alternatives]


# After `_backend_stages` (which `tune_shape` runs first), the shared knobs (chunk size, then every kernel's tiles,
# warps and stages at once, as upstream's flat launch fields name them), then each kernel's own launch in turn.
STAGES = (
    ("chunk and sequence tiles", _sequence_stage),
    ("head tiles", _head_stage),
    ("intra launch", _intra_stage),
    ("inter launch", _inter_stage),
    *((f"{kernel} launch", _kernel_stage(kernel)) for kernel in kernel_times.LAUNCH_CANDIDATES),
)


def describe(config: ChunkwiseConfig) -> str:
    """The fields a config sets, as `name=value` pairs ("heuristics" when none is set)."""
    values = [
        (field.name, getattr(config, field.name))
        for field in dataclasses.fields(config)
        if field.name not in ENTRY_FIELDS and getattr(config, field.name) is not None
    ]
    values += [(kernel, dict(fields)) for kernel, fields in config.kernels]
    values += [(f"{kernel}.backend", backend) for kernel, backend in config.kernel_backends]
    return " ".join(f"{name}={value}" for name, value in values) or "heuristics"


def _callables(config: ChunkwiseConfig, backend: str) -> impls.TimedCallables:
    """The jitted forward and forward+backward of `mlstm_chunkwise` under `config` (bf16 kernel operands)."""
    forward = lambda q, k, v, i, f: pallas_mlstm.mlstm_chunkwise(
        q, k, v, i, f, backend=backend, config=config, autocast_kernel_dtype=jnp.bfloat16
    )
    return impls.timed_callables(forward, 5)


def _pallas_call_details(jaxpr) -> list[str]:
    """What printing `jaxpr` (a Jaxpr or ClosedJaxpr) leaves out of its pallas_calls, at any depth: each block
    mapping's index map, transforms and buffering, and the scratch shapes (the printed grid mapping shows only the
    grid and the block shapes)."""
    details = []
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        mapping = eqn.params.get("grid_mapping") if eqn.primitive.name == "pallas_call" else None
        if mapping is not None:
            details.append(f"{mapping.grid_names} {mapping.scratch_avals}")
            for block in mapping.block_mappings:
                consts = getattr(block.index_map_jaxpr, "consts", ())
                details.append(f"{block.index_map_jaxpr} {consts} {block.transforms} {block.pipeline_mode}")
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(getattr(item, "jaxpr", item), "eqns"):  # a sub-jaxpr: scan, cond, pjit, a kernel's body
                    details += _pallas_call_details(item)
    return details


def jaxpr_digest(*jaxprs) -> str:
    """A digest of traced programs: each jaxpr as printed (every operation, and of each kernel its body, grid,
    block shapes and compiler parameters) and what printing leaves out of its kernels (`_pallas_call_details`)."""
    text = "\n".join(f"{jaxpr}\n{_pallas_call_details(jaxpr)}" for jaxpr in jaxprs)
    return hashlib.sha256(text.encode()).hexdigest()


def _program_key(config: ChunkwiseConfig, backend: str, weights, inputs) -> str:
    """A digest of the programs `config` runs on these arguments (`jaxpr_digest` of its forward and forward+backward).
    Configs with equal keys run the same operations and kernels with the same launches (with every kernel in Mosaic
    GPU, for one, the Triton tiles change nothing), so tune times one of them. Tracing both takes about two seconds
    at the 7b shape, against some 15 s to compile and time a candidate."""
    callables = _callables(config, backend)
    forward = callables.forward.trace(*inputs).jaxpr
    forward_backward = callables.forward_backward.trace(weights, *inputs).jaxpr
    return jaxpr_digest(forward, forward_backward)


def _evaluate(config, backend, input_sets, weights, expected, calls):
    """Checks, then times, `config`: returns (fwbw_ms, (h, *gradients), its jitted fwbw).

    Raises CandidateRejected when h or a gradient differs from `expected` (None: nothing to compare with).
    """
    callables = _callables(config, backend)
    results = (callables.forward(*input_sets[0]), *callables.forward_backward(weights, *input_sets[0]))
    if expected is not None:
        worst = max(accuracy.rel_err(result, ref) for result, ref in zip(results, expected))
        if not worst <= accuracy.BENCH_TOLERANCE:
            raise CandidateRejected(f"h or a gradient differs from the start config's by {worst:.1e}")
    argument_sets = [(weights, *inputs) for inputs in input_sets]
    return fwbw_ms(callables.forward_backward, argument_sets, calls), results, callables.forward_backward


def fwbw_ms(fwbw, argument_sets, calls: int) -> float:
    """A candidate's score: the time per call of `fwbw` issued back to back (`timing.back_to_back_ms`), as a training
    loop that does not wait on each step runs it. A call waited for alone also pays the host's dispatch and the wait,
    which differ between backends (an H100 at 7b, forward + backward: 0.19 ms to dispatch Mosaic GPU's, 0.54 ms
    Triton's; results/h100-timing-method-check.json), so that timer would weigh host work the loop hides."""
    return timing.back_to_back_ms(fwbw, argument_sets, calls)


# A candidate may need this fraction more temporary memory than the start: the Mosaic GPU kernels take a few MiB
# more than their Triton twins (0-20 MiB of about 1 GiB at the 7b and tfla-paper shapes on an H100), which an
# exact rule would let block every switch of backend.
TEMP_MEMORY_SLACK = 0.02


# Each candidate is timed over at least this many milliseconds of calls: at about 1.5 ms a call (small-heads,
# odd-heads on an H100), 10 calls timed one config to about ±0.1 ms, and the best candidate lost when timed again.
MIN_TIMED_MS = 100.0


def timed_calls(calls: int, start_ms: float) -> int:
    """The calls that time each candidate: `calls`, or enough that they take MIN_TIMED_MS at the start's speed."""
    return max(calls, math.ceil(MIN_TIMED_MS / max(start_ms, 1e-3)))


def _temp_bytes(fwbw, arguments) -> int:
    """The temporary device memory of the compiled forward+backward `fwbw` (a jitted function) on `arguments`."""
    return fwbw.lower(*arguments).compile().memory_analysis().temp_size_in_bytes


def tune_shape(shape: Shape, backend: str, calls: int, deadline: float) -> dict | None:
    """Searches the stages at `shape`; returns the configs-JSON entry of the winner, or None if none ran.

    The search starts from the config this card runs today (`plan.tuned_config_for`, else the heuristics), and
    keeps no candidate that needs more than TEMP_MEMORY_SLACK above the start's temporary memory. Its minimum is
    biased low by noise, so the winner and the start are timed once more at the end; those two times are stored,
    and the start wins unless the winner beats it again.
    """
    input_sets = [runner.make_inputs(impls.MLSTM, shape, seed) for seed in range(NUM_INPUT_SETS)]
    properties = device_properties()
    start = tuned_config_for(properties, *shape.dims().values()) or ChunkwiseConfig()
    like_cards = like_cards_configs_for(properties, shape.S, shape.DHQK, shape.DHHV)
    probe = lambda q, k, v, i, f: pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, backend=backend)
    weights = runner.make_weights(probe, input_sets[0])
    argument_sets = [(weights, *inputs) for inputs in input_sets]
    start_ms, expected, start_fwbw = _evaluate(start, backend, input_sets, weights, None, calls)
    if timed_calls(calls, start_ms) > calls:  # a short start: it, and every candidate, timed over more calls
        calls = timed_calls(calls, start_ms)
        start_ms = fwbw_ms(start_fwbw, argument_sets, calls)
    rel_err, reference_name = runner.check_forward(impls.MLSTM, input_sets[0], expected[0])
    if not rel_err <= accuracy.BENCH_TOLERANCE:
        runner.say(f"REFUSED {shape.name}: the start config's rel err {rel_err:.2e} against {reference_name}.")
        return None
    start_bytes = _temp_bytes(start_fwbw, argument_sets[0])
    runner.say(
        f"{shape.name} start ({describe(start)}): {start_ms:.3f} ms fwbw, {start_bytes / 2**20:.1f} MiB temporary "
        f"memory, rel err {rel_err:.1e}"
    )
    timings = {start: start_ms}
    programs = {_program_key(start, backend, weights, input_sets[0]): start}  # digest: the first config tried
    best, best_fwbw, best_bytes = start, start_fwbw, start_bytes
    complete = True
    stages = (("entries of cards like this one", _like_cards_stage(like_cards)), *_backend_stages(backend), *STAGES)
    for stage, candidates_of in stages:
        for config in candidates_of(best, shape):
            if config in timings:
                continue
            if time.monotonic() > deadline and len(timings) > 1:  # the budget counts from one candidate on
                complete = False
                break
            try:
                program = _program_key(config, backend, weights, input_sets[0])
                if program in programs:
                    same = describe(programs[program])
                    runner.say(f"  {stage}: {describe(config)}: not tried, the same program as {same}")
                    continue
                programs[program] = config
                timings[config], _, fwbw = _evaluate(config, backend, input_sets, weights, expected, calls)
            except Exception as error:  # compile failures (e.g. Triton out of shared memory), rejections
                runner.say(f"  {stage}: {describe(config)}: skipped, {type(error).__name__}: {str(error)[:200]}")
                continue
            runner.say(f"  {stage}: {describe(config)}: {timings[config]:.3f} ms")
            if timings[config] < timings[best]:
                config_bytes = _temp_bytes(fwbw, argument_sets[0])
                if config_bytes > start_bytes * (1 + TEMP_MEMORY_SLACK):
                    extra = (config_bytes - start_bytes) / 2**20
                    runner.say(f"    not kept: faster, but {extra:.1f} MiB more temporary memory than the start")
                    continue
                best, best_fwbw, best_bytes = config, fwbw, config_bytes
        if not complete:
            runner.say(f"time budget spent during stage '{stage}': keeping the best so far.")
            break
    confirmed_best_ms = fwbw_ms(best_fwbw, argument_sets, calls)
    confirmed_start_ms = fwbw_ms(start_fwbw, argument_sets, calls)
    if confirmed_best_ms >= confirmed_start_ms:
        best, confirmed_best_ms, best_bytes = start, confirmed_start_ms, start_bytes
    runner.say(
        f"{shape.name} best ({describe(best)}): {confirmed_best_ms:.3f} ms fwbw vs {confirmed_start_ms:.3f} "
        f"ms start (timed again after the search of {len(timings)} configs)"
    )
    return {
        "config": best.to_json(),
        "fwbw_ms": confirmed_best_ms,
        "default_fwbw_ms": confirmed_start_ms,
        "started_from": describe(start),
        "temp_bytes": best_bytes,
        "default_temp_bytes": start_bytes,
        "configs_timed": len(timings),
        "complete": complete,
        "tuned_on": {"shape": shape.name, **shape.dims()},
        "backend": backend,
        "calls": calls,
        "timer": "back to back",
    }


def card_properties() -> dict | None:
    """This card's compute capability and SM count, as `tuned_config` matches untuned cards by them; None off a GPU."""
    properties = device_properties()
    if properties.compute_capability is None or properties.core_count is None:
        return None
    return {"compute_capability": properties.capability_text, "core_count": properties.core_count}


def write_tuned_entry(path: str, device_kind: str, key: str, entry: dict, card: dict | None = None) -> None:
    """Stores `entry` first under configs[device_kind][key] in the JSON at `path`, keeping the other classes' entries
    and, after it, this class's entries that name another set of backends for single kernels (so an entry that runs
    Triton's kernels alone stays behind one that runs Mosaic GPU's, for `backend="triton"`), and the card's
    properties (`card`: compute_capability, core_count) under cards[device_kind] when known."""
    file = pathlib.Path(path)
    data = json.loads(file.read_text()) if file.is_file() else {"comment": CONFIGS_COMMENT, "configs": {}}
    entries = data["configs"].setdefault(device_kind, {})
    kept = [
        other for other in entry_list(entries.get(key, [entry])) if _backends_named(other) != _backends_named(entry)
    ]
    entries[key] = [entry, *kept] if kept else entry
    if card is not None:
        data.setdefault("cards", {})[device_kind] = card
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=1) + "\n")


def _backends_named(entry: dict) -> set[str]:
    """The backends a stored entry names for single kernels (its config's `kernel_backends`)."""
    return set(entry["config"].get("kernel_backends", {}).values())


def main_tune(argv: list[str]) -> None:
    """The `tune` subcommand: sweep each shape's configs on this card and store the winners."""
    if len(argv) > 1:
        raise app.UsageError(f"tune takes flags only; got the arguments {argv[1:]}.")
    backend = TUNE_BACKEND.value
    if backend == "interpret" and not CONFIGS_OUT.present:
        raise app.UsageError(
            "--tune_backend=interpret times the interpreter, whose times must not go into your tuned "
            "configs: pass --configs_out=PATH too (e.g. /tmp/tuned_configs.json)."
        )
    requested_shapes = runner.validated_shapes(runner.SHAPES.value)
    platform = jax.default_backend()
    if backend == "triton" and platform != "gpu":
        raise app.UsageError(
            "tune times the triton backend, which needs a GPU and JAX sees none here; to smoke-test "
            "the sweep on a CPU, pass --tune_backend=interpret --configs_out=/tmp/tuned_configs.json "
            "--time_budget_s=60."
        )
    try:
        tuned_configs_in(CONFIGS_OUT.value)
    except ValueError as error:
        raise app.UsageError(f"--configs_out: {error}") from None
    accuracy.load_oracles()  # the start config is checked against the oracle: refuse before any output
    card = jax.devices()[0].device_kind
    shapes = requested_shapes or resolve_shapes(runner.default_shapes(platform))
    runner.say(f"pallas_mlstm tune on {card}, backend {backend}, jax {jax.__version__}")
    if platform != "gpu":
        runner.say(runner.CPU_DISCLAIMER)
        warning = cpu_shape_warning(shapes, "--shapes")
        if warning:
            runner.say(warning)
    deadline = time.monotonic() + TIME_BUDGET_S.value
    refused = []
    for index, shape in enumerate(shapes):
        now = time.monotonic()
        if now > deadline:
            runner.say(f"time budget spent: {shape.name} not tuned.")
            continue
        shape_deadline = now + (deadline - now) / (len(shapes) - index)  # an equal share of what is left
        entry = tune_shape(shape, backend, runner.CALLS.value, shape_deadline)
        if entry is None:
            refused.append(shape.name)
            continue
        entry.update(
            {
                "jax_version": jax.__version__,
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": "python -m pallas_mlstm " + shlex.join(sys.argv[1:]),
            }
        )
        key = shape_class(shape.S, shape.DHQK, shape.DHHV)
        write_tuned_entry(CONFIGS_OUT.value, card, key, entry, card_properties())
        runner.say(f"stored the best config of {shape.name} as {card!r} / {key!r} in {CONFIGS_OUT.value}")
    if refused:
        sys.exit(
            f"nothing stored for {', '.join(refused)}: the start config failed the check against the reference "
            "(the REFUSED lines above); `python -m pallas_mlstm check` shows which kernels are off."
        )
