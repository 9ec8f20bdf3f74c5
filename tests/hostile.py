"""Hostile media for the tests and the hostile-inputs benchmark (torch-free).

Files built to attack decoders (decompression bombs, lying headers, playlists that point elsewhere)
and `HostileServer`, an HTTP server on a loopback address that misbehaves on purpose: slow, silent,
endless, redirecting. Every server thread watches one stop event, so `stop()` ends them all.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

Route = Callable[["_Handler", threading.Event], None]


# ---------------------------------------------------------------- files
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A 1-bit all-black PNG of `width` x `height`: about 110 KB for 30000 x 30000 (900 M pixels)."""
    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_chunk_bomb(kind: bytes = b"zTXt", size: int = 50_000_000) -> bytes:
    """A valid 32x32 PNG with a `zTXt` or `iCCP` chunk that inflates to `size` bytes (Pillow caps at 1 MB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    png = buf.getvalue()
    bomb = _chunk(kind, b"k\x00\x00" + zlib.compress(b"a" * size, 9))
    return png[:33] + bomb + png[33:]  # right after IHDR


def big_png(path: Path, size: int = 12000, mode: str = "RGB") -> Path:
    """A `size` x `size` PNG of large flat tiles: a couple of MB or less on disk, `size`^2 pixels decoded."""
    from PIL import Image

    tiles = np.arange(size) // 1500
    if mode == "RGB":
        rgb = np.empty((size, size, 3), np.uint8)
        rgb[..., 0] = ((tiles * 30) % 256)[:, None]
        rgb[..., 1] = ((tiles * 50) % 256)[None, :]
        rgb[..., 2] = 128
        img = Image.fromarray(rgb)
        del rgb
    else:
        grey = ((tiles[:, None] * 30 + tiles[None, :] * 50) % 256).astype(np.uint8)
        img = Image.fromarray(grey, "L")
        img = img if mode == "L" else img.convert(mode)
    img.save(path, compress_level=1)
    return path


def many_frame_gif(frames: int = 10_000, size: int = 16) -> bytes:
    """An animated GIF with `frames` frames (only the first is an image's pixels)."""
    from PIL import Image

    imgs = []
    for i in range(frames):  # a moving dot: every frame differs, so none is merged away
        img = Image.new("L", (size, size), 0)
        img.putpixel((i % size, (i // size) % size), 255)
        imgs.append(img)
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=True, append_images=imgs[1:], duration=10, loop=0)
    return buf.getvalue()


def animated_png(frames: int = 500, size: int = 64) -> bytes:
    """An APNG with `frames` frames."""
    from PIL import Image

    imgs = [Image.new("RGB", (size, size), (i % 256, 0, 0)) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, "PNG", save_all=True, append_images=imgs[1:])
    return buf.getvalue()


def _frames(count: int, width: int, height: int, pattern: str) -> Iterator[Any]:
    """PyAV frames: moving gradients, or flat colours that change every 8 frames (cheap to encode at 4K)."""
    import av

    yy, xx = np.mgrid[0:height, 0:width] if pattern != "flat" else (np.zeros(1), np.zeros(1))
    frame: Any = None
    for i in range(count):
        if pattern == "flat":
            if i % 8 == 0:
                img = np.full((height, width, 3), (i * 29) % 256, np.uint8)
                img[: height // 4, : width // 4] = (0, 255 - (i * 5) % 256, 80)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        else:
            img = np.stack([(xx * 255 // width + i * 5) % 256, (yy * 255 // height) % 256,
                            (xx + yy + i * 7) % 256], -1).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = None
        yield frame


def encode_video(frames: int = 30, width: int = 200, height: int = 120, fps: int = 10, fmt: str = "mp4",
                 codec: str = "libx264", pattern: str = "gradient") -> bytes:
    """A synthetic clip as bytes (`pattern="flat"`: a 64-frame 3840x2160 clip in a few seconds, ~0.4 MB)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream: Any = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        for frame in _frames(frames, width, height, pattern):
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def lying_avi(claimed_frames: int, frames: int = 10) -> bytes:
    """An AVI whose headers claim `claimed_frames` frames while it holds `frames`."""
    data = bytearray(encode_video(frames, 64, 64, 10, fmt="avi", codec="mpeg4"))
    strh = data.index(b"strh")
    struct.pack_into("<I", data, strh + 8 + 32, claimed_frames)  # AVISTREAMHEADER.dwLength
    avih = data.index(b"avih")
    struct.pack_into("<I", data, avih + 8 + 16, claimed_frames)  # AVIMAINHEADER.dwTotalFrames
    return bytes(data)


def hls_playlist(segment_urls: list[str]) -> bytes:
    """An HLS media playlist whose segments live elsewhere (a file path or URL each)."""
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:10"]
    for url in segment_urls:
        lines += ["#EXTINF:3.0,", url]
    return ("\n".join([*lines, "#EXT-X-ENDLIST"]) + "\n").encode()


# ---------------------------------------------------------------- HTTP
class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_error(404)
            return
        with contextlib.suppress(OSError):  # the client gave up: that is what the hostile routes are for
            route(self, self.server.stop_event)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read `hits` instead."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]
    hits: list[str]
    stop_event: threading.Event


class HostileServer:
    """An HTTP server on `host` (a loopback address) serving `routes`; a context manager that stops it."""

    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1", port: int = 0) -> None:
        self.httpd = _Server((host, port), _Handler)
        self.httpd.routes, self.httpd.hits, self.httpd.stop_event = dict(routes), [], threading.Event()
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def hits(self) -> list[str]:
        """Paths requested so far."""
        return self.httpd.hits

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def start(self) -> HostileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(data: bytes, content_type: str = "application/octet-stream", headers: dict[str, str] | None = None
          ) -> Route:
    """Answer 200 with `data`."""
    def route(h: _Handler, stop: threading.Event) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    return route


def redirect(location: str, status: int = 302) -> Route:
    """Answer with a redirect to `location`."""
    def route(h: _Handler, stop: threading.Event) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def drip(interval: float = 0.5, headers_too: bool = False) -> Route:
    """Slowloris: one byte every `interval` seconds, forever (in the body, or already in the status line)."""
    def route(h: _Handler, stop: threading.Event) -> None:
        if headers_too:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000:
                if stop.wait(interval):
                    return
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
            return
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.end_headers()
        while not stop.wait(interval):
            h.wfile.write(b"\x89")
            h.wfile.flush()
    return route


def silent() -> Route:
    """Accept the request and never answer."""
    def route(h: _Handler, stop: threading.Event) -> None:
        stop.wait(3600)
    return route


def endless(chunk: bytes, interval: float = 0.0) -> Route:
    """A never-ending 200 body (a live MPEG-TS stream): `chunk` every `interval` s until the client leaves."""
    def route(h: _Handler, stop: threading.Event) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "video/mp2t")
        h.end_headers()
        while not stop.wait(interval):
            h.wfile.write(chunk)
    return route


def gzip_bomb(size: int = 256 << 20) -> Route:
    """A body sent with `Content-Encoding: gzip` that would inflate to `size` bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as z:
        block = b"\x00" * (1 << 20)
        for _ in range(size >> 20):
            z.write(block)
    return serve(buf.getvalue(), "image/png", {"Content-Encoding": "gzip"})


def lying_length(claimed: int = 10 << 30) -> Route:
    """A 200 whose Content-Length claims `claimed` bytes."""
    def route(h: _Handler, stop: threading.Event) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(claimed))
        h.end_headers()
        h.wfile.write(b"\x00" * 1024)
    return route
