"""Hugging Face Hub in and out: repo ids resolved to checkpoints and bundles, model cards, push.

One resolver per kind, which every entry point calls: `resolve_checkpoint` (the export, `q3vl
parity`) and `resolve_bundle` / `locate_bundle` (Embedder, Reranker, `q3vl serve`, `q3vl
embed-dataset` and its Ray workers, every command that takes a bundle). A source is a local path or a
repo id `namespace/name[@revision]`; an existing local path wins (`q3vl.hub.source`). `huggingface_hub`
(the `hub` extra) is imported only when a repo id is resolved, never by `import q3vl` or the runtime.
"""

from __future__ import annotations

from typing import Any

from q3vl.hub.source import RepoRef, is_repo_id, parse_source

__all__ = ["RepoRef", "is_repo_id", "locate_bundle", "parse_source", "resolve_bundle", "resolve_checkpoint"]


def __getattr__(name: str) -> Any:
    if name in ("resolve_bundle", "locate_bundle"):
        from q3vl.hub import bundle

        return getattr(bundle, name)
    if name == "resolve_checkpoint":
        from q3vl.hub.checkpoint import resolve_checkpoint

        return resolve_checkpoint
    raise AttributeError(f"module 'q3vl.hub' has no attribute {name!r}")
