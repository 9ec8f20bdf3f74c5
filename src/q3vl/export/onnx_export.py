"""torch -> ONNX for the two graphs: dynamo exporter, dynamic shapes, weights as external data.

The example inputs used for tracing are deliberately small and odd-sized (2 blocks of 16 patches,
2 sequences of 16 tokens); validation then runs other shapes, so a shape baked in at trace time
cannot pass unnoticed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

from q3vl.bundle import TEXT_INPUTS, VISION_INPUTS

log = logging.getLogger(__name__)

OPSET = 20


def vision_example(patch_dim: int, side: int) -> tuple[Any, ...]:
    """Two blocks of a 4x4 patch grid."""
    import torch

    s, n = 2, 16
    g = torch.Generator().manual_seed(0)
    return (torch.randn(s, n, patch_dim, generator=g), torch.randint(0, 4, (s, n, 2), generator=g),
            torch.randint(0, side * side, (s, n, 4), generator=g), torch.rand(s, n, 4, generator=g))


def text_example(hidden: int, deepstack: int, vision_id: int) -> tuple[Any, ...]:
    """Two right-padded sequences of 16 tokens, 8 of them visual rows."""
    import torch

    b, length, v = 2, 16, 8
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (b, length), generator=g)
    ids[0, 4:12] = vision_id
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 12:] = 0
    pos = torch.arange(length).expand(3, b, length).contiguous()
    return ids, mask, pos, torch.randn(v, hidden, generator=g), torch.randn(v, deepstack, hidden, generator=g)


def _dynamic_vision() -> dict[str, Any]:
    from torch.export import Dim

    blocks, merged = Dim("blocks", min=1, max=65536), Dim("merged_patches", min=1, max=16384)
    return {name: {0: blocks, 1: 4 * merged} for name in VISION_INPUTS}


def _dynamic_text() -> dict[str, Any]:
    from torch.export import Dim

    batch, seq, vis = Dim("batch", min=1, max=4096), Dim("sequence", min=2, max=262144), Dim("visual_rows", max=2**22)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "position_ids": {1: batch, 2: seq},
            "visual_embeds": {0: vis}, "deepstack_embeds": {0: vis}}


def export_graph(module: Any, example: tuple[Any, ...], path: Path, kind: str, outputs: tuple[str, ...]) -> None:
    """Export `module` ("vision" or "text") to `path` with weights in `path.data`."""
    import torch

    inputs, dynamic = (VISION_INPUTS, _dynamic_vision()) if kind == "vision" else (TEXT_INPUTS, _dynamic_text())
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    chatter = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        # torch.onnx names dynamic axes itself and says so once per input: expected, not actionable
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        torch.onnx.export(module, example, str(path), dynamo=True, input_names=list(inputs),
                          output_names=list(outputs), dynamic_shapes=dynamic, opset_version=OPSET,
                          external_data=True, optimize=True, verbose=False)
    log.debug("torch.onnx output for %s:\n%s", path.name, chatter.getvalue())
