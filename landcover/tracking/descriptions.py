"""The markdown a person reads first on a run's page (`mlflow.note.content`): how it was
started, on what data, which model, and how good its best epoch was. Plain text, no links,
so it reads the same in the MLflow UI, in `mlflow runs describe` and in an exported record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

HEADLINE = ("val/overall_accuracy", "val/mIoU", "val/kappa", "val/loss")


def rounded(value: float, digits: int = 4) -> str:
    """A metric as people read it (0.9824, not 0.9823884027419458)."""
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def training_description(
    *,
    command: str,
    data_name: str,
    train_scenes: int,
    val_scenes: int,
    fingerprint: str,
    model: str,
    parameters: int,
    monitor: str,
    best_epoch: int | None,
    epochs: int,  # the last epoch's index
    best: Mapping[str, float],
    per_class_iou: Mapping[str, float] | None = None,
) -> str:
    """A short markdown summary of one training run."""
    lines = [
        f"**{command}**",
        "",
        "| | |",
        "| --- | --- |",
        f"| data | {data_name}: {train_scenes} train / {val_scenes} val scenes "
        f"(fingerprint `{fingerprint}`) |",
        f"| model | {model}, {parameters / 1e6:.2f} M parameters |",
    ]
    if best_epoch is None:
        lines.append(f"| best epoch | none ({monitor} was never finite) |")
    else:
        value = best.get(monitor)
        shown = f", {monitor} {rounded(value)}" if value is not None else ""
        lines.append(f"| best epoch | {best_epoch} (of epochs 0-{epochs}){shown} |")
    for key in HEADLINE:
        if key in best and key != monitor:
            lines.append(f"| {key} | {rounded(best[key])} |")
    if per_class_iou:
        worst = sorted(per_class_iou.items(), key=lambda item: item[1])
        text = ", ".join(f"{name} {rounded(value, 3)}" for name, value in worst)
        lines.append(f"| IoU per class (worst first) | {text} |")
    return "\n".join(lines) + "\n"


def command_line(program: str, overrides: Sequence[str]) -> str:
    """`landcover-train experiment=demo ...` as it was launched (overrides only)."""
    return " ".join([program, *overrides])
