"""A loopback stand-in for the Hugging Face Hub: the endpoints the real `huggingface_hub` client (2.4) calls.

Test scaffolding (not in the wheel). It serves in-memory repos on 127.0.0.1 the way the Hub does for:

- repo info: `GET /api/models/{repo}[/revision/{rev}]` (`?blobs=true`): `sha`, `siblings` with `size`,
  `blobId` (git sha1) and, for LFS files, `lfs.sha256`; `cardData` from the README's YAML;
- file resolve: `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag` (git sha1, or the
  sha256 for LFS files, with `X-Linked-Etag`/`X-Linked-Size` as the Hub adds), `Content-Length`,
  `Accept-Ranges`, and `Range: bytes=N-` answered 206 with `Content-Range` (the client's resume);
- errors as the client parses them: 404 + `X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`,
  401 + `RepoNotFound` for a private repo without the token;
- uploads: `POST /api/repos/create`, `/api/validate-yaml`, `/api/models/{repo}/preupload/{rev}` (every file
  "regular": no LFS or Xet transfer) and `/api/models/{repo}/commit/{rev}` (the NDJSON commit, base64 files).

No Xet: the client falls back to plain HTTP when a response has no Xet headers. Hostile modes for the
tests: a file whose bytes are corrupted in transit (the listing keeps the true hashes), a transfer that
stalls after N bytes (once, or every time), and files listed with a size but no content (never to be
fetched). Every request is logged (`log`): method, path, range and status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".onnx", ".data", ".npz", ".bin")


@dataclass
class Blob:
    """A file's content (None: listed only), or a claimed size for a listed-only file."""

    data: bytes | None
    claimed: int | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else int(self.claimed or 0)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(name: str, blob: Blob) -> bool:
    return name.endswith(LFS_SUFFIXES) or name == "tokenizer.json" or blob.size >= 10_000_000


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # private: this token is needed

    def commit(self, files: dict[str, Blob], branch: str = "main") -> str:
        sha = hashlib.sha1(json.dumps(sorted((n, b.size, hashlib.sha256(b.data or b"").hexdigest())
                                             for n, b in files.items())).encode() + branch.encode()
                           + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha


class LoopbackHub:
    """The server; use as a context manager (`url`, `log`, `repos`, hostile settings)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[dict[str, Any]] = []
        self.corrupt: set[str] = set()  # "repo/path": one byte flipped on the wire
        self.stall: dict[str, tuple[int, int]] = {}  # "repo/path" -> (after bytes, times: -1 = always)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ content
    def add_folder(self, repo_id: str, folder: Path, skip: tuple[str, ...] = (), branch: str = "main") -> str:
        files = {p.relative_to(folder).as_posix(): Blob(p.read_bytes()) for p in sorted(folder.rglob("*"))
                 if p.is_file() and not p.name.startswith(".") and p.relative_to(folder).as_posix() not in skip}
        return self.add_files(repo_id, files, branch)

    def add_files(self, repo_id: str, files: dict[str, Blob | bytes], branch: str = "main") -> str:
        blobs = {n: b if isinstance(b, Blob) else Blob(b) for n, b in files.items()}
        return self.repos.setdefault(repo_id, Repo()).commit(blobs, branch)

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Repo paths fetched with a successful GET of a file (not HEAD), in order."""
        out = []
        for r in self.log:
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", r["path"])
            if r["method"] == "GET" and m and r["status"] in (200, 206) and repo_id in (None, m[1]):
                out.append(unquote(m[2]))
        return out

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.log.append(entry)


class _Handler(BaseHTTPRequestHandler):
    server_hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              ctype: str = "application/json") -> None:
        # recorded before the reply goes out: a client that has its answer finds its request in the log
        self.server_hub.record({"method": self.command, "path": urlsplit(self.path).path, "status": status,
                                "range": self.headers.get("Range")})
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": code}, {"X-Error-Code": code, **(headers or {})})

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound")
            return None
        if repo.token and self.headers.get("authorization") != f"Bearer {repo.token}":
            self._error(401, "RepoNotFound")
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            self._error(404, "RevisionNotFound")
        return sha

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # ------------------------------------------------------------------ verbs
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._info(m[1], unquote(m[2] or "main"))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(m[1], unquote(m[2]), unquote(m[3]))
        self._error(404, "EntryNotFound")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            if self._repo(m[1]) is None:
                return None
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                               "oid": None} for f in files]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            return self._commit_upload(m[1], unquote(m[2]), body)
        self._error(404, "EntryNotFound")

    # ------------------------------------------------------------------ endpoints
    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev) if repo else None
        if repo is None or sha is None:
            return
        siblings = []
        for name, blob in sorted(repo.commits[sha].items()):
            entry: dict[str, Any] = {"rfilename": name, "size": blob.size,
                                     "blobId": git_sha1(blob.data) if blob.data is not None else "0" * 40}
            if is_lfs(name, blob):
                digest = hashlib.sha256(blob.data).hexdigest() if blob.data is not None else "0" * 64
                entry["lfs"] = {"sha256": digest, "size": blob.size, "pointerSize": 134}
            siblings.append(entry)
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": bool(repo.token),
                         "siblings": siblings, "cardData": _card(repo.commits[sha]), "tags": []})

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev) if repo else None
        if repo is None or sha is None:
            return
        blob = repo.commits[sha].get(name)
        if blob is None:
            return self._error(404, "EntryNotFound", {"X-Repo-Commit": sha})
        if blob.data is None:
            return self._error(500, "ListedOnly")  # a test's claimed-size file: must never be fetched
        lfs = is_lfs(name, blob)
        etag = hashlib.sha256(blob.data).hexdigest() if lfs else git_sha1(blob.data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(blob.size)})
        data = blob.data
        key = f"{repo_id}/{name}"
        if key in self.server_hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = _range_start(self.headers.get("Range"))
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if self.command == "GET" and key in self.server_hub.stall:
            return self._stalling(key, data[start:], max(0, self.server_hub.stall[key][0] - start), status, headers)
        self._send(status, data[start:], headers, "application/octet-stream")

    def _stalling(self, key: str, data: bytes, upto: int, status: int, headers: dict[str, str]) -> None:
        """Send the headers and the bytes up to the file offset the stall is set at, then nothing (until the
        server stops).
        """
        hub = self.server_hub
        after, times = hub.stall[key]
        if times == 0:
            return self._send(status, data, headers, "application/octet-stream")
        if times > 0:
            hub.stall[key] = (after, times - 1)
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[:upto])
        self.wfile.flush()
        hub.record({"method": "GET", "path": urlsplit(self.path).path, "status": -1,
                    "range": self.headers.get("Range")})
        hub.stop_event.wait(60)
        self.close_connection = True

    def _create(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.server_hub.repos:  # as the Hub answers: the client's exist_ok reads the url from it
            return self._json(409, {"error": "RepoExists", "url": url}, {"X-Error-Code": "RepoExists"})
        self.server_hub.repos[repo_id] = Repo()
        self._json(200, {"url": url, "name": repo_id})

    def _commit_upload(self, repo_id: str, rev: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        base = dict(repo.commits.get(repo.refs.get(rev, ""), {}))
        for line in body.splitlines():
            op = json.loads(line)
            if op["key"] == "file":
                base[op["value"]["path"]] = Blob(base64.b64decode(op["value"]["content"]))
            elif op["key"] == "deletedFile":
                base.pop(op["value"]["path"], None)
            elif op["key"] != "header":
                return self._error(400, f"unsupported operation {op['key']}")
        sha = repo.commit(base, rev)
        self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None})


def _range_start(header: str | None) -> int:
    m = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(m[1]) if m else 0


def _card(files: dict[str, Blob]) -> dict[str, Any]:
    readme = files.get("README.md")
    if readme is None or readme.data is None or not readme.data.startswith(b"---"):
        return {}
    import yaml

    data = yaml.safe_load(readme.data.decode().split("---", 2)[1])
    return data if isinstance(data, dict) else {}


def hub_env(hub: LoopbackHub, home: Path, **extra: str) -> dict[str, str]:
    """The environment that points a child process's Hub client at `hub`, with its cache under `home`."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": "", **extra}


def point_client_at(hub: LoopbackHub, home: Path, monkeypatch: Any, download_timeout: float | None = None,
                    cache: Path | None = None) -> None:
    """Point this process's Hub client at `hub`: the environment q3vl reads at call time, and the client's
    constants, which it read when first imported (with the test session's HF_HUB_OFFLINE=1); and make every
    request it sends to anything but 127.0.0.1 fail (a guard on its HTTP client).
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    for key, value in hub_env(hub, home).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # both, or the client builds URLs for the real Hub
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache or home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # never a developer's stored login
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    if download_timeout is not None:
        monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", download_timeout)

    def loopback_only(request: Any) -> None:
        if request.url.host != "127.0.0.1":
            raise AssertionError(f"a test request left the loopback: {request.method} {request.url}")

    def factory() -> Any:
        return httpx2.Client(event_hooks={"request": [loopback_only, _http.hf_request_event_hook]},
                             follow_redirects=True, timeout=None)

    _http.close_session()
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", factory)  # both restored afterwards: the default
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)  # factory, and no client (the guarded one is dropped)
