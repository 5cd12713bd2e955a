"""Pictures people would rather look at than read: confusion matrices, prediction panels,
learning curves and per-class scores.

Figures are rendered with matplotlib's Agg backend (no display on servers) and returned as
Figure objects; tracking decides where they go.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from landcover.data.schema import IGNORE_INDEX, ClassSchema  # noqa: E402


def confusion_matrix_figure(
    matrix: np.ndarray, class_names: Sequence[str], title: str = ""
) -> plt.Figure:
    """Row-normalised heatmap (recall per true class) annotated with counts."""
    counts = matrix.astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = 1.2 + 0.9 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    ax.set_title(title or "confusion matrix (row share, counts)")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                f"{share[i, j]:.2f}\n{int(counts[i, j])}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i, j] > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def image_to_rgb(image: np.ndarray) -> np.ndarray:
    """(bands, H, W) uint8 -> (H, W, 3) float with a 2-98 % stretch, for display only."""
    rgb = image[:3].transpose(1, 2, 0).astype(np.float32)
    lo, hi = np.percentile(rgb, [2, 98])
    return np.clip((rgb - lo) / max(hi - lo, 1.0), 0, 1)


def class_map_rgb(classes: np.ndarray, schema: ClassSchema) -> np.ndarray:
    """Class indices -> RGB; IGNORE_INDEX pixels are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: schema.num_classes] = schema.rgb_palette()
    palette[IGNORE_INDEX] = 0
    return palette[classes]


def add_class_legend(fig: plt.Figure, schema: ClassSchema) -> None:
    """Class colours under the panels, and room made for them."""
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=np.array(rgb) / 255) for rgb in schema.rgb_palette()
    ]
    fig.legend(handles, schema.names, loc="lower center", ncol=min(len(handles), 6))
    fig.tight_layout(rect=(0, 0.05, 1, 1))


def false_colour(image: np.ndarray) -> np.ndarray:
    """(bands, H, W) with near-infrared as band 4 -> NIR, red, green as RGB: vegetation shows
    red, water dark, pavement grey-blue. A 3-band image falls back to its RGB."""
    if image.shape[0] < 4:
        return image_to_rgb(image)
    return image_to_rgb(image[[3, 0, 1]])


ERROR_COLOURS = np.array([[0.16, 0.62, 0.26], [0.84, 0.15, 0.16], [0.55, 0.55, 0.55]])


def error_map(target: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Right (green), wrong (red), unlabelled (grey), as RGB."""
    kind = np.where(target == IGNORE_INDEX, 2, np.where(target == prediction, 0, 1))
    return ERROR_COLOURS[kind]


def panels_figure(
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    schema: ClassSchema,
    titles: Sequence[str] | None = None,
) -> plt.Figure:
    """One row per window: image | NIR false colour | labels | prediction | errors, each row
    named by `titles` (scene and window), with a class legend."""
    rows = len(images)
    fig, axes = plt.subplots(rows, 5, figsize=(15, 3 * rows + 0.8), squeeze=False)
    for row, (image, target, pred) in enumerate(zip(images, targets, predictions, strict=True)):
        labelled = target != IGNORE_INDEX
        accuracy = float((pred[labelled] == target[labelled]).mean()) if labelled.any() else 0.0
        pictures = (
            image_to_rgb(image),
            false_colour(image),
            class_map_rgb(target, schema),
            class_map_rgb(pred, schema),
            error_map(target, pred),
        )
        names = (
            titles[row] if titles else "image (RGB)",
            "near-infrared, red, green",
            "labels",
            "prediction",
            f"errors: {100 * accuracy:.1f} % right",
        )
        for ax, picture, title in zip(axes[row], pictures, names, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    add_class_legend(fig, schema)
    return fig


def learning_curves_figure(
    history: Sequence[dict[str, float]], monitor: str, best_epoch: int | None
) -> plt.Figure:
    """Train and val loss on one axis, the monitored score on a second, the best epoch marked:
    over- or under-fitting in one look."""
    fig, loss_ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("train/loss", "-"), ("val/loss", "--")):
        points = [(h["epoch"], h[key]) for h in history if key in h and np.isfinite(h[key])]
        if points:
            loss_ax.plot(*zip(*points, strict=True), style, marker="o", label=key)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    score_ax = loss_ax.twinx()
    scores = [(h["epoch"], h[monitor]) for h in history if monitor in h and np.isfinite(h[monitor])]
    if scores and "loss" not in monitor:
        score_ax.plot(*zip(*scores, strict=True), color="tab:green", marker="s", label=monitor)
        score_ax.set_ylabel(monitor)
    if best_epoch is not None:
        loss_ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    handles = loss_ax.get_legend_handles_labels()
    more = score_ax.get_legend_handles_labels()
    loss_ax.legend(handles[0] + more[0], handles[1] + more[1], loc="best", fontsize=8)
    loss_ax.set_title("learning curves")
    fig.tight_layout()
    return fig


def per_class_scores_figure(
    scores: dict[str, dict[str, float]], schema: ClassSchema, title: str
) -> plt.Figure:
    """IoU and F1 per class as grouped bars in the classes' own colours (one chart, not 2 x
    classes separate metric charts)."""
    names = schema.names
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 4.5))
    positions = np.arange(len(names))
    colours = np.array(schema.rgb_palette()) / 255
    for offset, (label, values) in zip((-0.2, 0.2), scores.items(), strict=False):
        heights = [values.get(name, 0.0) for name in names]
        bars = ax.bar(
            positions + offset,
            heights,
            width=0.38,
            color=colours,
            edgecolor="black",
            hatch="" if offset < 0 else "//",
            label=label,
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(positions, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    keys = [  # neutral swatches: the bars' own colours are the classes'
        Patch(facecolor="white", edgecolor="black", hatch=hatch, label=label)
        for label, hatch in zip(scores, ("", "//"), strict=False)
    ]
    ax.legend(handles=keys, fontsize=8)
    fig.tight_layout()
    return fig


def quicklook_figure(
    codes: np.ndarray,
    code_colors: dict[int, tuple[int, int, int, int]],
    names_by_code: dict[int, str],
    title: str,
    extent: tuple[float, float, float, float] | None = None,
    metres: bool = False,
) -> plt.Figure:
    """A downsampled class map with the map's own colour table and a legend.

    `extent` (left, right, bottom, top in the CRS's units) draws it at its ground shape (a
    6.1 x 7.7 km tile is taller than wide, whatever its pixels); `metres`: those units are
    metres, and a scale bar says how far is how far."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    for code, rgba in code_colors.items():
        lut[code] = rgba
    height, width = codes.shape
    if extent is not None:
        width, height = extent[1] - extent[0], extent[3] - extent[2]
    fig, ax = plt.subplots(figsize=(8, 8 * height / max(width, 1e-9) + 0.8))
    ax.imshow(lut[codes], interpolation="nearest", extent=extent)
    ax.set_title(title)
    ax.axis("off")
    if extent is not None and metres:
        add_scale_bar(ax, width)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=np.array(code_colors[c][:3]) / 255) for c in names_by_code
    ]
    fig.legend(handles, list(names_by_code.values()), loc="lower center", ncol=min(len(handles), 6))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def scale_bar_length(width_m: float) -> float:
    """A round length (1, 2 or 5 x 10^k metres) near a fifth of the picture's width."""
    target = max(width_m / 5, 1e-9)
    power = 10 ** np.floor(np.log10(target))  # at most target: 1 x power always fits
    return float(max(step * power for step in (1, 2, 5) if step * power <= target))


def add_scale_bar(ax: plt.Axes, width_m: float) -> None:
    """A scale bar at the lower left, in m or km."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    length = scale_bar_length(width_m)
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    bar = AnchoredSizeBar(
        ax.transData, length, label, "lower left", pad=0.4, frameon=True, size_vertical=0
    )
    ax.add_artist(bar)


# one evaluated scene: name, image (bands, H, W), labels RGB, prediction RGB, disagreement mask
PanelRow = tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def evaluation_panels_figure(rows: Sequence[PanelRow], schema: ClassSchema) -> plt.Figure:
    """One row per scene: image | labels | prediction | confident disagreement (magenta)."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows) + 0.6), squeeze=False)
    for ax_row, (name, image, labels_rgb, predicted_rgb, disagree) in zip(axes, rows, strict=True):
        overlay = image_to_rgb(image) * 0.6
        overlay[disagree] = (1.0, 0.0, 1.0)
        for ax, picture, title in zip(
            ax_row,
            (image_to_rgb(image), labels_rgb, predicted_rgb, overlay),
            (f"{name}", "labels", "prediction", "confident disagreement"),
            strict=True,
        ):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    add_class_legend(fig, schema)
    return fig
