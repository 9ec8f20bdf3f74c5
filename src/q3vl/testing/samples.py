"""Sample inputs for the README's examples: a few media files and the JSONL files that name them.

Why: a newcomer's first `q3vl embed` needs an items file and media to point it at, and the README's
examples must run as written (tests/test_docs_snippets.py runs them). `write_samples` makes them
offline and deterministically; the JSONL files use ids and paths relative to themselves, i.e. the
input dialect every command reads (`q3vl/preprocess/adapter.py`). Torch-free.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from q3vl.testing.inputs import gradient_image, screenshot_image, write_video

ITEMS: list[dict[str, Any]] = [
    {"id": "beach", "text": "A woman playing with her dog on a beach at sunset."},
    {"id": "skyline-text", "text": "City skyline view from a high-rise building at night."},
    {"id": "photo", "image": "photo.jpg", "instruction": "Find the matching photo"},
    {"id": "photo+caption", "text": "a sunset gradient", "image": "photo.jpg"},
    {"id": "clip", "video": "clip.mp4", "fps": 2},
    {"id": "frames", "video": ["frames/f0.png", "frames/f1.png", "frames/f2.png"]},
]
QUERY = {"text": "a dog on a beach"}
DOCUMENTS: list[dict[str, Any]] = [
    {"id": "dog", "text": "golden retriever running on the sand at sunset"},
    {"id": "report", "text": "quarterly revenue grew by four percent"},
    {"id": "skyline", "image": "skyline.jpg"},
    {"id": "clip", "video": "clip.mp4"},  # a document takes text/image/video; fps is per request
]


def _png_data_uri(seed: int) -> str:
    buf = io.BytesIO()
    gradient_image(48, 64, seed=seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_samples(directory: str | Path) -> dict[str, Path]:
    """Write photo.jpg, skyline.jpg, clip.mp4, frames/f*.png, items.jsonl (embedding items, one with
    an inline data-URI image), query.json and docs.jsonl (a rerank query and its documents) into
    `directory`; returns the name -> path of each.
    """
    d = Path(directory)
    (d / "frames").mkdir(parents=True, exist_ok=True)
    gradient_image(360, 480, seed=1).save(d / "photo.jpg", quality=90)
    screenshot_image(400, 640).save(d / "skyline.jpg", quality=90)
    write_video(d / "clip.mp4", frames=16, width=160, height=120, fps=8)
    for i in range(3):
        gradient_image(120, 160, seed=20 + i).save(d / "frames" / f"f{i}.png")
    _jsonl(d / "items.jsonl", [*ITEMS, {"id": "inline", "image": _png_data_uri(3)}])
    (d / "query.json").write_text(json.dumps(QUERY) + "\n", encoding="utf-8")
    _jsonl(d / "docs.jsonl", DOCUMENTS)
    names = ["photo.jpg", "skyline.jpg", "clip.mp4", "items.jsonl", "query.json", "docs.jsonl"]
    return {n: d / n for n in names}


__all__ = ["DOCUMENTS", "ITEMS", "QUERY", "write_samples"]
