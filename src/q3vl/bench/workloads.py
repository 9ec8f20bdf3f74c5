"""The benchmark workloads: identical, generated inputs for every system.

Text short (~32 tokens), medium (~128, not in the standard matrix: the GPU run's 32 x 128) and long
(~512), images 448x448, 1280x720 and a 1920x1080 screenshot
(max_pixels shrinks it), a 16-frame video (frame list), a mixed batch, each at batch sizes 1, 8
and 32 where the machine allows (`heavy` workloads run at batch 1 only on CPU), and reranking one
query against 32 documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from q3vl.testing.inputs import gradient_image, screenshot_image, write_video

_SENTENCE = ("retrieval models map queries and documents into a shared space where nearest neighbours are "
             "relevant results and rerankers refine the order of the top candidates with a cross encoder")
WORDS = _SENTENCE.split()


def words(n: int, offset: int = 0) -> str:
    """About `n` tokens of English (one token per common word)."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


@dataclass(frozen=True)
class Workload:
    """One row of the benchmark table."""

    name: str
    kind: str  # "embed" | "rerank"
    batch: int
    heavy: bool = False

    def items(self, media: Path) -> Any:
        """The inputs: a list of items (embed) or a rerank request (rerank)."""
        return make_items(self.name, self.batch, media)


def make_items(name: str, batch: int, media: Path) -> Any:
    """Deterministic inputs for workload `name` at `batch` items."""
    if name == "rerank 1x32":
        docs = [{"text": words(60, i)} for i in range(24)] + [{"image": gradient_image(448, 448, i)} for i in range(8)]
        return {"query": {"text": words(20)}, "documents": docs}
    make = {
        "text-32": lambda i: {"text": words(24, i)},
        "text-128": lambda i: {"text": words(116, i)},
        "text-512": lambda i: {"text": words(500, i)},
        "image-448": lambda i: {"image": gradient_image(448, 448, i)},
        "image-1280x720": lambda i: {"image": gradient_image(720, 1280, i)},
        "screenshot-1920x1080": lambda i: {"image": screenshot_image(1080, 1920)},
        "video-16f": lambda i: {"video": [gradient_image(360, 640, i * 16 + k) for k in range(16)]},
        "video-file": lambda i: {"video": str(_video(media)), "fps": 4},
        "mixed": lambda i: [{"text": words(40, i)}, {"image": gradient_image(448, 448, i)},
                            {"text": words(16, i), "image": gradient_image(720, 1280, i)},
                            {"video": [gradient_image(240, 320, i * 8 + k) for k in range(8)]}][i % 4],
    }[name]
    return [make(i) for i in range(batch)]


def _video(media: Path) -> Path:
    path = media / "bench-clip.mp4"
    if not path.exists():
        write_video(path, frames=32, width=640, height=360, fps=8)
    return path


def standard(quick: bool = False) -> list[Workload]:
    """The workload matrix; `quick` is a smoke-test subset."""
    if quick:
        return [Workload("text-32", "embed", 8), Workload("image-448", "embed", 1), Workload("mixed", "embed", 4),
                Workload("rerank 1x32", "rerank", 32)]
    out = []
    for name in ("text-32", "text-512", "image-448"):
        out += [Workload(name, "embed", b) for b in (1, 8, 32)]
    out += [Workload("image-1280x720", "embed", b, heavy=True) for b in (1, 8)]
    out += [Workload("screenshot-1920x1080", "embed", 1, heavy=True), Workload("video-16f", "embed", 1, heavy=True),
            Workload("mixed", "embed", 8), Workload("rerank 1x32", "rerank", 32)]
    return out
