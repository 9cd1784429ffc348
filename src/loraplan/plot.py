"""The plan's figure: per-layer scores with the selection highlighted, and the layer-similarity heatmap with the
share groups outlined when sharing is on."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .plan import LoraPlan

__all__ = ["check_plot_path", "plot_plan"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("`--plot` needs matplotlib: pip install 'loraplan[plot]'.") from exc
    return plt


def check_plot_path(path: str | Path) -> None:
    """Refuse a figure path whose suffix matplotlib cannot write (or any path when matplotlib is missing), before
    any work is done."""
    plt = _pyplot()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ConfigError(
            f"`--plot` {str(path)!r} has "
            + (f"the suffix .{suffix}, which matplotlib cannot write" if suffix else "no suffix to choose a format")
            + f". Use one of {', '.join('.' + f for f in sorted(formats))}, e.g. plan.png."
        )


def plot_plan(plan: LoraPlan, path: str | Path) -> Path:
    """Write the figure to ``path`` (PNG, SVG or PDF by suffix). Needs matplotlib (``pip install loraplan[plot]``)."""
    check_plot_path(path)
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    heat = plan.similarity is not None
    fig, axes = plt.subplots(1, 2 if heat else 1, figsize=(13 if heat else 8, 4.8), squeeze=False)
    ax = axes[0][0]
    primary = next((n for n in plan.scores if n != "importance"), "importance")
    values = plan.scores.get(primary) or [0.0] * plan.num_layers
    rest = set(plan.shared_rest)
    colours = [
        "tab:orange"
        if i in plan.selected_layers
        else ("tab:blue" if i in rest else ("tab:red" if i in plan.flagged_layers else "tab:gray"))
        for i in range(plan.num_layers)
    ]
    ax.bar(range(plan.num_layers), [0.0 if math.isnan(v) else v for v in values], color=colours)
    ax.set_xlabel("layer")
    ax.set_ylabel(primary)
    ax.set_title(
        f"{plan.model_fingerprint.class_name}: {plan.selector} selects "
        f"{len(plan.selected_layers)}/{plan.num_layers} (orange)" + ("; shared rest in blue" if rest else "")
    )
    finite = [v for v in values if not math.isnan(v)]
    if finite and primary == "cka":
        low, high = min(finite), max(finite)
        ax.set_ylim(max(0.0, low - (high - low) * 0.2 - 1e-3), min(1.0, high + (high - low) * 0.1 + 1e-3))
    for layer in plan.flagged_layers:
        ax.annotate("flagged", (layer, 0), rotation=90, ha="center", va="bottom", fontsize=7)
    if heat:
        hm = axes[0][1]
        image = hm.imshow(plan.similarity, cmap="viridis", origin="lower")
        fig.colorbar(image, ax=hm, fraction=0.046)
        hm.set_title(f"{plan.share} similarity; groups at >= {plan.config.get('share_threshold')}")
        hm.set_xlabel("layer")
        hm.set_ylabel("layer")
        for group in plan.share_groups:  # outline every pair of layers in a group
            for i in group:
                for j in group:
                    hm.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, ec="white", lw=1.0))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
