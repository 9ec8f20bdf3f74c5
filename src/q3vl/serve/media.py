"""The server's media rules: the runtime's `MediaPolicy` it runs under, and the API-level checks.

A request's media references (image_url / video_url / Cohere `images`) are strings. The server's rules
(safe by default, loosened by flags):

- `data:` URIs: always, within the per-item byte cap (`--max-media-bytes`);
- local paths and `file://`: refused unless `--media-root DIR`; then a relative path is read relative
  to DIR, and any path (after resolving `..` and symlinks) must stay inside it;
- http(s) URLs: public addresses only (loopback, private and link-local ones need
  `--allow-private-urls`), only `--allowed-hosts` when given, `--max-redirects`, the byte caps and
  `--media-deadline`, every redirect hop checked, the checked address connected to;
- any other scheme: refused.

`ServeConfig.policy(local_files=False)` (`q3vl.preprocess.media_options`) is the `MediaPolicy` the
models read every source under: it enforces all of this when media is planned and decoded.
`MediaGate` checks a reference before planning, so a refusal names the exact field
(`inputs[2].content[0].image_url.url`) and a relative path means "under the media root", not "under
the server's working directory".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from q3vl.errors import RequestError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class MediaGate:
    """The checks one server applies to every media reference (see the module docstring)."""

    root: str | None  # realpath of --media-root, or None: no local files at all
    item_bytes: int

    @classmethod
    def create(cls, root: str | os.PathLike[str] | None, item_bytes: int) -> MediaGate:
        return cls(os.path.realpath(root) if root is not None else None, item_bytes)

    def check(self, ref: str, kind: str, param: str) -> str:
        """The reference the runtime should read (a local path resolved under the root), or a refusal."""
        if "\x00" in ref:
            raise RequestError(f"{kind} reference contains a NUL byte", param)
        scheme = _SCHEME.match(ref)
        name = scheme.group(1).lower() if scheme and not _WINDOWS_DRIVE.match(ref) else ""
        if name == "data":
            return self._data(ref, kind, param)
        if name in ("http", "https"):
            return ref  # the runtime's MediaPolicy decides (addresses, hosts, redirects, bytes, deadline)
        if name == "file":
            return self._local(ref[len("file://"):] if ref.startswith(("file://", "FILE://")) else ref[5:],
                               kind, param, "file:// URIs")
        if name:
            raise RequestError(f"unsupported URL scheme {name!r} for a {kind}; use data:, http(s) or (with "
                               "--media-root) a path", param)
        return self._local(ref, kind, param, "local paths")

    def _data(self, ref: str, kind: str, param: str) -> str:
        head, sep, payload = ref.partition(",")
        if not sep or not head.lower().startswith(f"data:{kind}/") or not head.lower().endswith(";base64"):
            raise RequestError(f"a {kind} data URI must look like data:{kind}/<type>;base64,<payload>", param)
        if len(payload) // 4 * 3 > self.item_bytes + 3:
            raise RequestError(f"{kind} data URI is larger than the server's {self.item_bytes}-byte per-item "
                               "limit (--max-media-bytes)", param)
        return ref

    def _local(self, path: str, kind: str, param: str, what: str) -> str:
        if self.root is None:
            raise RequestError(f"{what} are refused by this server's media policy (start it with --media-root DIR "
                               f"to serve files under DIR); send the {kind} as a data: URI", param)
        real = os.path.realpath(os.path.join(self.root, path))
        if os.path.commonpath([self.root, real]) != self.root:
            raise RequestError(f"{kind} path {path[:200]!r} is outside the server's media root", param)
        return real
