"""Candidates from a clip-retrieval backend (`clip-retrieval back`, any host): POST /knn-service.

Written with requests rather than clip_retrieval.clip_client: that package imports its Flask server and pins
faiss, numpy<2 and an old pyarrow, which the WebUI's venv cannot take.
"""
from __future__ import annotations

import base64
import dataclasses
import itertools
import math
import string
from pathlib import Path
from typing import Callable, Optional

from lib_controlnet.errors import UserError


class KnnServiceError(UserError):
    """The retrieval backend could not be reached or answered something that is not a result list."""


@dataclasses.dataclass
class KnnQuery:
    text: Optional[str] = None
    image_path: Optional[str] = None
    image_url: Optional[str] = None

    def label(self) -> str:
        return self.text or self.image_url or self.image_path or ""


def service_url(base: str) -> str:
    base = base.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise KnnServiceError(f"The knn backend URL must start with http:// or https://, got '{base}'.")
    return base if base.endswith("/knn-service") else base + "/knn-service"


def expand_template(template: str, values: dict) -> list[str]:
    """"{style} {room}, interior design" x {"style": [...], "room": [...]} -> every combination, in order."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    missing = [name for name in names if name not in values]
    if missing:
        raise UserError(f"The prompt template needs values for: {', '.join(sorted(set(missing)))}.")
    unique = list(dict.fromkeys(names))
    lists = [[values[name]] if isinstance(values[name], str) else list(values[name]) for name in unique]
    return [template.format(**dict(zip(unique, combo))) for combo in itertools.product(*lists)]


def build_queries(config) -> list[KnnQuery]:
    prompts = list(config.prompts)
    if config.template:
        prompts += expand_template(config.template, config.template_values)
    queries = [KnnQuery(text=p) for p in dict.fromkeys(p.strip() for p in prompts) if p]
    for example in config.example_images:
        if str(example).startswith(("http://", "https://")):
            queries.append(KnnQuery(image_url=str(example)))
        else:
            if not Path(example).is_file():
                raise UserError(f"Example image {example} does not exist.")
            queries.append(KnnQuery(image_path=str(example)))
    return queries


class KnnClient:
    def __init__(self, url: str, timeout: float = 60.0):
        import requests

        self.url = service_url(url)
        self.timeout = timeout
        self.session = requests.Session()

    def payload(self, query: KnnQuery, config) -> dict:
        body = {
            "modality": config.modality,
            "num_images": int(config.num_images),
            "num_result_ids": int(config.num_images),
            "indice_name": config.indice_name,
            "use_mclip": bool(config.use_mclip),
            "deduplicate": bool(config.deduplicate),
            "use_safety_model": bool(config.use_safety_model),
            "use_violence_detector": bool(config.use_violence_detector),
            # the reference client sends these two as strings, "" meaning "no aesthetic re-ranking"
            "aesthetic_score": "" if config.aesthetic_score is None else str(config.aesthetic_score),
            "aesthetic_weight": str(config.aesthetic_weight),
        }
        if query.text is not None:
            body["text"] = query.text
        if query.image_url is not None:
            body["image_url"] = query.image_url
        if query.image_path is not None:
            body["image"] = base64.b64encode(Path(query.image_path).read_bytes()).decode("ascii")
        return body

    def query(self, query: KnnQuery, config) -> list[dict]:
        import requests

        try:
            response = self.session.post(self.url, json=self.payload(query, config), timeout=self.timeout)
        except requests.RequestException as error:
            raise KnnServiceError(f"Cannot reach the knn service at {self.url}: {error}") from None
        if response.status_code != 200:
            raise KnnServiceError(f"The knn service at {self.url} answered HTTP {response.status_code}.")
        try:
            results = response.json()
        except ValueError:
            raise KnnServiceError(f"The knn service at {self.url} did not answer JSON.") from None
        if isinstance(results, dict) and "error" in results:
            raise KnnServiceError(f"The knn service at {self.url} refused the query: {results['error']}")
        if not isinstance(results, list):
            raise KnnServiceError(f"The knn service at {self.url} answered {type(results).__name__}, not a list.")
        return results


def retrieve(config, on_query: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    """Query every prompt/example and merge: one candidate per url and per id, best similarity first kept."""
    client = KnnClient(config.knn_url, timeout=config.knn_timeout)
    queries = build_queries(config)
    seen_urls: set[str] = set()
    seen_ids: set[str] = set()
    merged: list[dict] = []
    for index, query in enumerate(queries):
        for result in client.query(query, config):
            url = result.get("url")
            if not isinstance(url, str) or not url:
                continue
            rid = result.get("id")
            rid = None if rid is None else str(rid)
            if url in seen_urls or (rid is not None and rid in seen_ids):
                continue
            seen_urls.add(url)
            if rid is not None:
                seen_ids.add(rid)
            similarity = result.get("similarity")
            merged.append(
                {
                    "url": url,
                    "caption": str(result.get("caption") or ""),
                    "similarity": float(similarity) if isinstance(similarity, (int, float)) else math.nan,
                    "source_id": rid or "",
                    "query": query.label(),
                    "source": "knn",
                }
            )
        if on_query:
            on_query(index + 1, len(queries))
    return merged
