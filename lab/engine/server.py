# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The engine's HTTPS front: TLS, SSO endpoints, authentication, routing.

One thread per connection: the SDK's ``close()`` revokes its token on a
second connection while its first one is still open and idle (keep-alive),
so a server serving one connection at a time would never answer the logout.
TLS handshakes run in the connection's thread too, so a client that rejects
the lab CA (or stalls) never holds up the others.
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import ssl
import time
from urllib.parse import parse_qs, unquote, urlsplit

from lab.engine import api, errors, hooks, xml

log = logging.getLogger("engine.http")

API_PREFIX = xml.API
SSO_TOKEN = "/ovirt-engine/sso/oauth/token"
SSO_LOGOUT = "/ovirt-engine/services/sso-logout"
HEALTH = "/ovirt-engine/services/health"
HEALTH_TEXT = b"DB Up!Welcome to Health Status!"

# Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 120
MAX_BODY = 64 * 1024**2


class EngineServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, engine, address: str, port: int, cert: str, key: str):
        self.engine = engine
        super().__init__((address, port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(
            self.socket, server_side=True, do_handshake_on_connect=False
        )

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request, client_address):
        log.exception("Connection from %s failed", client_address)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "thinair-lab-engine"
    sys_version = ""
    timeout = IDLE_TIMEOUT

    def setup(self):
        super().setup()
        # Headers and body leave in two writes; without this, Nagle's
        # algorithm and the client's delayed ACK add 40 ms to every call.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        try:
            super().handle()
        except (TimeoutError, ssl.SSLError, ConnectionError) as e:
            # A client refusing our certificate, or one going away, is not
            # an engine error.
            log.debug("Connection from %s ended: %s", self.client_address, e)

    def do_GET(self):
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def log_message(self, format, *args):
        log.debug("%s %s", self.client_address[0], format % args)

    # Private helpers.

    def _serve(self):
        start = time.monotonic()
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            body = self._read_body()
            reply = self._route(self.command, path, query, body)
        except errors.ApiError as e:
            reply = api.error_reply(e)
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            reply = api.error_reply(
                errors.ApiError(
                    errors.INTERNAL_ERROR, errors.REASON_FAILED, "[Internal Engine Error]"
                )
            )
        self._send(reply)
        log.info(
            "%s %s -> %d (%.0f ms)",
            self.command,
            self.path,
            reply.status,
            (time.monotonic() - start) * 1000,
        )

    def _route(self, method: str, path: str, query: dict, body: bytes) -> api.Reply:
        engine = self.server.engine
        if path == hooks.PREFIX or path.startswith(hooks.PREFIX + "/"):
            return engine.hooks.dispatch(method, path, query, body)
        if path == HEALTH:
            return api.Reply(200, HEALTH_TEXT, "text/plain")
        if path == SSO_TOKEN and method == "POST":
            return _json(*engine.sso.token(_form(body)))
        if path == SSO_LOGOUT and method == "POST":
            return _json(*engine.sso.logout(_form(body)))
        if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
            return api.Reply(errors.NOT_FOUND)
        fault = engine.faults.take(method, path)
        if fault is not None and not fault.after:
            reply = hooks.apply(fault)
            if reply is not None:
                return reply
        if engine.sso.authenticate(self.headers.get("Authorization")) is None:
            reply = api.Reply(errors.UNAUTHORIZED)
            reply.headers["WWW-Authenticate"] = 'Basic realm="RESTAPI"'
            return reply
        relative = path[len(API_PREFIX) :].strip("/")
        reply = engine.api.dispatch(api.Request(method, relative, query, body))
        if fault is not None and fault.after:
            return hooks.apply(fault)
        return reply

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
        except ValueError:
            raise errors.bad_request(f"Invalid Content-Length '{length}'") from None
        if size < 0 or size > MAX_BODY:
            raise errors.bad_request(f"Request body of {size} bytes is out of range")
        return self.rfile.read(size)

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise errors.bad_request("Invalid chunked request body") from None
            if size == 0:
                # Trailer section ends with an empty line.
                while self.rfile.readline(1024).strip():
                    pass
                return bytes(data)
            data += self.rfile.read(size)
            self.rfile.readline(1024)
            if len(data) > MAX_BODY:
                raise errors.bad_request("Request body is too large")

    def _send(self, reply: api.Reply):
        self.send_response(reply.status)
        if reply.content_type:
            charset = "" if reply.content_type == "text/plain" else ";charset=UTF-8"
            self.send_header("Content-Type", reply.content_type + charset)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)


def _form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.bad_request("Form body is not UTF-8") from None
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


def _json(status: int, data: dict) -> api.Reply:
    return api.Reply(status, json.dumps(data).encode(), "application/json")
