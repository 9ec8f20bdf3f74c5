"""Request bodies parsed with every list and object bounded while parsing, so a long one costs nothing.

FastAPI parses a JSON body whole (`json.loads`, on the event loop, holding the GIL) before any
limit applies: a 200 KB body of 100,000 list elements costs 2-4 ms of uninterruptible C per request,
wherever the list sits, and two clients looping it make every other request wait behind those calls.
`BoundedRoute` parses the body itself first, container by container: a route's top-level item lists
(`input`, `texts`/`images`/`inputs`, `documents`) may hold a little over --max-client-batch-size
elements, any other list `MAX_PARTS` (no request field takes more), an object `MAX_KEYS` members, and
nesting is `MAX_DEPTH` deep; past a bound the request is a 413 naming where, and nothing more is
read. Strings, numbers and literals are decoded by the C decoder `json.loads` uses, so an accepted
body parses to exactly what `json.loads` gives. The parsed body is handed to FastAPI
(`ParsedRequest`), which validates it as usual; a body that is not valid JSON is left to FastAPI to
parse and report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from q3vl.serve.errors import RequestTooLargeError
from q3vl.serve.schemas import MAX_PARTS

MAX_KEYS = 64  # members of one object (the largest request model has 13 fields)
MAX_DEPTH = 32  # nesting (a request is at most 6 deep)
_WS = re.compile(r"[ \t\n\r]*")
_DECODE = json.JSONDecoder().raw_decode  # json.loads' own decoder (same strings, numbers, NaN/Infinity)


def parse_body(body: bytes, item_lists: tuple[str, ...], item_limit: int) -> Any:
    """`json.loads(body)`, except that a list longer than its bound (`item_limit` + 1 for the top-level
    keys `item_lists`, so the caller can name an exact count one over the limit; `MAX_PARTS` for any
    other list), an object with over `MAX_KEYS` members or nesting over `MAX_DEPTH` raises
    `RequestTooLargeError` (param: where) as soon as it is seen. Raises `json.JSONDecodeError` (or
    `UnicodeDecodeError`) wherever `json.loads` would fail.
    """
    if body.count(b",") < min(MAX_KEYS, item_limit + 1) and body.count(b"[") + body.count(b"{") < MAX_DEPTH:
        return json.loads(body)  # no list or object in it can reach a bound (a common small request): C speed
    return parse_bounded(body, item_lists, item_limit)


def parse_bounded(body: bytes, item_lists: tuple[str, ...], item_limit: int) -> Any:
    """`parse_body` container by container, whatever the body (what it does for a body with many values)."""
    s = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads decodes bytes
    parser = _Parser(s, item_lists, item_limit)
    value, i = parser.value(_ws(s, 0), (), 0)
    if _ws(s, i) != len(s):
        raise json.JSONDecodeError("Extra data", s, _ws(s, i))
    return value


def _ws(s: str, i: int) -> int:
    match = _WS.match(s, i)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _where(path: tuple[str | int, ...]) -> str:
    """`documents[0].content`: a path into the body, as error params name fields."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "body"


class _Parser:
    def __init__(self, s: str, item_lists: tuple[str, ...], item_limit: int) -> None:
        self.s, self.item_lists, self.item_limit = s, item_lists, item_limit

    def value(self, i: int, path: tuple[str | int, ...], depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:
            raise RequestTooLargeError(f"the body nests deeper than {MAX_DEPTH} levels", _where(path))
        if self.s.startswith("{", i):
            return self.object(i, path, depth)
        if self.s.startswith("[", i):
            items = depth == 1 and len(path) == 1 and path[0] in self.item_lists
            return self.array(i, path, depth, self.item_limit + 1 if items else MAX_PARTS, items)
        return _DECODE(self.s, i)

    def object(self, i: int, path: tuple[str | int, ...], depth: int) -> tuple[dict[str, Any], int]:
        s, obj = self.s, dict[str, Any]()
        i = _ws(s, i + 1)
        if s.startswith("}", i):
            return obj, i + 1
        while True:
            if not s.startswith('"', i):
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", s, i)
            key, i = _DECODE(s, i)
            i = _ws(s, i)
            if not s.startswith(":", i):
                raise json.JSONDecodeError("Expecting ':' delimiter", s, i)
            obj[key], i = self.value(_ws(s, i + 1), (*path, key), depth + 1)
            if len(obj) > MAX_KEYS:
                raise RequestTooLargeError(f"more than {MAX_KEYS} fields in one object", _where(path))
            i = _ws(s, i)
            if s.startswith(",", i):
                i = _ws(s, i + 1)
            elif s.startswith("}", i):
                return obj, i + 1
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", s, i)

    def array(self, i: int, path: tuple[str | int, ...], depth: int, cap: int,
              items_of_request: bool) -> tuple[list[Any], int]:
        s, items = self.s, list[Any]()
        i = _ws(s, i + 1)
        if s.startswith("]", i):
            return items, i + 1
        while True:
            value, i = self.value(i, (*path, len(items)), depth + 1)
            items.append(value)
            if len(items) > cap:
                raise RequestTooLargeError(
                    f"{len(items)}+ items in one request; this server takes at most {self.item_limit} "
                    "(--max-client-batch-size): split the request" if items_of_request else
                    f"more than {cap} elements in `{_where(path)}`; no field takes that many", _where(path))
            i = _ws(s, i)
            if s.startswith(",", i):
                i = _ws(s, i + 1)
            elif s.startswith("]", i):
                return items, i + 1
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", s, i)


class ParsedRequest(Request):
    """A request whose body was read and parsed already (FastAPI reads both through these methods)."""

    def __init__(self, request: Request, body: bytes, parsed: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._read, self._parsed = body, parsed

    async def body(self) -> bytes:
        return self._read

    async def json(self) -> Any:
        return self._parsed


class BoundedRoute(APIRoute):
    """An API route whose JSON body is parsed by `parse_body`, its `item_lists` bounded by
    --max-client-batch-size: more items in one is a 413 naming it, before FastAPI validates anything.
    """

    item_lists: tuple[str, ...] = ()

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        lists = self.item_lists

        async def bounded(request: Request) -> Response:
            if not lists or not json_body(request):
                return await handler(request)
            svc = request.app.state.svc
            limit = svc.config.max_client_batch_size
            body = await request.body()
            try:
                data = parse_body(body, lists, limit)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # FastAPI parses again, says why
                return await handler(request)
            if isinstance(data, dict):
                for name in lists:
                    value = data.get(name)
                    if isinstance(value, list) and len(value) > limit:
                        svc.check_count(len(value), name)
            return await handler(ParsedRequest(request, body, data))

        return bounded


def bounded_route(*item_lists: str) -> type[APIRoute]:
    """The `BoundedRoute` class for a route whose item lists are these top-level keys."""
    return type("BoundedRoute", (BoundedRoute,), {"item_lists": item_lists})


def json_body(request: Request) -> bool:
    """FastAPI's own rule for parsing a body as JSON: an application/json or application/*+json type."""
    import email.message

    kind = request.headers.get("content-type")
    if not kind:
        return False
    if kind == "application/json":  # nearly every request: skip the header parser
        return True
    message = email.message.Message()
    message["content-type"] = kind
    sub = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (sub == "json" or sub.endswith("+json"))
