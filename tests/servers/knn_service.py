"""A knn backend speaking clip-retrieval's protocol, over a fixed catalog instead of a CLIP index.

Run: python knn_service.py CATALOG.json [--log REQUESTS.jsonl]. CATALOG is a list of {id, url, caption}.
POST /knn-service ranks the catalog by word overlap with `text` (image queries: by id order) and answers the
top `num_images` as [{id, url, caption, similarity}]; GET /indices-list answers ["test_index"]. Every request
body is appended to the log so tests can check what the client sent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INDICES = ["test_index"]


class Handler(BaseHTTPRequestHandler):
    catalog: list = []
    log_path = None
    delay = 0.0
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path == "/indices-list":
            return self.answer(200, INDICES)
        return self.answer(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        try:
            query = json.loads(self.rfile.read(length))
        except ValueError:
            return self.answer(400, {"error": "bad json"})
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(query) + "\n")
        if self.path != "/knn-service":
            return self.answer(404, {"error": "not found"})
        if query.get("indice_name") not in INDICES:
            return self.answer(200, {"error": f"unknown index {query.get('indice_name')}"})
        time.sleep(self.delay)
        words = set(str(query.get("text") or "").lower().replace(",", " ").split())
        scored = []
        for rank, entry in enumerate(self.catalog):
            overlap = len(words & set(entry["caption"].lower().replace(",", " ").split())) if words else 0
            score = overlap / (len(words) or 1) if words else 1.0 - rank / (len(self.catalog) + 1)
            if score > 0:
                scored.append((score, rank, entry))
        scored.sort(key=lambda item: (-item[0], item[1]))
        count = int(query.get("num_images", 40))
        return self.answer(200, [{**entry, "similarity": round(score, 4)} for score, _, entry in scored[:count]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("catalog")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", default=None)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each query takes (a real index is slow)")
    args = parser.parse_args()
    with open(args.catalog, encoding="utf-8") as handle:
        Handler.catalog = json.load(handle)
    Handler.log_path = args.log
    Handler.delay = args.delay
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
