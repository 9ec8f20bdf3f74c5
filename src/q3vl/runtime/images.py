"""One image prepared exactly as the embedder prepares it, without loading a model's graphs.

For a stage that decodes images apart from the model (the Ray decode stage on CPU actors): the
same two steps the embedder runs for every image, `plan_image` when it plans an item (read the
header under the media policy, smart_resize with the bundle's patch factor and the item's pixel
limits) and `ImagePlan.pixels` when it loads it (decode, PIL bicubic resize). The pixels it returns,
given back to the embedder, are taken as they are: smart_resize of a conforming size returns it and
the resize to the same size is a copy, so the embedding is the one the file gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from q3vl.bundle import Manifest
from q3vl.preprocess.encode import plan_image
from q3vl.preprocess.media import MediaAccess, MediaPolicy, media_call
from q3vl.preprocess.vision import Geometry


def bundle_geometry(bundle: str | Path) -> Geometry:
    """The vision geometry (patch, temporal patch, merge) a bundle's manifest records."""
    return Geometry.from_spec(Manifest.read(Path(bundle)).spec.vision)


def prepare_image(ref: object, geometry: Geometry, *, min_pixels: int = 4096, max_pixels: int = 1_843_200,
                  media_policy: MediaPolicy | None = None, timeout: float = 10.0) -> np.ndarray:
    """The pixels the embedder would feed for image `ref` (a path, URL, data URI, bytes, PIL image or
    array): uint8 `[h, w, 3]` at the size smart_resize gives for `min_pixels`/`max_pixels` (the
    embedder's constructor defaults), read under `media_policy` (default: `MediaPolicy()`).
    """
    policy = media_policy or MediaPolicy()
    with media_call(policy):
        return plan_image(ref, MediaAccess.current(policy, timeout), geometry, min_pixels, max_pixels).pixels()
