#!/usr/bin/env python3
"""Independent WebSocket clients for the relay's WebSocket routes
(``[[upstreams]]``): HTTP/1.1 Upgrade (RFC 6455 section 4), HTTP/2 extended
CONNECT (RFC 8441) and HTTP/3 extended CONNECT (RFC 9220).

None of it shares code with the relay:

- HTTP/1.1: the ``websockets`` package's own sync client (handshake,
  Sec-WebSocket-Accept check, framing, masking), on a socket this script
  opens to the relay's TCP front (cleartext listener, or TLS with ALPN
  http/1.1).
- HTTP/2: the ``h2`` package (bench/interop/h2_client.py's connection) for
  the extended CONNECT, and the ``websockets`` package's sans-I/O protocol
  (``ClientProtocol`` in the OPEN state: masked client frames,
  fragmentation, ping/pong, the closing handshake) for the frames carried
  in DATA.
- HTTP/3: aioquic's ``H3Connection`` (bench/interop/masque_client.py's
  connection) for the extended CONNECT, the same sans-I/O framing in DATA.

Usage::

    ws_client.py --http {1,2,3} --relay HOST:PORT [--tls] [--ca cert.pem]
        [--token T] [--path /echo/] CASE[@PATH] [CASE[@PATH] ...]

A case runs against ``--path``, or against PATH when written ``CASE@PATH``;
each prints one JSON object on one line, ``{"case": "CASE[@PATH]", ...}``,
with the handshake's answer (``status``: 101 on HTTP/1.1, 200 on HTTP/2
and HTTP/3 when it opened; ``headers``, lower-cased; ``opened``) and what
the case saw. A case that could not run prints ``{"case": ..., "error":
"..."}``; the exit status is 0 unless the arguments are wrong. Every wait
has a deadline (``--timeout``) and every loop a bound.

Cases:

- ``handshake``: opens and closes (1000); reports the answer (used for the
  refusals: 404, 407, 502 with Proxy-Status).
- ``echo_text`` / ``echo_binary``: ``--count`` messages of varied sizes,
  each must come back identical and of the same type.
- ``large``: one ``--large-bytes`` binary message (1 MiB by default),
  sent while reading, echoed whole.
- ``subprotocol``: offers ``--subprotocol`` (repeatable; default
  ``chat.v2, chat.v1``) and reports what the answer chose and what the
  origin saw offered.
- ``headers``: asks the origin (``headers?``) what request it received.
- ``deflate``: offers permessage-deflate; reports the answer's
  Sec-WebSocket-Extensions and that compressed messages echo.
- ``wrong_protocol``: ``:protocol websocket2`` (HTTP/2, HTTP/3) or
  ``Upgrade: websocket2`` (HTTP/1.1).
- ``bad_version``: ``Sec-WebSocket-Version: 8``.
- ``reset``: opens with ``?tag=T``, sends part of a large message, then
  resets the stream (HTTP/2 RST_STREAM CANCEL, HTTP/3 RESET_STREAM and
  STOP_SENDING H3_REQUEST_CANCELLED, HTTP/1.1 a TCP RST); then opens a new
  session (on the same connection for HTTP/2 and HTTP/3), checks it
  echoes, and asks the origin (``record?T``, bounded polling) whether it
  saw the first connection close.
- ``upstream_close``: waits, sending nothing, for the origin to close (an
  origin started with ``--close CODE``); reports the close frame's code
  and reason and whether the stream then ended.
- ``close_request``: asks the origin to close (``close?4000 bye``) and
  reports the same.
- ``origin_reset``: asks an HTTP/2 origin (``ws_h2_origin.py``) to reset
  its stream (``reset?``) and reports how the client's side ended: its
  stream's reset code (HTTP/2, HTTP/3) or a close without a Close frame.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
import uuid
import warnings

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.headers import build_extension, parse_extension
from websockets.protocol import State
from websockets.sync.client import connect as ws_connect
from websockets.uri import parse_uri

import h2.errors
import h2_client
import masque_client
from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.h3.connection import Setting
from aioquic.h3.events import DataReceived, HeadersReceived

DEFAULT_SUBPROTOCOLS = ["chat.v2", "chat.v1"]

# websockets 14+ asks that a sync client be used as a context manager; the
# cases here hold it across calls and close it themselves.
warnings.filterwarnings("ignore", message="connect\\(\\) must be used as a context manager")


class ClientError(Exception):
    """A case could not run."""


class Closed(Exception):
    """The peer closed the WebSocket (a Close frame), or the stream ended."""

    def __init__(self, code: int | None, reason: str | None, ended: bool) -> None:
        super().__init__(f"closed: {code} {reason!r} ended={ended}")
        self.code = code
        self.reason = reason
        self.ended = ended


# -- payloads -------------------------------------------------------------


def text_messages(count: int) -> list[str]:
    base = ["", "a", "héllo wörld ✓", "x" * 125, "y" * 126, "z" * 65535, "w" * 65536]
    return [f"{i}:{base[i % len(base)]}" for i in range(count)]


def binary_messages(count: int) -> list[bytes]:
    sizes = [0, 1, 125, 126, 1000, 65535, 65536, 200_000]
    return [os.urandom(sizes[i % len(sizes)]) for i in range(count)]


def digest(b: bytes | str) -> str:
    return hashlib.sha256(b.encode() if isinstance(b, str) else b).hexdigest()[:16]


# -- HTTP/1.1: the websockets sync client --------------------------------


class EofSocket(socket.socket):
    """A TCP socket that notes when the peer ended the connection (recv
    returned nothing), so a case can tell that the relay closed it."""

    peer_eof = False

    def recv(self, *a, **kw):  # type: ignore[override]
        data = super().recv(*a, **kw)
        if not data:
            self.peer_eof = True
        return data


class EofSSLSocket(ssl.SSLSocket):
    """The same over TLS (SSLContext.sslsocket_class)."""

    peer_eof = False

    def recv(self, *a, **kw):  # type: ignore[override]
        try:
            data = super().recv(*a, **kw)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # close_notify, or the TCP connection ended without one.
            self.peer_eof = True
            raise
        if not data:
            self.peer_eof = True
        return data


def tcp_socket(args: argparse.Namespace) -> EofSocket:
    host, port = args.relay.rsplit(":", 1)
    info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    s = EofSocket(info[0], socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    s.connect(info[4])
    return s


def tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.sslsocket_class = EofSSLSocket
    return ctx


def h1_socket(args: argparse.Namespace) -> socket.socket:
    """A connection to the relay's TCP front, over TLS with --tls."""
    s = tcp_socket(args)
    if not args.tls:
        return s
    t = tls_context(args).wrap_socket(s, server_hostname=args.server_name)
    if t.selected_alpn_protocol() not in (None, "http/1.1"):
        raise ClientError(f"ALPN picked {t.selected_alpn_protocol()!r}")
    return t


def authority(args: argparse.Namespace) -> str:
    return args.authority or f"{args.server_name}:{args.relay.rsplit(':', 1)[1]}"


def auth_headers(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("proxy-authorization", f"Bearer {args.token}")] if args.token else []


def lower(headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


class H1Session:
    """A WebSocket over HTTP/1.1 Upgrade: the websockets sync client."""

    def __init__(self, args: argparse.Namespace, path: str, subprotocols: list[str] | None,
                 origin: str | None, deflate: bool) -> None:
        self.args = args
        # TLS (--tls) is the websockets client's, on this socket.
        self.sock = tcp_socket(args)
        scheme = "wss" if args.tls else "ws"
        self.status = 0
        self.headers: dict[str, str] = {}
        self.conn = None
        try:
            self.conn = ws_connect(
                f"{scheme}://{authority(args)}{path}",
                sock=self.sock,
                ssl=tls_context(args) if args.tls else None,
                server_hostname=args.server_name if args.tls else None,
                additional_headers=auth_headers(args),
                subprotocols=subprotocols,
                origin=origin,
                compression="deflate" if deflate else None,
                proxy=None,
                open_timeout=args.timeout,
                close_timeout=args.timeout,
                ping_interval=None,
                max_size=None,
                user_agent_header="ws_client.py",
            )
        except InvalidStatus as e:
            self.status = e.response.status_code
            self.headers = lower(e.response.headers.raw_items())
            self.body = e.response.body.decode("utf-8", "replace") if e.response.body else ""
            self.sock.close()
            return
        except InvalidHandshake as e:
            self.sock.close()
            raise ClientError(f"handshake: {type(e).__name__}: {e}") from e
        self.status = self.conn.response.status_code
        self.headers = lower(self.conn.response.headers.raw_items())
        # The TLS socket when --tls: it is the one that sees the peer's end.
        self.sock = self.conn.socket
        if args.tls and self.sock.selected_alpn_protocol() not in (None, "http/1.1"):
            raise ClientError(f"ALPN picked {self.sock.selected_alpn_protocol()!r}")

    @property
    def opened(self) -> bool:
        return self.conn is not None

    def send(self, message: str | bytes) -> None:
        self.conn.send(message)

    def recv(self, timeout: float) -> str | bytes:
        try:
            return self.conn.recv(timeout=timeout)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            self.conn.recv_events_thread.join(self.args.timeout)
            raise Closed(rcvd.code if rcvd else None, rcvd.reason if rcvd else None,
                         getattr(self.sock, "peer_eof", False)) from e

    def close(self) -> dict:
        self.conn.close(1000, "done")
        self.conn.recv_events_thread.join(self.args.timeout)
        rcvd = self.conn.protocol.close_rcvd
        return {"close_reply": rcvd.code if rcvd else None, "ended": getattr(self.sock, "peer_eof", False)}

    def abort_mid_message(self, partial: bytes) -> None:
        """Writes part of a frame on the socket, then resets the TCP
        connection (SO_LINGER 0)."""
        self.sock.sendall(partial)
        time.sleep(0.2)
        raw = self.sock
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.conn.close_socket()

    def shutdown(self) -> None:
        if self.conn is not None:
            self.conn.close_socket()
        else:
            self.sock.close()


def h1_raw(args: argparse.Namespace, path: str, upgrade: str, version: str) -> dict:
    """A hand-written HTTP/1.1 Upgrade request (for what the websockets
    client will not send); returns the answer's status and headers."""
    s = h1_socket(args)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    lines = [f"GET {path} HTTP/1.1", f"Host: {authority(args)}", "Connection: Upgrade", f"Upgrade: {upgrade}",
             f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}"]
    lines += [f"{k}: {v}" for k, v in auth_headers(args)]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    deadline = time.monotonic() + args.timeout
    while b"\r\n\r\n" not in head and len(head) < 65536:
        if time.monotonic() > deadline:
            raise ClientError("no response head")
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    s.close()
    if b"\r\n\r\n" not in head:
        raise ClientError(f"the relay closed before a whole answer: {head[:200]!r}")
    status_line, *rest = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = [(k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in rest if ":" in line)]
    return {"status": int(status_line.split(" ")[1]), "headers": lower(fields)}


# -- HTTP/2 and HTTP/3: extended CONNECT, frames in DATA -----------------


class H3Client(masque_client.Client):
    """masque_client's aioquic connection, keeping each request stream's
    DATA as raw bytes (WebSocket frames, not capsules)."""

    def __init__(self, *a, **kw) -> None:
        self.raw: dict[int, bytearray] = {}
        super().__init__(*a, **kw)

    def on_h3_event(self, event: object) -> None:
        if isinstance(event, HeadersReceived):
            st = self.stream(event.stream_id)
            st.headers = [(k.decode(), v.decode()) for k, v in event.headers]
            st.fin |= event.stream_ended
        elif isinstance(event, DataReceived):
            st = self.stream(event.stream_id)
            self.raw.setdefault(event.stream_id, bytearray()).extend(event.data)
            st.fin |= event.stream_ended


class H2Conn:
    """One HTTP/2 connection (h2_client.H2Client) carrying WebSocket
    streams."""

    version = 2

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        args.authorization = None
        self.c = h2_client.H2Client(args)
        self.c.wait_settings()
        self.connect_protocol = self.c.connect_protocol_enabled()

    def open(self, headers: list[tuple[str, str]]) -> tuple[int, dict]:
        sid = self.c.request(headers)
        return sid, self.c.answer(sid)

    def send(self, sid: int, data: bytes) -> None:
        self.c.send(sid, data)

    def end(self, sid: int) -> None:
        self.c.conn.end_stream(sid)
        self.c.flush()

    def reset(self, sid: int) -> None:
        self.c.conn.reset_stream(sid, error_code=h2.errors.ErrorCodes.CANCEL)
        self.c.flush()

    def poll(self, sid: int, wait: float) -> bytes:
        if not self.c.data.get(sid):
            self.c.pump(wait)
        return bytes(self.c.data.pop(sid, b""))

    def finished(self, sid: int) -> bool:
        return sid in self.c.ended

    def reset_code(self, sid: int) -> int | None:
        return self.c.resets.get(sid)

    def conn_error(self) -> int | None:
        return self.c.terminated

    def close(self) -> None:
        self.c.close()


class H3Conn:
    """One HTTP/3 connection (aioquic) carrying WebSocket streams."""

    version = 3

    def __init__(self, args: argparse.Namespace) -> None:
        host, port = args.relay.rsplit(":", 1)
        self.c = H3Client((host, int(port)), args.ca, args.token or "", args.timeout, h3_datagrams=False)
        self.c.wait("the relay's SETTINGS", lambda: self.c.h3.received_settings is not None)
        self.connect_protocol = self.c.h3.received_settings.get(Setting.ENABLE_CONNECT_PROTOCOL) == 1

    def open(self, headers: list[tuple[str, str]]) -> tuple[int, dict]:
        sid = self.c.send_request([(k.encode(), v.encode()) for k, v in headers])
        return sid, self.c.answer(sid)

    def send(self, sid: int, data: bytes) -> None:
        self.c.h3.send_data(sid, data, end_stream=False)
        self.c.flush()

    def end(self, sid: int) -> None:
        self.c.h3.send_data(sid, b"", end_stream=True)
        self.c.flush()

    def reset(self, sid: int) -> None:
        self.c.quic.reset_stream(sid, H3ErrorCode.H3_REQUEST_CANCELLED)
        self.c.quic.stop_stream(sid, H3ErrorCode.H3_REQUEST_CANCELLED)
        self.c.flush()

    def poll(self, sid: int, wait: float) -> bytes:
        if not self.c.raw.get(sid):
            self.c.pump(wait)
        return bytes(self.c.raw.pop(sid, b""))

    def finished(self, sid: int) -> bool:
        return self.c.stream(sid).fin

    def reset_code(self, sid: int) -> int | None:
        return self.c.stream(sid).reset_code

    def conn_error(self) -> int | None:
        return self.c.conn_error

    def close(self) -> None:
        self.c.close()


class FramedSession:
    """A WebSocket on one extended CONNECT stream: the websockets package's
    sans-I/O ClientProtocol, already OPEN (the CONNECT was the handshake),
    writes masked frames into DATA and parses the frames in DATA."""

    def __init__(self, args: argparse.Namespace, conn: H2Conn | H3Conn, path: str, subprotocols: list[str] | None,
                 origin: str | None, deflate: bool, protocol: str = "websocket", version: str = "13") -> None:
        self.args = args
        self.conn = conn
        scheme = "https" if (conn.version == 3 or args.tls) else "http"
        headers = [
            (":method", "CONNECT"),
            (":protocol", protocol),
            (":scheme", scheme),
            (":authority", authority(args)),
            (":path", path),
            ("sec-websocket-version", version),
        ]
        if subprotocols:
            headers.append(("sec-websocket-protocol", ", ".join(subprotocols)))
        if origin:
            headers.append(("origin", origin))
        factory = ClientPerMessageDeflateFactory() if deflate else None
        if factory is not None:
            headers.append(("sec-websocket-extensions", build_extension([(factory.name, factory.get_request_params())])))
        headers += auth_headers(args)
        self.sid, answer = conn.open(headers)
        self.status = answer.get("status", 0)
        self.headers = {k.lower(): v for k, v in answer.get("headers", {}).items()}
        self.answer = answer
        self.proto = ClientProtocol(parse_uri("ws://relay.invalid/"), state=State.OPEN, max_size=None)
        ext = self.headers.get("sec-websocket-extensions")
        if factory is not None and ext:
            accepted = []
            for name, params in parse_extension(ext):
                if name == factory.name:
                    accepted.append(factory.process_response_params(params, accepted))
            self.proto.extensions = accepted
        self.pending: list[str | bytes] = []
        self.fragments: list[bytes] = []
        self.fragment_text = False
        self.eof_fed = False
        self.end_sent = False

    @property
    def opened(self) -> bool:
        return self.status == 200

    def flush(self) -> None:
        for data in self.proto.data_to_send():
            if data == b"":
                if not self.end_sent:
                    self.end_sent = True
                    self.conn.end(self.sid)
            else:
                self.conn.send(self.sid, data)

    def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.proto.send_text(message.encode())
        else:
            self.proto.send_binary(message)
        self.flush()

    def step(self, wait: float) -> None:
        data = self.conn.poll(self.sid, wait)
        if data:
            self.proto.receive_data(data)
        # poll took every byte that came before the stream's end.
        if self.conn.finished(self.sid) and not self.eof_fed:
            self.eof_fed = True
            self.proto.receive_eof()
        for frame in self.proto.events_received():
            self.on_frame(frame)
        self.flush()

    def on_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self.fragments = [bytes(frame.data)]
            self.fragment_text = frame.opcode == Opcode.TEXT
        elif frame.opcode == Opcode.CONT:
            self.fragments.append(bytes(frame.data))
        else:
            return  # ping (answered by the protocol), pong, close (below)
        if frame.fin:
            body = b"".join(self.fragments)
            self.pending.append(body.decode() if self.fragment_text else body)
            self.fragments = []

    def closed_now(self) -> Closed | None:
        rcvd = self.proto.close_rcvd
        if rcvd is not None or self.conn.finished(self.sid) or self.conn.reset_code(self.sid) is not None:
            return Closed(rcvd.code if rcvd else None, rcvd.reason if rcvd else None, self.conn.finished(self.sid))
        return None

    def recv(self, timeout: float) -> str | bytes:
        deadline = time.monotonic() + timeout
        while True:
            if self.pending:
                return self.pending.pop(0)
            closed = self.closed_now()
            if closed is not None:
                # The stream's end follows the Close frame: wait for it.
                end = time.monotonic() + self.args.timeout
                while not self.conn.finished(self.sid) and self.conn.reset_code(self.sid) is None \
                        and time.monotonic() < end:
                    self.step(0.02)
                closed.ended = self.conn.finished(self.sid)
                raise closed
            if time.monotonic() >= deadline:
                raise TimeoutError("no message")
            self.step(min(0.02, max(0.0, deadline - time.monotonic())))

    def close(self) -> dict:
        self.proto.send_close(1000, "done")
        self.flush()
        deadline = time.monotonic() + self.args.timeout
        while self.proto.close_rcvd is None and time.monotonic() < deadline \
                and self.conn.reset_code(self.sid) is None:
            self.step(0.02)
        while not self.conn.finished(self.sid) and time.monotonic() < deadline \
                and self.conn.reset_code(self.sid) is None:
            self.step(0.02)
        if not self.end_sent:
            self.end_sent = True
            self.conn.end(self.sid)
        rcvd = self.proto.close_rcvd
        return {"close_reply": rcvd.code if rcvd else None, "ended": self.conn.finished(self.sid),
                "reset": self.conn.reset_code(self.sid)}

    def abort_mid_message(self, partial: bytes) -> None:
        self.conn.send(self.sid, partial)
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            self.conn.poll(self.sid, 0.02)
        self.conn.reset(self.sid)

    def shutdown(self) -> None:
        pass


# -- driver ---------------------------------------------------------------


class Runner:
    """Opens sessions for one case: a new connection per case (HTTP/2,
    HTTP/3), reused by the case's later sessions."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.conn: H2Conn | H3Conn | None = None
        if args.http == 2:
            self.conn = H2Conn(args)
        elif args.http == 3:
            self.conn = H3Conn(args)

    def info(self) -> dict:
        if self.conn is None:
            return {}
        return {"connect_protocol": self.conn.connect_protocol}

    def open(self, path: str, subprotocols: list[str] | None = None, origin: str | None = None,
             deflate: bool = False):
        if self.conn is None:
            return H1Session(self.args, path, subprotocols, origin, deflate)
        if not self.conn.connect_protocol:
            raise ClientError("the relay did not send SETTINGS_ENABLE_CONNECT_PROTOCOL=1")
        return FramedSession(self.args, self.conn, path, subprotocols, origin, deflate)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def answer_of(s) -> dict:
    out = {"status": s.status, "headers": s.headers, "opened": s.opened}
    if getattr(s, "body", None):
        out["body"] = s.body
    return out


def echo(s, messages: list, timeout: float) -> dict:
    """Sends each message and reads its echo before the next one."""
    matched = wrong_type = changed = 0
    for m in messages:
        s.send(m)
        got = s.recv(timeout)
        if type(got) is not type(m):
            wrong_type += 1
        elif got != m:
            changed += 1
        else:
            matched += 1
    return {"sent": len(messages), "matched": matched, "wrong_type": wrong_type, "changed": changed}


def case_handshake(r: Runner, path: str) -> dict:
    s = r.open(path)
    out = answer_of(s)
    if s.opened:
        out.update(s.close())
    return out


def echo_case(kind: str):
    def run(r: Runner, path: str) -> dict:
        s = r.open(path)
        out = answer_of(s)
        if not s.opened:
            return out
        msgs = text_messages(r.args.count) if kind == "text" else binary_messages(r.args.count)
        out.update(echo(s, msgs, r.args.timeout))
        out.update(s.close())
        return out

    return run


def case_large(r: Runner, path: str) -> dict:
    s = r.open(path)
    out = answer_of(s)
    if not s.opened:
        return out
    payload = os.urandom(r.args.large_bytes)
    started = time.monotonic()
    s.send(payload)
    got = s.recv(r.args.timeout * 3)
    out.update({"bytes": len(payload), "received": len(got) if isinstance(got, bytes) else None,
                "binary": isinstance(got, bytes), "identical": got == payload,
                "seconds": round(time.monotonic() - started, 3)})
    # A second one after it: the stream still flows both ways.
    s.send(payload[: 1 << 16])
    out["after"] = s.recv(r.args.timeout) == payload[: 1 << 16]
    out.update(s.close())
    return out


def case_subprotocol(r: Runner, path: str) -> dict:
    offered = r.args.subprotocol or DEFAULT_SUBPROTOCOLS
    s = r.open(path, subprotocols=offered)
    out = answer_of(s)
    out["offered"] = offered
    if not s.opened:
        return out
    out["chosen"] = s.headers.get("sec-websocket-protocol")
    s.send("headers?")
    seen = json.loads(s.recv(r.args.timeout))
    out["origin_saw_offer"] = seen["headers"].get("sec-websocket-protocol")
    out.update(echo(s, ["in chat.v1"], r.args.timeout))
    out.update(s.close())
    return out


def case_headers(r: Runner, path: str) -> dict:
    s = r.open(path, subprotocols=r.args.subprotocol or None, origin=r.args.origin_header)
    out = answer_of(s)
    if not s.opened:
        return out
    s.send("headers?")
    got = s.recv(r.args.timeout)
    out["origin"] = json.loads(got)
    out.update(s.close())
    return out


def case_deflate(r: Runner, path: str) -> dict:
    s = r.open(path, deflate=True)
    out = answer_of(s)
    if not s.opened:
        return out
    out["extensions"] = s.headers.get("sec-websocket-extensions")
    out.update(echo(s, ["compress me " * 500, b"\x00" * 100_000, "small"], r.args.timeout))
    out.update(s.close())
    return out


def case_wrong_protocol(r: Runner, path: str) -> dict:
    if r.conn is None:
        return h1_raw(r.args, path, "websocket2", "13")
    s = FramedSession(r.args, r.conn, path, None, None, False, protocol="websocket2")
    out = answer_of(s)
    # The refusal is a stream's: the connection still serves.
    t = r.open(r.args.path)
    out["next_status"] = t.status
    if t.opened:
        out.update({"next_" + k: v for k, v in echo(t, ["still alive"], r.args.timeout).items()})
        t.close()
    out["conn_error"] = r.conn.conn_error()
    return out


def case_bad_version(r: Runner, path: str) -> dict:
    if r.conn is None:
        return h1_raw(r.args, path, "websocket", "8")
    s = FramedSession(r.args, r.conn, path, None, None, False, version="8")
    return answer_of(s)


def with_query(path: str, query: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}{query}"


def origin_record(r: Runner, path: str, tag: str) -> tuple[dict, object]:
    """Asks the origin, on a new session, for the record of `tag`, until it
    says that connection closed (bounded)."""
    t = r.open(path)
    if not t.opened:
        return {"next_status": t.status}, t
    record: dict = {}
    deadline = time.monotonic() + r.args.timeout
    while time.monotonic() < deadline:
        t.send(f"record?{tag}")
        record = json.loads(t.recv(r.args.timeout))
        if record.get("closed"):
            break
        time.sleep(0.05)
    return record, t


def case_reset(r: Runner, path: str) -> dict:
    tag = uuid.uuid4().hex[:12]
    s = r.open(with_query(path, f"tag={tag}"))
    out = answer_of(s)
    if not s.opened:
        return out
    out.update(echo(s, ["before the reset"], r.args.timeout))
    frame = Frame(Opcode.BINARY, os.urandom(1 << 20)).serialize(mask=True)
    s.abort_mid_message(frame[: 64 << 10])
    if r.conn is not None:
        out["reset_answer"] = r.conn.reset_code(s.sid)
    record, t = origin_record(r, path, tag)
    out["origin_record"] = {k: record.get(k) for k in ("found", "opened", "closed", "close_code", "bytes")}
    if t.opened:
        out.update({"next_" + k: v for k, v in echo(t, ["after the reset"], r.args.timeout).items()})
        out["next_status"] = t.status
        t.close()
    if r.conn is not None:
        out["conn_error"] = r.conn.conn_error()
    return out


def close_case(ask: bool):
    def run(r: Runner, path: str) -> dict:
        s = r.open(path)
        out = answer_of(s)
        if not s.opened:
            return out
        if ask:
            s.send("close?4000 bye")
        try:
            got = s.recv(r.args.timeout)
            out["unexpected_message"] = got if isinstance(got, str) else digest(got)
        except Closed as c:
            out.update({"close_code": c.code, "close_reason": c.reason, "ended": c.ended})
        except TimeoutError:
            out["close_code"] = None
        if r.conn is not None:
            out["reset"] = r.conn.reset_code(s.sid)
        s.shutdown()
        return out

    return run


def case_origin_reset(r: Runner, path: str) -> dict:
    """Asks an HTTP/2 origin (ws_h2_origin.py) to reset its stream
    (``reset?``): the client should see its own stream reset (HTTP/2,
    HTTP/3) or its connection end without a Close frame (HTTP/1.1)."""
    s = r.open(path)
    out = answer_of(s)
    if not s.opened:
        return out
    out.update(echo(s, ["before the reset"], r.args.timeout))
    s.send("reset?")
    try:
        got = s.recv(r.args.timeout)
        out["unexpected_message"] = got if isinstance(got, str) else digest(got)
    except Closed as c:
        out.update({"close_code": c.code, "close_reason": c.reason})
    except TimeoutError:
        out["timed_out"] = True
    except (OSError, ClientError) as e:
        out["transport_error"] = type(e).__name__
    if r.conn is not None:
        out["reset"] = r.conn.reset_code(s.sid)
        out["conn_error"] = r.conn.conn_error()
    s.shutdown()
    return out


CASES = {
    "handshake": case_handshake,
    "origin_reset": case_origin_reset,
    "echo_text": echo_case("text"),
    "echo_binary": echo_case("binary"),
    "large": case_large,
    "subprotocol": case_subprotocol,
    "headers": case_headers,
    "deflate": case_deflate,
    "wrong_protocol": case_wrong_protocol,
    "bad_version": case_bad_version,
    "reset": case_reset,
    "upstream_close": close_case(False),
    "close_request": close_case(True),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http", type=int, choices=[1, 2, 3], required=True)
    p.add_argument("--relay", required=True, help="host:port: the TCP front (1, 2) or QUIC (3)")
    p.add_argument("--tls", action="store_true", help="HTTP/1.1 and HTTP/2: TLS (else cleartext)")
    p.add_argument("--ca", help="the relay's certificate (TLS, HTTP/3)")
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--authority", help=":authority / Host (default SERVER_NAME:PORT)")
    p.add_argument("--token", help="bearer token (Proxy-Authorization); none sent without it")
    p.add_argument("--path", default="/echo/", help="the request path of cases without @PATH")
    p.add_argument("--subprotocol", action="append", default=[], help="a subprotocol to offer")
    p.add_argument("--origin-header", help="headers: the Origin to send")
    p.add_argument("--count", type=int, default=24, help="messages per echo case")
    p.add_argument("--large-bytes", type=int, default=1 << 20)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds any single wait may take")
    p.add_argument("cases", nargs="+")
    args = p.parse_args()
    for spec in args.cases:
        name, _, path = spec.partition("@")
        if name not in CASES:
            p.error(f"unknown case {name!r}; cases: {', '.join(sorted(CASES))}")
    if args.http == 3 and not args.ca:
        p.error("--http 3 needs --ca")
    for spec in args.cases:
        name, _, path = spec.partition("@")
        started = time.monotonic()
        runner = None
        try:
            runner = Runner(args)
            res = runner.info()
            res.update(CASES[name](runner, path or args.path))
        except (ClientError, Closed, TimeoutError, OSError, InvalidHandshake, ConnectionClosed,
                h2_client.ClientError, masque_client.ClientError) as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # report, never hang the driver
            res = {"error": f"{type(e).__name__}: {e}"}
        finally:
            if runner is not None:
                try:
                    runner.close()
                except Exception:
                    pass
        res["case"] = spec
        res["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(res, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
