"""Per-stage bars per system (median, with min-max whiskers), as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .harness import STAGES


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(doc["systems"])
    fig, axes = plt.subplots(1, len(STAGES), figsize=(4 * len(STAGES), 4))
    for ax, stage in zip(axes, STAGES):
        med = [doc["systems"][s]["summary"][stage]["median"] for s in systems]
        lo = [m - doc["systems"][s]["summary"][stage]["min"] for s, m in zip(systems, med)]
        hi = [doc["systems"][s]["summary"][stage]["max"] - m for s, m in zip(systems, med)]
        ax.bar(range(len(systems)), med, yerr=[lo, hi], capsize=4, color=[f"C{i}" for i in range(len(systems))])
        ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right")
        ax.set_title(stage.replace("_", " "))
        ax.set_ylabel("seconds (median, min-max)")
    machine = doc["machine"]
    fig.suptitle(f"{doc['config'].get('model_name', '')} {doc['config']['height']}x{doc['config']['width']}, "
                 f"{doc['config']['steps']} steps, batch {doc['config']['batch']} - {machine.get('gpu', machine['cpu'])}"
                 + (" (one system at a time)" if doc["config"].get("mode") == "one-at-a-time" else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
