#!/usr/bin/env python3
"""An independent WebTransport-over-HTTP/3 client for the interop suite, on
aioquic's asyncio QUIC client and its ``H3Connection`` (no code shared with
the relay). It drives the relay (or bench/interop/wt_origin.py directly):
one QUIC connection, one extended CONNECT (``:protocol = webtransport``),
one case, one JSON result line on stdout.

Cases (``--case``), all against wt_origin.py's ``/echo`` behaviour:

- ``echo-bidi``: a text and a binary payload, each on its own bidi stream
  with FIN; the echo must come back byte-exact with FIN.
- ``echo-uni``: a text and a binary payload, each on its own uni stream;
  each must come back on a server-initiated uni stream with FIN.
- ``datagram``: ``--datagrams N`` HTTP datagrams; counts the echoes (loss is
  allowed: it fails only below ``--datagram-min``, default N/2, or on a
  corrupted echo).
- ``large``: ``--size`` bytes (default 3 MiB) on one bidi stream; the echo
  must match byte for byte (flow control and backpressure across hops).
- ``server-bidi``: sends ``open-bidi``; expects a server-initiated bidi
  stream for this session carrying ``hello from origin`` + FIN.
- ``close-from-client``: sends WT_CLOSE_SESSION (``--close-code``,
  ``--close-reason``) then FIN; expects the peer to end (FIN or reset) the
  CONNECT stream.
- ``session-gone``: leaves a bidirectional stream open (its first bytes
  echoed), then the session ends (``--close-side origin``: the origin's
  ``close`` command; ``client``: its own WT_CLOSE_SESSION and FIN); expects
  that stream reset with WT_SESSION_GONE (section 6).
- ``close-from-origin``: sends ``close:CODE:REASON``; expects a
  WT_CLOSE_SESSION capsule with that code and reason, then FIN.
- ``reset``: sends ``reset:CODE`` (``--reset-code``); expects that stream
  reset with CODE mapped into the HTTP/3 space (draft-14 section 4.4).
- ``client-reset``: writes 100 bytes on a bidi stream, waits for their
  echo, then resets it with ``--reset-code`` (mapped); expects the origin's
  mirrored reset with the same code (and, with ``--tag``, the origin's
  record of it, read on a second stream).
- ``record``: sends ``record?TAG`` (``--tag``) and prints the origin's JSON
  record of the session whose path carried ``tag=TAG``.
- ``status``: only the response: status, Proxy-Status and all header
  fields, for refusals; succeeds on any response unless ``--expect-status``.

The result line: ``{"case", "ok", "status", "proxy_status", "headers",
"peer_settings", ...case fields..., "error"?}``. Exit status: 0 success,
1 failure (``error`` says why), 2 bad arguments. Every wait is bounded
(``--timeout`` per step; ``large`` gets three times as long) and the whole
run by ``--deadline``.

SETTINGS: before sending CONNECT it waits for the peer's SETTINGS (draft-14
section 3.1) and, unless ``--no-settings-check``, requires
ENABLE_CONNECT_PROTOCOL=1, H3_DATAGRAM=1 and a WebTransport setting
(draft-16's SETTINGS_WT_ENABLED 0x2c7cf000 = 1, SETTINGS_WT_MAX_SESSIONS
0x14e9cd29 > 0 or the draft-02 SETTINGS_ENABLE_WEBTRANSPORT 0x2b603742 = 1;
WT_ENABLED above 1 fails, draft-16 section 3.1). ``--wt-settings`` picks what
it sends itself: ``both`` (default: all three), ``aioquic`` (aioquic's own:
0x2b603742 only), ``draft14`` (0x14e9cd29 only), ``draft16`` (0x2c7cf000
only). ``--protocol`` is the CONNECT's ``:protocol``: ``webtransport``
(default, what deployed browsers send) or draft-16's ``webtransport-h3``.

Usage::

    wt_client.py --connect 127.0.0.1:4433 --authority localhost:4433 \
        --path /echo --ca cert.pem --token T --case echo-bidi
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import ssl
import sys
import time
from typing import Callable

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.buffer import Buffer, BufferReadError, encode_uint_var
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, Setting
from aioquic.h3.events import (
    DatagramReceived,
    DataReceived,
    H3Event,
    HeadersReceived,
    WebTransportStreamDataReceived,
)
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StopSendingReceived, StreamReset

SETTINGS_WT_MAX_SESSIONS = 0x14E9CD29
SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02 = 0x2B603742
SETTINGS_WT_ENABLED = 0x2C7CF000
SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8
SETTINGS_H3_DATAGRAM = 0x33
CAPSULE_WT_CLOSE_SESSION = 0x2843
CAPSULE_WT_DRAIN_SESSION = 0x78AE
WT_SESSION_GONE = 0x170D7B68
WT_APP_ERROR_FIRST = 0x52E4A40FA8DB
WT_APP_ERROR_LAST = 0x52E5AC983162

CASES = ["echo-bidi", "echo-uni", "datagram", "large", "server-bidi", "close-from-client",
         "close-from-origin", "reset", "client-reset", "record", "status", "drain", "session-gone"]


class CaseFailed(Exception):
    pass


def wt_to_h3(code: int) -> int:
    return WT_APP_ERROR_FIRST + code + code // 0x1E


def h3_to_wt(code: int) -> int | None:
    if not WT_APP_ERROR_FIRST <= code <= WT_APP_ERROR_LAST or (code - 0x21) % 0x1F == 0:
        return None
    shifted = code - WT_APP_ERROR_FIRST
    return shifted - shifted // 0x1F


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    return encode_uint_var(capsule_type) + encode_uint_var(len(value)) + value


class WtH3(H3Connection):
    def __init__(self, quic, profile: str) -> None:
        self._wt_profile = profile
        super().__init__(quic, enable_webtransport=True)

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        if self._wt_profile in ("draft14", "draft16"):
            settings.pop(Setting.ENABLE_WEBTRANSPORT, None)
        if self._wt_profile in ("draft14", "both"):
            settings[SETTINGS_WT_MAX_SESSIONS] = 1
        if self._wt_profile in ("draft16", "both"):
            settings[SETTINGS_WT_ENABLED] = 1
        return settings

    def mark_webtransport_bidi(self, stream_id: int, session_id: int) -> None:
        # aioquic 1.7.2 forgets that a bidi stream it opened is a
        # WebTransport stream and would parse the echo as HTTP/3 frames.
        with self._get_or_create_stream(stream_id) as stream:
            stream.frame_type = FrameType.WEBTRANSPORT_STREAM
            stream.session_id = session_id


class InStream:
    def __init__(self, session_id: int | None) -> None:
        self.session_id = session_id
        self.chunks: list[bytes] = []
        self.size = 0
        self.fin = False
        self.reset_code: int | None = None
        self.stop_code: int | None = None

    def data(self) -> bytes:
        return b"".join(self.chunks)


class ClientProtocol(QuicConnectionProtocol):
    profile = "both"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.h3 = WtH3(self._quic, self.profile)
        self.changed = asyncio.Event()
        self.streams: dict[int, InStream] = {}
        self.session_id: int | None = None
        self.response: list[tuple[str, str]] | None = None
        self.session_fin = False
        self.session_reset: int | None = None
        self.session_stop: int | None = None
        self.capsule_buf = b""
        self.capsules: list[tuple[int, bytes]] = []
        self.datagrams: list[bytes] = []
        self.terminated: ConnectionTerminated | None = None

    def stream(self, stream_id: int, session_id: int | None = None) -> InStream:
        st = self.streams.get(stream_id)
        if st is None:
            st = self.streams[stream_id] = InStream(session_id)
        return st

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            if event.stream_id == self.session_id:
                self.session_reset = event.error_code
            else:
                self.stream(event.stream_id).reset_code = event.error_code
        elif isinstance(event, StopSendingReceived):
            if event.stream_id == self.session_id:
                self.session_stop = event.error_code
            else:
                self.stream(event.stream_id).stop_code = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
        for h3_event in self.h3.handle_event(event):
            self.h3_event_received(h3_event)
        self.changed.set()

    def h3_event_received(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived) and event.stream_id == self.session_id:
            if self.response is None:
                self.response = [(k.decode(errors="replace"), v.decode(errors="replace")) for k, v in event.headers]
            if event.stream_ended:
                self.session_fin = True
        elif isinstance(event, DataReceived) and event.stream_id == self.session_id:
            self.capsule_buf += event.data
            buf = Buffer(data=self.capsule_buf)
            consumed = 0
            while not buf.eof():
                try:
                    ctype = buf.pull_uint_var()
                    length = buf.pull_uint_var()
                    value = buf.pull_bytes(length)
                except BufferReadError:
                    break
                consumed = buf.tell()
                self.capsules.append((ctype, value))
            self.capsule_buf = self.capsule_buf[consumed:]
            if event.stream_ended:
                self.session_fin = True
        elif isinstance(event, DatagramReceived) and event.stream_id == self.session_id:
            self.datagrams.append(event.data)
        elif isinstance(event, WebTransportStreamDataReceived):
            st = self.stream(event.stream_id, event.session_id)
            if st.session_id is None:
                st.session_id = event.session_id
            st.chunks.append(event.data)
            st.size += len(event.data)
            if event.stream_ended:
                st.fin = True

    async def wait(self, what: str, pred: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.terminated is not None:
                raise CaseFailed(
                    f"connection closed while waiting for {what}: error {self.terminated.error_code:#x} "
                    f"{self.terminated.reason_phrase!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CaseFailed(f"timeout ({timeout:g} s) waiting for {what}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass

    # -- sending helpers ----------------------------------------------------

    def open_bidi(self) -> int:
        sid = self.h3.create_webtransport_stream(self.session_id, is_unidirectional=False)
        self.h3.mark_webtransport_bidi(sid, self.session_id)
        self.stream(sid, self.session_id)
        return sid

    def open_uni(self) -> int:
        return self.h3.create_webtransport_stream(self.session_id, is_unidirectional=True)

    def send(self, stream_id: int, data: bytes, fin: bool) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream=fin)
        self.transmit()


def header(headers: list[tuple[str, str]] | None, name: str) -> str | None:
    for k, v in headers or []:
        if k == name:
            return v
    return None


def check_settings(settings: dict[int, int]) -> str | None:
    if settings.get(SETTINGS_ENABLE_CONNECT_PROTOCOL) != 1:
        return "peer SETTINGS lack ENABLE_CONNECT_PROTOCOL=1"
    if settings.get(SETTINGS_H3_DATAGRAM) != 1:
        return "peer SETTINGS lack H3_DATAGRAM=1"
    if settings.get(SETTINGS_WT_ENABLED, 0) > 1:
        # draft-16 section 3.1: H3_SETTINGS_ERROR for a client.
        return f"peer SETTINGS_WT_ENABLED is {settings[SETTINGS_WT_ENABLED]}, above 1"
    if not (settings.get(SETTINGS_WT_ENABLED) == 1
            or settings.get(SETTINGS_WT_MAX_SESSIONS, 0) > 0
            or settings.get(SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02) == 1):
        return "peer SETTINGS lack WT_ENABLED=1, WT_MAX_SESSIONS>0 and ENABLE_WEBTRANSPORT=1"
    return None


# -- cases ------------------------------------------------------------------

async def echo_on_bidi(c: ClientProtocol, payload: bytes, timeout: float) -> dict:
    sid = c.open_bidi()
    # Write in pieces so a large payload is not one giant buffer copy.
    step = 256 * 1024
    for off in range(0, len(payload), step):
        c.send(sid, payload[off:off + step], fin=False)
        await asyncio.sleep(0)
    c.send(sid, b"", fin=True)
    st = c.streams[sid]
    await c.wait(f"echo FIN on stream {sid}", lambda: st.fin or st.reset_code is not None, timeout)
    if st.reset_code is not None:
        raise CaseFailed(f"stream {sid} reset with {st.reset_code:#x} before the echo ended")
    got = st.data()
    if got != payload:
        raise CaseFailed(f"stream {sid}: echo differs: sent {len(payload)} bytes (sha256 "
                         f"{hashlib.sha256(payload).hexdigest()[:16]}), got {len(got)} "
                         f"(sha256 {hashlib.sha256(got).hexdigest()[:16]})")
    return {"stream_id": sid, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


TEXT = "hello webtransport — ünïcödé".encode()
BINARY = bytes(range(256)) * 4 + b"\x00\xff\x00"


async def case_echo_bidi(c: ClientProtocol, args) -> dict:
    return {"streams": [await echo_on_bidi(c, p, args.timeout) for p in (TEXT, BINARY)]}


async def case_large(c: ClientProtocol, args) -> dict:
    payload = random.Random(args.size).randbytes(args.size)
    start = time.monotonic()
    out = await echo_on_bidi(c, payload, args.timeout * 3)
    out["seconds"] = round(time.monotonic() - start, 3)
    return out


async def case_echo_uni(c: ClientProtocol, args) -> dict:
    sent = []
    for payload in (TEXT, BINARY):
        sid = c.open_uni()
        c.send(sid, payload, fin=True)
        sent.append((sid, payload))
    def incoming() -> list[tuple[int, InStream]]:
        return [(i, s) for i, s in c.streams.items()
                if i & 3 == 3 and s.session_id == c.session_id]
    await c.wait("2 server uni streams with FIN",
                 lambda: sum(1 for _, s in incoming() if s.fin) >= len(sent), args.timeout)
    got = sorted(s.data() for _, s in incoming() if s.fin)
    if got != sorted(p for _, p in sent):
        raise CaseFailed(f"uni echoes differ: sent {[len(p) for _, p in sent]} bytes, got {[len(g) for g in got]}")
    return {"sent_streams": [i for i, _ in sent], "echo_streams": [i for i, _ in incoming()]}


async def case_datagram(c: ClientProtocol, args) -> dict:
    n = args.datagrams
    payloads = [f"dgram-{i:04d}-".encode() + bytes([i % 256]) * 64 for i in range(n)]
    for i, p in enumerate(payloads):
        c.h3.send_datagram(c.session_id, p)
        c.transmit()
        if i % 10 == 9:
            await asyncio.sleep(0.01)
    try:
        await c.wait(f"{n} datagram echoes", lambda: len(c.datagrams) >= n, args.timeout)
    except CaseFailed:
        pass  # losses are allowed: counted below
    valid = set(payloads)
    received = len(c.datagrams)
    corrupt = [d for d in c.datagrams if d not in valid]
    minimum = args.datagram_min if args.datagram_min is not None else max(1, n // 2)
    out = {"sent": n, "received": received, "distinct": len(set(c.datagrams) & valid), "corrupt": len(corrupt),
           "min": minimum}
    if corrupt:
        raise CaseFailed(f"{len(corrupt)} echoed datagrams are not ones sent", out)
    if received < minimum:
        raise CaseFailed(f"only {received} of {n} datagrams echoed (minimum {minimum})", out)
    return out


async def case_server_bidi(c: ClientProtocol, args) -> dict:
    cmd = c.open_bidi()
    c.send(cmd, b"open-bidi", fin=True)
    def server_bidi() -> list[tuple[int, InStream]]:
        return [(i, s) for i, s in c.streams.items() if i & 3 == 1 and s.session_id == c.session_id]
    await c.wait("a server-initiated bidi stream with FIN", lambda: any(s.fin for _, s in server_bidi()), args.timeout)
    sid, st = next((i, s) for i, s in server_bidi() if s.fin)
    if st.data() != b"hello from origin":
        raise CaseFailed(f"server bidi stream {sid} carried {st.data()[:100]!r}")
    # Close our half of it too.
    c.send(sid, b"", fin=True)
    return {"server_stream_id": sid, "data": st.data().decode()}


async def case_close_from_client(c: ClientProtocol, args) -> dict:
    reason = args.close_reason.encode()
    c.h3.send_data(c.session_id, encode_capsule(CAPSULE_WT_CLOSE_SESSION,
                                                (args.close_code & 0xFFFFFFFF).to_bytes(4, "big") + reason),
                   end_stream=True)
    c.transmit()
    await c.wait("the peer to end the CONNECT stream",
                 lambda: c.session_fin or c.session_reset is not None, args.timeout)
    return {"sent_code": args.close_code, "sent_reason": args.close_reason, "peer_fin": c.session_fin,
            "peer_reset": c.session_reset}


async def case_close_from_origin(c: ClientProtocol, args) -> dict:
    cmd = c.open_bidi()
    c.send(cmd, f"close:{args.close_code}:{args.close_reason}".encode(), fin=True)
    await c.wait("WT_CLOSE_SESSION and FIN on the CONNECT stream",
                 lambda: c.session_fin or c.session_reset is not None, args.timeout)
    closes = [v for t, v in c.capsules if t == CAPSULE_WT_CLOSE_SESSION]
    out = {"capsules": [hex(t) for t, _ in c.capsules], "peer_fin": c.session_fin, "peer_reset": c.session_reset,
           "command_stream_reset": c.streams[cmd].reset_code}
    if not closes:
        raise CaseFailed("no WT_CLOSE_SESSION capsule before the CONNECT stream ended", out)
    value = closes[0]
    code = int.from_bytes(value[:4], "big")
    reason = value[4:].decode(errors="replace")
    out.update(code=code, reason=reason)
    if code != args.close_code or reason != args.close_reason:
        raise CaseFailed(f"WT_CLOSE_SESSION carried {code}/{reason!r}, asked for {args.close_code}/{args.close_reason!r}", out)
    if not c.session_fin:
        raise CaseFailed("CONNECT stream reset after WT_CLOSE_SESSION instead of FIN", out)
    # Our side of the CONNECT stream: FIN too (section 6: close or reset).
    try:
        c.h3.send_data(c.session_id, b"", end_stream=True)
        c.transmit()
    except Exception:
        pass
    return out


async def case_session_gone(c: ClientProtocol, args) -> dict:
    """A stream left open when the session ends is reset with WT_SESSION_GONE
    (section 6): against an origin that leaves its streams alone
    (``wt_origin.py --keep-streams-on-close``), that reset is the relay's."""
    sid = c.open_bidi()
    first = b"g" * 100
    c.send(sid, first, fin=False)
    st = c.streams[sid]
    await c.wait(f"the echo on stream {sid}", lambda: st.size >= len(first), args.timeout)
    if args.close_side == "client":
        c.h3.send_data(c.session_id, encode_capsule(CAPSULE_WT_CLOSE_SESSION, (0).to_bytes(4, "big") + b"gone"),
                       end_stream=True)
        c.transmit()
    else:
        cmd = c.open_bidi()
        c.send(cmd, b"close:0:gone", fin=True)
    await c.wait(f"stream {sid} to end", lambda: st.reset_code is not None or st.fin, args.timeout)
    out = {"stream_id": sid, "h3_code": st.reset_code, "fin": st.fin, "close_side": args.close_side}
    if st.reset_code != WT_SESSION_GONE:
        got = "FIN" if st.reset_code is None else hex(st.reset_code)
        raise CaseFailed(f"stream {sid} ended with {got}, not WT_SESSION_GONE", out)
    return out


async def case_reset(c: ClientProtocol, args) -> dict:
    sid = c.open_bidi()
    c.send(sid, f"reset:{args.reset_code}".encode(), fin=True)
    st = c.streams[sid]
    await c.wait(f"RESET_STREAM on stream {sid}", lambda: st.reset_code is not None or st.fin, args.timeout)
    expected = wt_to_h3(args.reset_code)
    out = {"stream_id": sid, "h3_code": st.reset_code, "wt_code": None if st.reset_code is None else h3_to_wt(st.reset_code),
           "expected_h3_code": expected}
    if st.reset_code is None:
        raise CaseFailed(f"stream {sid} ended with FIN, not a reset", out)
    if st.reset_code != expected:
        raise CaseFailed(f"reset code {st.reset_code:#x} (wt {out['wt_code']}), expected {expected:#x} (wt {args.reset_code})", out)
    return out


async def case_client_reset(c: ClientProtocol, args) -> dict:
    sid = c.open_bidi()
    # More than the origin's 64-byte command window, so it echoes at once:
    # once the echo is back the origin knows the stream's session (a plain
    # RESET_STREAM may discard the stream header otherwise; aioquic has no
    # RESET_STREAM_AT).
    first = b"r" * 100
    c.send(sid, first, fin=False)
    st = c.streams[sid]
    await c.wait(f"the echo on stream {sid}", lambda: st.size >= len(first), args.timeout)
    code = wt_to_h3(args.reset_code)
    c._quic.reset_stream(sid, code)
    c.transmit()
    await c.wait(f"the mirrored reset on stream {sid}", lambda: st.reset_code is not None or st.fin, args.timeout)
    out = {"stream_id": sid, "sent_h3_code": code, "h3_code": st.reset_code,
           "wt_code": None if st.reset_code is None else h3_to_wt(st.reset_code)}
    if st.reset_code != code:
        raise CaseFailed(f"expected the origin to reset stream {sid} with {code:#x}, got "
                         f"{'FIN' if st.reset_code is None else hex(st.reset_code)}", out)
    if args.tag:
        rec = (await case_record(c, args))["record"]
        seen = [r for r in rec.get("stream_resets", []) if r.get("wt_code") == args.reset_code]
        out["origin_saw"] = seen
        if not seen:
            raise CaseFailed(f"the origin's record shows no reset with code {args.reset_code}", out)
    return out


async def case_record(c: ClientProtocol, args) -> dict:
    if not args.tag:
        raise CaseFailed("--tag is required for the record case")
    sid = c.open_bidi()
    c.send(sid, f"record?{args.tag}".encode(), fin=True)
    st = c.streams[sid]
    await c.wait("the record", lambda: st.fin or st.reset_code is not None, args.timeout)
    try:
        return {"record": json.loads(st.data())}
    except ValueError:
        raise CaseFailed(f"record is not JSON: {st.data()[:200]!r}")


async def case_drain(c: ClientProtocol, args) -> dict:
    """Waits for WT_DRAIN_SESSION on the CONNECT stream (a draining relay, or
    one whose origin sent GOAWAY, section 4.7), checks that the session still
    carries a stream after it, then ends the session with WT_CLOSE_SESSION and
    FIN."""
    await c.wait("WT_DRAIN_SESSION on the CONNECT stream",
                 lambda: any(t == CAPSULE_WT_DRAIN_SESSION for t, _ in c.capsules)
                 or c.session_fin or c.session_reset is not None, args.timeout)
    out = {"capsules": [hex(t) for t, _ in c.capsules], "peer_fin": c.session_fin, "peer_reset": c.session_reset}
    drains = [v for t, v in c.capsules if t == CAPSULE_WT_DRAIN_SESSION]
    if not drains:
        raise CaseFailed("the CONNECT stream ended without WT_DRAIN_SESSION", out)
    if drains[0]:
        raise CaseFailed(f"WT_DRAIN_SESSION with a value ({len(drains[0])} bytes)", out)
    out["echo_after_drain"] = await echo_on_bidi(c, b"after the drain notice", args.timeout)
    c.h3.send_data(c.session_id, encode_capsule(CAPSULE_WT_CLOSE_SESSION, (0).to_bytes(4, "big") + b"drained"),
                   end_stream=True)
    c.transmit()
    await c.wait("the peer to end the CONNECT stream",
                 lambda: c.session_fin or c.session_reset is not None, args.timeout)
    out.update(peer_fin=c.session_fin, peer_reset=c.session_reset)
    return out


CASE_FUNCS = {
    "echo-bidi": case_echo_bidi, "echo-uni": case_echo_uni, "datagram": case_datagram, "large": case_large,
    "server-bidi": case_server_bidi, "close-from-client": case_close_from_client,
    "close-from-origin": case_close_from_origin, "session-gone": case_session_gone, "reset": case_reset, "client-reset": case_client_reset, "record": case_record,
    "drain": case_drain,
}


async def run(args, result: dict) -> None:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=args.server_name,
        max_datagram_frame_size=65536,
        idle_timeout=max(30.0, args.timeout * 3),
    )
    if args.insecure:
        config.verify_mode = ssl.CERT_NONE
    else:
        config.load_verify_locations(args.ca)
    ClientProtocol.profile = args.wt_settings
    host, port = args.connect
    try:
        cm = connect(host, port, configuration=config, create_protocol=ClientProtocol, wait_connected=False)
        c = await asyncio.wait_for(cm.__aenter__(), args.timeout)
    except (asyncio.TimeoutError, OSError) as exc:
        raise CaseFailed(f"could not start the QUIC connection: {exc!r}")
    # wait_connected=False also means "not sent yet": send the Initial.
    c.transmit()
    try:
        try:
            await asyncio.wait_for(c.wait_connected(), args.timeout)
        except asyncio.TimeoutError:
            waiter = c._connected_waiter
            if waiter is not None:  # its ConnectionError on close is expected
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise CaseFailed(f"no QUIC handshake within {args.timeout:g} s")
        except ConnectionError:
            t = c.terminated
            why = f"error {t.error_code:#x} {t.reason_phrase!r}" if t is not None else "connection lost"
            raise CaseFailed(f"QUIC handshake failed: {why}")
        await c.wait("the peer's SETTINGS", lambda: c.h3._received_settings is not None, args.timeout)
        settings = c.h3._received_settings
        result["peer_settings"] = {hex(k): v for k, v in sorted(settings.items())}
        if not args.no_settings_check:
            problem = check_settings(settings)
            if problem:
                raise CaseFailed(problem)
        c.session_id = c._quic.get_next_available_stream_id()
        headers = [
            (b":method", b"CONNECT"),
            (b":protocol", args.protocol.encode()),
            (b":scheme", b"https"),
            (b":authority", args.authority.encode()),
            (b":path", args.path.encode()),
        ]
        if args.token:
            headers.append((b"proxy-authorization", f"Bearer {args.token}".encode()))
        if args.origin:
            headers.append((b"origin", args.origin.encode()))
        for extra in args.header:
            name, _, value = extra.partition(":")
            headers.append((name.strip().lower().encode(), value.strip().encode()))
        c.h3.send_headers(c.session_id, headers, end_stream=False)
        c.transmit()
        result["session_id"] = c.session_id
        await c.wait("the CONNECT response",
                     lambda: c.response is not None or c.session_reset is not None, args.timeout)
        if c.response is None:
            result["session_reset"] = c.session_reset
            raise CaseFailed(f"CONNECT stream reset with {c.session_reset:#x} before a response")
        status = header(c.response, ":status")
        result["status"] = int(status) if status and status.isdigit() else status
        result["proxy_status"] = header(c.response, "proxy-status")
        result["headers"] = {k: v for k, v in c.response}
        if args.case == "status":
            if args.expect_status is not None and result["status"] != args.expect_status:
                raise CaseFailed(f"status {status}, expected {args.expect_status}")
            return
        if not (isinstance(result["status"], int) and 200 <= result["status"] < 300):
            raise CaseFailed(f"session refused: status {status} (proxy-status {result['proxy_status']!r})")
        try:
            result.update(await CASE_FUNCS[args.case](c, args))
        except CaseFailed as exc:
            if len(exc.args) > 1 and isinstance(exc.args[1], dict):
                result.update(exc.args[1])
            raise
        # End the session cleanly when the case left it open.
        if not c.session_fin and c.session_reset is None and args.case not in ("close-from-client", "close-from-origin", "session-gone"):
            try:
                c.h3.send_data(c.session_id, b"", end_stream=True)
                c.transmit()
            except Exception:
                pass
    finally:
        try:
            await asyncio.wait_for(cm.__aexit__(None, None, None), 3)
        except (asyncio.TimeoutError, Exception):
            pass
        result["conn_error"] = None if c.terminated is None else c.terminated.error_code


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connect", type=parse_hostport, required=True, help="HOST:PORT of the relay (or origin)")
    p.add_argument("--authority", help=":authority (default: the --connect value)")
    p.add_argument("--path", default="/echo", help=":path (default /echo)")
    p.add_argument("--server-name", default="localhost", help="TLS server name (default localhost)")
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--ca", help="verify the server against this CA (PEM)")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--token", help="sent as proxy-authorization: Bearer TOKEN")
    p.add_argument("--origin", help="an Origin header field")
    p.add_argument("--header", action="append", default=[], help="extra 'name: value' field (repeatable)")
    p.add_argument("--case", choices=CASES, required=True)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per step (default 10)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds for the whole run (default 60)")
    p.add_argument("--datagrams", type=int, default=50, help="datagram case: how many (default 50)")
    p.add_argument("--datagram-min", type=int, help="datagram case: echoes needed (default N/2)")
    p.add_argument("--size", type=int, default=3 << 20, help="large case: bytes (default 3 MiB)")
    p.add_argument("--close-code", type=int, default=42, help="close cases: WebTransport error code (default 42)")
    p.add_argument("--close-reason", default="bye", help="close cases: reason (default 'bye')")
    p.add_argument("--reset-code", type=int, default=7, help="reset case: WebTransport error code (default 7)")
    p.add_argument("--close-side", choices=["origin", "client"], default="origin",
                   help="session-gone case: who ends the session (default origin)")
    p.add_argument("--tag", help="record case: the tag to look up")
    p.add_argument("--expect-status", type=int, help="status case: fail unless this status")
    p.add_argument("--wt-settings", choices=["both", "aioquic", "draft14", "draft16"], default="both",
                   help="WebTransport SETTINGS to send (default both)")
    p.add_argument("--protocol", default="webtransport",
                   help=":protocol of the CONNECT: webtransport (default, what browsers send) or "
                        "webtransport-h3 (draft-16 section 3.2)")
    p.add_argument("--no-settings-check", action="store_true", help="do not require WebTransport SETTINGS from the peer")
    args = p.parse_args()
    if args.authority is None:
        args.authority = f"{args.connect[0]}:{args.connect[1]}"
    result: dict = {"case": args.case, "ok": False}
    code = 1
    try:
        asyncio.run(asyncio.wait_for(run(args, result), args.deadline))
        result["ok"] = True
        code = 0
    except CaseFailed as exc:
        result["error"] = str(exc.args[0])
    except asyncio.TimeoutError:
        result["error"] = f"deadline ({args.deadline:g} s) exceeded"
    except Exception as exc:  # a bug or an unexpected peer behaviour: still one line
        result["error"] = f"unexpected {type(exc).__name__}: {exc}"
    print(json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
