"""Pictures of a job: its loss curve, its adapter's head similarity per layer, its routing by
task; as PNG or SVG.

Drawing is matplotlib's object-oriented API on the Agg backend (a `Figure` per picture, never
pyplot's global state), so pictures can be drawn in any thread: the routes call these in the
threadpool, after the job's data was read (no database connection is held while drawing).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before anything else of matplotlib is imported: no display, no GUI toolkit
matplotlib.rcParams["svg.hashsalt"] = "rlora"  # SVG element ids from the content, not random: same data, same bytes

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

FORMATS = {"png": "image/png", "svg": "image/svg+xml"}
PLOTS = ("loss", "head_similarity", "routing")
MAX_LAYERS_SHOWN = 48  # heatmaps on one picture; a deep model's layers are sampled evenly
_DPI = 100


class PlotUnavailable(LookupError):
    """The job has no data for this picture (yet): the reason, for a 404."""


def _render(figure: Figure, fmt: str) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # No creation date in the SVG or PNG: the same data draws the same bytes.
    figure.savefig(buffer, format=fmt, dpi=_DPI, metadata={"Date": None} if fmt == "svg" else {"Software": None})
    return buffer.getvalue()


def loss_plot(train_loss: list[dict[str, Any]], evaluation: dict[str, Any] | None, fmt: str) -> bytes:
    """Training loss by step (``[{"step", "loss"}]``), and each task's eval loss at the step it
    was measured (the last one) as a marker."""
    points = [(p["step"], p["loss"]) for p in train_loss if p.get("loss") is not None and math.isfinite(p["loss"])]
    evaluated = {task: r["loss"] for task, r in (evaluation or {}).items() if r.get("loss") is not None}
    if not points and not evaluated:
        raise PlotUnavailable("no loss recorded yet")
    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.add_subplot()
    if points:
        axes.plot([s for s, _ in points], [v for _, v in points], label="train", linewidth=1.2)
    last = points[-1][0] if points else 0
    for task, value in sorted(evaluated.items()):
        axes.scatter([last], [value], marker="o", zorder=3, label=f"eval: {task}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (answer tokens)")
    axes.set_title("loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper right")
    figure.tight_layout()
    return _render(figure, fmt)


def head_similarity_matrices(adapter_dir: Path) -> dict[str, list[list[float]]]:
    """Per adapted module, the cosine similarity of each pair of its heads ``B_i`` (flattened),
    from the adapter folder's weights; modules with one head are left out."""
    import numpy as np
    from safetensors.numpy import load_file

    from rlora.adapter.folder import WEIGHTS_FILE

    matrices = {}
    for name, heads in sorted(load_file(str(adapter_dir / WEIGHTS_FILE)).items()):
        if not name.endswith(".lora_B") or heads.shape[0] < 2:
            continue
        flat = heads.reshape(heads.shape[0], -1).astype(np.float64)
        norms = np.linalg.norm(flat, axis=1)
        unit = flat / np.where(norms == 0, 1.0, norms)[:, None]
        cosine = unit @ unit.T
        both_zero = (norms == 0)[:, None] & (norms == 0)[None, :]
        matrices[name.removesuffix(".lora_B")] = np.where(both_zero, 1.0, cosine).round(4).tolist()
    return matrices


def _shown(names: list[str]) -> list[str]:
    if len(names) <= MAX_LAYERS_SHOWN:
        return names
    step = len(names) / MAX_LAYERS_SHOWN
    return [names[int(i * step)] for i in range(MAX_LAYERS_SHOWN)]


def head_similarity_plot(matrices: dict[str, list[list[float]]], fmt: str) -> bytes:
    """A heatmap per adapted layer of the similarity of its heads (-1 to 1)."""
    if not matrices:
        raise PlotUnavailable("the adapter has no layer with several heads")
    names = _shown(sorted(matrices))
    columns = min(6, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(2.0 * columns + 1.0, 2.0 * rows + 0.5), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    image = None
    for axes, name in zip(grid.flat, names):
        matrix = matrices[name]
        image = axes.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        heads = len(matrix)
        axes.set_xticks(range(heads))
        axes.set_yticks(range(heads))
        axes.tick_params(labelsize=6)
        axes.set_title(_short(name), fontsize=7)
    for axes in list(grid.flat)[len(names):]:
        axes.set_axis_off()
    shown = "" if len(names) == len(matrices) else f" ({len(names)} of {len(matrices)} layers)"
    figure.suptitle(f"head similarity (cosine of B_i, B_j){shown}", fontsize=9)
    figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.8)
    return _render(figure, fmt)


def _short(module: str) -> str:
    """``model.layers.3.mlp.gate_proj`` -> ``layer 3 gate_proj``: what tells layers apart."""
    parts = module.split(".")
    numbers = [p for p in parts if p.isdigit()]
    return f"layer {'.'.join(numbers)} {parts[-1]}" if numbers else module


def routing_by_task(metrics: dict[str, Any] | None) -> dict[str, list[float]]:
    """Each task's mean head weights, averaged over the routed layers: from the routing
    summary's ``by_task`` table (a mixture of several tasks), else the overall summary as the
    row ``all tasks``. Empty when the adapter has no router."""
    routing = (metrics or {}).get("routing") or {}
    by_task = routing.get("by_task")
    if by_task:
        layers_by_task = {task: [layer["mean_weight"][task] for layer in by_task["per_layer"].values()] for task in by_task["tasks"]}
    else:
        layers_by_task = {"all tasks": [layer["mean_weight"] for layer in routing.get("per_layer", {}).values()]}
    return {task: [sum(weights) / len(layers) for weights in zip(*layers)] for task, layers in layers_by_task.items() if layers}


def routing_plot(table: dict[str, list[float]], fmt: str) -> bytes:
    """A heatmap of tasks by heads: each task's mean weight on each head."""
    if not table:
        raise PlotUnavailable("no routing recorded (the job has not finished, or its adapter has no router)")
    tasks = sorted(table)
    heads = max(len(row) for row in table.values())
    figure = Figure(figsize=(1.2 + 0.7 * heads + 2.0, 1.2 + 0.45 * len(tasks)))
    axes = figure.add_subplot()
    image = axes.imshow([table[t] for t in tasks], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes.set_xticks(range(heads), [f"head {i}" for i in range(heads)], fontsize=8)
    axes.set_yticks(range(len(tasks)), [t[:24] for t in tasks], fontsize=8)
    for row, task in enumerate(tasks):
        for column, weight in enumerate(table[task]):
            axes.text(column, row, f"{weight:.2f}", ha="center", va="center", fontsize=7, color="white" if weight < 0.6 else "black")
    axes.set_title("routing by task (mean head weight)", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return _render(figure, fmt)
