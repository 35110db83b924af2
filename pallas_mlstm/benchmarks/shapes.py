"""Named benchmark shapes (benchmarks/README.md): the 7B widths, small and odd heads, the TFLA paper's shape, long
contexts, a constant-token sweep, a CPU toy."""

from __future__ import annotations

import dataclasses

SWEEP_TOKENS = 65536
SWEEP_SEQUENCE_LENGTHS = tuple(2**n for n in range(9, 17))  # 512 ... 65536
SWEEP_ALIAS = "sweep"
CPU_QUICK_ELEMENTS = 2**22  # q, k, v elements up to which a CPU runs a shape's bench in seconds, not minutes


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark problem: q, k (B, NH, S, DHQK), v (B, NH, S, DHHV), gates (B, NH, S)."""

    name: str
    B: int
    NH: int
    S: int
    DHQK: int
    DHHV: int
    why: str
    # Packed documents of this many tokens: f̃ = −∞ at each document's first token (after the first), which
    # is what `mlstm_chunkwise(..., segment_ids=...)` sets where the id changes. None: one document per row.
    document_len: int | None = None

    def dims(self) -> dict[str, int]:
        """The five dimensions by name, as stored in the JSON records."""
        return {"B": self.B, "NH": self.NH, "S": self.S, "DHQK": self.DHQK, "DHHV": self.DHHV}

    def quick_on_cpu(self) -> bool:
        """Whether a CPU runs it in seconds (a smoke test), not minutes or hours."""
        return self.B * self.NH * self.S * (2 * self.DHQK + self.DHHV) <= CPU_QUICK_ELEMENTS


def _named_shapes() -> dict[str, Shape]:
    shapes = [
        Shape("7b", 8, 8, 8192, 256, 512, "xLSTM-7B widths, 65,536 tokens"),
        Shape("7b-short", 32, 8, 2048, 256, 512, "same tokens, short context"),
        Shape(
            "7b-packed",
            8,
            8,
            8192,
            256,
            512,
            "7b with packed documents of 1000 tokens (resets inside chunks)",
            document_len=1000,
        ),
        Shape("small-heads", 4, 16, 4096, 128, 128, "1B-class heads"),
        Shape("tfla-paper", 8, 16, 8192, 128, 256, "the TFLA paper's 7B-class benchmark shape (embedding 4096)"),
        Shape("odd-heads", 4, 8, 4096, 96, 192, "head dims that are not powers of 2"),
        Shape("long-256k", 1, 8, 262144, 256, 512, "long context: memory of forward + backward"),
        Shape("long-512k", 1, 8, 524288, 256, 512, "long context: does forward + backward fit on one 80 GB H100"),
        Shape("tiny", 1, 2, 256, 32, 32, "CPU smoke shape: its times mean nothing"),
        Shape(
            "tiny-packed", 1, 2, 256, 32, 32, "CPU smoke shape with packed documents of 100 tokens", document_len=100
        ),
    ]
    shapes += [
        Shape(f"sweep-S{s}", SWEEP_TOKENS // s, 8, s, 256, 512, "runtime vs context length at 65,536 tokens")
        for s in SWEEP_SEQUENCE_LENGTHS
    ]
    return {shape.name: shape for shape in shapes}


SHAPES = _named_shapes()
GPU_DEFAULT_SHAPES = ("7b", "7b-short", "small-heads", "tfla-paper", "odd-heads")
CPU_DEFAULT_SHAPES = ("tiny",)


def resolve_shapes(names: list[str]) -> list[Shape]:
    """The shapes named (``sweep`` stands for every sweep-S*); ValueError for an unknown name."""
    resolved = []
    for name in names:
        if name == SWEEP_ALIAS:
            resolved += [SHAPES[f"sweep-S{s}"] for s in SWEEP_SEQUENCE_LENGTHS]
        elif name in SHAPES:
            resolved.append(SHAPES[name])
        else:
            known = ", ".join(SHAPES)
            raise ValueError(f"unknown shape {name!r}; known: {known}, or {SWEEP_ALIAS!r} for all sweep-S*.")
    return list(dict.fromkeys(resolved))


def cpu_shape_warning(shapes: list[Shape], flag: str) -> str | None:
    """The line to print before running `shapes` (given by `flag`) on a CPU when some are not quick there."""
    slow = [shape for shape in shapes if not shape.quick_on_cpu()]
    if not slow:
        return None
    named = ", ".join(f"{shape.name} ({', '.join(f'{k}={v}' for k, v in shape.dims().items())})" for shape in slow)
    quick = " or ".join(f"{flag}={name}" for name, shape in SHAPES.items() if shape.quick_on_cpu())
    return (
        f"WARNING: {named} {'is a GPU shape' if len(slow) == 1 else 'are GPU shapes'}: on this CPU the run will be "
        f"very slow (minutes to hours; Ctrl-C stops it). To check that the tooling works, use a small shape: {quick}."
    )
