"""`landcover-evaluate`: whole-scene evaluation and the label-disagreement map.

Patch scores during training are not what users get; this runs the same tiled predictor as
`landcover-predict` over whole labelled scenes, streams every labelled pixel into one confusion
matrix, and marks where the model is confident and the label says otherwise. The 2018
tutorial's model found a pond missing from the ground truth: ranked disagreement regions turn
that anecdote into a tool for finding label errors.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import rasterio
import torch
from omegaconf import DictConfig
from rasterio.windows import Window
from scipy import ndimage

from landcover.artifacts.reference import LoadedModel
from landcover.config import plain_dict
from landcover.data.loaders import ensure_synthetic, split_scenes
from landcover.data.scenes import Scene, label_path_for, open_raster
from landcover.data.schema import IGNORE_INDEX, ClassSchema
from landcover.errors import ConfigError
from landcover.metrics import ConfusionMatrix, scores_from_matrix
from landcover.predict.predictor import PredictSettings, predict_raster
from landcover.predict.prior import literal_template
from landcover.predict.runnable import runnable_model
from landcover.predict.writer import OutputSet, class_indices_of_codes, pixel_area
from landcover.tracking import runs as tracking
from landcover.tracking.datasets import scenes_dataset
from landcover.tracking.figures import (
    class_map_rgb,
    confusion_matrix_figure,
    evaluation_panels_figure,
)

log = logging.getLogger("landcover.evaluate")

AGREE, DISAGREE, UNLABELLED = 0, 1, 255
DISAGREEMENT_COLORS = {AGREE: (0, 0, 0, 0), DISAGREE: (255, 0, 255, 255), UNLABELLED: (0, 0, 0, 0)}


def log_evaluation(
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    matrix: np.ndarray,
    class_names: list[str],
    matrix_figure: plt.Figure,
    panels: plt.Figure,
    per_scene_csv: str,
    regions_csv: str,
    disagreement_maps: list[Path],
    dataset: Any = None,
    model_id: str | None = None,
) -> None:
    """A whole-scene evaluation, inside an active run: the scenes it read as the run's
    dataset, its metrics linked to that dataset and to the evaluated logged model."""
    from landcover.tracking.datasets import log_datasets

    mlflow.log_params(dict(params))
    if dataset is not None:
        log_datasets({"evaluation": dataset})
    mlflow.log_metrics(
        {k: float(v) for k, v in metrics.items() if np.isfinite(v)},
        dataset=dataset,
        model_id=model_id,
    )
    tracking.log_confusion_matrix(matrix, class_names, matrix_figure)
    mlflow.log_figure(panels, "panels/scene_panels.png")
    plt.close(panels)
    mlflow.log_text(per_scene_csv, "per_scene_metrics.csv")
    mlflow.log_text(regions_csv, "disagreement/disagreement_regions.csv")
    for path in disagreement_maps:
        mlflow.log_artifact(str(path), "disagreement")


def disagreement(
    target: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, threshold: float
) -> np.ndarray:
    """DISAGREE where the label is known, the model is at least `threshold` sure, and they
    differ; UNLABELLED where the label is ignored or the input has no data."""
    out = np.full(target.shape, AGREE, dtype=np.uint8)
    unlabelled = (target == IGNORE_INDEX) | (predicted == IGNORE_INDEX)
    out[(predicted != target) & (confidence >= threshold) & ~unlabelled] = DISAGREE
    out[unlabelled] = UNLABELLED
    return out


@dataclass
class SceneEvaluation:
    """One scene's confusion matrix, disagreement regions and output files."""

    scene: Scene
    matrix: np.ndarray
    outputs: dict[str, Path]
    regions: list[dict]


class SceneScorer:
    """Receives finished rows from the predictor (in its writer thread) and scores them."""

    def __init__(
        self,
        scene: Scene,
        schema: ClassSchema,
        threshold: float,
        outputs: OutputSet,
        profile: dict,
        target: Path,
    ) -> None:
        self.labels = open_raster(scene.label_path)
        self.lookup = schema.lookup_table()
        self.threshold = threshold
        self.matrix = ConfusionMatrix(schema.num_classes)
        self.raster = outputs.add(
            "disagreement",
            target,
            profile,
            nodata=UNLABELLED,
            colormap=DISAGREEMENT_COLORS,
            descriptions=["1: confident prediction disagrees with label"],
        )

    def __call__(
        self,
        row: int,
        classes: np.ndarray,
        confidence: np.ndarray,
        probabilities: np.ndarray | None,
    ) -> None:
        """Score finished rows against the labels and write their disagreement."""
        height, width = classes.shape
        window = Window(0, row, width, height)
        target = self.lookup[self.labels.read(1, window=window)]
        self.matrix.update(torch.from_numpy(classes), torch.from_numpy(target))
        self.raster.write(disagreement(target, classes, confidence, self.threshold), window)

    def close(self) -> None:
        """Close the label and disagreement rasters opened for scoring."""
        self.labels.close()


def rank_regions(
    mask: np.ndarray,
    target: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    names: list[str],
    transform,
    has_crs: bool,
    min_pixels: int,
) -> list[dict]:
    """Connected disagreement regions (8-connected), largest first."""
    regions, count = ndimage.label(mask == DISAGREE, structure=np.ones((3, 3)))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(regions), regions, index).astype(int)
    mean_conf = ndimage.mean(confidence, regions, index)
    slices = ndimage.find_objects(regions)
    area = pixel_area(transform) if has_crs else None
    rows = []
    for label, size, conf, box in zip(index, sizes, mean_conf, slices, strict=True):
        if size < min_pixels:
            continue
        inside = regions[box] == label
        label_class = np.bincount(target[box][inside], minlength=256).argmax()
        predicted_class = np.bincount(predicted[box][inside], minlength=256).argmax()
        r0, r1, c0, c1 = box[0].start, box[0].stop, box[1].start, box[1].stop
        x, y = transform * ((c0 + c1) / 2, (r0 + r1) / 2)
        rows.append(
            {
                "pixels": int(size),
                "area_m2": None if area is None else size * area,
                "row_min": r0,
                "col_min": c0,
                "row_max": r1 - 1,
                "col_max": c1 - 1,
                "centre_x": x if has_crs else None,
                "centre_y": y if has_crs else None,
                "label_class": names[label_class] if label_class < len(names) else "unknown",
                "predicted_class": names[predicted_class]
                if predicted_class < len(names)
                else "unknown",
                "mean_confidence": float(conf),
            }
        )
    return sorted(rows, key=lambda r: (-r["pixels"], -r["mean_confidence"]))


def evaluate_scene(
    model: LoadedModel,
    scene: Scene,
    output_dir: Path,
    settings: PredictSettings,
    threshold: float,
    min_region_pixels: int,
) -> SceneEvaluation:
    """Map one labelled scene with the tiled predictor users get and score it as it is written (no
    second pass)."""
    schema = model.schema
    stem = Path(scene.image_path).stem
    with open_raster(scene.image_path) as src:
        profile = {
            "width": src.width,
            "height": src.height,
            "crs": src.crs,
            "transform": src.transform,
        }
    target = output_dir / f"{stem}_disagreement.tif"
    outputs = OutputSet(target)
    scorer = SceneScorer(scene, schema, threshold, outputs, profile, target)
    try:
        result = predict_raster(
            model, scene.image_path, output_dir / f"{stem}_landcover.tif", settings, on_rows=scorer
        )
        published = outputs.publish()
    except BaseException:
        outputs.discard()
        raise
    finally:
        scorer.close()
    with (
        rasterio.open(published["disagreement"]) as dis,
        rasterio.open(result.outputs["classes"]) as pred,
        open_raster(scene.label_path) as lab,
    ):
        mask = dis.read(1)
        predicted = class_indices_of_codes(schema)[pred.read(1)]
        target = schema.lookup_table()[lab.read(1)]
        confidence = np.zeros(mask.shape, np.float32)
        if "confidence" in result.outputs:
            with rasterio.open(result.outputs["confidence"]) as conf:
                confidence = conf.read(1) / 255.0
        regions = rank_regions(
            mask,
            target,
            predicted,
            confidence,
            schema.names,
            dis.transform,
            dis.crs is not None,
            min_region_pixels,
        )
    return SceneEvaluation(
        scene,
        scorer.matrix.numpy(),
        {**result.outputs, "disagreement": published["disagreement"]},
        regions,
    )


def _csv(rows: list[dict]) -> str:
    """Rows may differ in keys (a metric is absent for a scene without that class): the header
    is their union, in first-seen order, and missing cells stay empty."""
    if not rows:
        return ""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def scene_panels(evaluations: list[SceneEvaluation], schema: ClassSchema, limit: int):
    """image | labels | prediction | disagreement for up to `limit` scenes, downsampled."""
    rows = []
    code_to_class = class_indices_of_codes(schema)
    for evaluation in evaluations[:limit]:
        scene = evaluation.scene
        factor = max(1, int(np.ceil(max(scene.width, scene.height) / 512)))
        shape = (scene.height // factor, scene.width // factor)
        with (
            open_raster(scene.image_path) as src,
            open_raster(scene.label_path) as lab,
            rasterio.open(evaluation.outputs["classes"]) as pred,
            rasterio.open(evaluation.outputs["disagreement"]) as dis,
        ):
            image = src.read(out_shape=(src.count, *shape))
            target = schema.lookup_table()[lab.read(1, out_shape=shape)]
            predicted = code_to_class[pred.read(1, out_shape=shape)]
            mask = dis.read(1, out_shape=shape)
        rows.append(
            (
                Path(scene.image_path).name,
                image,
                class_map_rgb(target, schema),
                class_map_rgb(predicted, schema),
                mask == DISAGREE,
            )
        )
    return evaluation_panels_figure(rows, schema)


def with_scene_prior(settings: PredictSettings, scene: Scene, data_cfg: Any) -> PredictSettings:
    """The settings for one scene: its prior layer found like its labels (`data.prior_suffix`
    in place of `data.image_suffix`) unless `predict.prior_layer` names one."""
    if settings.prior_layer or not data_cfg.prior_suffix:
        return settings
    layer = label_path_for(scene.image_path, data_cfg.image_suffix, data_cfg.prior_suffix)
    return dataclasses.replace(settings, prior_layer=literal_template(layer))


def run_evaluation(cfg: DictConfig) -> dict[str, float]:
    """`landcover-evaluate` on its validated config (typed by `EvaluateCommandConfig`)."""
    data_cfg = cfg.data
    threshold = float(cfg.evaluate.confidence_threshold)
    if not 0 < threshold <= 1:
        raise ConfigError(f"evaluate.confidence_threshold={threshold} must be within (0, 1]")
    model = runnable_model(
        str(cfg.model),
        backend=str(cfg.predict.backend),
        precision=str(cfg.predict.precision),
        batch_size=int(cfg.predict.batch_size),
        tracking_uri=cfg.tracking.uri,
        device=cfg.device,
    )
    ensure_synthetic(data_cfg)
    schema = model.schema
    scenes = split_scenes(data_cfg, str(cfg.split), schema)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = PredictSettings(**plain_dict(cfg.predict))
    evaluations = [
        evaluate_scene(
            model,
            scene,
            output_dir,
            with_scene_prior(settings, scene, data_cfg),
            threshold,
            int(cfg.evaluate.min_region_pixels),
        )
        for scene in scenes
    ]
    total = np.sum([e.matrix for e in evaluations], axis=0)
    scores = scores_from_matrix(total, schema.scored_classes)
    metrics = scores.as_metrics(schema.names, schema.scored_classes, prefix="eval/")
    per_scene = []
    regions: list[dict[str, Any]] = []
    for evaluation in evaluations:
        scene_scores = scores_from_matrix(evaluation.matrix, schema.scored_classes)
        per_scene.append(
            {
                "scene": Path(evaluation.scene.image_path).name,
                "labelled_pixels": int(evaluation.matrix.sum()),
                **{
                    k.removeprefix("eval/"): round(v, 6)
                    for k, v in scene_scores.as_metrics(
                        schema.names, schema.scored_classes, prefix="eval/"
                    ).items()
                },
            }
        )
        regions.extend(
            {"scene": Path(evaluation.scene.image_path).name, **r} for r in evaluation.regions
        )
    regions.sort(key=lambda r: -r["pixels"])
    regions = [{"rank": i + 1, **r} for i, r in enumerate(regions[: cfg.evaluate.max_regions])]
    (output_dir / "per_scene_metrics.csv").write_text(_csv(per_scene))
    (output_dir / "disagreement_regions.csv").write_text(_csv(regions))
    log.info(
        "evaluated %d scenes: OA %.4f, mIoU %.4f; %d disagreement regions; outputs in %s",
        len(scenes),
        scores.overall_accuracy,
        scores.mean_iou,
        len(regions),
        output_dir,
    )
    tags = {
        "landcover.kind": "evaluation",
        "landcover.model": model.reference,
        "data": data_cfg.name,
        "split": str(cfg.split),
    }
    if model.source_run_id:
        tags["landcover.source_run_id"] = model.source_run_id
    with tracking.start_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        run_name=f"evaluate {data_cfg.name}/{cfg.split}",
        tags=tags,
    ):
        log_evaluation(
            params={
                "model": model.reference,
                "data": data_cfg.name,
                "split": str(cfg.split),
                "scenes": len(scenes),
                "confidence_threshold": threshold,
                **{f"predict.{k}": v for k, v in plain_dict(cfg.predict).items()},
            },
            metrics=metrics,
            matrix=total,
            class_names=schema.names,
            matrix_figure=confusion_matrix_figure(
                total, schema.names, "whole-scene confusion matrix"
            ),
            panels=scene_panels(evaluations, schema, int(cfg.evaluate.max_panels)),
            per_scene_csv=_csv(per_scene),
            regions_csv=_csv(regions),
            disagreement_maps=[e.outputs["disagreement"] for e in evaluations],
            dataset=scenes_dataset(
                f"{data_cfg.name}/{cfg.split}", str(data_cfg.root), scenes, schema
            ),
            model_id=model.model_id,
        )
    return metrics
