"""The timers of the package: median wall time of jitted calls, and their steady-state time back to back."""

from __future__ import annotations

import statistics
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
