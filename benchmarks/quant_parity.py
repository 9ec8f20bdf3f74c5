"""Weight-quantized bundles against the fp32 bundle they came from, on the built-in parity set.

    python benchmarks/quant_parity.py FP32_BUNDLE VARIANT_BUNDLE [VARIANT_BUNDLE ...] [--tag TAG]
    python benchmarks/quant_parity.py --report benchmarks/results/TAG.json   # re-render with the stated tolerances

`q3vl parity` checks a bundle against the PyTorch reference; a quantized bundle's tolerance is
stated against the fp32 bundle instead (`q3vl.tolerances`), and the fp32 bundle itself matches the
reference to cosine 1 - 1e-12. This runs the same 28 items (images of five shapes, a screenshot,
videos, texts in eight scripts, mixes; for a reranker each item is a document against a text query
and against an image query: 56 scores) through the fp32 bundle once and through each variant, and
reports per variant the worst item's figure, which item it is, and whether the variant's stated
tolerance holds. Writes benchmarks/results/<tag>.json and <tag>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bench.run import machine_info
from q3vl.bundle import Manifest
from q3vl.runtime import model_for
from q3vl.tasks import task_for
from q3vl.testing.inputs import default_inputs
from q3vl.tolerances import tolerance


def outputs(bundle: Path, requests: list[tuple[str, Any]]) -> list[np.ndarray]:
    task = task_for(Manifest.read(bundle).task)
    # a variant outside its tolerance is still measured
    with model_for(task.name)(bundle, allow_unverified=True) as model:
        return [task.values(model, request) for _, request in requests]


def render(data: dict[str, Any]) -> str:
    """The Markdown report; each row's tolerance is the one `q3vl.tolerances` states now."""
    task = task_for(data["task"])
    mi = data["machine"]
    label = task.metric_label.replace("|", "\\|")
    lines = [f"{task.name} bundles vs the fp32 bundle `{data['fp32']}` on the built-in parity set "
             f"(checkpoint: {data['checkpoints'] or 'not stated'}); {mi['date']}, {data['seconds']} s", "",
             f"| bundle | precision | items | worst {label} | worst item | median | stated tolerance | within |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        tol = tolerance(r["precision"])
        lines.append(f"| {r['bundle']} | {r['precision']} | {r['items']} | {r['worst']:.6f} | {r['worst_item']} | "
                     f"{r['median']:.6f} | {task.bound(tol):g} | {'yes' if task.within(r['worst'], tol) else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if sys.argv[1:2] == ["--report"]:  # re-render a saved run: python benchmarks/quant_parity.py --report X.json
        path = Path(sys.argv[2])
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32", type=Path)
    p.add_argument("variants", type=Path, nargs="+")
    p.add_argument("--checkpoints", default="", help="what the checkpoint is, for the report (e.g. 'small, realistic')")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="quant-parity")
    a = p.parse_args()
    started = time.perf_counter()
    task = task_for(Manifest.read(a.fp32).task)
    key = task.outputs[0]
    with tempfile.TemporaryDirectory(prefix="q3vl-parity-") as tmp:
        items = default_inputs(Path(tmp))
        from q3vl.testing.inputs import gradient_image  # what a reranker image query carries (as q3vl parity)

        requests = task.parity_requests([item for _, item in items], gradient_image(128, 128, 3))
        base = outputs(a.fp32, requests)
        rows = []
        for variant in a.variants:
            m = Manifest.read(variant)
            got = outputs(variant, requests)
            figures, labels = [], []
            for (prefix, _), g, b in zip(requests, got, base):
                figures += list(task.compare({key: g}, {key: b}))
                labels += [prefix + name for name, _ in items]
            worst_at = int(np.argmin(figures) if task.higher_is_better else np.argmax(figures))
            worst = float(figures[worst_at])
            q = m.extra.get("quantization", {})
            rows.append({"bundle": variant.name, "precision": m.precision,
                         "method": q.get("method") or (q.get("int8_plan") or {}).get("method"),
                         "items": len(figures), "metric": task.metric, "worst": worst,
                         "worst_item": labels[worst_at], "median": float(np.median(figures))})
            sys.stderr.write(f"{variant.name}: {task.metric} {worst:.6f} at {labels[worst_at]}\n")
    data = {"machine": machine_info(), "task": task.name, "fp32": a.fp32.name, "checkpoints": a.checkpoints,
            "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.tag}.json").write_text(json.dumps(data, indent=2) + "\n")
    text = render(data)
    (a.out / f"{a.tag}.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
