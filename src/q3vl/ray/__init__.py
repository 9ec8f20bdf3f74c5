"""Corpus embedding on Ray Data (the `ray` extra): `EmbedBatch` / `RerankBatch` for `map_batches`,
`embed_corpus` (the resumable `q3vl embed-dataset` job) and the `ColumnMap` from columns to items.

Importing `q3vl.ray` does not import Ray; the names below load their module on first use, and a
missing Ray names the extra to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from q3vl.ray.job import embed_corpus
    from q3vl.ray.rows import ColumnMap
    from q3vl.ray.store import IdSet, read_manifest
    from q3vl.ray.udf import EmbedBatch, RerankBatch, assign_ids

_WHERE = {"EmbedBatch": "udf", "RerankBatch": "udf", "assign_ids": "udf", "ColumnMap": "rows",
          "embed_corpus": "job", "IdSet": "store", "read_manifest": "store"}
__all__ = ["ColumnMap", "EmbedBatch", "IdSet", "RerankBatch", "assign_ids", "embed_corpus", "read_manifest"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"q3vl.ray.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'q3vl.ray' has no attribute {name!r}")
