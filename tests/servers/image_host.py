"""An image host with every kind of trouble a LAION list holds. Run: python image_host.py [--slow-seconds S].

/good/<n>.<png|jpg>   a real image, deterministic per n (size 96x80 unless ?w=&h=)
/redirect/<n>         302 to /good/<n>.png
/missing.png          404
/slow.jpg             answers after --slow-seconds (beyond the client's timeout)
/corrupt.jpg          image/jpeg that is not a JPEG
/page.html            text/html
/bomb.png             a small PNG declaring 6000x6000 pixels (decompression bomb)
/big.jpg              2 MiB of bytes (beyond a 1 MiB byte cap)
/noai.jpg             a good JPEG sent with X-Robots-Tag: noai
"""
from __future__ import annotations

import argparse
import functools
import io
import struct
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=4096)  # the host should cost the downloader under test as little CPU as it can
def good_image(n: int, fmt: str, width: int = 96, height: int = 80) -> bytes:
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, 3)
    pixels = np.stack([(xx * 3 + base[0]) % 256, (yy * 3 + base[1]) % 256, ((xx + yy) + base[2]) % 256], -1)
    pixels[height // 4: height // 2, width // 4: width // 2] = 255 - base  # a square: edges for canny
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG" if fmt == "png" else "JPEG", quality=90)
    return buffer.getvalue()


def png_bomb(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * side
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


class Handler(BaseHTTPRequestHandler):
    slow_seconds = 5.0
    bomb = b""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path.startswith("/good/"):
            name = path.rsplit("/", 1)[1]
            n, _, fmt = name.partition(".")
            width = int(query.get("w", ["96"])[0])
            height = int(query.get("h", ["80"])[0])
            body = good_image(int(n), fmt, width, height)
            return self.send(200, body, "image/png" if fmt == "png" else "image/jpeg")
        if path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", f"/good/{path.rsplit('/', 1)[1]}.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/slow.jpg":
            time.sleep(self.slow_seconds)
            return self.send(200, good_image(999, "jpg"), "image/jpeg")
        if path == "/corrupt.jpg":
            return self.send(200, b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10, "image/jpeg")
        if path == "/page.html":
            return self.send(200, b"<html><body>not an image</body></html>", "text/html")
        if path == "/bomb.png":
            return self.send(200, self.bomb, "image/png")
        if path == "/big.jpg":
            return self.send(200, b"\xff\xd8\xff" + b"\x00" * (2 * 1024 * 1024), "image/jpeg")
        if path == "/noai.jpg":
            return self.send(200, good_image(777, "jpg"), "image/jpeg", {"X-Robots-Tag": "noai, noimageai"})
        return self.send(404, b"not found", "text/plain")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--bomb-side", type=int, default=6000)
    args = parser.parse_args()
    Handler.slow_seconds = args.slow_seconds
    Handler.bomb = png_bomb(args.bomb_side)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
