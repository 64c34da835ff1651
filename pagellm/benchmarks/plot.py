"""Throughput-latency plot of a request-rate sweep (matplotlib, no display needed)."""

from __future__ import annotations

from typing import Sequence


def plot_sweep(runs: Sequence[dict], path: str, title: str = "") -> str:
    """One point per run: x = output tokens/s, y = median TPOT and median TTFT (ms), labelled by
    request rate. `runs`: dicts with "label" and a `metrics.summarize` result under "summary"."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["summary"]["output_throughput"] for r in runs]
    for ax, key, name in ((axes[0], "tpot_ms", "median TPOT (ms)"), (axes[1], "ttft_ms", "median TTFT (ms)")):
        ys = [r["summary"][key]["median"] for r in runs]
        ax.plot(xs, ys, marker="o")
        for x, y, r in zip(xs, ys, runs):
            ax.annotate(str(r["label"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
