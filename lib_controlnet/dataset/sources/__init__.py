"""Where candidate images come from. Every source returns rows {url, caption, similarity, source_id, query,
source}; `collect` merges them in a fixed order and drops repeated urls, so a resumed build sees the same list."""
from __future__ import annotations

from typing import Callable, Optional


def collect(config, on_progress: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    rows: list[dict] = []
    if config.knn_url and config.queries_given():
        if is_remote(config.knn_url):
            from lib_controlnet.dataset.sources.knn import retrieve
        else:  # a local index folder (dataset index build), searched in this process
            from lib_controlnet.dataset.sources.local_index import retrieve

        rows += retrieve(config, on_query=on_progress)
    if config.url_list:
        from lib_controlnet.dataset.sources.url_list import read_url_list

        rows += read_url_list(config)
    if config.image_dir:
        from lib_controlnet.dataset.sources.local_folder import read_local_folder

        rows += read_local_folder(config)
    if config.hf_dataset_dir:
        from lib_controlnet.dataset.sources.hf_disk import read_hf_disk

        rows += read_hf_disk(config)
    seen: set[str] = set()
    merged = []
    for row in rows:
        if row["url"] in seen:
            continue
        seen.add(row["url"])
        merged.append(row)
    if config.max_samples:
        merged = merged[: config.max_samples]
    return merged


# Sources whose urls are paths of files on this machine (download reads them, img2dataset never sees them).
LOCAL_FILE_SOURCES = ("local_folder", "local_index_file")


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("hf://")
