#!/usr/bin/env python3
"""An independent MASQUE connect-udp client on aioquic, for the interop suite.

The relay's own tests use a quiche client; this one shares no code with the
relay (aioquic's QUIC, TLS, QPACK and HTTP/3 framing), and it drives
aioquic's low-level ``QuicConnection`` / ``H3Connection`` directly so it can
also send what a well-behaved client never would: header sections with
chosen (pseudo-)fields, uppercase names, HTTP/3 datagrams with a chosen
quarter stream ID and context ID, DATAGRAM capsules, oversize or truncated
capsules, requests after GOAWAY, partial HEADERS frames.

Usage::

    masque_client.py --relay 127.0.0.1:4433 --ca cert.pem --token T \
        --echo-port 7777 CASE [CASE ...]

Each case runs on its own QUIC connection and prints one JSON object on one
line: ``{"case": NAME, ...}`` with what the relay answered (``answer``:
``response`` with ``status`` and ``headers``, or ``reset`` with ``code``),
what came back through the tunnel, and how the connection ended
(``conn_error``: the relay's CONNECTION_CLOSE error code, if any). The Rust
tests in bench/tests/interop.rs and abuse.rs assert on these objects. A case
that cannot run at all prints ``{"case": NAME, "error": "..."}``; the exit
status is 0 unless the arguments are wrong.

Everything is bounded: every wait has a deadline (``--timeout``), every loop
a count.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from typing import Callable

from aioquic.buffer import Buffer, BufferReadError, encode_uint_var
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, Setting, encode_frame
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)

TEMPLATE = "/.well-known/masque/udp/{host}/{port}/"
CAPSULE_DATAGRAM = 0x00
# HTTP/3 frame type of GOAWAY (RFC 9114 section 7.2.6).
FRAME_GOAWAY = 0x07


class ClientError(Exception):
    """A case could not run (no handshake, timeout before any answer)."""


class MasqueH3(H3Connection):
    """aioquic's H3Connection, plus SETTINGS_H3_DATAGRAM=1 (RFC 9297 section
    2.1.1) when datagrams are on: aioquic only sends it for WebTransport."""

    def __init__(self, quic: QuicConnection, h3_datagrams: bool) -> None:
        self._masque_datagrams = h3_datagrams
        super().__init__(quic)

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        if self._masque_datagrams:
            settings[Setting.H3_DATAGRAM] = 1
        return settings


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    """A capsule: Type (i), Length (i), Value (RFC 9297 section 3.2)."""
    return encode_uint_var(capsule_type) + encode_uint_var(len(value)) + value


class StreamState:
    """What the relay sent on one request stream."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] | None = None
        self.reset_code: int | None = None
        self.stop_sending_code: int | None = None
        self.fin = False
        self.capsule_buf = b""
        self.capsules: list[tuple[int, bytes]] = []
        self.datagrams: list[tuple[int, bytes]] = []


class Client:
    """One QUIC + HTTP/3 connection to the relay, driven by hand."""

    def __init__(
        self,
        relay: tuple[str, int],
        ca: str,
        token: str,
        timeout: float,
        h3_datagrams: bool = True,
        handshake: bool = True,
        on_handshake: Callable[["Client"], None] | None = None,
    ) -> None:
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            server_name="localhost",
            max_datagram_frame_size=65536 if h3_datagrams else None,
            idle_timeout=30.0,
            # QUIC packets as large as the relay's (1350 bytes), so a
            # 1200-byte payload fits one DATAGRAM frame.
            max_datagram_size=1350,
        )
        config.load_verify_locations(ca)
        self.relay = relay
        self.token = token
        self.timeout = timeout
        self.quic = QuicConnection(configuration=config)
        self.h3 = MasqueH3(self.quic, h3_datagrams)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.connect(relay)
        self.sock.setblocking(False)
        self.streams: dict[int, StreamState] = {}
        self.conn_error: int | None = None
        self.conn_reason: str | None = None
        self.conn_frame_type: int | None = None
        self.handshake_done = False
        self.goaway_id: int | None = None
        self.unknown_datagrams = 0
        # Called once, on HandshakeCompleted, before any event that came
        # with it reaches the HTTP/3 layer (the relay's SETTINGS among them).
        self.on_handshake = on_handshake
        self.quic.connect(relay, now=time.monotonic())
        self.flush()
        if handshake:
            self.wait("handshake", lambda: self.handshake_done)

    # -- transport -----------------------------------------------------

    def flush(self) -> None:
        for data, _addr in self.quic.datagrams_to_send(now=time.monotonic()):
            try:
                self.sock.send(data)
            except BlockingIOError:
                pass  # loopback buffer full: QUIC recovers the loss

    def pump(self, wait: float) -> None:
        """Waits up to `wait` seconds for packets, then processes everything
        that arrived and whatever timer expired."""
        timer = self.quic.get_timer()
        now = time.monotonic()
        if timer is not None:
            wait = max(0.0, min(wait, timer - now))
        readable, _, _ = select.select([self.sock], [], [], wait)
        if readable:
            for _ in range(1000):
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    break
                self.quic.receive_datagram(data, self.relay, now=time.monotonic())
        timer = self.quic.get_timer()
        if timer is not None and time.monotonic() >= timer:
            self.quic.handle_timer(now=time.monotonic())
        self.process_events()
        self.flush()

    def process_events(self) -> None:
        while True:
            event = self.quic.next_event()
            if event is None:
                return
            self.on_quic_event(event)

    def on_quic_event(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.handshake_done = True
            if self.on_handshake is not None:
                hook, self.on_handshake = self.on_handshake, None
                hook(self)
        elif isinstance(event, ConnectionTerminated):
            self.conn_error = event.error_code
            self.conn_reason = event.reason_phrase
            self.conn_frame_type = event.frame_type
        elif isinstance(event, StreamReset):
            self.stream(event.stream_id).reset_code = event.error_code
        elif isinstance(event, StopSendingReceived):
            self.stream(event.stream_id).stop_sending_code = event.error_code
        elif isinstance(event, StreamDataReceived) and event.stream_id == self.h3._peer_control_stream_id:
            self.scan_control_stream(event.data)
        elif isinstance(event, DatagramFrameReceived):
            self.on_datagram(event.data)
            return
        for h3_event in self.h3.handle_event(event):
            self.on_h3_event(h3_event)

    def scan_control_stream(self, data: bytes) -> None:
        """Notes a GOAWAY on the relay's control stream (aioquic accepts it
        without reporting it). Frames on the control stream after SETTINGS
        are small, and GOAWAY arrives in one STREAM frame here."""
        buf = Buffer(data=data)
        try:
            while not buf.eof():
                frame_type = buf.pull_uint_var()
                length = buf.pull_uint_var()
                body = buf.pull_bytes(length)
                if frame_type == FRAME_GOAWAY:
                    self.goaway_id = Buffer(data=body).pull_uint_var()
        except BufferReadError:
            pass  # the stream type byte or a frame split across packets

    def on_datagram(self, data: bytes) -> None:
        buf = Buffer(data=data)
        try:
            quarter = buf.pull_uint_var()
            context = buf.pull_uint_var()
        except BufferReadError:
            self.unknown_datagrams += 1
            return
        stream = self.streams.get(quarter * 4)
        if stream is None:
            self.unknown_datagrams += 1
            return
        stream.datagrams.append((context, data[buf.tell():]))

    def on_h3_event(self, event: object) -> None:
        from aioquic.h3.events import DataReceived, HeadersReceived

        if isinstance(event, HeadersReceived):
            st = self.stream(event.stream_id)
            st.headers = [(k.decode(), v.decode()) for k, v in event.headers]
            st.fin |= event.stream_ended
        elif isinstance(event, DataReceived):
            st = self.stream(event.stream_id)
            st.capsule_buf += event.data
            st.fin |= event.stream_ended
            self.decode_capsules(st)

    @staticmethod
    def decode_capsules(st: StreamState) -> None:
        while st.capsule_buf:
            buf = Buffer(data=st.capsule_buf)
            try:
                capsule_type = buf.pull_uint_var()
                length = buf.pull_uint_var()
                value = buf.pull_bytes(length)
            except BufferReadError:
                return
            st.capsules.append((capsule_type, value))
            st.capsule_buf = st.capsule_buf[buf.tell():]

    def stream(self, stream_id: int) -> StreamState:
        return self.streams.setdefault(stream_id, StreamState())

    def wait(self, what: str, cond: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not cond():
            if self.conn_error is not None and what != "connection close":
                raise ClientError(
                    f"connection closed while waiting for {what}: code {self.conn_error:#x} {self.conn_reason!r}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(f"timed out waiting for {what}")
            self.pump(min(remaining, 0.05))

    def linger(self, seconds: float) -> None:
        """Keeps the connection moving for `seconds` (bounded)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.conn_error is None:
            self.pump(min(0.02, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        if self.conn_error is None:
            self.quic.close(error_code=0x100)
            self.flush()
        self.sock.close()

    # -- HTTP/3 --------------------------------------------------------

    def connect_udp_headers(self, host: str, port: str | int) -> list[tuple[bytes, bytes]]:
        return [
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-udp"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", TEMPLATE.format(host=host, port=port).encode()),
            (b"capsule-protocol", b"?1"),
            (b"proxy-authorization", f"Bearer {self.token}".encode()),
        ]

    def send_request(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> int:
        """Sends `headers` exactly as given (aioquic validates nothing it
        sends) on a new request stream."""
        stream_id = self.quic.get_next_available_stream_id()
        self.stream(stream_id)
        self.h3.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream_id

    def answer(self, stream_id: int) -> dict:
        """Waits for a response or a reset on `stream_id`."""
        st = self.stream(stream_id)
        self.wait(f"an answer on stream {stream_id}", lambda: st.headers is not None or st.reset_code is not None)
        if st.headers is not None:
            status = int(dict(st.headers).get(":status", "0"))
            return {"answer": "response", "status": status, "headers": dict(st.headers)}
        return {"answer": "reset", "code": st.reset_code}

    def open_tunnel(self, port: int) -> int:
        stream_id = self.send_request(self.connect_udp_headers("127.0.0.1", port))
        ans = self.answer(stream_id)
        if ans.get("status") != 200:
            raise ClientError(f"tunnel refused: {ans}")
        return stream_id

    def send_h3_datagram(self, stream_id: int, payload: bytes, context: int = 0) -> None:
        self.quic.send_datagram_frame(encode_uint_var(stream_id // 4) + encode_uint_var(context) + payload)

    def send_raw_stream(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.quic.send_stream_data(stream_id, data, end_stream)
        self.flush()


# -- cases ----------------------------------------------------------------


def payloads(count: int) -> list[bytes]:
    """Distinct payloads of varied sizes, each one tagged with its index."""
    sizes = [1, 7, 64, 300, 1000, 1200]
    return [i.to_bytes(4, "big") + os.urandom(max(0, sizes[i % len(sizes)] - 4)) for i in range(count)]


def echo_check(sent: list[bytes], got: list[bytes]) -> dict:
    want = {p[:4]: p for p in sent}
    ok = sum(1 for g in got if len(g) >= 4 and want.get(g[:4]) == g)
    return {"sent": len(sent), "received": len(got), "matched": ok, "mismatched": len(got) - ok}


def case_datagrams_both_ways(args: argparse.Namespace) -> dict:
    c = Client(args.relay, args.ca, args.token, args.timeout)
    s = c.open_tunnel(args.echo_port)
    ans = c.answer(s)
    sent = payloads(args.count)
    for i, p in enumerate(sent):
        c.send_h3_datagram(s, p)
        if i % 16 == 15:
            c.flush()
            c.pump(0.002)
    c.flush()
    st = c.stream(s)
    try:
        c.wait("echoes", lambda: len(st.datagrams) >= len(sent))
    except ClientError:
        pass
    got = [p for ctx, p in st.datagrams if ctx == 0]
    res = {"status": ans["status"], "capsule_protocol": ans["headers"].get("capsule-protocol")}
    res.update(echo_check(sent, got))
    res["other_contexts"] = sum(1 for ctx, _ in st.datagrams if ctx != 0)
    res["capsules_down"] = len(st.capsules)
    c.close()
    return res


def case_capsules_both_ways(args: argparse.Namespace) -> dict:
    # No SETTINGS_H3_DATAGRAM and no max_datagram_frame_size: the relay
    # must answer with DATAGRAM capsules (RFC 9297 section 2.1.1).
    c = Client(args.relay, args.ca, args.token, args.timeout, h3_datagrams=False)
    c.wait("the relay's SETTINGS", lambda: c.h3.received_settings is not None)
    s = c.open_tunnel(args.echo_port)
    sent = payloads(args.count)
    # Several capsules per DATA frame, and one capsule split over two frames.
    blob = b"".join(encode_capsule(CAPSULE_DATAGRAM, b"\x00" + p) for p in sent)
    cut = len(blob) // 2 + 1
    c.h3.send_data(s, blob[:cut], end_stream=False)
    c.flush()
    c.h3.send_data(s, blob[cut:], end_stream=False)
    c.flush()
    st = c.stream(s)
    try:
        c.wait("echoed capsules", lambda: len(st.capsules) >= len(sent))
    except ClientError:
        pass
    got = [v[1:] for t, v in st.capsules if t == CAPSULE_DATAGRAM and v[:1] == b"\x00"]
    res = echo_check(sent, got)
    res["h3_datagrams_down"] = len(st.datagrams)
    res["relay_h3_datagram_setting"] = (c.h3.received_settings or {}).get(Setting.H3_DATAGRAM)
    c.close()
    return res


def refusal(edit: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]) -> Callable:
    """A case that sends a connect-udp request changed by `edit` and reports
    the relay's answer and that the connection survived it."""

    def run(args: argparse.Namespace) -> dict:
        c = Client(args.relay, args.ca, args.token, args.timeout)
        c.wait("the relay's SETTINGS", lambda: c.h3.received_settings is not None)
        headers = edit(c.connect_udp_headers("127.0.0.1", 9))
        s = c.send_request(headers)
        res = c.answer(s)
        res["stop_sending"] = c.stream(s).stop_sending_code
        # The refusal is a stream-level answer: the connection still serves.
        try:
            t = c.open_tunnel(args.echo_port)
            c.send_h3_datagram(t, b"still alive")
            c.flush()
            c.wait("an echo", lambda: len(c.stream(t).datagrams) > 0)
            res["connection_ok"] = c.stream(t).datagrams[0] == (0, b"still alive")
        except ClientError as e:
            res["connection_ok"] = False
            res["after"] = str(e)
        res["conn_error"] = c.conn_error
        c.close()
        return res

    return run


def without(name: bytes) -> Callable:
    return lambda h: [(k, v) for k, v in h if k != name]


def replace(name: bytes, value: bytes) -> Callable:
    return lambda h: [(k, value if k == name else v) for k, v in h]


def case_protocol_before_settings(args: argparse.Namespace) -> dict:
    """Sends the extended CONNECT the moment the handshake completes, before
    the HTTP/3 layer has seen anything from the relay (its SETTINGS among
    it). The relay sent SETTINGS_ENABLE_CONNECT_PROTOCOL=1 on its control
    stream at the start: RFC 8441 section 3 (RFC 9220 section 3) only makes
    such a request malformed for a peer that does not support extended
    CONNECT, and a server cannot tell whether its SETTINGS arrived first."""
    state: dict = {}

    def send_now(c: Client) -> None:
        state["settings_seen_when_sent"] = c.h3.received_settings is not None
        state["stream"] = c.send_request(c.connect_udp_headers("127.0.0.1", args.echo_port))

    c = Client(args.relay, args.ca, args.token, args.timeout, on_handshake=send_now)
    s = state["stream"]
    res = c.answer(s)
    res["settings_seen_when_sent"] = state["settings_seen_when_sent"]
    res["relay_enable_connect_protocol"] = (c.h3.received_settings or {}).get(Setting.ENABLE_CONNECT_PROTOCOL)
    if res.get("status") == 200:
        c.send_h3_datagram(s, b"tunnel works")
        c.flush()
        c.wait("an echo", lambda: len(c.stream(s).datagrams) > 0)
        res["echo"] = c.stream(s).datagrams[0][1].decode()
    c.close()
    return res


def case_unknown_context(args: argparse.Namespace) -> dict:
    """Datagrams with context IDs the relay never registered, one for a
    stream that is no tunnel, and a DATAGRAM capsule with an unknown context;
    then a context-0 payload, which must be the only thing echoed."""
    c = Client(args.relay, args.ca, args.token, args.timeout)
    s = c.open_tunnel(args.echo_port)
    for ctx in (2, 4, 6, 0x3FFF):
        c.send_h3_datagram(s, b"not for the target", context=ctx)
    c.quic.send_datagram_frame(encode_uint_var(400 // 4) + b"\x00no such stream")
    c.h3.send_data(s, encode_capsule(CAPSULE_DATAGRAM, encode_uint_var(8) + b"capsule, unknown ctx"), False)
    c.flush()
    c.linger(0.2)
    c.send_h3_datagram(s, b"for the target")
    c.flush()
    st = c.stream(s)
    try:
        c.wait("the echo", lambda: len(st.datagrams) > 0)
        c.linger(0.3)
    except ClientError:
        pass
    res = {
        "echoed": [p.decode(errors="replace") for _, p in st.datagrams],
        "reset": st.reset_code,
        "conn_error": c.conn_error,
    }
    c.close()
    return res


def connection_error_case(frame: bytes) -> Callable:
    """A case that sends one malformed HTTP/3 datagram on an open tunnel and
    reports the relay's CONNECTION_CLOSE."""

    def run(args: argparse.Namespace) -> dict:
        c = Client(args.relay, args.ca, args.token, args.timeout)
        c.open_tunnel(args.echo_port)
        c.quic.send_datagram_frame(frame)
        c.flush()
        try:
            c.wait("connection close", lambda: c.conn_error is not None)
        except ClientError as e:
            return {"conn_error": None, "error": str(e)}
        # frame_type None: an application CONNECTION_CLOSE (0x1d).
        res = {"conn_error": c.conn_error, "application_close": c.conn_frame_type is None}
        c.sock.close()
        return res

    return run


def stream_abort_case(data: Callable[[], bytes], end_stream: bool) -> Callable:
    """A case that sends `data` in DATA frames on an open tunnel (optionally
    ending the stream) and reports how the relay ended the stream."""

    def run(args: argparse.Namespace) -> dict:
        c = Client(args.relay, args.ca, args.token, args.timeout)
        s = c.open_tunnel(args.echo_port)
        body = data()
        # DATA frames of at most 16 KiB, as a real client would write them.
        st = c.stream(s)
        for off in range(0, len(body), 16384):
            if st.reset_code is not None or st.stop_sending_code is not None:
                break  # the relay already aborted the stream
            last = off + 16384 >= len(body)
            c.h3.send_data(s, body[off:off + 16384], end_stream=end_stream and last)
            c.flush()
            c.pump(0.001)
        try:
            c.wait("the stream to be aborted", lambda: st.reset_code is not None)
        except ClientError as e:
            return {"reset": None, "error": str(e), "fin": st.fin}
        c.linger(0.1)
        res = {"reset": st.reset_code, "stop_sending": st.stop_sending_code, "conn_error": c.conn_error}
        # Another tunnel on the same connection still works.
        t = c.open_tunnel(args.echo_port)
        c.send_h3_datagram(t, b"next tunnel")
        c.flush()
        c.wait("an echo", lambda: len(c.stream(t).datagrams) > 0)
        res["next_tunnel_echo"] = c.stream(t).datagrams[0][1].decode()
        c.close()
        return res

    return run


def case_goaway(args: argparse.Namespace) -> dict:
    """Opens a tunnel, tells the driver (stdout line "ready"), waits for
    "go" on stdin (the driver makes the relay drain meanwhile), waits for
    GOAWAY, then ignores it: a new request must be rejected with
    H3_REQUEST_REJECTED (RFC 9114 section 5.2) while the open tunnel keeps
    forwarding."""
    c = Client(args.relay, args.ca, args.token, args.timeout)
    s = c.open_tunnel(args.echo_port)
    print(json.dumps({"ready": True}), flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        return {"error": f"driver said {line!r}"}
    c.wait("GOAWAY", lambda: c.goaway_id is not None)
    late = c.send_request(c.connect_udp_headers("127.0.0.1", args.echo_port))
    res = {"goaway_id": c.goaway_id, "late_stream": late, "tunnel_stream": s}
    res.update({"late_" + k: v for k, v in c.answer(late).items()})
    c.send_h3_datagram(s, b"after goaway")
    c.flush()
    c.wait("an echo", lambda: len(c.stream(s).datagrams) > 0)
    res["tunnel_echo"] = c.stream(s).datagrams[0][1].decode()
    c.close()
    return res


def case_slowloris(args: argparse.Namespace) -> dict:
    """Opens `--streams` request streams and sends each an incomplete
    HEADERS frame (the frame header announces more bytes than follow), then
    trickles one more byte per stream every 200 ms for `--hold` seconds so
    the connection never idles out. Reports how many streams the relay let
    it open and what the relay did to them."""
    c = Client(args.relay, args.ca, args.token, args.timeout)
    c.wait("the relay's SETTINGS", lambda: c.h3.received_settings is not None)
    announced = 8000
    opened = []
    for _ in range(args.streams):
        sid = c.quic.get_next_available_stream_id()
        try:
            c.quic.send_stream_data(sid, encode_uint_var(FrameType.HEADERS) + encode_uint_var(announced) + b"\x00\x00")
        except Exception as e:  # aioquic refuses past the peer's stream limit
            c.stream(sid)  # noqa: keep the count honest
            return {"error": f"cannot open stream {sid}: {e!r}"}
        c.stream(sid)
        opened.append(sid)
    c.flush()
    # The relay's MAX_STREAMS: how many of them it lets in.
    deadline = time.monotonic() + args.hold
    while time.monotonic() < deadline and c.conn_error is None:
        for sid in opened:
            st = c.streams[sid]
            if st.reset_code is None and st.stop_sending_code is None:
                try:
                    c.quic.send_stream_data(sid, b"\x00")
                except Exception:
                    pass
        c.flush()
        c.linger(0.2)
    res = {
        "streams": len(opened),
        "peer_max_streams_bidi": c.quic._remote_max_streams_bidi,
        "reset": sum(1 for sid in opened if c.streams[sid].reset_code is not None),
        "stop_sending": sum(1 for sid in opened if c.streams[sid].stop_sending_code is not None),
        "answered": sum(1 for sid in opened if c.streams[sid].headers is not None),
        "conn_error": c.conn_error,
    }
    c.close()
    return res


def case_oversize_headers(args: argparse.Namespace) -> dict:
    """A HEADERS frame announcing 1 MiB, far over the relay's
    SETTINGS_MAX_FIELD_SECTION_SIZE: the relay must not buffer it."""
    c = Client(args.relay, args.ca, args.token, args.timeout)
    c.wait("the relay's SETTINGS", lambda: c.h3.received_settings is not None)
    sid = c.quic.get_next_available_stream_id()
    c.stream(sid)
    c.send_raw_stream(sid, encode_uint_var(FrameType.HEADERS) + encode_uint_var(1 << 20) + b"\x00" * 60000)
    st = c.stream(sid)
    try:
        c.wait("the relay to refuse", lambda: st.reset_code is not None or c.conn_error is not None)
    except ClientError as e:
        return {"error": str(e)}
    res = {
        "reset": st.reset_code,
        "conn_error": c.conn_error,
        "max_field_section_size": (c.h3.received_settings or {}).get(Setting.MAX_FIELD_SECTION_SIZE),
    }
    c.close()
    return res


def _capsule_header_only() -> bytes:
    # Type 0 (DATAGRAM), Length 100, then 10 of the 100 bytes; FIN follows.
    return encode_uint_var(CAPSULE_DATAGRAM) + encode_uint_var(100) + b"\x00" + b"x" * 9


def _oversize_capsule() -> bytes:
    # A DATAGRAM capsule announcing 70000 value bytes (> 65535): refused
    # before its value is read. Send 20000 of them.
    return encode_uint_var(CAPSULE_DATAGRAM) + encode_uint_var(70000) + b"\x00" * 20000


def _oversize_udp_payload_capsule() -> bytes:
    # Context 0 + 65528 bytes: a UDP payload one byte over 65527.
    return encode_capsule(CAPSULE_DATAGRAM, b"\x00" + b"u" * 65528)


CASES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "datagrams_both_ways": case_datagrams_both_ways,
    "capsules_both_ways": case_capsules_both_ways,
    "missing_protocol": refusal(without(b":protocol")),
    "missing_scheme": refusal(without(b":scheme")),
    "missing_authority": refusal(without(b":authority")),
    "missing_path": refusal(without(b":path")),
    "unknown_pseudo_header": refusal(lambda h: [(b":relay", b"x")] + h),
    "uppercase_field_name": refusal(lambda h: h + [(b"X-Upper", b"1")]),
    "uppercase_pseudo_header": refusal(lambda h: [(b":Method" if k == b":method" else k, v) for k, v in h]),
    "wrong_template": refusal(replace(b":path", b"/masque/udp/127.0.0.1/9/")),
    "bad_port_zero": refusal(lambda h: [(k, v.replace(b"/9/", b"/0/")) if k == b":path" else (k, v) for k, v in h]),
    "bad_port_too_large": refusal(
        lambda h: [(k, v.replace(b"/9/", b"/65536/")) if k == b":path" else (k, v) for k, v in h]
    ),
    "bad_port_not_a_number": refusal(
        lambda h: [(k, v.replace(b"/9/", b"/echo/")) if k == b":path" else (k, v) for k, v in h]
    ),
    "protocol_before_settings": case_protocol_before_settings,
    "unknown_context": case_unknown_context,
    # RFC 9297 section 2.1: a quarter stream ID cut short, and one past
    # 2^60-1, are connection errors of type H3_DATAGRAM_ERROR.
    "truncated_quarter_stream_id": connection_error_case(b"\x80\x00"),
    "quarter_stream_id_too_large": connection_error_case(b"\xd0\x00\x00\x00\x00\x00\x00\x00\x00payload"),
    "capsule_truncated_by_fin": stream_abort_case(_capsule_header_only, end_stream=True),
    "oversize_capsule": stream_abort_case(_oversize_capsule, end_stream=False),
    "oversize_udp_payload_capsule": stream_abort_case(_oversize_udp_payload_capsule, end_stream=False),
    "goaway": case_goaway,
    "slowloris": case_slowloris,
    "oversize_headers": case_oversize_headers,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--relay", required=True, help="relay UDP address, host:port")
    p.add_argument("--ca", required=True, help="the relay's certificate (PEM)")
    p.add_argument("--token", required=True, help="bearer token")
    p.add_argument("--echo-port", type=int, default=9, help="UDP echo target port on 127.0.0.1")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds any single wait may take")
    p.add_argument("--count", type=int, default=64, help="payloads per echo case")
    p.add_argument("--streams", type=int, default=100, help="slowloris: request streams to open")
    p.add_argument("--hold", type=float, default=3.0, help="slowloris: seconds to keep them open")
    p.add_argument("cases", nargs="+", choices=sorted(CASES))
    args = p.parse_args()
    host, port = args.relay.rsplit(":", 1)
    args.relay = (host, int(port))
    for name in args.cases:
        started = time.monotonic()
        try:
            res = CASES[name](args)
        except ClientError as e:
            res = {"error": str(e)}
        except Exception as e:  # report, never hang the driver
            res = {"error": f"{type(e).__name__}: {e}"}
        res["case"] = name
        res["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
