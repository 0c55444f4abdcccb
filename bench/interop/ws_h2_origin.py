#!/usr/bin/env python3
"""An upstream WebSocket origin reached over HTTP/2 extended CONNECT
(RFC 8441), for the relay's WebSocket tests; an independent implementation
on the ``h2`` package (HTTP/2 framing, HPACK, flow control) and the
``websockets`` package's sans-I/O frame protocol, sharing no code with the
relay (nor with ws_origin.py, whose behaviour it mirrors).

It prints one JSON line on stdout once it listens: ``{"port": N}``; then
nothing more on stdout (a driver may stop reading). Diagnostics go to
stderr. It runs until killed.

Each connection is HTTP/2 or HTTP/1.1:

- With ``--tls-cert``/``--tls-key`` it serves TLS and offers the ALPN
  protocols of ``--alpn`` (default ``h2``): ``h2`` negotiated means HTTP/2;
  ``http/1.1`` or no ALPN means HTTP/1.1.
- Cleartext: a connection that starts with the HTTP/2 connection preface
  (``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n``) is HTTP/2 with prior
  knowledge (h2c, RFC 9113 section 3.3); anything else is HTTP/1.1.

HTTP/2: its SETTINGS carry SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 (RFC 8441
section 3) unless ``--no-connect-protocol`` (then a request with
``:protocol`` is malformed, RFC 8441 section 5: RST_STREAM PROTOCOL_ERROR).
A request with ``:method CONNECT`` and ``:protocol websocket`` opens a
WebSocket session on its stream: ``:status 200`` (no END_STREAM), then the
stream's DATA carries WebSocket frames both ways. Any other request gets
400 (501 for a CONNECT with ``:path`` but without ``:protocol websocket``)
and END_STREAM; a plain CONNECT (no ``:scheme``/``:path``) is a connection
error for ``h2`` (GOAWAY PROTOCOL_ERROR).
Flow control both ways: received DATA is acknowledged (WINDOW_UPDATE) only
once handled, and not while more than ``ACK_HIGH_WATER`` bytes of this
stream's output wait for the peer's window, so a slow reader of the echo
holds back the writer; DATA is sent within the stream and connection
windows and the peer's frame size, the rest queued until WINDOW_UPDATE.
The client's END_STREAM is the end of its WebSocket input (like a TCP FIN):
the origin finishes what it queued and ends its side of the stream. Once
the closing handshake is done (both close frames) the origin ends its side
of the stream (END_STREAM). A RST_STREAM from the client, or the connection
dropping, ends the session abruptly (close code 1006).

HTTP/1.1 (the relay's fallback when it negotiated no HTTP/2): an RFC 6455
Upgrade handshake (``websockets.server.ServerProtocol``), then the same.

Options change how it answers the handshake:

- ``--subprotocol P`` (repeatable): the subprotocols it supports; it picks
  the first of them the client offered (``sec-websocket-protocol``), and
  goes on without one when the client offered none of them.
- ``--refuse STATUS``: refuses every WebSocket request with that HTTP
  status and a short text body (END_STREAM on HTTP/2), e.g. 403.
- ``--close CODE [--close-reason TEXT]``: closes every session right after
  it opens with that close code and reason.
- ``--max-size N``: the largest message accepted (default 64 MiB; larger
  ones fail the session with close code 1009).

It echoes every message as it came (text stays text, binary stays binary;
a fragmented message is reassembled and echoed as one frame). Pings are
answered with pongs. It records what each request looked like upstream (the
relay's side of the story). Special text messages ask for it instead of
being echoed:

- ``headers?``: a JSON text message ``{"path": ..., "headers": {...},
  "http": "h2" | "http/1.1"}`` with the request's path and header fields
  (names lower-cased, repeated fields joined with ", "), as this origin
  received them; on HTTP/2 they include the pseudo-header fields
  (``:method``, ``:protocol``, ``:scheme``, ``:authority``, ``:path``).
- ``record?TAG``: a JSON text message with the record of the session whose
  request path carried the query ``tag=TAG`` (``{"found": false}`` when
  there was none): ``{"found": true, "path", "headers", "http", "opened",
  "closed", "close_code", "close_reason", "reset", "messages", "bytes"}``.
  ``close_code``/``close_reason`` are what the client side sent in its close
  frame (1006 and "" when it sent none: an abrupt end); ``closed`` turns
  true when the session ended: the closing handshake done (recorded as soon
  as the client's close frame arrives after ours, or ours answers it), the
  input ended, the stream reset or the connection gone. ``reset`` is true
  when the session ended by RST_STREAM (from either side; a RST_STREAM
  after a completed closing handshake changes nothing) or, on HTTP/1.1, by
  the origin aborting the connection (``reset?``). ``messages`` and
  ``bytes`` count what the client sent, special messages included (bytes of
  binary messages, characters of text messages, as ws_origin.py counts).
  At most ``MAX_RECORDS`` tags are kept.
- ``close?CODE REASON``: the origin closes this session with that code and
  reason; if the client does not answer with its close frame within 10 s,
  the origin resets the stream (aborts the connection on HTTP/1.1).
- ``reset?``: the origin resets this session: RST_STREAM with error code
  CANCEL (0x8) on HTTP/2; on HTTP/1.1 it aborts the TCP connection.

Usage::

    ws_h2_origin.py [--host 127.0.0.1] [--port 0] [--subprotocol chat.v1]
                    [--refuse 403] [--close 4000 --close-reason bye]
                    [--tls-cert cert.pem --tls-key key.pem] [--alpn h2,http/1.1]
                    [--no-connect-protocol] [--max-size 67108864]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import ssl
import sys
import urllib.parse

import h2.config
import h2.errors
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from websockets.exceptions import InvalidHeader
from websockets.frames import BINARY, CONT, TEXT
from websockets.headers import parse_subprotocol
from websockets.http11 import Request
from websockets.protocol import SEND_EOF, Protocol, Side, State
from websockets.server import ServerProtocol

# Records by tag (the `tag` query parameter of the request path); bounded
# so a long run cannot grow it without end.
MAX_RECORDS = 10_000
RECORDS: dict[str, dict] = {}

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# The receive windows it advertises: per stream (SETTINGS_INITIAL_WINDOW_SIZE)
# and for the connection (a WINDOW_UPDATE on stream 0 at the start).
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
# Received DATA stays unacknowledged while more than this many bytes of the
# stream's output wait for the peer's flow-control window.
ACK_HIGH_WATER = 1 << 20
# How long to wait for the client's close frame after sending ours.
CLOSE_TIMEOUT = 10.0
READ_SIZE = 1 << 16


def log(message: str) -> None:
    print(f"ws_h2_origin: {message}", file=sys.stderr, flush=True)


def join_fields(fields) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def tag_of(path: str) -> str | None:
    query = urllib.parse.urlsplit(path).query
    tags = urllib.parse.parse_qs(query).get("tag")
    return tags[0] if tags else None


def new_record(path: str, headers: dict[str, str], http: str) -> dict:
    record = {
        "path": path,
        "headers": headers,
        "http": http,
        "opened": False,
        "closed": False,
        "close_code": None,
        "close_reason": None,
        "reset": False,
        "messages": 0,
        "bytes": 0,
    }
    tag = tag_of(path)
    if tag is not None and (tag in RECORDS or len(RECORDS) < MAX_RECORDS):
        RECORDS[tag] = record
    return record


def pick_subprotocol(args: argparse.Namespace, offered) -> str | None:
    for mine in args.subprotocol:
        if mine in offered:
            return mine
    return None


class Session:
    """One WebSocket session: the frame protocol, the record and the
    message semantics; the HTTP/2 and HTTP/1.1 transports subclass it."""

    def __init__(self, ws: Protocol, record: dict, args: argparse.Namespace) -> None:
        self.ws = ws
        self.record = record
        self.args = args
        self.fragments: list[bytes] = []
        self.opcode = None
        self.finished = False
        self.close_timer: asyncio.TimerHandle | None = None

    # Transport hooks.
    def out_data(self, data: bytes) -> None:
        raise NotImplementedError

    def out_eof(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def kick(self) -> None:
        """Push what is queued to the network (outside the read loop)."""
        raise NotImplementedError

    def opened(self) -> None:
        self.record["opened"] = True
        if self.args.close is not None:
            self.send_close(self.args.close, self.args.close_reason)
        self.pump()

    def finish(self, code: int | None = None, reason: str | None = None, reset: bool = False) -> None:
        """Record the end of the session (once)."""
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        if self.finished:
            return
        self.finished = True
        rcvd = self.ws.close_rcvd
        if code is None:
            code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (1006, "")
        self.record["closed"] = True
        self.record["close_code"] = code
        self.record["close_reason"] = reason
        self.record["reset"] = reset

    def pump(self) -> None:
        """Hand the frame protocol's output to the transport."""
        for data in self.ws.data_to_send():
            if data == SEND_EOF:
                # The closing handshake is done or the session failed.
                self.finish()
                self.out_eof()
            else:
                self.out_data(data)

    def receive(self, data: bytes) -> None:
        self.ws.receive_data(data)
        self.handle(self.ws.events_received())

    def receive_eof(self) -> None:
        self.ws.receive_eof()
        self.handle(self.ws.events_received())

    def handle(self, events) -> None:
        for frame in events:
            if isinstance(frame, Request):
                continue
            if frame.opcode is TEXT or frame.opcode is BINARY:
                self.opcode, self.fragments = frame.opcode, [frame.data]
            elif frame.opcode is CONT:
                self.fragments.append(frame.data)
            else:
                continue  # ping (answered by the protocol), pong, close
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), []
                self.message(self.opcode, data)
                if self.finished:
                    break  # reset? (or a close timeout): nothing more to answer
        self.pump()

    def send_close(self, code: int, reason: str) -> None:
        if self.ws.state is not State.OPEN:
            return
        try:
            self.ws.send_close(code, reason)
        except Exception as exc:  # an invalid code, e.g. 1005
            log(f"cannot close with {code} {reason!r}: {exc}")
            self.ws.send_close(1011, "bad close request")
        self.close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.close_timed_out)

    def close_timed_out(self) -> None:
        self.close_timer = None
        if not self.finished:
            log("no close frame from the client in time; resetting")
            self.reset()
            self.kick()

    def message(self, opcode, data: bytes) -> None:
        text = None
        if opcode is TEXT:
            try:
                text = data.decode()
            except UnicodeDecodeError as exc:
                self.ws.fail(1007, f"{exc.reason} at position {exc.start}")
                return
        self.record["messages"] += 1
        self.record["bytes"] += len(text) if text is not None else len(data)
        if self.ws.state is not State.OPEN:
            return  # we sent our close frame: no more answers
        if text == "headers?":
            self.ws.send_text(json.dumps({
                "path": self.record["path"],
                "headers": self.record["headers"],
                "http": self.record["http"],
            }).encode())
        elif text is not None and text.startswith("record?"):
            found = RECORDS.get(text[len("record?"):])
            self.ws.send_text(json.dumps({"found": True, **found} if found else {"found": False}).encode())
        elif text is not None and text.startswith("close?"):
            code, _, reason = text[len("close?"):].partition(" ")
            try:
                number = int(code)
            except ValueError:
                number = 1011
            self.send_close(number, reason)
        elif text == "reset?":
            self.reset()
        elif opcode is TEXT:
            self.ws.send_text(data)
        else:
            self.ws.send_binary(data)


# HTTP/2 ------------------------------------------------------------------

class H2Session(Session):
    def __init__(self, conn: H2Conn, stream_id: int, record: dict, args: argparse.Namespace) -> None:
        super().__init__(Protocol(Side.SERVER, state=State.OPEN, max_size=args.max_size), record, args)
        self.conn = conn
        self.stream_id = stream_id
        self.out: collections.deque[memoryview] = collections.deque()
        self.out_bytes = 0
        self.end_pending = False
        self.local_ended = False
        self.remote_ended = False
        self.unacked = 0
        self.gone = False

    def out_data(self, data: bytes) -> None:
        if data:
            self.out.append(memoryview(data))
            self.out_bytes += len(data)

    def out_eof(self) -> None:
        self.end_pending = True

    def kick(self) -> None:
        self.conn.flush()

    def data(self, data: bytes, flow_controlled_length: int) -> None:
        if not self.remote_ended and not self.gone:
            self.receive(data)
        self.unacked += flow_controlled_length

    def input_ended(self) -> None:
        if not self.remote_ended:
            self.remote_ended = True
            if not self.gone:
                self.receive_eof()
        self.maybe_done()

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """The origin resets the stream (reset? or a close timeout)."""
        if self.gone:
            return
        try:
            self.conn.h2.reset_stream(self.stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass
        self.finish(1006, "", reset=True)
        self.drop()

    def peer_reset(self) -> None:
        self.finish(1006, "", reset=True)
        self.drop()

    def connection_lost(self) -> None:
        self.finish(1006, "")
        self.drop()

    def drop(self) -> None:
        if self.gone:
            return
        self.gone = True
        self.out.clear()
        self.out_bytes = 0
        if self.unacked:
            # Give the connection window back (the stream is closed).
            try:
                self.conn.h2.acknowledge_received_data(self.unacked, self.stream_id)
            except Exception:
                pass
            self.unacked = 0
        self.conn.sessions.pop(self.stream_id, None)

    def maybe_done(self) -> None:
        if self.local_ended and self.remote_ended:
            self.drop()

    def flush(self) -> None:
        if self.gone:
            return
        h2c = self.conn.h2
        try:
            while self.out:
                room = min(h2c.local_flow_control_window(self.stream_id), h2c.max_outbound_frame_size)
                if room <= 0:
                    break
                head = self.out[0]
                n = min(room, len(head))
                h2c.send_data(self.stream_id, bytes(head[:n]))
                if n == len(head):
                    self.out.popleft()
                else:
                    self.out[0] = head[n:]
                self.out_bytes -= n
            if not self.out and self.end_pending and not self.local_ended:
                h2c.end_stream(self.stream_id)
                self.local_ended = True
            if self.unacked and self.out_bytes <= ACK_HIGH_WATER:
                h2c.acknowledge_received_data(self.unacked, self.stream_id)
                self.unacked = 0
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log(f"stream {self.stream_id}: {exc!r}")
            self.finish(1006, "")
            self.drop()
            return
        self.maybe_done()


class H2Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: argparse.Namespace) -> None:
        self.reader = reader
        self.writer = writer
        self.args = args
        self.sessions: dict[int, H2Session] = {}
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        settings = {
            SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.h2.DEFAULT_MAX_HEADER_LIST_SIZE,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        }
        if not args.no_connect_protocol:
            settings[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        if args.no_connect_protocol:
            # h2 sends every known setting; leave this one out altogether.
            del self.h2.local_settings[SettingCodes.ENABLE_CONNECT_PROTOCOL]

    def write(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def flush(self) -> None:
        for session in list(self.sessions.values()):
            session.flush()
        self.write()

    async def run(self, first: bytes) -> None:
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self.write()
        data = first
        try:
            while True:
                if data:
                    try:
                        events = self.h2.receive_data(data)
                    except h2.exceptions.ProtocolError as exc:
                        log(f"HTTP/2 connection error: {exc!r}")
                        self.write()  # the GOAWAY
                        break
                    for event in events:
                        self.event(event)
                self.flush()
                await self.writer.drain()
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            # A peer that closes after the sessions ended may reset a
            # connection with bytes in flight: only a loss that cut a
            # session short is worth a line.
            if any(not x.record["closed"] for x in self.sessions.values()):
                log(f"HTTP/2 connection lost: {exc!r}")
        finally:
            for session in list(self.sessions.values()):
                session.connection_lost()
            self.writer.close()

    def event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.request(event)
        elif isinstance(event, h2.events.DataReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session.data(event.data, event.flow_controlled_length)
            else:
                try:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                except Exception:
                    pass
            # With END_STREAM, a StreamEnded event follows in the same list.
        elif isinstance(event, h2.events.StreamEnded):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session.input_ended()
        elif isinstance(event, h2.events.StreamReset):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session.peer_reset()
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code != h2.errors.ErrorCodes.NO_ERROR:
                log(f"GOAWAY from the client: {event.error_code!r}")
        # WindowUpdated, RemoteSettingsChanged: flush() runs after every batch.

    def respond(self, stream_id: int, status: int, text: str) -> None:
        body = text.encode()
        self.h2.send_headers(stream_id, [
            (":status", str(status)),
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            ("server", "ws_h2_origin.py"),
        ])
        self.h2.send_data(stream_id, body, end_stream=True)

    def request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        fields = [
            (bytes(n).decode("utf-8", "backslashreplace"), bytes(v).decode("utf-8", "backslashreplace"))
            for n, v in event.headers
        ]
        headers = join_fields(fields)
        method = headers.get(":method")
        protocol = headers.get(":protocol")
        if protocol is not None and self.args.no_connect_protocol:
            # RFC 8441 section 5: malformed without the setting.
            self.h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        if method != "CONNECT":
            self.respond(sid, 400, "this origin serves WebSocket over extended CONNECT only\n")
            return
        if protocol is None or protocol.lower() != "websocket":
            self.respond(sid, 501, f"unsupported CONNECT (:protocol {protocol})\n")
            return
        path = headers.get(":path", "")
        record = new_record(path, headers, "h2")
        if self.args.refuse is not None:
            self.respond(sid, self.args.refuse, f"refused with {self.args.refuse}\n")
            return
        offered: list[str] = []
        if "sec-websocket-protocol" in headers:
            try:
                offered = parse_subprotocol(headers["sec-websocket-protocol"])
            except InvalidHeader:
                offered = []
        chosen = pick_subprotocol(self.args, offered)
        response = [(":status", "200"), ("server", "ws_h2_origin.py")]
        if chosen is not None:
            response.append(("sec-websocket-protocol", chosen))
        self.h2.send_headers(sid, response)
        session = H2Session(self, sid, record, self.args)
        self.sessions[sid] = session
        session.opened()


# HTTP/1.1 ----------------------------------------------------------------

class H1Session(Session):
    def __init__(self, ws: ServerProtocol, writer: asyncio.StreamWriter, record: dict, args: argparse.Namespace) -> None:
        super().__init__(ws, record, args)
        self.writer = writer

    def out_data(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def out_eof(self) -> None:
        pass  # serve_h1 half-closes when it sees the protocol's EOF

    def kick(self) -> None:
        pass

    def reset(self) -> None:
        self.finish(1006, "", reset=True)
        self.writer.transport.abort()


async def serve_h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes, args: argparse.Namespace) -> None:
    ws = ServerProtocol(
        select_subprotocol=lambda _, offered: pick_subprotocol(args, offered),
        max_size=args.max_size,
    )
    session: H1Session | None = None
    eof_sent = False

    def write_out() -> None:
        nonlocal eof_sent
        for data in ws.data_to_send():
            if data == SEND_EOF:
                eof_sent = True
                if session is not None:
                    session.finish()
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()  # TLS: no half-close; close after the buffer
            elif not writer.is_closing():
                writer.write(data)

    try:
        data = first or await reader.read(READ_SIZE)
        while True:
            if data:
                ws.receive_data(data)
            else:
                ws.receive_eof()
            events = ws.events_received()
            if events and isinstance(events[0], Request):
                request = events.pop(0)
                record = new_record(request.path, join_fields(request.headers.raw_items()), "http/1.1")
                if args.refuse is not None:
                    response = ws.reject(args.refuse, f"refused with {args.refuse}\n")
                else:
                    response = ws.accept(request)
                response.headers["Server"] = "ws_h2_origin.py"
                ws.send_response(response)
                if response.status_code == 101:
                    session = H1Session(ws, writer, record, args)
                    write_out()
                    session.opened()
            if session is not None:
                session.handle(events)
                if session.record["reset"] and session.finished and writer.transport.is_closing():
                    break
            write_out()
            if not data or writer.transport.is_closing():
                break
            await writer.drain()
            timeout = CLOSE_TIMEOUT if eof_sent else None
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
            except asyncio.TimeoutError:
                break
    except (ConnectionError, ssl.SSLError, OSError) as exc:
        log(f"HTTP/1.1 connection lost: {exc!r}")
    finally:
        if session is not None:
            session.finish()
        writer.close()


# Server ------------------------------------------------------------------

async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: argparse.Namespace) -> None:
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        first = b""
        if ssl_object is not None:
            is_h2 = ssl_object.selected_alpn_protocol() == "h2"
        else:
            # Cleartext: HTTP/2 with prior knowledge starts with the preface.
            while len(first) < len(PREFACE) and PREFACE.startswith(first):
                chunk = await reader.read(len(PREFACE) - len(first))
                if not chunk:
                    writer.close()
                    return
                first += chunk
            is_h2 = first.startswith(PREFACE)
        if is_h2:
            await H2Conn(reader, writer, args).run(first)
        else:
            await serve_h1(reader, writer, first, args)
    except Exception as exc:  # never let one connection take the server down
        log(f"connection failed: {exc!r}")
        writer.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--subprotocol", action="append", default=[], help="a subprotocol it supports")
    p.add_argument("--refuse", type=int, help="refuse every WebSocket request with this HTTP status")
    p.add_argument("--close", type=int, help="close right after the session opens with this code")
    p.add_argument("--close-reason", default="")
    p.add_argument("--max-size", type=int, default=64 << 20, help="largest message accepted")
    p.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--alpn", default="h2", help="ALPN protocols offered with TLS, comma-separated")
    p.add_argument("--no-connect-protocol", action="store_true",
                   help="do not send SETTINGS_ENABLE_CONNECT_PROTOCOL (HTTP/2)")
    args = p.parse_args()
    return asyncio.run(serve_forever(args))


async def serve_forever(args: argparse.Namespace) -> int:
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
        tls.set_alpn_protocols([p.strip() for p in args.alpn.split(",") if p.strip()])
    server = await asyncio.start_server(
        lambda r, w: handle_connection(r, w, args), args.host, args.port, ssl=tls,
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await asyncio.get_running_loop().create_future()
    return 0


if __name__ == "__main__":
    sys.exit(main())
