"""The export-case comparison harness: one bundle against a reference, on generated inputs.

Used twice with different references: export validation (the bundle against transformers,
`export/parity.py`) and weight quantization (a quantized bundle against the fp32 bundle it came
from, `export/quantize/weights.py`). Inputs go through the runtime's own batch API (`plan` -> `load` ->
`run_batch`), so both sides see identical token ids and pixel values and what is compared is the
graphs. The per-item figure, the worst-of rule and the bound come from the bundle's task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from q3vl.errors import BackendError, InputError
from q3vl.runtime import BatchModel, BatchResult, Loaded, Plan, run_batches
from q3vl.tasks import row_cosine
from q3vl.tolerances import Tolerance

log = logging.getLogger(__name__)

Reference = Callable[[Sequence[Loaded]], dict[str, np.ndarray]]
VisionReference = Callable[[Sequence[Any]], tuple[np.ndarray, np.ndarray]]


def _image(h: int, w: int, seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx * 3 + yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8))


def cases() -> dict[str, list[dict[str, Any]]]:
    """The generated inputs: three image sizes (one non-square), a video, text only, and a mix."""
    frames = [_image(96, 128, 10 + i) for i in range(4)]
    return {
        "images": [{"text": "a photo", "image": _image(224, 224, 1)}, {"image": _image(160, 416, 2)},
                   {"text": "tall", "image": _image(480, 96, 3)}],
        "video": [{"text": "a clip", "video": frames}],
        "text_only": [{"text": "short"}, {"text": "a longer sentence about retrieval " * 6},
                      {"text": "多语言文本 and mixed text"}],
        "mixed": [{"text": "query text"}, {"text": "caption", "image": _image(128, 192, 4)},
                  {"image": _image(96, 96, 5), "video": frames[:3]}],
    }


class _Whole:
    """The sink of a case: its one micro-batch's result; any item error is a bug, raised."""

    result: BatchResult | None = None

    def wanted(self, plan: Plan) -> bool:
        return True

    def failed(self, plan: Plan, error: InputError | BackendError) -> None:
        raise error

    def ran(self, result: BatchResult) -> None:
        self.result = result


def run_case(model: BatchModel[Any], items: list[dict[str, Any]]) -> BatchResult:
    """A case's items planned by the model and run through the batch seam as one micro-batch (any
    failure is a bug: raise it).
    """
    plans = model.plan(model.task.request(items))
    for p in plans:
        if isinstance(p, InputError):
            raise p
    sink = _Whole()
    run_batches(model, [[p for p in plans if isinstance(p, Plan)]], sink, prefetch=False, one_by_one=False)
    assert sink.result is not None
    return sink.result


def run_cases(model: Any, reference: Reference, tol: Tolerance, precision: str,
              vision_reference: VisionReference | None = None) -> dict[str, Any]:
    """Every case through `model` and `reference`; the parity report (`passed`, `summary`, per case).

    `reference(loaded)` returns the reference's text-graph outputs for a case; `vision_reference(blocks)`
    (optional) its merged and DeepStack vision rows, compared by cosine against the bundle's vision graph.
    """
    task = model.task
    report: dict[str, Any] = {"precision": precision, "tolerance": asdict(tol), "cases": {}}
    worst_vision = 1.0
    for name, items in cases().items():
        ran = run_case(model, items)
        loaded, out = ran.items, ran.outputs
        row: dict[str, Any] = {"shapes": [x.plan.tokens for x in loaded]}
        flat = [b for x in loaded for b in x.blocks]
        if flat and vision_reference is not None:
            got = model.runner.vision(flat)
            ref_emb, ref_ds = vision_reference(flat)
            emb, ds = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
            row["vision_min_cos"] = float(min(row_cosine(emb, ref_emb).min(), row_cosine(ds, ref_ds).min()))
            worst_vision = min(worst_vision, row["vision_min_cos"])
        row[task.metric] = task.worst(task.compare(out, reference(loaded)))
        if len(task.outputs) == 1:  # a scalar head (the reranker): keep the values for the record
            row["values"] = [round(float(v), 6) for v in out[task.outputs[0]]]
        row["finite"] = bool(all(np.isfinite(v).all() for v in out.values()))
        report["cases"][name] = row
        log.debug("parity %s: %s", name, row)
    worst = task.worst([r[task.metric] for r in report["cases"].values()])
    finite = all(r["finite"] for r in report["cases"].values())
    vision_ok = vision_reference is None or worst_vision >= tol.vision_cos
    report.update({task.metric: worst, "passed": bool(vision_ok and task.within(worst, tol) and finite)})
    vision = f"vision min cos {worst_vision:.7f}, " if vision_reference is not None else ""
    if vision_reference is not None:
        report["vision_min_cos"] = worst_vision
    report["summary"] = f"{vision}{task.describe(worst)}, finite={finite} ({precision})"
    return report
