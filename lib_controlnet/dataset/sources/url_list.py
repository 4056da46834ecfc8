"""Candidates from a URL list: parquet, CSV/TSV or JSONL with a url column and an optional caption column
(LAION and DataComp metadata work as they are), with caption keyword filters."""
from __future__ import annotations

import math
from pathlib import Path

from lib_controlnet.errors import UserError


class UrlListError(UserError):
    """The URL list cannot be read or lacks the url column."""


def read_table(path: Path):
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            delimiter = "\t" if suffix == ".tsv" else ","
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        if suffix in (".jsonl", ".json"):
            return pajson.read_json(path)
    except Exception as error:  # pyarrow raises several types; the user needs the reason
        raise UrlListError(f"Cannot read URL list {path}: {error}") from None
    raise UrlListError(f"URL list {path} must be .parquet, .csv, .tsv or .jsonl.")


def keyword_filter(include: list, exclude: list):
    include = [k.lower() for k in include if k]
    exclude = [k.lower() for k in exclude if k]

    def keep(caption: str) -> bool:
        low = caption.lower()
        if include and not any(k in low for k in include):
            return False
        return not any(k in low for k in exclude)

    return keep


def read_url_list(config) -> list[dict]:
    path = Path(config.url_list)
    if not path.is_file():
        raise UrlListError(f"URL list {path} does not exist.")
    table = read_table(path)
    if config.url_col not in table.column_names:
        raise UrlListError(f"URL list {path} has no '{config.url_col}' column (it has: {', '.join(table.column_names)}).")
    urls = table.column(config.url_col).to_pylist()
    has_caption = config.caption_col in table.column_names
    captions = table.column(config.caption_col).to_pylist() if has_caption else [""] * len(urls)
    similarities = table.column("similarity").to_pylist() if "similarity" in table.column_names else [None] * len(urls)
    keep = keyword_filter(config.include_keywords, config.exclude_keywords)
    rows, seen = [], set()
    for url, caption, similarity in zip(urls, captions, similarities):
        if not isinstance(url, str) or not url.strip() or url in seen:
            continue
        caption = "" if caption is None else str(caption)
        if not keep(caption):
            continue
        seen.add(url)
        rows.append(
            {
                "url": url.strip(),
                "caption": caption,
                "similarity": float(similarity) if isinstance(similarity, (int, float)) else math.nan,
                "source_id": "",
                "query": "",
                "source": "url_list",
            }
        )
    return rows
