"""Tiled prediction of rasters of any size, strip by strip.

Reading the next strip, running the model on the next batch of tiles and writing the finished
rows each have a thread, while this one blends the last batch into the strip, so the model never
waits for the bookkeeping and end-to-end speed stays close to the forward pass alone. Memory
is bounded by one strip (tile height x raster width), never by the raster's area.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioIOError
from rasterio.windows import Window
from tqdm.auto import tqdm

from landcover.artifacts.reference import LoadedModel
from landcover.config import PredictSettings as PredictSettings  # the schema is the settings
from landcover.data.scenes import check_same_grid, open_raster
from landcover.data.schema import IGNORE_INDEX
from landcover.errors import ConfigValueError, SceneError
from landcover.predict.prior import PriorLayer, prior_of
from landcover.predict.tiling import Reweight, StripAccumulator, TileLayout
from landcover.predict.tta import averaged_probabilities, check_mode
from landcover.predict.writer import AreaTable, ClassMapWriter

log = logging.getLogger(__name__)

# (first row, class indices, confidence, merged probabilities or None) of finished rows
RowsCallback = Callable[[int, np.ndarray, np.ndarray, np.ndarray | None], None]


@dataclass
class PredictionResult:
    """What mapping one raster produced: output paths, area table, pixels and seconds."""

    input: str  # a path or a remote href (http, s3, /vsi...)
    outputs: dict[str, Path]
    area_table: AreaTable
    seconds: float
    pixels: int
    warning: str | None = None  # e.g. a pixel size far from the model's training data
    width: int = 0  # the raster's (and its map's) grid
    height: int = 0
    crs: str = ""  # empty without a CRS


def plan_layout(
    model: LoadedModel, settings: PredictSettings, width: int, height: int
) -> tuple[TileLayout, bool]:
    """Tile geometry and merge mode for this model.

    A model that predicts only its input's centre (output_margin > 0) must be merged in centre
    mode with exactly its margin as context; a full-output model blends by default.
    """
    margin = model.output_margin
    mode = settings.mode
    if mode not in ("auto", "centre", "blend"):
        raise ConfigValueError(f"predict.mode={mode!r} is not one of auto, centre, blend")
    if margin:
        if mode == "blend":
            raise ConfigValueError(
                f"predict.mode=blend needs a full-output model; {model.reference} "
                f"predicts only the centre of its input ({margin} px margin)"
            )
        context, blend = margin, False
    else:
        context, blend = settings.overlap // 2, mode != "centre"
    divisor = model.size_divisor
    tile = max(divisor, settings.tile_size // divisor * divisor)
    return TileLayout(width=width, height=height, tile=tile, context=context), blend


def tiles_per_batch(model: LoadedModel, settings: PredictSettings) -> int:
    """`predict.batch_size`, where 0 means the backend's own best (1 tile for eager PyTorch,
    one per thread for a compiled graph)."""
    if settings.batch_size < 0:
        raise ConfigValueError(
            f"config value predict.batch_size={settings.batch_size} must be >= 0 (0: auto)"
        )
    return settings.batch_size or model.preferred_batch


def read_strip(src, layout: TileLayout, top: int) -> np.ndarray:
    """Input rows [top - context, top - context + tile) over the full width plus context,
    mirrored beyond the raster's edges."""
    c, t = layout.context, layout.tile
    width = layout.cols * layout.core + 2 * c
    row0, col0 = top - c, -c
    r0, r1 = max(row0, 0), min(row0 + t, layout.height)
    c0, c1 = 0, layout.width
    pixels = read_window(src, Window(c0, r0, c1 - c0, r1 - r0))
    pads = ((r0 - row0, row0 + t - r1), (c0 - col0, col0 + width - c1))
    if any(p for pair in pads for p in pair):
        pixels = np.pad(pixels, ((0, 0), *pads), mode="symmetric")
    return pixels


def read_window(src, window: Window) -> np.ndarray:
    """A windowed read whose failure (a file truncated or corrupted under us) is one error
    naming the file and the rows, not a GDAL traceback."""
    try:
        return src.read(window=window)
    except RasterioIOError as err:
        raise SceneError(
            f"{src.name}: reading rows {window.row_off}-{window.row_off + window.height} failed: "
            f"truncated or corrupt input? ({err})"
        ) from err


def read_valid_mask(src, row: int, rows: int) -> np.ndarray | None:
    """True where the input has data; None when every pixel counts.

    Honours a nodata value (a pixel is missing when every band equals it) and an internal or
    external mask. A 4th band that GDAL labels "alpha" is NOT a mask here: in NAIP-style
    imagery it is near-infrared, and GDAL labels it alpha whenever a 4-band RGB file was
    written without saying otherwise (the real Chesapeake tile is such a file).
    """
    window = Window(0, row, src.width, rows)
    if src.nodata is not None:
        return ~(read_window(src, window) == src.nodata).all(axis=0)
    flags = src.mask_flag_enums[0]
    if MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags:
        return src.read_masks(1, window=window) > 0
    return None


@dataclass(frozen=True)
class TileBatch:
    """Tiles of one strip that go through the model together."""

    top: int  # the strip's first core row
    cols: list[int]  # each tile's first core column
    pixels: np.ndarray  # (tiles, bands, tile, tile) float32
    ends_strip: bool  # the strip's last batch: its finished rows can be handed out after it
    next_top: int | None  # the next strip's first core row (None after the last strip)


def tile_batches(
    src, layout: TileLayout, batch_size: int, reader: ThreadPoolExecutor
) -> Iterator[TileBatch]:
    """Every tile of the raster, strip by strip, `batch_size` at a time; the next strip is
    read by `reader` while this one's tiles are predicted."""
    tops = list(layout.row_tops())
    cols = layout.col_lefts()
    next_strip = reader.submit(read_strip, src, layout, tops[0])
    for index, top in enumerate(tops):
        strip = next_strip.result()
        next_top = tops[index + 1] if index + 1 < len(tops) else None
        if next_top is not None:
            next_strip = reader.submit(read_strip, src, layout, next_top)
        for start in range(0, len(cols), batch_size):
            chunk = cols[start : start + batch_size]
            pixels = np.stack([strip[:, :, col : col + layout.tile] for col in chunk])
            yield TileBatch(
                top,
                chunk,
                pixels.astype(np.float32),
                start + batch_size >= len(cols),
                next_top,
            )


def pixel_size_warning(
    model: LoadedModel, src: rasterio.io.DatasetReader, source: str, tolerance: float
) -> str | None:
    """A warning when the input's pixel size is more than `tolerance` times off the model's
    training pixel size (a 1 m model maps a 23 m tile as if it were 1 m: plausible nonsense).
    Silent where either has no CRS (pixel sizes then mean nothing)."""
    trained = model.metadata.get("pixel_size")
    if not trained or src.crs is None:
        return None
    size = float(abs(src.res[0]))
    ratio = max(size / trained, trained / size)
    if ratio <= tolerance:
        return None
    return (
        f"{source}: pixel size {size:g} differs from the model's training pixel size "
        f"{trained:g} by {ratio:.1f}x (more than predict.pixel_size_tolerance={tolerance:g}); "
        "its map is likely wrong"
    )


def prior_layer_path(template: str | None, source: str, model: LoadedModel, name: str) -> str:
    """The prior layer's raster for `source`: `{stem}` and `{dir}` in the template name the
    input's file name without extension and its folder."""
    if not template:
        raise ConfigValueError(
            f"model {model.reference} fuses the prior layer {name!r} into its map: give that "
            "layer's raster with predict.prior_layer=<path or template such as "
            "'{dir}/{stem}_nlcd.tif'>, or map without it with predict.use_prior=false"
        )
    # string splits, not Path: a URL's "//" must survive (https://host/x.tif -> https://host)
    folder, _, name = source.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    try:
        return template.format(stem=stem, dir=folder or ".")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigValueError(
            f"config value predict.prior_layer={template!r}: only {{stem}} and {{dir}} may be "
            f"named ({err})"
        ) from err


def prior_reweight(
    prior: PriorLayer, layer_path: str, src, source: str, stack: ExitStack
) -> Reweight:
    """Reads the prior layer's rows as the accumulator hands them out and fuses them; the
    layer must lie on the input's grid (checked here, before any tile runs)."""
    layer = stack.enter_context(open_raster(layer_path))
    if layer.count != 1 or layer.dtypes[0] != "uint8":
        raise SceneError(
            f"{layer_path}: a prior layer must be one uint8 band of class codes, not "
            f"{layer.count} band(s) of {layer.dtypes[0]}"
        )
    check_same_grid(src, source, layer, layer_path)

    def reweight(row: int, rows: int, col: int, merged: np.ndarray) -> None:
        codes = read_window(layer, Window(col, row, merged.shape[2], rows))[0]
        prior.reweight(merged, codes)

    return reweight


def predict_raster(
    model: LoadedModel,
    input_path: str | Path,
    output_path: str | Path,
    settings: PredictSettings | None = None,
    on_rows: RowsCallback | None = None,
    keep_probabilities: bool = False,
) -> PredictionResult:
    """Map one raster; `on_rows(row, classes, confidence, probabilities)` sees every strip
    (probabilities only with `keep_probabilities` or `settings.probabilities`)."""
    settings = settings or PredictSettings.defaults()
    started = time.perf_counter()
    source, output_path = str(input_path), Path(output_path)
    schema = model.schema
    # GDAL handles are not thread-safe: the reader thread and the finisher (which reads the
    # nodata mask) each get their own.
    with (
        # remote COGs: no directory listing, no probing for sidecar files (one request each)
        rasterio.Env(
            GDAL_CACHEMAX=settings.gdal_cache_mb,
            GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
            CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.tiff",
            # a busy server's refused or dropped range request is asked again, not fatal
            GDAL_HTTP_MAX_RETRY=3,
            GDAL_HTTP_RETRY_DELAY=0.5,
        ),
        open_raster(source) as src,
        open_raster(source) as mask_src,
        ExitStack() as layers,
    ):
        if src.count != model.bands:
            raise SceneError(
                f"{source}: has {src.count} band(s) but model "
                f"{model.reference} expects {model.bands}"
            )
        warning = pixel_size_warning(model, src, source, settings.pixel_size_tolerance)
        if warning:
            log.warning("%s", warning)
        layout, blend = plan_layout(model, settings, src.width, src.height)
        prior = prior_of(model.metadata, schema) if settings.use_prior else None
        reweight = (
            prior_reweight(
                prior,
                prior_layer_path(settings.prior_layer, source, model, prior.name),
                src,
                source,
                layers,
            )
            if prior is not None
            else None
        )
        profile = {
            "width": src.width,
            "height": src.height,
            "crs": src.crs,
            "transform": src.transform,
        }
        accumulator = StripAccumulator(layout, schema.num_classes, blend)
        batch_size = tiles_per_batch(model, settings)
        transforms = check_mode(settings.tta, layout.tile, layout.tile)
        keep = settings.probabilities or keep_probabilities
        bar = tqdm(
            total=layout.rows * layout.cols,
            desc=f"predict {source.rsplit('/', 1)[-1]}",
            unit="tile",
            disable=not settings.progress,
            dynamic_ncols=True,
        )
        with (
            ClassMapWriter(
                output_path,
                profile=profile,
                schema=schema,
                confidence=settings.confidence,
                probabilities=settings.probabilities,
            ) as writer,
            ThreadPoolExecutor(1) as reader,
            ThreadPoolExecutor(1) as forwarder,
            ThreadPoolExecutor(1) as finisher,
        ):
            written: list[Future] = []  # the last strip's rows being written

            def merge_batch(batch: TileBatch, probabilities: Future) -> None:
                """Blend a batch into the strip; after a strip's last batch, hand its finished
                rows to the finisher (one strip being written at a time)."""
                for col, tile in zip(batch.cols, probabilities.result(), strict=True):
                    accumulator.add(tile, batch.top, col)
                bar.update(len(batch.cols))
                if not batch.ends_strip:
                    return
                finished = accumulator.flush(
                    batch.next_top, keep_probabilities=keep, reweight=reweight
                )
                while written:
                    written.pop().result()
                if finished[1].shape[0]:
                    written.append(
                        finisher.submit(_finish_rows, mask_src, writer, *finished, on_rows)
                    )

            # the model works on the next batch while this thread blends the last one and
            # hands out finished rows: the model never waits for the bookkeeping
            in_flight: deque[tuple[TileBatch, Future]] = deque()
            for batch in tile_batches(src, layout, batch_size, reader):
                in_flight.append(
                    (
                        batch,
                        forwarder.submit(
                            averaged_probabilities, model.forward, batch.pixels, transforms
                        ),
                    )
                )
                if len(in_flight) > 1:
                    merge_batch(*in_flight.popleft())
            while in_flight:
                merge_batch(*in_flight.popleft())
            while written:
                written.pop().result()
            bar.close()
        table = writer.area_table()
    if settings.vectorize:
        from landcover.predict.vectorize import vectorize_map

        writer.outputs["polygons"] = vectorize_map(
            writer.outputs["classes"],
            min_area=settings.vectorize_min_area,
            simplify=settings.vectorize_simplify,
        )
    return PredictionResult(
        source,
        writer.outputs,
        table,
        time.perf_counter() - started,
        layout.width * layout.height,
        warning,
        layout.width,
        layout.height,
        profile["crs"].to_string() if profile["crs"] else "",
    )


def _finish_rows(
    src,
    writer: ClassMapWriter,
    row: int,
    classes: np.ndarray,
    confidence: np.ndarray,
    probabilities: np.ndarray | None,
    on_rows: RowsCallback | None,
) -> None:
    valid = read_valid_mask(src, row, classes.shape[0])
    if valid is not None:
        classes[~valid] = IGNORE_INDEX
    confidence_u8 = np.round(confidence * 255).astype(np.uint8)
    probabilities_u8 = (
        np.round(probabilities * 255).astype(np.uint8) if probabilities is not None else None
    )
    writer.write_rows(row, classes, confidence_u8, probabilities_u8)
    if on_rows is not None:
        on_rows(row, classes, confidence, probabilities)
