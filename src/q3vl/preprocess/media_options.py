"""`MediaOptions`: the media policy's command-line options, declared once for `serve` and `embed-dataset`.

A `MediaPolicy` has many fields; a front end exposes these seven as flags (`--media-root`,
`--allow-private-urls`, `--allowed-hosts`, `--max-media-bytes`, `--max-media-request-bytes`,
`--media-deadline`, `--max-redirects`) and turns them into the policy its models read under
(`policy`). What differs is the base: the server reads no local file unless `--media-root` is given
(its clients are untrusted); `embed-dataset` reads local files anywhere the job can, unless
`--media-root` narrows that (its corpus is the operator's own). Both refuse loopback, private and
link-local addresses unless `--allow-private-urls`, and give http(s) media `--max-redirects` hops,
the byte caps and the deadline. The defaults here are `MediaPolicy()`'s; the server's own defaults
are `MediaOptions.server()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from q3vl.errors import ConfigError
from q3vl.options import check_fields, default_of, opt
from q3vl.preprocess.media import MIB, MediaPolicy

MEDIA = "media policy"


def _hosts(text: str) -> tuple[str, ...] | None:
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    return hosts or None


@dataclass(frozen=True)
class MediaOptions:
    """What media a front end may read, and how much (see the module docstring)."""

    GROUP: ClassVar[str] = MEDIA  # the title its flags are shown under

    media_root: Path | None = opt(None, "read local paths and file:// only under DIR (serve: local files are refused "
                                        "without it; embed-dataset: read anywhere without it)", metavar="DIR",
                                  group=MEDIA)
    allow_private_urls: bool = opt(False, "let http(s) media URLs reach loopback, private and link-local addresses",
                                   group=MEDIA)
    allowed_hosts: tuple[str, ...] | None = opt(None, "comma-separated hosts http(s) media may come from "
                                                      "('.x.com': its subdomains; default: any public host)",
                                                parse=_hosts, group=MEDIA)
    max_media_bytes: int = opt(default_of(MediaPolicy, "max_item_bytes"), "bytes of one image or video", low=1,
                               group=MEDIA)
    max_media_request_bytes: int = opt(default_of(MediaPolicy, "max_call_bytes"),
                                       "media bytes of one request (embed-dataset: of one call of rows)", low=1,
                                       group=MEDIA)
    media_deadline: float = opt(default_of(MediaPolicy, "deadline"), "seconds to fetch and decode one item",
                                above=0, group=MEDIA)
    max_redirects: int = opt(default_of(MediaPolicy, "max_redirects"), "redirects an http(s) media URL may take",
                             low=0, group=MEDIA)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.media_root is not None and not Path(self.media_root).is_dir():
            raise ConfigError(f"--media-root {self.media_root} is not a directory")

    @classmethod
    def server(cls, **overrides: Any) -> MediaOptions:
        """The server's defaults: smaller caps and a shorter deadline than a trusted batch job's."""
        return cls(**{"max_media_bytes": 32 * MIB, "max_media_request_bytes": 256 * MIB, "media_deadline": 30.0,
                      "max_redirects": 3, **overrides})

    def policy(self, local_files: bool) -> MediaPolicy:
        """The `MediaPolicy` of these options: local paths and file:// under `media_root` when given,
        else everywhere when `local_files` (a trusted corpus) or nowhere (a server).
        """
        local = local_files or self.media_root is not None
        try:
            return MediaPolicy(allow_local=local, allow_file_uri=local,
                               local_root=os.fspath(self.media_root) if self.media_root is not None else None,
                               allowed_hosts=self.allowed_hosts, allow_private_networks=self.allow_private_urls,
                               max_redirects=self.max_redirects, max_item_bytes=self.max_media_bytes,
                               max_call_bytes=self.max_media_request_bytes, deadline=self.media_deadline)
        except (ValueError, TypeError) as e:  # e.g. an allowed host that is not a valid name
            raise ConfigError(f"media policy options: {e}") from e


__all__ = ["MediaOptions"]
