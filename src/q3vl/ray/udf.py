"""Callable classes for `ray.data.Dataset.map_batches`: embedding and reranking rows of a dataset.

Each class loads its bundle once per Ray actor (the constructor) and maps one `pyarrow.Table` batch
to the same rows plus result columns (`map_batches(EmbedBatch, batch_format="pyarrow", ...)`). They
own no batching: `EmbedBatch` hands a batch's items to `Embedder.process_details` (plan, then the
runtime's one micro-batch loop `run_batches`: length-sorted micro-batches, per-item errors and token
counts), and `RerankBatch` plans each query group with `Reranker.plan` and runs every group's plans
through `run_batches` together, so pairs of different queries share micro-batches.

A row never fails a batch: whatever is wrong with it (a value of the wrong type, an unreadable file,
a refused URL, a NaN option, an over-long text) becomes its `error` and its result is null. An input
column named `error` is honoured: rows whose value there is non-empty (an earlier stage's verdict) are
passed through with that error and not run.

Result columns are plain Arrow types (fixed-size lists, not Ray tensor columns), so the Parquet a job
writes opens in any reader.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from q3vl.errors import BackendError, ConfigError, InputError
from q3vl.ray.options import CODES
from q3vl.ray.rows import MULTI, SINGLE, ColumnMap, content_id, item_of, row_id, table_rows
from q3vl.runtime import RuntimeOptions

if TYPE_CHECKING:
    import pyarrow as pa

    from q3vl.codes import Calibration
    from q3vl.ray.store import IdSet
    from q3vl.runtime import BatchResult, Plan, Reranker

log = logging.getLogger(__name__)
ID, EMBEDDING, TOKENS, ERROR, SCORE = "id", "embedding", "tokens", "error", "score"
CONTENT = MULTI


def code_column(precision: str) -> str:
    """The output column of one code precision (`embedding_int8`, `embedding_binary`, ...)."""
    return f"{EMBEDDING}_{precision}"


def _column_map(value: ColumnMap | dict[str, object] | None, default: ColumnMap) -> ColumnMap:
    return ColumnMap.of(value, default)


def _vectors(rows: np.ndarray, valid: np.ndarray) -> pa.Array:
    """A fixed-size-list column of `rows` `[N, W]` with nulls where `valid` is False."""
    import pyarrow as pa

    width = rows.shape[1]
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width, mask=pa.array(~valid))


def _with_results(batch: pa.Table, keep: Sequence[str] | None, results: dict[str, pa.Array]) -> pa.Table:
    """`batch` (its `error` and private columns dropped, cut to `keep` when given) with `results` appended."""
    private = [c for c in batch.column_names if c == ERROR or c.startswith("_q3vl_")]  # decode stage's pixels
    table = batch.drop_columns(private) if private else batch
    if keep is not None:
        table = table.select([c for c in table.column_names if c in keep])
    clash = sorted(set(table.column_names) & set(results))
    if clash:
        raise ConfigError(f"the dataset already has columns {clash}, which this stage writes; rename them")
    for name, column in results.items():
        table = table.append_column(name, column)
    return table


def prior_errors(batch: pa.Table) -> list[str]:
    """The incoming `error` column's verdicts ("" where none): an earlier stage's, honoured by every stage."""
    if ERROR not in batch.column_names:
        return [""] * batch.num_rows
    return [e if isinstance(e, str) else "" for e in batch.column(ERROR).to_pylist()]


class RowStage:
    """What both callables share: the model, per-row error bookkeeping and the output table."""

    def __init__(self, base_dir: str | None, keep_columns: Sequence[str] | None) -> None:
        self.base_dir = None if base_dir is None else str(base_dir)
        self.keep = None if keep_columns is None else list(keep_columns)

    def _items(self, rows: list[dict[str, object]], errors: list[str], cmap: ColumnMap) -> dict[int, dict[str, object]]:
        """Each still-good row's item; a row that cannot be mapped gets its error instead."""
        from q3vl.runtime import guarded

        items: dict[int, dict[str, object]] = {}
        for i, row in enumerate(rows):
            if errors[i]:
                continue
            got = guarded(i, lambda row=row: item_of(row, cmap, self.base_dir))  # type: ignore[misc]
            if isinstance(got, InputError):
                errors[i] = got.reason
            else:
                items[i] = got
        return items


class EmbedBatch(RowStage):
    """`map_batches` callable: each row's embedding, optional codes, token count and error.

    Args:
        bundle: an embedding bundle (a path every worker can read).
        columns: the `ColumnMap` (or its fields as a dict) from columns to item keys.
        base_dir: directory that relative paths in the data resolve against.
        dim: Matryoshka dimension (first `dim` values, renormalised).
        normalize: L2-normalise (the wrapper's default).
        codes: code precisions to add as `embedding_<precision>` columns: int8, uint8 (these need
            `calibration`), binary, ubinary.
        calibration: a stored `Calibration` file (q3vl calibrate), the same for every worker.
        keep_columns: input columns to pass through (default: all).
        options: the `RuntimeOptions` the `Embedder` is built with (backend, batch_size, max_pixels,
            media_policy, ...); `**keywords` named like its fields are applied on top.

    Output columns: `embedding` (fixed-size list of float32, null for a bad row), one column per code,
    `tokens` (int64, text + vision tokens; 0 for a bad row), `error` (string, "" for a good row).
    """

    def __init__(self, bundle: str | Path, *, columns: ColumnMap | dict[str, object] | None = None,
                 base_dir: str | None = None, dim: int | None = None, normalize: bool = True,
                 codes: Sequence[str] = (), calibration: str | Path | None = None,
                 keep_columns: Sequence[str] | None = None, options: RuntimeOptions | None = None,
                 **keywords: object) -> None:
        from q3vl.runtime import Embedder

        super().__init__(base_dir, keep_columns)
        self.columns = _column_map(columns, ColumnMap())
        self.model = Embedder(bundle, options=RuntimeOptions.of((), keywords, options, "EmbedBatch"))
        self.model.check_dim(dim)
        self.dim, self.normalize = dim, normalize
        self.width = dim or self.model.dim
        self.codes = tuple(codes)
        self.calibration = _calibration(self.codes, calibration, self.width)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        n = batch.num_rows
        from q3vl.ray.decode import apply_decoded

        errors = prior_errors(batch)
        rows = table_rows(batch, self.columns.columns())
        apply_decoded(batch, rows, self.columns)
        items = self._items(rows, errors, self.columns)
        vectors = np.zeros((n, self.width), np.float32)
        valid = np.zeros(n, bool)
        tokens = np.zeros(n, np.int64)
        if items:
            index = list(items)
            details = self.model.process_details([items[i] for i in index], self.normalize, self.dim,
                                                 on_error="skip", progress=False)
            for k, i in enumerate(index):
                if k in details.errors:
                    errors[i] = details.errors[k].reason
                else:
                    vectors[i], valid[i], tokens[i] = details.values[k], True, details.tokens[k]
        results = {EMBEDDING: _vectors(vectors, valid)}
        for precision in self.codes:
            results[code_column(precision)] = _vectors(self._encode(vectors, valid, precision), valid)
        results[TOKENS] = pa.array(tokens)
        results[ERROR] = pa.array(errors, pa.string())
        return _with_results(batch, self.keep, results)

    def _encode(self, vectors: np.ndarray, valid: np.ndarray, precision: str) -> np.ndarray:
        """Codes of the valid rows (zeros under the nulls), exactly `quantize_embeddings`'."""
        from q3vl.codes import quantize_embeddings

        width = self.width if precision in ("int8", "uint8") else -(-self.width // 8)
        out = np.zeros((len(vectors), width), np.int8 if precision in ("int8", "binary") else np.uint8)
        if valid.any():
            out[valid] = quantize_embeddings(vectors[valid], precision, self.calibration)
        return out


def _calibration(codes: tuple[str, ...], path: str | Path | None, width: int) -> Calibration | None:
    """The stored calibration int8/uint8 codes need, checked against the embedding width."""
    from q3vl.codes import Calibration

    unknown = sorted(set(codes) - set(CODES))
    if unknown:
        raise ConfigError(f"unknown code precisions {unknown}; choose from {list(CODES)}")
    if path is None:
        if {"int8", "uint8"} & set(codes):
            raise ConfigError("int8/uint8 codes need a calibration file (q3vl calibrate), shared by every worker")
        return None
    try:
        calib = Calibration.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot read calibration {path}: {e}") from e
    if calib.dim != width:
        raise ConfigError(f"calibration {path} is for dim {calib.dim}; the embeddings have {width}")
    return calib


class RerankBatch(RowStage):
    """`map_batches` callable: the reranker score of each row's (query, document) pair.

    `query` maps the query side (default: text from `query`, image from `query_image`, video from
    `query_video`, and the request options `instruction`, `fps`, `max_frames`, `video_budget`); `document` maps the
    document (default: `text`, `image`, `video`). Rows with the same query (same mapped values) are
    planned as one request, so a query's media are read once per batch. Output columns: `score`
    (float32 in [0, 1], null for a bad row), `tokens`, `error`. Other arguments as for `EmbedBatch`
    (`options` / `**keywords`: the `Reranker`'s `RuntimeOptions`).
    """

    def __init__(self, bundle: str | Path, *, query: ColumnMap | dict[str, object] | None = None,
                 document: ColumnMap | dict[str, object] | None = None, base_dir: str | None = None,
                 keep_columns: Sequence[str] | None = None, options: RuntimeOptions | None = None,
                 **keywords: object) -> None:
        from q3vl.runtime import Reranker

        super().__init__(base_dir, keep_columns)
        self.query = _column_map(query, ColumnMap(text=("query",), image=("query_image",), video=("query_video",)))
        self.document = _column_map(document, ColumnMap.content_only())
        if self.document.json or self.query.json:
            raise ConfigError("RerankBatch reads columns, not JSON lines")
        mapped = [k for k in SINGLE if self.document.column(k)]
        if mapped:
            raise ConfigError(f"{mapped} belong to the query mapping: {list(SINGLE)} are request options, not "
                              "a document's; map them with query=ColumnMap(...) or set them to None")
        self.model = Reranker(bundle, options=RuntimeOptions.of((), keywords, options, "RerankBatch"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        from q3vl.runtime import run_batches

        errors = prior_errors(batch)
        rows = table_rows(batch, [*self.query.columns(), *self.document.columns()])
        queries = self._items(rows, errors, self.query)
        docs = self._items(rows, errors, self.document)
        groups: dict[str, list[int]] = {}
        for i in sorted(set(queries) & set(docs)):
            groups.setdefault(content_id(rows[i], self.query), []).append(i)
        plans = [p for members in groups.values() for p in self._plan(queries[members[0]], members, docs, errors)]
        sink = _Scores(self.model, errors, batch.num_rows)
        run_batches(self.model, self.model.batches(plans), sink, prefetch=self.model.prefetch)
        results = {SCORE: pa.array(sink.scores, mask=~sink.valid), TOKENS: pa.array(sink.tokens),
                   ERROR: pa.array(errors, pa.string())}
        return _with_results(batch, self.keep, results)

    def _plan(self, query: dict[str, object], members: list[int], docs: dict[int, dict[str, object]],
              errors: list[str]) -> list[Plan]:
        """The plans of one query's documents, re-indexed to their rows; failures go to `errors`."""
        from q3vl.runtime import as_input_error

        request = {"query": {k: v for k, v in query.items() if k in CONTENT},
                   "documents": [docs[i] for i in members],
                   **{k: v for k, v in query.items() if k not in CONTENT}}
        try:
            planned = self.model.plan(request)
        except Exception as e:  # a bad query: every pair of this group carries its error
            reason = as_input_error(e).reason
            for i in members:
                errors[i] = reason
            return []
        out = []
        for i, p in zip(members, planned):
            if isinstance(p, InputError):
                errors[i] = p.reason
            else:
                out.append(replace(p, index=i))
        return out


class _Scores:
    """The batch sink of `RerankBatch`: each pair's score and tokens by row, an item's error (a failed
    query's `QueryError` included: pairs of several queries share micro-batches) into its row.
    """

    def __init__(self, model: Reranker, errors: list[str], n: int) -> None:
        self.model, self.errors = model, errors
        self.scores = np.zeros(n, np.float32)
        self.valid = np.zeros(n, bool)
        self.tokens = np.zeros(n, np.int64)

    def wanted(self, plan: Plan) -> bool:
        return True

    def failed(self, plan: Plan, error: InputError | BackendError) -> None:
        if isinstance(error, BackendError):
            raise error
        self.errors[plan.index] = error.reason

    def ran(self, result: BatchResult) -> None:
        for x, s in zip(result.items, self.model.scores(result.outputs)):
            i = x.plan.index
            self.scores[i], self.valid[i], self.tokens[i] = s, True, x.plan.tokens


def assign_ids(batch: pa.Table, *, columns: ColumnMap, id_column: str | None, done: IdSet | None = None) -> pa.Table:
    """`map_batches` function (a cheap CPU task): add the string `id` column (the id column's value or
    the content hash), drop rows whose id is in `done` (an `IdSet` of ids already written), and put a
    bad id value into the `error` column.
    """
    import pyarrow as pa

    names = [*columns.columns(), *([id_column] if id_column and not columns.json else [])]
    prior = prior_errors(batch)
    pairs = [row_id(r, columns, id_column, e) for r, e in zip(table_rows(batch, names), prior)]
    ids = [p[0] for p in pairs]
    table = batch.drop_columns([ID]) if ID in batch.column_names else batch
    table = table.append_column(ID, pa.array(ids, pa.string()))
    if any(e for _, e in pairs):
        merged = [a or b for a, (_, b) in zip(prior, pairs)]
        table = table.drop_columns([ERROR]) if ERROR in table.column_names else table
        table = table.append_column(ERROR, pa.array(merged, pa.string()))
    if done is not None and len(done):
        table = table.filter(pa.array(~done.contains(ids)))
    return table
