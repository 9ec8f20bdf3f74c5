"""The one input dialect of every q3vl command that reads items from a file.

Why: `embed`, `rerank`, `parity` and `index build` each had their own reader, so an `id` that
`index build` kept was an error for `embed`, `parity` wanted `name`, and relative media paths
resolved against whatever the current directory happened to be. Every command that reads items
(and the coming `serve` and `embed-dataset`) goes through this module instead:

- **Format**: JSONL, one JSON object per non-empty line. The keys are exactly the runtime's
  (`text`, `image`, `video`, `instruction`, `fps`, `max_frames` for an embedding item; `text`,
  `image`, `video` for a reranker document), plus an optional `id` (a string or an integer), which
  every output carries: `.jsonl` outputs have an `id` field, `.npy` outputs a `<stem>.ids.json`
  beside them, indexes return it from `index search`, parity reports label rows with it.
- **Media paths**: a relative `image`/`video` path (frame lists included) is resolved against the
  directory of the file that names it, not the current directory, so a JSONL file and its media can
  be moved together; `~` is expanded; URLs (`http(s)://`, `file://`) and `data:` URIs are kept as
  written. Errors show the resolved path.
- **Errors** are `InputError`s that name the file, the 1-based line and the id, e.g.
  `items.jsonl line 3 (id 'cat-7'): image file not found: /data/cats/7.jpg`; every line is checked
  (JSON, keys, value types) before any model is loaded.

The API is small on purpose: `read_items` (a file -> `Record`s), `parse_item` (one object, e.g. from
an HTTP body), `resolve_media` (paths only), `locate` (a runtime error -> the same error naming the
line and id). Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from q3vl.errors import InputError
from q3vl.preprocess.items import CONTENT_KEYS, EMBED_KEYS, content, embed_item

ID = "id"
KINDS = {"embed": EMBED_KEYS, "document": CONTENT_KEYS}
MEDIA_KEYS = ("image", "video")
_KEPT = ("http://", "https://", "file://", "data:")


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


def resolve_media(item: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """A copy of `item` whose relative image/video paths (frames included) are joined to `base`."""
    base = Path(base)
    out = dict(item)
    for key in MEDIA_KEYS:
        if key in out:
            out[key] = _resolve(out[key], base)
    return out


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    if not isinstance(value, str) or value.startswith(_KEPT) or not value:
        return value
    path = os.path.expanduser(value)
    return path if os.path.isabs(path) else os.path.normpath(base / path)


def parse_item(obj: Any, kind: str = "embed", *, base: str | Path | None = None, line: int = 0,
               source: str = "") -> Record:
    """Validate one decoded JSON object as an item of `kind` ("embed" or "document").

    Keys, value types and the `id` are checked here (an `InputError` naming the line and id);
    media paths are resolved against `base` when given. Files are not opened: the runtime reports
    a missing or unreadable file, which `locate` attributes to the line.
    """
    where = Record({}, line, None, source).where
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, not {type(obj).__name__}")
    ident = obj.get(ID)
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise InputError(f"{where}: id must be a string or an integer, not {json.dumps(ident)[:40]}")
    record = Record({}, line, ident, source)
    item = {k: v for k, v in obj.items() if k != ID}
    allowed = KINDS[kind]
    unknown = sorted(set(item) - set(allowed))
    if unknown:
        hint = " (the item's label is 'id')" if "name" in unknown else ""
        raise InputError(f"{record.where}: unknown keys {unknown}; allowed: {[*allowed, ID]}{hint}")
    if base is not None:
        item = resolve_media(item, base)
    try:
        embed_item(item) if kind == "embed" else content(item)
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
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
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


__all__ = ["ID", "Record", "ids", "locate", "parse_item", "read_items", "read_object", "resolve_media"]
