"""Downloading one annotator weight file from the Hugging Face hub into the annotator folder.

Written here, not through huggingface_hub: the version the WebUI pins (<0.26) resumes and times out, but never
checks a downloaded file against its sha256, and keeps files in its own cache layout, not where the user looks.

- The file goes to `<name>.part` beside its final place and is renamed only when complete and checked; an
  interrupted download keeps the part, and the next try (in the same call, or a later one) asks for the rest
  with an HTTP Range request.
- The hash: the registry's sha256 where it holds one, else the one the hub publishes for LFS files (the
  X-Linked-Etag header of the resolve URL). A file whose hash differs is deleted, never used.
- Every network wait has a timeout (DOWNLOAD_TIMEOUT seconds without a byte arriving).
- Progress goes to the console (stderr) as a tqdm bar, as the WebUI's other downloads show theirs.
- The hub's address: HF_ENDPOINT if set (mirrors such as hf-mirror.com), else https://huggingface.co.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DOWNLOAD_TIMEOUT = 30.0  # seconds without a byte arriving
ATTEMPTS = 4  # tries per call while each one makes progress
CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(Exception):
    """One sentence for the user; raised as AnnotatorWeightsError by weights.find_weight."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def file_url(repo: str, path: str, repo_type: str = "model") -> str:
    prefix = {"model": "", "space": "spaces/", "dataset": "datasets/"}[repo_type]
    return f"{endpoint()}/{prefix}{repo}/resolve/main/{urllib.parse.quote(path)}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 302 itself carries the hash: look at it, then follow by hand


def _resolve(url: str, timeout: float) -> tuple[str, str]:
    """(the URL the bytes come from, the published sha256 or "") from a HEAD of the resolve URL."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "controlnet-studio"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        response = opener.open(request, timeout=timeout)
        headers, location = response.headers, url
    except urllib.error.HTTPError as error:
        if error.code not in (301, 302, 303, 307, 308):
            raise
        headers, location = error.headers, urllib.parse.urljoin(url, error.headers.get("Location", url))
    published = (headers.get("X-Linked-Etag") or "").strip().strip('"').lower()
    return location, published if _SHA256.match(published) else ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, part: Path, timeout: float, label: str) -> bool:
    """Append the bytes after what `part` holds; True when the server says the file is complete."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "controlnet-studio"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing after what we hold: the part is the whole file
            return True
        raise
    with response:
        if have and response.status != 206:  # the server ignores Range: start again
            have = 0
        remaining = int(response.headers.get("Content-Length") or 0)
        with open(part, "ab" if have else "wb") as out, \
                tqdm(total=have + remaining or None, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=f"Downloading {label}", leave=False) as bar:
            got = 0
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                got += len(block)
                bar.update(len(block))
    if remaining and got < remaining:  # http.client ends a short body quietly: a closed connection looks like EOF
        raise ConnectionError(f"the connection closed after {have + got} of {have + remaining} bytes")
    return True


def download(url: str, target: Path, sha256: str = "", timeout: float | None = None) -> Path:
    """Download `url` to `target` (resuming `target`.part), checked against `sha256` or the hub's published
    hash. Raises DownloadError with one sentence saying what failed and where to put the file by hand."""
    import http.client

    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    by_hand = f"download it by hand into {target.parent} from {url}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise DownloadError(f"Could not download {target.name}: Hugging Face downloads are off here "
                            f"(HF_HUB_OFFLINE is set); {by_hand}.")
    try:
        source, published = _resolve(url, timeout)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise DownloadError(f"Could not download {target.name} from {url} ({_reason(error)}); {by_hand}.") from None
    expected = (sha256 or published).lower()
    for attempt in range(ATTEMPTS):
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch(source, part, timeout, target.name)
            break
        except (http.client.IncompleteRead, ConnectionError) as error:  # cut off: resume if it moved on
            if attempt == ATTEMPTS - 1 or (part.stat().st_size if part.exists() else 0) <= before:
                raise DownloadError(f"The download of {target.name} from {url} was cut off ({_reason(error)}); "
                                    f"the next try resumes it, or {by_hand}.") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise DownloadError(f"Could not download {target.name} from {url} ({_reason(error)}); "
                                f"{by_hand}.") from None
    if expected:
        actual = _sha256(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(f"The {target.name} downloaded from {url} has sha256 {actual}, not the published "
                                f"{expected}, and was deleted; {by_hand}.")
    os.replace(part, target)
    return target


def _reason(error: BaseException) -> str:
    import socket

    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    inner = getattr(error, "reason", error)
    if isinstance(inner, (socket.timeout, TimeoutError)) or isinstance(error, (socket.timeout, TimeoutError)):
        return "no answer within the timeout"
    return f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
