"""The optional CPU decode stage: images decoded and resized on CPU actors before the embedding stage.

On a GPU node the embedding actor's own loader threads decode the next micro-batch while the current
one runs; when a node has too few cores for that (large photos, many GPUs), `DecodeImages` moves the
decode and the resize to separate CPU actors, which Ray can place anywhere in the cluster.

Each single image (a path, URL, data URI, encoded bytes or an array) is prepared by the runtime's
`prepare_image`, the embedder's own steps (read under the media policy, smart_resize with the
bundle's patch factor and the same `min_pixels` / `max_pixels`, PIL bicubic), and passed on as raw
RGB bytes at that final size. The embedder's own resize of an image already at its target size is
the identity (smart_resize of a conforming size returns it; Pillow's resize to the same size is a
copy), so the embedding is the one the file gives (tested). Image lists, frame lists and videos pass
through and are decoded in the embedding stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from q3vl.errors import ConfigError
from q3vl.ray.rows import ColumnMap, image_limits, resolve, table_rows

if TYPE_CHECKING:
    import pyarrow as pa

    from q3vl.preprocess import MediaPolicy

PIXELS = "_q3vl_pixels_{}"
SHAPE = "_q3vl_shape_{}"
PRIVATE = "_q3vl_"


class DecodeImages:
    """`map_batches` callable (CPU actors): adds, per image column, the decoded pixels of each row's
    single image; a row whose image cannot be read gets that error in `error` (and is not embedded).

    `min_pixels`, `max_pixels` and `media_policy` must be the embedding stage's (the pipeline helper
    passes the same values to both).
    """

    def __init__(self, bundle: str | Path, *, columns: ColumnMap | None = None, base_dir: str | None = None,
                 min_pixels: int = 4096, max_pixels: int = 1_843_200, media_policy: MediaPolicy | None = None,
                 timeout: float = 10.0) -> None:
        from q3vl.preprocess import MediaPolicy
        from q3vl.runtime import bundle_geometry

        self.columns = columns or ColumnMap()
        if self.columns.json:
            raise ConfigError("the decode stage reads columns, not JSON lines")
        self.geometry = bundle_geometry(bundle)
        self.base_dir, self.min_pixels, self.max_pixels = base_dir, min_pixels, max_pixels
        self.policy = media_policy or MediaPolicy()
        self.timeout = timeout

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        from q3vl.ray.udf import ERROR, prior_errors
        from q3vl.runtime import as_input_error, prepare_image

        errors = prior_errors(batch)
        rows = table_rows(batch, [*self.columns.image, *self.columns.column("min_pixels"),
                                  *self.columns.column("max_pixels")])
        table = batch
        for column in self.columns.image:
            if column not in batch.column_names:
                continue
            pixels: list[bytes | None] = [None] * len(rows)
            shapes: list[list[int] | None] = [None] * len(rows)
            for i, row in enumerate(rows):
                value, limits = row.get(column), image_limits(row, self.columns)
                if errors[i] or not isinstance(value, (str, bytes, np.ndarray)) or not self._usable(limits):
                    continue  # nothing, a list of images or a bad value: left to the embedding stage
                try:
                    own = limits or {}
                    rgb = prepare_image(resolve(value, self.base_dir) if isinstance(value, str) else value,
                                        self.geometry, min_pixels=own.get("min_pixels", self.min_pixels),
                                        max_pixels=own.get("max_pixels", self.max_pixels), media_policy=self.policy,
                                        timeout=self.timeout)
                except Exception as e:
                    errors[i] = as_input_error(e).reason
                    continue
                pixels[i], shapes[i] = rgb.tobytes(), list(rgb.shape)
            table = table.append_column(PIXELS.format(column), pa.array(pixels, pa.binary()))
            table = table.append_column(SHAPE.format(column), pa.array(shapes, pa.list_(pa.int32())))
        table = table.drop_columns([ERROR]) if ERROR in table.column_names else table
        return table.append_column(ERROR, pa.array(errors, pa.string()))

    def _usable(self, limits: dict[str, int] | None) -> bool:
        """Whether a row's own pixel limits (if any) are valid; the embedding stage reports bad ones."""
        if limits is None:
            return False
        return limits.get("min_pixels", self.min_pixels) <= limits.get("max_pixels", self.max_pixels)


def apply_decoded(batch: pa.Table, rows: list[dict[str, object]], columns: ColumnMap) -> None:
    """Put the decode stage's pixels (arrays at their final size) in place of the image values they
    were decoded from, in `rows` (the embedding stage's view of `batch`).
    """
    for column in columns.image:
        name = PIXELS.format(column)
        if name not in batch.column_names:
            continue
        shapes = batch.column(SHAPE.format(column)).to_pylist()
        for row, data, shape in zip(rows, batch.column(name).to_pylist(), shapes):
            if data is not None:
                row[column] = np.frombuffer(data, np.uint8).reshape(shape)
