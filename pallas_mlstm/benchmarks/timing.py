"""The one timer of the package: median wall time of jitted calls, after warm-up."""

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
