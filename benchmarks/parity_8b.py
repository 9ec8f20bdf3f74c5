"""The 8B shape on a 24 GiB CPU machine: an int8 bundle against the bfloat16 PyTorch reference, in two steps.

    python benchmarks/parity_8b.py reference CHECKPOINT --out work/8b-ref.npz [--task reranker] [--only LABEL,...]
    python benchmarks/parity_8b.py bundle BUNDLE --refs work/8b-ref.npz [--tag parity-8b-embedding]

The float32 reference of the 8B model needs ~35 GB and the int8 bundle ~9 GB, so both do not
fit at once in 24 GiB: step one runs the published wrapper's logic (`q3vl.reference`) in bfloat16
(memory-mapped, ~17 GB) on the items below, one item per forward pass, and saves its outputs and
timings; step two loads the bundle with the runtime (no torch), runs the same items, and compares
(embedding: cosine per item; reranker: |score difference| per document, documents scored against
one text query). Items: texts (short, an instruction, English, Chinese, Arabic, 32 tokens), images
(224x224, 640x480, 20x20, a 640x360 screenshot, 448x448), a 24-frame H.264 clip, a 4-frame list and
text+image. Step two also times per-item latency of a 32-token text and a 448x448 image, and the
load; peak RSS of each step is read from the process. Writes benchmarks/results/<tag>.json / .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bench.workloads import words
from q3vl.testing.inputs import MULTILINGUAL, gradient_image, screenshot_image, write_video

QUERY = {"text": "a red box moving over a gradient"}


def items(media: Path) -> list[tuple[str, dict[str, Any]]]:
    video = write_video(media / "clip.mp4")
    return [
        ("text/short", {"text": "hello"}),
        ("text/instruction", {"text": "cats", "instruction": "Retrieve images of the animal"}),
        ("text/english", {"text": MULTILINGUAL["english"]}),
        ("text/chinese", {"text": MULTILINGUAL["chinese"]}),
        ("text/arabic", {"text": MULTILINGUAL["arabic"]}),
        ("text/32 tokens", {"text": words(24)}),
        ("image/224x224", {"image": gradient_image(224, 224, 1)}),
        ("image/640x480", {"image": gradient_image(480, 640, 2)}),
        ("image/20x20", {"image": gradient_image(20, 20, 3)}),
        ("image/screenshot-640x360", {"image": screenshot_image(360, 640)}),
        ("image/448x448", {"image": gradient_image(448, 448, 4)}),
        ("video/file 24 frames", {"video": str(video)}),
        ("video/4-frame list", {"video": [gradient_image(120, 160, 50 + i) for i in range(4)]}),
        ("mixed/text+image", {"text": "a gradient", "image": gradient_image(256, 384, 7)}),
    ]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def request(task: Any, item: dict[str, Any]) -> Any:
    """One item as the task's request: an embedding item, or a document (no instruction) scored against QUERY."""
    if task.name == "embedding":
        return [item]
    return {"query": QUERY, "documents": [{k: v for k, v in item.items() if k != "instruction"}]}


def reference(a: argparse.Namespace) -> int:
    import torch

    from q3vl.reference import reference_for
    from q3vl.tasks import task_for

    torch.set_num_threads(a.threads)
    task = task_for(a.task)
    started = time.perf_counter()
    model = reference_for(task.name)(a.checkpoint, dtype="bfloat16")
    load_s = time.perf_counter() - started
    out, seconds, labels = [], [], []
    with tempfile.TemporaryDirectory(prefix="q3vl-8b-") as tmp:
        wanted = set(a.only.split(",")) if a.only else None
        for label, item in items(Path(tmp)):
            if wanted is not None and label not in wanted:
                continue
            t = time.perf_counter()
            out.append(task.reference_values(model, request(task, item))[0])
            seconds.append(time.perf_counter() - t)
            labels.append(label)
            sys.stderr.write(f"reference {label}: {seconds[-1]:.1f} s, peak RSS {peak_rss_gb():.1f} GB\n")
    np.savez(a.out, values=np.stack(out), labels=np.array(labels), seconds=np.array(seconds),
             meta=np.array(json.dumps({"task": a.task, "checkpoint": str(a.checkpoint), "dtype": "bfloat16",
                                       "load_s": load_s, "peak_rss_gb": peak_rss_gb()})))
    return 0


def bundle(a: argparse.Namespace) -> int:
    from q3vl.bench.run import machine_info
    from q3vl.bundle import Manifest
    from q3vl.runtime import model_for
    from q3vl.tasks import task_for

    ref = np.load(a.refs)
    meta = json.loads(str(ref["meta"]))
    task = task_for(Manifest.read(a.bundle).task)
    started = time.perf_counter()
    model = model_for(task.name)(a.bundle, allow_unverified=True)  # exported with --no-validate: no fp32 reference fits
    load_s = time.perf_counter() - started
    got, seconds = [], []
    with tempfile.TemporaryDirectory(prefix="q3vl-8b-") as tmp:
        work = items(Path(tmp))
        ran = {str(x) for x in ref["labels"]}
        for label, item in work:
            if label not in ran:
                continue
            t = time.perf_counter()
            got.append(task.values(model, request(task, item))[0])
            seconds.append(time.perf_counter() - t)
            sys.stderr.write(f"bundle {label}: {seconds[-1]:.1f} s\n")
        latency = {}
        for name, item in (("text-32", dict(work)["text/32 tokens"]), ("image-448x448", dict(work)["image/448x448"])):
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                model.process(request(task, item))
                ts.append(time.perf_counter() - t)
            latency[name] = {"median_s": statistics.median(ts), "runs": len(ts)}
    model.close()
    key = task.outputs[0]
    figures = task.compare({key: np.stack(got)}, {key: ref["values"]})
    worst = task.worst(figures)
    labels = [str(x) for x in ref["labels"]]
    manifest = Manifest.read(a.bundle)
    size = sum(f.stat().st_size for f in a.bundle.iterdir() if f.is_file())
    data = {"machine": machine_info(), "task": task.name, "bundle": str(a.bundle), "precision": manifest.precision,
            "reference": meta, "bundle_bytes": size, "load_s": load_s, "peak_rss_gb": peak_rss_gb(),
            "rows": [{"item": lb, "figure": float(f), "bundle_s": s, "reference_s": float(r)}
                     for lb, f, s, r in zip(labels, figures, seconds, ref["seconds"])],
            "worst": worst, "metric": task.metric, "latency": latency}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.tag}.json").write_text(json.dumps(data, indent=2) + "\n")
    mi = data["machine"]
    figure = "cosine" if task.name == "embedding" else "\\|score diff\\|"  # escaped: a table cell
    lines = [f"{task.name}: {a.bundle.name} ({manifest.precision}, {size / 1e9:.2f} GB) vs the bfloat16 PyTorch "
             f"reference of {Path(meta['checkpoint']).name}; {mi['cpu']}, {mi['cores']} cores, {mi['memory_gib']} GiB; "
             f"{mi['date']}", "",
             f"Worst {figure} over {len(labels)} items: **{worst:.5f}**. Bundle load {load_s:.1f} s, bundle step "
             f"peak RSS {data['peak_rss_gb']:.1f} GB; reference load {meta['load_s']:.1f} s, reference step peak RSS "
             f"{meta['peak_rss_gb']:.1f} GB.",
             f"Per-item latency (bundle, median of {a.repeats}): "
             + ", ".join(f"{k} {v['median_s'] * 1e3:.0f} ms" for k, v in latency.items()) + ".", "",
             f"| item | {figure} | bundle s | bf16 reference s |", "|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['item']} | {r['figure']:.5f} | {r['bundle_s']:.2f} | {r['reference_s']:.1f} |")
    (a.out / f"{a.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    r = sub.add_parser("reference")
    r.add_argument("checkpoint", type=Path)
    r.add_argument("--task", choices=["embedding", "reranker"], default="embedding")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--only", help="comma-separated item labels to run (default: all; the bf16 reference of the 8B "
                                  "shape takes minutes per image on 2 cores)")
    b = sub.add_parser("bundle")
    b.add_argument("bundle", type=Path)
    b.add_argument("--refs", type=Path, required=True)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    b.add_argument("--tag", default="parity-8b")
    a = p.parse_args()
    return reference(a) if a.step == "reference" else bundle(a)


if __name__ == "__main__":
    raise SystemExit(main())
