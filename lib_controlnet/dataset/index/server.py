"""`dataset index serve`: clip-retrieval's back routes over a LocalIndex, so its web front, its ClipClient and
our own knn source all work against a local index.

  POST /knn-service  {text | image (base64) | image_url | embedding_input, modality, num_images,
                      num_result_ids, indice_name, deduplicate, use_safety_model, use_violence_detector,
                      aesthetic_score, aesthetic_weight, use_mclip} -> [{id, similarity, url/image_path, caption, ...}]
  GET  /indices-list -> [name]
  POST /metadata     {ids, indice_name} -> [{id, metadata: {...}}]

Fields sent as null count as absent (ClipClient sends every field). As in the back, a metadata row with an
existing `image_path` also gets the image itself, base64 JPEG, as `image` (the front shows local files so).
Bodies are read as JSON whatever their content type (ClipClient sends none). Only the standard library.
"""
from __future__ import annotations

import base64
import io
import json
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lib_controlnet.dataset.index.search import LocalIndex
from lib_controlnet.errors import UserError

MAX_BODY = 64 * 1024 * 1024
MAX_IMAGE_URL_BYTES = 32 * 1024 * 1024


def _present(body: dict, name: str):
    value = body.get(name)
    return None if value is None or value == "" else value


def query_vector(index: LocalIndex, body: dict):
    if _present(body, "text") is not None:
        return index.text_vector(str(body["text"]))
    if _present(body, "image") is not None:
        try:
            data = base64.b64decode(body["image"], validate=False)
        except ValueError:
            raise UserError("The image field is not base64.") from None
        return index.image_vector(data)
    if _present(body, "image_url") is not None:
        request = urllib.request.Request(str(body["image_url"]), headers={"User-Agent": "controlnet-studio"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                data = response.read(MAX_IMAGE_URL_BYTES + 1)
        except Exception as error:  # urllib raises URLError, HTTPError, timeouts, ValueError
            raise UserError(f"Cannot fetch image_url {body['image_url']}: {error}") from None
        return index.image_vector(data)
    if _present(body, "embedding_input") is not None:
        return index.embedding_vector(body["embedding_input"])
    raise UserError("Give one of text, image, image_url or embedding_input.")


def _with_image(row: dict) -> dict:
    path = row.get("image_path")
    if isinstance(path, str) and path and Path(path).is_file():
        from PIL import Image

        try:
            with Image.open(path) as image:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG")
            row["image"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        except Exception:  # an unreadable file: the row keeps its path, without the preview
            pass
    return row


def knn(index: LocalIndex, body: dict) -> list:
    num_images = int(body.get("num_images") or 40)
    # aesthetic_score is not a filter here: the back re-ranks with LAION's aesthetic embeddings (downloaded),
    # and ClipClient sends 9 by default, which as a minimum would drop nearly every row.
    results = index.search(
        query_vector(index, body), modality=str(body.get("modality") or "image"), num_images=num_images,
        num_result_ids=int(body.get("num_result_ids") or num_images), deduplicate=bool(body.get("deduplicate")),
        use_safety_model=bool(body.get("use_safety_model")))
    return [_with_image(row) for row in results]


def make_handler(index: LocalIndex, name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body leave in two writes: with Nagle on, the body waits for the client's delayed ACK
        # (40 ms on Linux) on every kept-alive request
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def answer(self, status: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Access-Control-Allow-Origin", "*")  # the web front may be served elsewhere
            self.end_headers()
            self.wfile.write(body)

        def do_OPTIONS(self):  # noqa: N802 (CORS preflight of the front)
            self.send_response(204)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Content-Type")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):  # noqa: N802
            if self.path == "/indices-list":
                return self.answer(200, [name])
            if self.path in ("/", "/healthz"):
                return self.answer(200, "ok")
            return self.answer(404, {"error": f"no route {self.path}"})

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self.answer(413, {"error": "request body too large"})
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self.answer(400, {"error": "the request body is not JSON"})
            if not isinstance(body, dict):
                return self.answer(400, {"error": "the request body must be a JSON object"})
            if self.path not in ("/knn-service", "/metadata"):
                return self.answer(404, {"error": f"no route {self.path}"})
            asked = body.get("indice_name")
            if asked not in (None, name):
                return self.answer(400, {"error": f"unknown index {asked}; this server has {name}"})
            try:
                if self.path == "/metadata":
                    ids = [int(i) for i in body.get("ids") or []]
                    if any(i < 0 or i >= index.offsets[-1] for i in ids):
                        raise UserError(f"ids must lie in 0..{int(index.offsets[-1]) - 1}.")
                    return self.answer(200, [{"id": i, "metadata": m} for i, m in zip(ids, index.metadata(ids))])
                return self.answer(200, knn(index, body))
            except (UserError, ValueError, TypeError) as error:
                return self.answer(400, {"error": str(error)})

    return Handler


def make_server(index: LocalIndex, host: str = "127.0.0.1", port: int = 1234, name: str | None = None):
    server = ThreadingHTTPServer((host, port), make_handler(index, name or index.name))
    server.daemon_threads = True
    return server
