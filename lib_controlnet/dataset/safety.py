"""What the downloader may fetch and decode.

- Only http and https, also after redirects.
- Image hosts on private, loopback, link-local or otherwise non-public addresses are refused (server-side
  request forgery through a dataset list) unless the build config or the extension setting allows them. The
  check runs on the address actually connected to, so redirects and DNS re-binding are covered too.
- A byte cap on every response and a pixel cap on decoding (OpenCV's OPENCV_IO_MAX_IMAGE_PIXELS, read when cv2
  loads, and Pillow's MAX_IMAGE_PIXELS) against decompression bombs.
- The no-AI X-Robots-Tag directives are honoured by img2dataset itself (`disallowed_header_directives`).

img2dataset fetches with urllib's global opener, so `install_guard` puts our handlers there, in the process
that downloads (see download.py for how it reaches img2dataset's worker processes).
"""
from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

ALLOWED_SCHEMES = ("http", "https")


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 89_478_485


def policy_for(config) -> FetchPolicy:
    from lib_controlnet.settings import get_settings

    return FetchPolicy(
        allow_private=bool(config.allow_private_urls or get_settings().allow_private_urls),
        max_bytes=int(config.max_image_bytes),
        max_pixels=int(config.max_image_pixels),
    )


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


class RefusedURL(urllib.error.URLError):
    """A URL or an address the policy does not allow (the reason ends up in failures.jsonl)."""


def check_url(url: str, policy: FetchPolicy) -> Optional[str]:
    """None if the URL may be fetched, else the reason it may not (resolves the host name)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() not in ALLOWED_SCHEMES:
        return f"scheme '{parsed.scheme or '(none)'}' refused: only http and https"
    host = parsed.hostname
    if not host:
        return "no host in url"
    if policy.allow_private:
        return None
    try:
        infos = socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        return f"cannot resolve host {host}: {error}"
    for info in infos:
        address = info[4][0]
        if not is_public_address(address):
            return f"private address {address} refused (allow private URLs to fetch it)"
    return None


def check_scheme(url: str, policy: FetchPolicy) -> Optional[str]:
    """The cheap part of check_url, without DNS: scheme, host, and literal private IPs. Host names are checked
    when the guard connects (after resolution), which also covers redirects."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() not in ALLOWED_SCHEMES:
        return f"scheme '{parsed.scheme or '(none)'}' refused: only http and https"
    if not parsed.hostname:
        return "no host in url"
    if not policy.allow_private:
        try:
            if not is_public_address(parsed.hostname):
                return f"private address {parsed.hostname} refused (allow private URLs to fetch it)"
        except ValueError:
            pass  # a name, not an address
    return None


def _guarded_create_connection(policy: FetchPolicy):
    """socket.create_connection that refuses non-public peers before sending a byte."""

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *args, **kwargs):
        host, port = address[0], address[1]
        last_error: Optional[Exception] = None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            if not policy.allow_private and not is_public_address(sockaddr[0]):
                raise RefusedURL(f"private address {sockaddr[0]} refused (allow private URLs to fetch it)")
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)  # the checked address itself: no second lookup to re-bind
                return sock
            except OSError as error:
                last_error = error
                sock.close()
        raise last_error or OSError(f"cannot connect to {host}")

    return create_connection


def _connection_class(base, policy: FetchPolicy):
    class Guarded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = _guarded_create_connection(policy)

    return Guarded


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.connection = _connection_class(http.client.HTTPConnection, policy)

    def http_open(self, req):
        return self.do_open(self.connection, req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.connection = _connection_class(http.client.HTTPSConnection, policy)

    def https_open(self, req):
        return self.do_open(self.connection, req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise RefusedURL(f"redirect to scheme '{scheme}' refused: only http and https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _ByteCap(urllib.request.BaseHandler):
    handler_order = 400  # before the error processor: a 404 still reads as a 404

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def http_response(self, request, response):
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise RefusedURL(f"image larger than {self.max_bytes} bytes (Content-Length {length})")
        original_read = response.read
        cap = self.max_bytes

        def capped_read(amt=None):
            data = original_read(cap + 1 if amt is None or amt > cap + 1 else amt)
            if amt is None and len(data) > cap:
                response.close()
                raise RefusedURL(f"image larger than {cap} bytes")
            return data

        response.read = capped_read
        return response

    https_response = http_response


def build_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """http/https only: unlike urllib.request.build_opener, no file:, ftp: or data: handlers, and no proxy
    (a proxy would connect for us and bypass the address check)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.UnknownHandler(), _HTTP(policy), _HTTPS(policy),
                    urllib.request.HTTPDefaultErrorHandler(), _Redirects(), urllib.request.HTTPErrorProcessor(),
                    _ByteCap(policy.max_bytes)):
        opener.add_handler(handler)
    return opener


def set_decode_limits(policy: FetchPolicy) -> None:
    """Pixel caps for Pillow now and for OpenCV in processes started after this call (cv2 reads the variable
    once, when it loads)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = policy.max_pixels
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(policy.max_pixels)


def install_guard(policy: FetchPolicy) -> None:
    """Make urllib.request.urlopen (what img2dataset calls) go through the policy in this process."""
    urllib.request.install_opener(build_opener(policy))
    set_decode_limits(policy)
