"""q3vl: export Qwen3-VL-Embedding/Reranker to ONNX and run them without PyTorch.

`import q3vl` is light: the runtime classes load on first use, and nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from q3vl._version import __version__

if TYPE_CHECKING:
    from q3vl.preprocess.media import MediaPolicy
    from q3vl.runtime import Embedder, Reranker

__all__ = ["Embedder", "MediaPolicy", "Reranker", "__version__", "export_bundle"]


def __getattr__(name: str) -> Any:
    if name in ("Embedder", "Reranker"):
        from q3vl import runtime

        return getattr(runtime, name)
    if name == "MediaPolicy":
        from q3vl.preprocess.media import MediaPolicy

        return MediaPolicy
    if name == "export_bundle":
        from q3vl.export.exporter import export_bundle

        return export_bundle
    raise AttributeError(f"module 'q3vl' has no attribute {name!r}")
