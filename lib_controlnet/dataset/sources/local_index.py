"""Candidates from a local index folder (`dataset index build`) given where a knn backend URL would go: the
same prompts, template and example images, encoded by the index's own CLIP model and searched here.

A result whose metadata has an http(s) `url` is downloaded like any knn result (source "local_index"); one
built from local files gives its `image_path`, read from disk (source "local_index_file").
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from lib_controlnet.errors import UserError


def _vector(index, query, timeout: float):
    if query.text is not None:
        return index.text_vector(query.text)
    if query.image_path is not None:
        return index.image_vector(Path(query.image_path).read_bytes())
    import requests

    try:
        response = requests.get(query.image_url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as error:
        raise UserError(f"Cannot fetch example image {query.image_url}: {error}") from None
    return index.image_vector(response.content)


def retrieve(config, on_query: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    from lib_controlnet.dataset.index.search import open_index
    from lib_controlnet.dataset.sources.knn import build_queries

    index = open_index(config.knn_url)
    queries = build_queries(config)
    seen: set = set()
    rows: list[dict] = []
    for number, query in enumerate(queries):
        results = index.search(
            _vector(index, query, config.knn_timeout), modality=config.modality, num_images=config.num_images,
            deduplicate=config.deduplicate, use_safety_model=config.use_safety_model,
            aesthetic_score=config.aesthetic_score, columns=None)
        for result in results:
            url = result.get("url") if str(result.get("url") or "").startswith(("http://", "https://")) else None
            path = result.get("image_path")
            if url is None and not path:
                continue
            key = url or path
            if key in seen or result["id"] in seen:
                continue
            seen.update((key, result["id"]))
            rows.append({
                "url": key,
                "caption": str(result.get("caption") or ""),
                "similarity": float(result.get("similarity", math.nan)),
                "source_id": str(result["id"]),
                "query": query.label(),
                "source": "local_index" if url else "local_index_file",
            })
        if on_query:
            on_query(number + 1, len(queries))
    return rows
