"""Runtime vs sequence length at constant tokens (the TFLA paper's figure), from bench records.

From saved records: `python -m pallas_mlstm.benchmarks.plot OUT.png RECORDS.json [MORE.json ...]`.
Needs matplotlib; without it the plot is skipped with a line saying so.
"""

from __future__ import annotations

import importlib.util
import json
import sys

from pallas_mlstm.benchmarks.shapes import SWEEP_TOKENS

SWEEP_PREFIX = "sweep-S"
MODE_TITLES = {"fw": "forward", "fwbw": "forward + backward"}


def plot_constant_token_sweep(records: list[dict], path: str) -> str:
    """Writes the PNG of the sweep-S* records (one line per implementation, fw and fwbw side by side).

    Returns a line saying what was written or why nothing was.
    """
    sweep = [r for r in records if r["shape"].startswith(SWEEP_PREFIX)]
    if not sweep:
        return f"no plot: no {SWEEP_PREFIX}* records (run the bench with --shapes=sweep)."
    if importlib.util.find_spec("matplotlib") is None:
        return f"no plot: matplotlib is not installed (the {len(sweep)} sweep records are in the JSON)."
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    modes = [mode for mode in MODE_TITLES if any(r["mode"] == mode for r in sweep)]
    figure, axes = pyplot.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        lines = {}
        for r in sweep:
            if r["mode"] == mode:
                label = r["impl"] if r["chunk_size"] is None else f"{r['impl']} (chunk {r['chunk_size']})"
                lines.setdefault(label, []).append((r["S"], r["median_ms"]))
        for label, points in sorted(lines.items()):
            lengths, milliseconds = zip(*sorted(points))
            axis.plot(lengths, milliseconds, marker="o", label=label)
        axis.set_xscale("log", base=2)
        lengths = sorted({r["S"] for r in sweep})
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.set_yscale("log")
        axis.set_xlabel(f"sequence length S (batch = {SWEEP_TOKENS} / S)")
        axis.set_ylabel("median time per call (ms)")
        axis.set_title(MODE_TITLES[mode])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    cards = sorted({r["card"] for r in sweep})
    first = sweep[0]
    figure.suptitle(
        f"{SWEEP_TOKENS} tokens per call (mLSTM NH={first['NH']}, DHQK={first['DHQK']}, DHHV={first['DHHV']}), bf16 "
        f"— {', '.join(cards)}, jax {first['jax_version']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return f"wrote the plot of {len(sweep)} sweep records to {path}"


def main(argv: list[str]) -> int:
    """Plots the records of the JSON files named in argv[2:] to the PNG named in argv[1]."""
    if len(argv) < 3:
        print("usage: python -m pallas_mlstm.benchmarks.plot OUT.png RECORDS.json [MORE.json ...]", file=sys.stderr)
        return 2
    records = []
    for path in argv[2:]:
        try:
            with open(path) as file:
                records += json.load(file)
        except (OSError, ValueError) as error:
            print(
                f"python -m pallas_mlstm.benchmarks.plot: cannot read the records in {path}: {error}", file=sys.stderr
            )
            return 2
    print(plot_constant_token_sweep(records, argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
