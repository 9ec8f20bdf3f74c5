"""The one item adapter: every front end's format becomes the runtime's items here.

Why: the command line, the server and the Ray job each had their own reader, and they drifted apart
(`embed-dataset` silently ignored a per-item `max_pixels` that `q3vl embed` honoured, so one JSONL
line gave two different vectors). Now every front end hands its values to this module:

- Python dicts (`Embedder.process`, `Reranker.process`) are the item model itself
  (`q3vl.preprocess.items`), validated when they are planned;
- JSONL files (`q3vl embed`, `rerank`, `parity`, `index build`): `read_items`, `read_object`;
- HTTP bodies (`q3vl serve`): `serve/convert.py` gathers content parts and options into a dict
  (its media gate resolves references under `--media-root`) and calls `to_item`;
- dataset rows (`embed-dataset`, `EmbedBatch`, `RerankBatch`): `ray/rows.py` turns Arrow values into
  Python values and calls `to_item` (a JSON line: `parse_json` first).

One set of **keys**: `items.KEYS` (text, image, video, instruction, fps, max_frames, min_pixels,
max_pixels, total_pixels), plus `id`, which outputs carry and the runtime never sees. A video given as
frames is a `video` list (one way to say it). A front end that cannot carry a key refuses it by name
(a reranker document takes only content keys: the options are the request's), never drops it.

One set of **path rules** (`resolve_path`): `~` is expanded, a relative `image`/`video` path (frame
lists included) is joined to the directory of the file that names it (a JSONL file, a dataset), URLs
(`scheme://`) and `data:` URIs are kept as written. What may then be read is the media policy's call
(`q3vl.preprocess.media.MediaPolicy`), the same for every front end.

One set of **error texts**: the value checks of `items.KEYS` say what is wrong (`InputError.reason`);
each front end adds the place it knows: `items.jsonl line 3 (id 'cat-7'): ...` (files), the `param`
of an HTTP 400 (`input[3]`), a dataset row's `error` column. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from q3vl.errors import InputError
from q3vl.preprocess.items import CONTENT_KEYS, EMBED_KEYS, OPTION_KEYS, content, embed_item

ID = "id"
KINDS = {"embed": EMBED_KEYS, "document": CONTENT_KEYS, "query": (*CONTENT_KEYS, *OPTION_KEYS)}
MEDIA_KEYS = ("image", "video")
_KEPT = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|data:)")


@dataclass(frozen=True)
class Record:
    """One item of an input file: the runtime item (media paths resolved), where it came from, its id."""

    item: dict[str, Any]
    line: int  # 1-based line number in `source` (0: not from a file)
    id: str | int | None = None
    source: str = ""

    @property
    def where(self) -> str:
        """`items.jsonl line 3 (id 'cat-7')`: how errors name this item."""
        place = f"{self.source} line {self.line}" if self.source else f"item {self.line}"
        return place + (f" (id {self.id!r})" if self.id is not None else "")


# ---------------------------------------------------------------- paths
def resolve_path(value: str, base: str | Path | None) -> str:
    """A media reference as the runtime should read it: `~` expanded and a relative path joined to
    `base` (when given); URLs and `data:` URIs unchanged.
    """
    if not value or _KEPT.match(value):
        return value
    path = os.path.expanduser(value)
    return path if base is None or os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def resolve_media(item: dict[str, Any], base: str | Path | None) -> dict[str, Any]:
    """A copy of `item` whose image/video paths (frames included) follow `resolve_path`."""
    out = dict(item)
    for key in MEDIA_KEYS:
        if key in out:
            out[key] = _resolve(out[key], base)
    return out


def _resolve(value: Any, base: str | Path | None) -> Any:
    if isinstance(value, (list, tuple)):
        return [_resolve(v, base) for v in value]
    return resolve_path(value, base) if isinstance(value, str) else value


# ---------------------------------------------------------------- values -> items
def to_item(fields: dict[str, Any], kind: str = "embed", *, base: str | Path | None = None) -> dict[str, Any]:
    """The runtime item of `fields` (item keys -> values, no `id`): keys checked against `kind`
    ("embed", "document", or "query": a reranker query with the request's options), every value
    checked, media paths resolved. A problem is an `InputError` whose reason every front end shares.
    """
    allowed = KINDS[kind]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        hint = " (the item's label is 'id')" if "name" in unknown else ""
        hint += " (a document takes content keys only: options belong to the query)" if kind == "document" and \
            set(unknown) & set(OPTION_KEYS) else ""
        raise InputError(f"unknown keys {unknown}; allowed: {[*allowed, ID]}{hint}")
    item = resolve_media(fields, base)
    embed_item(item) if kind != "document" else content(item)  # a query's options are checked as an item's
    return item


def parse_json(text: str, where: str) -> dict[str, Any]:
    """One JSON object from a line of text; an `InputError` naming `where` (a file and line) otherwise."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, not {type(obj).__name__}")
    return obj


def check_id(ident: Any, where: str) -> str | int | None:
    """An item's `id`: a string or an integer (a bool is neither), or None."""
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise InputError(f"{where}: id must be a string or an integer, not {json.dumps(ident)[:40]}")
    return ident


def parse_item(obj: Any, kind: str = "embed", *, base: str | Path | None = None, line: int = 0,
               source: str = "") -> Record:
    """Validate one decoded JSON object as an item of `kind` ("embed", "document" or "query").

    Keys, value types and the `id` are checked here (an `InputError` naming the line and id);
    media paths are resolved against `base` when given. Files are not opened: the runtime reports
    a missing or unreadable file, which `locate` attributes to the line.
    """
    where = Record({}, line, None, source).where
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, not {type(obj).__name__}")
    ident = check_id(obj.get(ID), where)
    record = Record({}, line, ident, source)
    try:
        item = to_item({k: v for k, v in obj.items() if k != ID}, kind, base=base)
    except InputError as e:
        raise InputError(f"{record.where}: {e.reason}") from None
    return Record(item, line, ident, source)


def read_items(path: str | Path, kind: str = "embed") -> list[Record]:
    """Every item of a JSONL file, validated, media paths resolved against the file's directory.

    Raises an `InputError` naming the line (and id) of the first bad line, of a repeated id, or
    saying the file holds no items.
    """
    path = Path(path)
    base = path.absolute().parent
    records: list[Record] = []
    seen: dict[str | int, int] = {}
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        obj = parse_json(text, f"{path} line {n}")
        rec = parse_item(obj, kind, base=base, line=n, source=str(path))
        if rec.id is not None:
            if rec.id in seen:
                raise InputError(f"{rec.where}: the same id is on line {seen[rec.id]}; ids must be unique")
            seen[rec.id] = n
        records.append(rec)
    if not records:
        raise InputError(f"{path} holds no items")
    return records


def read_object(path: str | Path, keys: Sequence[str]) -> dict[str, Any]:
    """One JSON object from a file (a reranker query, a search query), its media resolved against
    the file's directory; unknown keys are an `InputError` naming the file.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, not {type(obj).__name__}")
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        raise InputError(f"{path}: unknown keys {unknown}; allowed: {list(keys)}")
    return resolve_media(obj, path.absolute().parent)


def read_query(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reranker query file: (the query's content, the request's options), both checked, the
    query's media resolved against the file's directory.
    """
    obj = read_object(path, KINDS["query"])
    try:
        to_item(obj, "query")
    except InputError as e:
        raise InputError(f"{path}: {e.reason}") from None
    return ({k: v for k, v in obj.items() if k in CONTENT_KEYS},
            {k: v for k, v in obj.items() if k in OPTION_KEYS})


def locate(err: InputError, records: Sequence[Record]) -> InputError:
    """The runtime's error about item `err.index` of `records`, reworded to name its line and id."""
    if err.index is None or not 0 <= err.index < len(records):
        return err
    located = type(err)(f"{records[err.index].where}: {err.reason}")
    located.index = err.index
    located.__cause__ = err.__cause__
    return located


def ids(records: Sequence[Record]) -> list[str | int] | None:
    """Each record's id (its 0-based position where it has none), or None when no record has one."""
    if all(r.id is None for r in records):
        return None
    return [r.id if r.id is not None else k for k, r in enumerate(records)]


__all__ = ["ID", "KINDS", "Record", "check_id", "ids", "locate", "parse_item", "parse_json", "read_items",
           "read_object", "read_query", "resolve_media", "resolve_path", "to_item"]
