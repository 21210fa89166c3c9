# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""NBD URLs: where an export lives (Address), parsed from and written as
the URLs of uri.md and qemu's legacy ``nbd:`` forms.

URLs: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md
"""

from __future__ import annotations

import dataclasses
from urllib.parse import quote, unquote, urlsplit

from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_wire import (
    NBD_DEFAULT_PORT,
    check_string,
)

_SCHEMES = {
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
}


@dataclasses.dataclass(frozen=True)
class Address:
    """Where an NBD export lives; str() gives the canonical URL."""

    transport: str  # "tcp" or "unix"
    host: str | None = None
    port: int | None = None
    path: str | None = None  # unix socket path
    export: str = ""
    tls: bool = False

    def __post_init__(self):
        if self.transport == "tcp":
            if not self.host or not isinstance(self.port, int) or self.path is not None:
                raise ValueError(f"a tcp address needs host and port, and no path: {self!r}")
            if not 0 < self.port < 65536:
                raise ValueError(f"port {self.port} out of range 1-65535")
        elif self.transport == "unix":
            if not self.path or self.host is not None or self.port is not None:
                raise ValueError(f"a unix address needs a socket path, and no host: {self!r}")
        else:
            raise ValueError(f"transport must be 'tcp' or 'unix', not {self.transport!r}")
        check_string("export name", self.export)

    def __str__(self):
        return format_url(self)

    def with_export(self, export):
        """The same server with another export name."""
        return dataclasses.replace(self, export=export)


def parse_url(url):
    """Parse an NBD URL into an Address.

    Accepts nbd://host[:port][/export], nbds://..., nbd+unix:///export?socket=PATH,
    nbds+unix:///export?socket=PATH and qemu's legacy nbd:HOST:PORT[:exportname=X]
    and nbd:unix:PATH[:exportname=X]. Raises ValueError naming the URL and the problem.
    """
    if not isinstance(url, str):
        raise ValueError(f"NBD URL must be a string, not {type(url).__name__}: {url!r}")
    if url.startswith("nbd:") and not url.startswith("nbd://"):
        return _parse_legacy_url(url)

    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError(
            f"invalid NBD URL {url!r}: contains white space or control characters; "
            f"percent-encode them (a space is %20)"
        )
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"invalid NBD URL {url!r}: {e}") from None
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"invalid NBD URL {url!r}: unsupported scheme {parts.scheme!r}; use nbd://, nbds://, "
            f"nbd+unix://, nbds+unix:// or nbd:unix:PATH"
        )
    transport, tls = _SCHEMES[parts.scheme]
    if parts.fragment:
        raise ValueError(f"invalid NBD URL {url!r}: unexpected fragment #{parts.fragment}")
    if "@" in parts.netloc:
        raise ValueError(f"invalid NBD URL {url!r}: user names are not supported")
    export = _url_export(url, parts.path)
    params = _url_query(url, parts.query)

    if transport == "tcp":
        if params:
            raise ValueError(
                f"invalid NBD URL {url!r}: unsupported query parameter {next(iter(params))!r}"
            )
        if not parts.netloc:
            raise ValueError(f"invalid NBD URL {url!r}: missing host")
        host, port = _split_host_port(url, parts.netloc, NBD_DEFAULT_PORT)
        return Address("tcp", host=host, port=port, export=export, tls=tls)

    if parts.netloc:
        raise ValueError(
            f"invalid NBD URL {url!r}: a {parts.scheme} URL names no host; "
            f"use {parts.scheme}:///EXPORT?socket=PATH"
        )
    path = params.pop("socket", None)
    if params:
        raise ValueError(
            f"invalid NBD URL {url!r}: unsupported query parameter {next(iter(params))!r}"
        )
    if not path:
        raise ValueError(
            f"invalid NBD URL {url!r}: missing socket path; "
            f"use {parts.scheme}:///EXPORT?socket=PATH"
        )
    return Address("unix", path=path, export=export, tls=tls)


def format_url(address):
    """The canonical URL of an Address (or of an NBD URL in any accepted form)."""
    if isinstance(address, str):
        address = parse_url(address)
    scheme = "nbds" if address.tls else "nbd"
    export = quote(address.export, safe="/")
    if address.transport == "tcp":
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{scheme}://{host}:{address.port}/{export}"
    return f"{scheme}+unix:///{export}?socket={quote(address.path, safe='/')}"


def _parse_legacy_url(url):
    """qemu's nbd:unix:PATH[:exportname=X] and nbd:HOST:PORT[:exportname=X]."""
    spec = url[len("nbd:") :]
    export = ""
    marker = spec.find(":exportname=")
    if marker >= 0:
        spec, export = spec[:marker], spec[marker + len(":exportname=") :]
    if spec.startswith("unix:"):
        path = spec[len("unix:") :]
        if not path:
            raise ValueError(f"invalid NBD URL {url!r}: missing socket path after 'nbd:unix:'")
        return Address("unix", path=path, export=export)
    if not spec:
        raise ValueError(f"invalid NBD URL {url!r}: missing HOST:PORT after 'nbd:'")
    host, port = _split_host_port(url, spec, None)
    return Address("tcp", host=host, port=port, export=export)


def _split_host_port(url, text, default_port):
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid NBD URL {url!r}: unterminated IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise ValueError(f"invalid NBD URL {url!r}: {host!r} is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid NBD URL {url!r}: unexpected {rest!r} after the address")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        if ":" in host:
            raise ValueError(
                f"invalid NBD URL {url!r}: write IPv6 addresses in brackets, e.g. [::1]:10809"
            )
    if not host:
        raise ValueError(f"invalid NBD URL {url!r}: missing host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"invalid NBD URL {url!r}: missing port, use nbd:HOST:PORT")
        return host, default_port
    if not port_text or port_text.strip("0123456789") or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid NBD URL {url!r}: invalid port {port_text!r}")
    return host, int(port_text)


def _url_export(url, path):
    # The export is the path without its first "/", percent-decoded.
    if path and not path.startswith("/"):
        raise ValueError(f"invalid NBD URL {url!r}: the export name must follow '/'")
    try:
        export = unquote(path[1:], errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"invalid NBD URL {url!r}: export name is not UTF-8") from None
    try:
        check_string("export name", export)
    except ValueError as e:
        raise ValueError(f"invalid NBD URL {url!r}: {e}") from None
    return export


def _url_query(url, query):
    # RFC 3986 query: "+" is a plain character, only %XX is decoded.
    params = {}
    if not query:
        return params
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"invalid NBD URL {url!r}: query parameter {key!r} has no value")
        key = unquote(key)
        if key in params:
            raise ValueError(f"invalid NBD URL {url!r}: query parameter {key!r} repeated")
        params[key] = unquote(value)
    return params
