"""A stand-in for the Hugging Face hub's file downloads. Run: python hub.py --files DIR [--stall-seconds S].

Like the hub: HEAD or GET <prefix>/<repo...>/resolve/main/<file> answers 302 to /blobs/<file>, with the file's
sha256 in X-Linked-Etag and its size in X-Linked-Size; /blobs/<file> serves the bytes, honouring `Range:
bytes=N-` with 206. The prefix picks a trouble (files come from DIR by their base name):
  /ok/...     behaves
  /cut/...    the first GET of a blob without Range sends the full Content-Length but only half the bytes and
              closes the connection (an interrupted download); GETs with Range behave
  /badsha/... announces a wrong sha256
  /stall/...  the blob answers its headers, then sends nothing for --stall-seconds
  /missing/.. 404 for everything
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    files = Path(".")
    stall_seconds = 10.0
    protocol_version = "HTTP/1.1"
    cut_done: set = set()
    log: list = []

    def log_message(self, *args):
        pass

    def _plain(self, status: int, body: bytes = b"", headers: dict | None = None, send_body: bool = True) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _route(self, send_body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        mode = parts[0]
        if mode == "missing" or len(parts) < 3:
            return self._plain(404, b"Entry not found", send_body=send_body)
        if "resolve" in parts:
            name = parts[-1]
            path = self.files / name
            if not path.is_file():
                return self._plain(404, b"Entry not found", send_body=send_body)
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if mode == "badsha":
                digest = hashlib.sha256(data + b"x").hexdigest()
            return self._plain(302, headers={"Location": f"/{mode}/blobs/{name}", "X-Linked-Etag": f'"{digest}"',
                                             "X-Linked-Size": str(len(data)), "ETag": '"0123abcd"'},
                               send_body=send_body)
        if parts[1] == "blobs":
            return self._blob(mode, parts[-1], send_body)
        return self._plain(404, b"Entry not found", send_body=send_body)

    def _blob(self, mode: str, name: str, send_body: bool) -> None:
        path = self.files / name
        if not path.is_file():
            return self._plain(404, b"Entry not found", send_body=send_body)
        data = path.read_bytes()
        ranged = self.headers.get("Range", "")
        Handler.log.append((mode, name, ranged))
        start = int(ranged[len("bytes="):].split("-")[0]) if ranged.startswith("bytes=") else 0
        if start >= len(data) and ranged:
            return self._plain(416, headers={"Content-Range": f"bytes */{len(data)}"}, send_body=send_body)
        body = data[start:]
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        if mode == "stall":
            self.wfile.flush()
            time.sleep(self.stall_seconds)
            return
        if mode == "cut" and not ranged and name not in Handler.cut_done:
            Handler.cut_done.add(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_HEAD(self):  # noqa: N802
        self._route(send_body=False)

    def do_GET(self):  # noqa: N802
        if self.path == "/log":
            return self._plain(200, repr(Handler.log).encode())
        self._route(send_body=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stall-seconds", type=float, default=10.0)
    args = parser.parse_args()
    Handler.files = Path(args.files)
    Handler.stall_seconds = args.stall_seconds
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
