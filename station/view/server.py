"""The operator view's HTTP side: the page, its state as JSON, the parts' images,
and the live stream (server-sent events), on the standard library's
ThreadingHTTPServer.

Routes (GET or HEAD)::

    /                 the page (static/index.html); /static/view.js, /static/view.css
    /events           text/event-stream: "state" (counts, heatmap, health, models) and
                      "part" (one inspected part) events; the current state and the
                      latest parts first, then live
    /state.json       the same state and latest parts, once (scripts, checks)
    /image/<id>.jpg   a latest part's frame with its mask and boxes drawn

A slow browser never holds the line up: the sink hands each event to every client's
bounded queue without waiting (:class:`Clients`); a client whose queue is full is
dropped (its browser reconnects and starts from the current state), and a socket
that takes no data for ``SOCKET_TIMEOUT_S`` is closed.

With a secret (``operator_view.auth``) every route needs it: HTTP Basic (the
configured user name and the secret), ``Authorization: Bearer <secret>``, the cookie
set by a first ``?token=<secret>``; anything else gets 401.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import queue
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..config import OperatorViewConfig
from ..errors import StationError
from ..priority import ThreadPolicy

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/view.js": ("view.js", "text/javascript; charset=utf-8"),
          "/static/view.css": ("view.css", "text/css; charset=utf-8")}
CLIENT_QUEUE = 256  # events waiting for one browser; beyond, it is dropped (it reconnects)
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
SOCKET_TIMEOUT_S = 10.0  # a request, or a browser taking no data, for this long is closed
# The kernel's send buffer of an event stream (Linux doubles it): small, so that a browser that
# stops reading backs up into its event queue and is dropped, not into megabytes of TCP buffer.
STREAM_SNDBUF = 32 * 1024
RETRY_MS = 2000  # how soon a browser reconnects to the stream (the SSE "retry" field)
COOKIE = "station_view"
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


def sse_event(name: str, data: str) -> bytes:
    """One server-sent event; ``data`` is one line of JSON."""
    return f"event: {name}\ndata: {data}\n\n".encode()


class _Client:
    def __init__(self) -> None:
        self.events: queue.Queue[bytes | None] = queue.Queue(maxsize=CLIENT_QUEUE)
        self.dropped = False


class Clients:
    """The browsers on ``/events``, at most ``limit``; :meth:`broadcast` never waits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.dropped = 0  # clients dropped because they fell behind
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()

    def join(self) -> _Client | None:
        """A new client, or None when ``limit`` are connected."""
        with self._lock:
            if len(self._clients) >= self.limit:
                return None
            client = _Client()
            self._clients.add(client)
            return client

    def leave(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)

    def broadcast(self, event: bytes) -> None:
        """``event`` to every client; one whose queue is full is dropped, not waited for."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.events.put_nowait(event)
            except queue.Full:
                client.dropped = True
                self.leave(client)
                with self._lock:
                    self.dropped += 1
                log.warning("operator view: a browser fell %d events behind: dropped (it reconnects)", CLIENT_QUEUE)

    def close(self) -> None:
        """End every stream (the stop)."""
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for client in clients:
            client.dropped = True
            try:
                client.events.put_nowait(None)
            except queue.Full:
                pass  # its stream ends at its next event or keep-alive


class Content:
    """What the server serves, given by the sink (station/view/live.py)."""

    def __init__(self, state: Callable[[], dict], hello: Callable[[], list[bytes]],
                 image: Callable[[str], bytes | None], clients: Clients):
        self.state = state  # the state and latest parts as JSON-ready data
        self.hello = hello  # the events a new stream starts with
        self.image = image  # a latest part's JPEG by result id
        self.clients = clients


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S  # on the socket: a stuck browser ends its own thread, nothing else

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if not self._authorised(url.query):
            return
        content = self.server.content
        if url.path in _FILES:
            name, kind = _FILES[url.path]
            self._send(HTTPStatus.OK, self.server.files[name], kind)
        elif url.path == "/events":
            self._stream(content)
        elif url.path == "/favicon.ico":  # browsers ask; the page has none
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif url.path == "/state.json":
            self._send(HTTPStatus.OK, self.server.to_json(content.state()), "application/json")
        elif url.path.startswith("/image/") and url.path.endswith(".jpg"):
            jpeg = content.image(url.path[len("/image/"):-len(".jpg")])
            if jpeg is None:
                self._send(HTTPStatus.NOT_FOUND, b"no such part among the latest\n", "text/plain")
            else:
                self._send(HTTPStatus.OK, jpeg, "image/jpeg")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _authorised(self, query: str) -> bool:
        """True when no secret is set or the request gives it; otherwise 401 (or, for a
        first ``?token=``, the cookie and a redirect to the same path without the token)."""
        server = self.server
        if server.secret is None:
            return True
        given = parse_qs(query).get("token", [None])[0]
        if given is not None and _same(given, server.secret):
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", urlsplit(self.path).path)
            self.send_header("Set-Cookie", f"{COOKIE}={server.cookie}; HttpOnly; SameSite=Strict; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        if self._offers_secret(server.secret, server.cookie):
            return True
        body = b"401: this page needs the operator view's secret (operator_view.auth)\n"
        self._send(HTTPStatus.UNAUTHORIZED, body, "text/plain", {"WWW-Authenticate": 'Basic realm="station"'})
        return False

    def _offers_secret(self, secret: str, cookie: str) -> bool:
        """A bearer token, or a Basic password under the configured user name, equal to
        the secret; or the cookie a ``?token=`` set."""
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and _same(value.strip(), secret):
            return True
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return _same(user, self.server.username) & _same(password, secret)
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and _same(value, cookie):
                return True
        return False

    def _send(self, status: HTTPStatus, body: bytes, kind: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _stream(self, content: Content) -> None:
        """The live stream until the browser leaves, falls behind, or the stop."""
        client = content.clients.join()
        if client is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"too many browsers on this station's page\n", "text/plain")
            return
        try:
            self.send_response(HTTPStatus.OK)
            for name, value in _HEADERS.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
            self.wfile.write(f"retry: {RETRY_MS}\n\n".encode() + b"".join(content.hello()))
            while not client.dropped:
                try:
                    event = client.events.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    event = b": keep-alive\n\n"
                if event is None or client.dropped:
                    break
                self.wfile.write(event)
        except OSError:  # the browser went away, or took nothing for SOCKET_TIMEOUT_S
            pass
        finally:
            content.clients.leave(client)

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise
        log.debug("operator view %s: " + format, self.address_string(), *args)


def _same(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode("utf-8", "surrogateescape"))


def cookie_for(secret: str) -> str:
    """The cookie's value: a digest of the secret (any characters may be in the secret; a
    cookie value may not hold some, and the secret itself never goes into one)."""
    return hashlib.sha256(b"station operator view\0" + secret.encode("utf-8", "surrogateescape")).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a browser's stream never holds up the stop
    allow_reuse_address = True
    content: Content
    files: dict[str, bytes]
    secret: str | None
    cookie: str
    username: str
    to_json: Callable[[Any], bytes]


class ViewServer:
    """Serves ``content`` on ``cfg.host:cfg.port`` from a thread of its own (under
    ``policy.background()``, which the request threads inherit) until :meth:`stop`."""

    def __init__(self, cfg: OperatorViewConfig, content: Content, secret: str | None, policy: ThreadPolicy,
                 to_json: Callable[[Any], bytes]):
        try:
            family = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as exc:
            raise StationError(f"operator_view: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None

        class Server(_Server):
            address_family = family

        try:
            self._httpd = Server((cfg.host, cfg.port), _Handler)
        except OSError as exc:
            raise StationError(f"operator_view: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        httpd = self._httpd
        httpd.content, httpd.secret, httpd.to_json = content, secret, to_json
        httpd.cookie = cookie_for(secret) if secret is not None else ""
        httpd.username = cfg.auth.username if cfg.auth is not None else ""
        httpd.files = {name: (STATIC / name).read_bytes() for name, _ in _FILES.values()}
        self.host, self.port = cfg.host, int(httpd.server_address[1])
        self._policy = policy
        self._thread = threading.Thread(target=self._serve, name="operator-view-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _serve(self) -> None:
        self._policy.background()
        self._httpd.serve_forever(poll_interval=0.1)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, close the socket (the streams end with :meth:`Clients.close`)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout)
        self._httpd.server_close()
