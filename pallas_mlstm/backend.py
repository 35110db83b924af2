"""What a backend is: `Backend`, the object each backend package registers (pallas_mlstm.registry lists them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pallas_mlstm.kernel_call import KernelSet


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to run the kernels: its name, its launchers, its launch-config type, and where it can run.

    `resolve_launch(kernel, flat, override)` turns upstream's flat launch fields (a dict) and a per-kernel
    override (a dict of the launch type's fields, or None) into the validated launch config of `kernel`
    (ValueError naming the field); None for a backend without launch parameters (then `launch_type` is None
    too). `available()` says whether it can run here; `unavailable` is the error text when it cannot.
    `priority`: `backend=None` takes the available backend of lowest priority; None: never picked by itself.
    `min_chunk`: the smallest chunk its kernels take. `partitionable`: False where XLA cannot partition its kernels
    (Mosaic GPU's interpreter runs host callbacks in a fixed order): it then runs on one device only."""

    name: str
    kernels: KernelSet
    available: Callable[[], bool]
    unavailable: str = ""
    priority: int | None = None
    min_chunk: int = 1
    launch_type: type | None = None
    resolve_launch: Callable[[str, dict, dict | None], Any] | None = None
    interpret: bool = False
    partitionable: bool = True

    def launch(self, kernel: str, flat: dict, override: dict | None) -> Any:
        """`kernel`'s launch config on this backend (None where it has none)."""
        return None if self.resolve_launch is None else self.resolve_launch(kernel, flat, override)
