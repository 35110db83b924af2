"""The timers of the package: median wall time of jitted calls, their steady-state time back to back, and the GPU
time of each kernel they run."""

from __future__ import annotations

import collections
import pathlib
import statistics
import tempfile
import time

import jax

# Calls per round of `back_to_back_ms`, each round's median time per call one sample.
BACK_TO_BACK_ROUND = 10
# Calls issued back to back that may run ahead of the one the host waits for: enough that the GPU never waits for
# the host's dispatch (0.1-0.7 ms a call of the op on an H100) where a call takes longer than that, while at most
# IN_FLIGHT + 1 calls' outputs are alive (at 7b's forward + backward 1 GiB each).
IN_FLIGHT = 2


def median_ms(function, argument_sets, calls: int) -> float:
    """Median wall time in ms of `calls` calls (each to jax.block_until_ready), rotating argument sets.

    Calls once on every set first, to warm up (compile).
    """
    for arguments in argument_sets:
        jax.block_until_ready(function(*arguments))
    times = []
    for call in range(calls):
        arguments = argument_sets[call % len(argument_sets)]
        start = time.perf_counter()
        jax.block_until_ready(function(*arguments))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _round_ms(function, argument_list) -> float:
    """Wall time in ms per call of one call per item of `argument_list`, issued back to back: the host waits for a
    call only once IN_FLIGHT later calls are queued behind it, and for the last ones at the end. After IN_FLIGHT +
    1 untimed calls on the first item (compiling, and growing the allocator to the calls' memory)."""
    jax.block_until_ready([function(*argument_list[0]) for _ in range(IN_FLIGHT + 1)])
    pending = collections.deque()
    start = time.perf_counter()
    for arguments in argument_list:
        pending.append(function(*arguments))
        if len(pending) > IN_FLIGHT:
            jax.block_until_ready(pending.popleft())
    jax.block_until_ready(list(pending))  # a list: block_until_ready passes over a deque
    elapsed = time.perf_counter() - start
    return 1e3 * elapsed / len(argument_list)


def pipelined_ms(function, arguments, calls: int) -> float:
    """Wall time in ms per call of `calls` calls issued back to back (`_round_ms`): the time per step of a loop that
    does not wait on each step, without the per-call dispatch latency that `median_ms` includes."""
    return _round_ms(function, [arguments] * calls)


def back_to_back_ms(function, argument_sets, calls: int, per_round: int = BACK_TO_BACK_ROUND) -> float:
    """The median over rounds of the time per call of `per_round` calls issued back to back (`_round_ms`),
    rotating between the argument sets: a training loop's time per step, without the host's dispatch and wait
    that each call of `median_ms` pays (results/h100-timing-method-check.json). calls // per_round rounds, at least
    one (of `calls` calls where they are fewer than `per_round`)."""
    per_round = min(per_round, calls)
    rounds = max(1, calls // per_round)
    times = []
    for first in range(0, rounds * per_round, per_round):
        times.append(_round_ms(function, [argument_sets[(first + c) % len(argument_sets)] for c in range(per_round)]))
    return statistics.median(times)


def device_kernel_ms(function, arguments, calls: int) -> dict[str, float] | None:
    """The GPU time per call of each kernel that `calls` calls of `function` run back to back (after a warm-up
    call), {kernel name: ms}, most first, from a jax.profiler trace; None where the trace has no GPU stream (on the
    CPU). Beside `pipelined_ms` it tells a launcher's kernel from the XLA work around it and the gaps between."""
    jax.block_until_ready(function(*arguments))
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        try:
            jax.block_until_ready([function(*arguments) for _ in range(calls)])
        finally:
            jax.profiler.stop_trace()
        traces = sorted(pathlib.Path(folder).rglob("*.xplane.pb"))
        return kernel_ms(jax.profiler.ProfileData.from_file(str(traces[-1])), calls) if traces else None


def kernel_ms(profile: jax.profiler.ProfileData, calls: int) -> dict[str, float] | None:
    """{kernel name: ms per call} of a trace of `calls` calls: the events of its GPU planes' stream lines ("Stream
    #..."; the derived lines such as "XLA Ops" repeat them), summed by name, most first; None where it has none."""
    totals, streams = collections.Counter(), 0
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU:"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream #"):
                streams += 1
                for event in line.events:
                    totals[event.name] += event.duration_ns
    return {name: ns / 1e6 / calls for name, ns in totals.most_common()} if streams else None
