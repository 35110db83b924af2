"""What the launch defaults need to know about the GPU: its name, compute capability, SM count and shared memory.

Tuned configs are stored per `device_kind` (the card's exact name); a card without an entry borrows the entry
of a tuned card of the same compute capability (nearest SM count), and the kernels' own defaults scale with
its SM count and shared memory, so an untuned card (an H100 PCIe, an H200 NVL, an A100) gets measured
Hopper-class launches or safe ones, never an exact-name cliff.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

# Shared memory one thread block may use, by compute capability (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"); capabilities not listed are treated as the smallest, 99 KiB.
_SHARED_MEMORY_PER_BLOCK_KIB = {(8, 0): 163, (8, 7): 163, (9, 0): 227, (10, 0): 227, (10, 3): 227}
_SMALLEST_SHARED_MEMORY_KIB = 99


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """The card the kernels launch on; compute_capability / core_count are None off a CUDA GPU."""

    device_kind: str
    compute_capability: tuple[int, int] | None = None
    core_count: int | None = None  # streaming multiprocessors

    @property
    def capability_text(self) -> str | None:
        """The compute capability as the tuned configs write it ("9.0"), None off a CUDA GPU."""
        return None if self.compute_capability is None else "{}.{}".format(*self.compute_capability)

    @property
    def shared_memory_kib(self) -> int | None:
        """Shared memory per thread block in KiB (None off a CUDA GPU)."""
        if self.compute_capability is None:
            return None
        return _SHARED_MEMORY_PER_BLOCK_KIB.get(self.compute_capability, _SMALLEST_SHARED_MEMORY_KIB)


def _capability(device) -> tuple[int, int] | None:
    value = getattr(device, "compute_capability", None)  # "9.0" on CUDA devices
    try:
        major, minor = str(value).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


@functools.cache
def _properties_of(device) -> DeviceProperties:
    core_count = getattr(device, "core_count", None)
    return DeviceProperties(
        device.device_kind,
        _capability(device),
        int(core_count) if isinstance(core_count, int) and core_count > 0 else None,
    )


def device_properties(device=None) -> DeviceProperties:
    """The properties of `device` (default: JAX's first device)."""
    return _properties_of(jax.devices()[0] if device is None else device)
