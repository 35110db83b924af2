"""The timers of the package: median wall time of jitted calls, their steady-state time back to back, and the GPU
time of each kernel they run."""

from __future__ import annotations

import collections
import pathlib
import statistics
import tempfile
import time

import jax


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


def pipelined_ms(function, arguments, calls: int) -> float:
    """Wall time in ms per call of `calls` calls issued back to back (JAX dispatches asynchronously) and waited for
    once at the end, after a warm-up call: the time per step of a loop that does not wait on each step, without
    the per-call dispatch latency that `median_ms` includes."""
    jax.block_until_ready(function(*arguments))
    start = time.perf_counter()
    outputs = [function(*arguments) for _ in range(calls)]
    jax.block_until_ready(outputs)
    return 1e3 * (time.perf_counter() - start) / calls


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
