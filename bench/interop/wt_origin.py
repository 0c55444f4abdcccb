#!/usr/bin/env python3
"""An upstream WebTransport-over-HTTP/3 origin for the relay's WebTransport
tests, on aioquic's asyncio QUIC server and its ``H3Connection`` (an
implementation that shares no code with the relay).

It prints one JSON line on stdout once it listens: ``{"port": N}`` (first
line, always); after that, one JSON line per thing it saw (``"event"``:
``session_opened``, ``session_refused``, ``session_closed``,
``stream_reset``, ``stop_sending``, ``stream_done``, ``connection_closed``),
so a test can check what crossed the relay. A driver may stop reading after
the first line (writes to a closed stdout are dropped). Diagnostics go to
stderr.

Extended CONNECT with ``:protocol = webtransport``:

- ``/echo`` (query allowed, e.g. ``/echo?tag=T``): 200, and the session
  echoes: every client bidi stream's bytes go back on the same stream (FIN
  mirrored); every client uni stream's bytes go back on a new server uni
  stream, with FIN, once the client's stream ended; every datagram goes back
  as it came.
- ``/refuse``: 403. Any other path: 404. A CONNECT with another (or no)
  ``:protocol``, or another method: 400 / 405.

Commands: a client bidi stream whose whole content (up to its FIN) is exactly

- ``open-bidi``: the origin opens a bidi stream to the client and writes
  ``hello from origin`` + FIN (the command stream gets an empty FIN);
- ``close:CODE:REASON``: the origin sends a WT_CLOSE_SESSION capsule (0x2843)
  with that 32-bit code and UTF-8 reason on the CONNECT stream, then FIN,
  and resets the session's other streams with WT_SESSION_GONE;
- ``reset:CODE``: the origin resets that stream's send side with the
  WebTransport application error CODE mapped into the HTTP/3 error space
  (draft-ietf-webtrans-http3-14 section 4.4: 0x52e4a40fa8db + n + n // 0x1e);
- a client's RESET_STREAM on a bidi stream is mirrored: the origin resets
  its side of that stream with the same code (and records it);
- ``record?TAG``: the origin writes back (+ FIN) the JSON record of the
  session whose CONNECT path carried ``tag=TAG`` (``{"found": false}`` if
  none): path, headers, the peer's SETTINGS, streams and bytes, resets seen,
  datagrams, and how it closed. This lets a test see, through the relay,
  what reached the origin.

A stream whose content is longer than 64 bytes is echoed as it arrives
(commands are only looked for in short streams).

SETTINGS (``--wt-settings``): ``both`` (default) sends aioquic's own
(SETTINGS_ENABLE_CONNECT_PROTOCOL=1, SETTINGS_H3_DATAGRAM=1,
SETTINGS_ENABLE_WEBTRANSPORT(0x2b603742)=1) plus draft-14's
SETTINGS_WT_MAX_SESSIONS (0x14e9cd29) = ``--wt-max-sessions``; ``aioquic``
only aioquic's; ``draft14`` only WT_MAX_SESSIONS (no 0x2b603742); ``draft16``
only draft-16's SETTINGS_WT_ENABLED (0x2c7cf000) = ``--wt-enabled`` (1), and
then it takes only draft-16's ``:protocol webtransport-h3`` (400 for
``webtransport``; the other profiles take only ``webtransport``); ``none``
neither (an HTTP/3 server that does not announce WebTransport; it still
answers CONNECT as above).

Usage::

    wt_origin.py --listen 127.0.0.1:0 --cert cert.pem --key key.pem
                 [--wt-settings both|aioquic|draft14|draft16] [--wt-max-sessions 1]
                 [--wt-enabled 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.parse

from aioquic.asyncio import QuicConnectionProtocol, serve
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
from aioquic.quic.events import (
    ConnectionTerminated,
    ProtocolNegotiated,
    QuicEvent,
    StopSendingReceived,
    StreamReset,
)

# draft-ietf-webtrans-http3-14 codepoints.
SETTINGS_WT_MAX_SESSIONS = 0x14E9CD29
SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02 = 0x2B603742
SETTINGS_WT_ENABLED = 0x2C7CF000
CAPSULE_WT_CLOSE_SESSION = 0x2843
CAPSULE_WT_DRAIN_SESSION = 0x78AE
WT_SESSION_GONE = 0x170D7B68
WT_BUFFERED_STREAM_REJECTED = 0x3994BD84
WT_APP_ERROR_FIRST = 0x52E4A40FA8DB
WT_APP_ERROR_LAST = 0x52E5AC983162
H3_MESSAGE_ERROR = 0x10E

# Streams up to this many bytes (with FIN) are checked for commands.
COMMAND_MAX = 64
MAX_RECORDS = 10_000
RECORDS: dict[str, dict] = {}


def wt_to_h3(code: int) -> int:
    """A WebTransport application error code (32 bits) as an HTTP/3 error
    code (draft-14 section 4.4, skipping the reserved 0x1f * N + 0x21)."""
    return WT_APP_ERROR_FIRST + code + code // 0x1E


def h3_to_wt(code: int) -> int | None:
    """The WebTransport application error code an HTTP/3 error code
    carries, None when it is outside that range or a reserved codepoint."""
    if not WT_APP_ERROR_FIRST <= code <= WT_APP_ERROR_LAST or (code - 0x21) % 0x1F == 0:
        return None
    shifted = code - WT_APP_ERROR_FIRST
    return shifted - shifted // 0x1F


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    return encode_uint_var(capsule_type) + encode_uint_var(len(value)) + value


def emit(obj: dict) -> None:
    try:
        print(json.dumps(obj), flush=True)
    except (BrokenPipeError, ValueError):
        pass


def settings_json(settings: dict[int, int] | None) -> dict[str, int] | None:
    if settings is None:
        return None
    return {hex(k): v for k, v in sorted(settings.items())}


class WtH3(H3Connection):
    """aioquic's H3Connection with the chosen WebTransport SETTINGS."""

    def __init__(self, quic, profile: str, max_sessions: int, wt_enabled: int = 1) -> None:
        self._wt_profile = profile
        self._wt_max_sessions = max_sessions
        self._wt_enabled = wt_enabled
        super().__init__(quic, enable_webtransport=True)

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        if self._wt_profile in ("draft14", "draft16", "none"):
            settings.pop(Setting.ENABLE_WEBTRANSPORT, None)
        if self._wt_profile in ("draft14", "both"):
            settings[SETTINGS_WT_MAX_SESSIONS] = self._wt_max_sessions
        if self._wt_profile == "draft16":
            settings[SETTINGS_WT_ENABLED] = self._wt_enabled
        return settings

    def mark_webtransport_bidi(self, stream_id: int, session_id: int) -> None:
        """aioquic 1.7.2 does not remember that a bidi stream it opened with
        create_webtransport_stream() is a WebTransport stream, and would
        parse the peer's bytes on it as HTTP/3 frames: mark it."""
        with self._get_or_create_stream(stream_id) as stream:
            stream.frame_type = FrameType.WEBTRANSPORT_STREAM
            stream.session_id = session_id


class Session:
    def __init__(self, session_id: int, record: dict) -> None:
        self.session_id = session_id
        self.record = record
        self.capsule_buf = b""
        self.closed = False
        # Streams of this session: id -> {"buf", "echoing", "fin", "kind"}
        self.streams: dict[int, dict] = {}


class OriginProtocol(QuicConnectionProtocol):
    args: argparse.Namespace

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.h3: WtH3 | None = None
        self.sessions: dict[int, Session] = {}
        # CONNECT requests held until the client's SETTINGS arrived
        # (draft-14 section 3.1: draft versions wait for them).
        self.pending: list[HeadersReceived] = []
        # Stream events for sessions not (yet) known.
        self.orphans: dict[int, list[H3Event]] = {}

    # -- QUIC events ---------------------------------------------------------

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN:
                self.h3 = WtH3(self._quic, self.args.wt_settings, self.args.wt_max_sessions,
                               self.args.wt_enabled)
        elif isinstance(event, StreamReset):
            self.on_reset(event.stream_id, event.error_code, "stream_reset")
        elif isinstance(event, StopSendingReceived):
            self.on_reset(event.stream_id, event.error_code, "stop_sending")
        elif isinstance(event, ConnectionTerminated):
            emit({"event": "connection_closed", "error_code": event.error_code, "reason": event.reason_phrase})
            for session in list(self.sessions.values()):
                self.finish_session(session, how="connection_closed")
        if self.h3 is None:
            return
        for h3_event in self.h3.handle_event(event):
            self.h3_event_received(h3_event)
        if self.pending and self.h3._received_settings is not None:
            pending, self.pending = self.pending, []
            for headers in pending:
                self.on_request(headers)
        self.transmit()

    def on_reset(self, stream_id: int, code: int, what: str) -> None:
        session = self.session_of_stream(stream_id)
        entry = {"event": what, "stream_id": stream_id, "code": code, "wt_code": h3_to_wt(code)}
        if session is not None:
            entry["session_id"] = session.session_id
            session.record[what + "s"].append({"stream_id": stream_id, "code": code, "wt_code": h3_to_wt(code)})
            if stream_id == session.session_id:
                emit(entry)
                self.finish_session(session, how=what, code=code)
                return
            st = session.streams.get(stream_id)
            if what == "stream_reset" and st is not None:
                # Mirrored, like FIN: the client's reset of a bidi stream
                # resets this origin's side with the same code.
                if st["kind"] == "bidi" and st.get("client") and not st.get("send_done"):
                    self._quic.reset_stream(stream_id, code)
                    entry["mirrored"] = True
                session.streams.pop(stream_id, None)
        emit(entry)

    def session_of_stream(self, stream_id: int) -> Session | None:
        if stream_id in self.sessions:
            return self.sessions[stream_id]
        for session in self.sessions.values():
            if stream_id in session.streams:
                return session
        return None

    # -- HTTP/3 events -------------------------------------------------------

    def h3_event_received(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            if self.h3._received_settings is None:
                self.pending.append(event)
            else:
                self.on_request(event)
        elif isinstance(event, DataReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                self.on_capsule_data(session, event.data, event.stream_ended)
        elif isinstance(event, DatagramReceived):
            session = self.sessions.get(event.stream_id)
            if session is None or session.closed:
                return
            session.record["datagrams_received"] += 1
            self.h3.send_datagram(event.stream_id, event.data)
            session.record["datagrams_echoed"] += 1
        elif isinstance(event, WebTransportStreamDataReceived):
            session = self.sessions.get(event.session_id)
            if session is None:
                # Buffered until the session exists (section 4.6), bounded.
                if event.session_id not in self.orphans and len(self.orphans) >= 16:
                    self._quic.stop_stream(event.stream_id, WT_BUFFERED_STREAM_REJECTED)
                    if not event.stream_id & 2:
                        self._quic.reset_stream(event.stream_id, WT_BUFFERED_STREAM_REJECTED)
                    return
                queue = self.orphans.setdefault(event.session_id, [])
                if len(queue) < 1000:
                    queue.append(event)
                return
            self.on_stream_data(session, event)

    def on_request(self, event: HeadersReceived) -> None:
        headers = [(k.decode(errors="replace"), v.decode(errors="replace")) for k, v in event.headers]
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        fields: dict[str, str] = {}
        for k, v in headers:
            if not k.startswith(":"):
                fields[k] = f"{fields[k]}, {v}" if k in fields else v
        path = pseudo.get(":path", "")
        route = urllib.parse.urlsplit(path).path
        if pseudo.get(":method") != "CONNECT":
            status = 405
        elif pseudo.get(":protocol") != ("webtransport-h3" if self.args.wt_settings == "draft16" else "webtransport"):
            # A draft-16 origin takes its own token only; older drafts'
            # origins know only theirs.
            status = 400
        elif route == "/echo":
            status = 200
        elif route == "/refuse":
            status = 403
        else:
            status = 404
        sid = event.stream_id
        record = {
            "session_id": sid,
            "path": path,
            "authority": pseudo.get(":authority"),
            "protocol": pseudo.get(":protocol"),
            "scheme": pseudo.get(":scheme"),
            "headers": fields,
            "peer_settings": settings_json(self.h3._received_settings),
            "status": status,
            "bidi_streams": 0,
            "uni_streams": 0,
            "server_streams": 0,
            "bytes_received": 0,
            "stream_resets": [],
            "stop_sendings": [],
            "datagrams_received": 0,
            "datagrams_echoed": 0,
            "closed": False,
            "close_how": None,
            "close_code": None,
            "close_reason": None,
        }
        tags = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("tag")
        if tags and (tags[0] in RECORDS or len(RECORDS) < MAX_RECORDS):
            RECORDS[tags[0]] = record
        if status != 200:
            emit({"event": "session_refused", **{k: record[k] for k in (
                "session_id", "path", "authority", "protocol", "scheme", "headers", "peer_settings", "status")}})
            self.h3.send_headers(sid, [(b":status", str(status).encode()), (b"server", b"wt_origin.py")], end_stream=True)
            return
        self.h3.send_headers(sid, [(b":status", b"200"), (b"server", b"wt_origin.py")])
        session = Session(sid, record)
        self.sessions[sid] = session
        emit({"event": "session_opened", **{k: record[k] for k in (
            "session_id", "path", "authority", "protocol", "scheme", "headers", "peer_settings", "status")}})
        for orphan in self.orphans.pop(sid, []):
            self.on_stream_data(session, orphan)

    # -- session stream: capsules ---------------------------------------------

    def on_capsule_data(self, session: Session, data: bytes, ended: bool) -> None:
        session.capsule_buf += data
        buf = Buffer(data=session.capsule_buf)
        consumed = 0
        while not buf.eof():
            try:
                ctype = buf.pull_uint_var()
                length = buf.pull_uint_var()
                value = buf.pull_bytes(length)
            except BufferReadError:
                break
            consumed = buf.tell()
            if session.closed and session.record["close_how"] == "capsule":
                # Data after WT_CLOSE_SESSION: H3_MESSAGE_ERROR (section 6).
                self._quic.reset_stream(session.session_id, H3_MESSAGE_ERROR)
                return
            if ctype == CAPSULE_WT_CLOSE_SESSION and len(value) >= 4:
                code = int.from_bytes(value[:4], "big")
                reason = value[4:].decode(errors="replace")
                self.finish_session(session, how="capsule", code=code, reason=reason)
                # The recipient closes the CONNECT stream in response.
                self.end_session_stream(session)
            elif ctype == CAPSULE_WT_DRAIN_SESSION:
                emit({"event": "drain", "session_id": session.session_id})
        session.capsule_buf = session.capsule_buf[consumed:]
        if ended:
            if not session.closed:
                self.finish_session(session, how="fin", code=0, reason="")
            self.end_session_stream(session)

    def end_session_stream(self, session: Session) -> None:
        if not session.record.get("_fin_sent"):
            session.record["_fin_sent"] = True
            try:
                self.h3.send_data(session.session_id, b"", end_stream=True)
            except Exception as exc:  # already ended or reset
                print(f"wt_origin: FIN on session {session.session_id}: {exc}", file=sys.stderr)

    def finish_session(self, session: Session, how: str, code: int | None = None, reason: str | None = None) -> None:
        if session.closed:
            return
        session.closed = True
        rec = session.record
        rec.update(closed=True, close_how=how, close_code=code, close_reason=reason)
        emit({
            "event": "session_closed",
            "session_id": session.session_id,
            "how": how,
            "code": code,
            "reason": reason,
            "datagrams_received": rec["datagrams_received"],
            "datagrams_echoed": rec["datagrams_echoed"],
            "bidi_streams": rec["bidi_streams"],
            "uni_streams": rec["uni_streams"],
            "bytes_received": rec["bytes_received"],
        })
        # Section 6: reset the session's streams with WT_SESSION_GONE
        # (unless --keep-streams-on-close: then the relay in front must).
        for stream_id, st in list(session.streams.items()):
            if how == "connection_closed" or self.args.keep_streams_on_close:
                break
            if not st.get("send_done"):
                try:
                    self._quic.reset_stream(stream_id, WT_SESSION_GONE)
                except Exception:
                    pass
            if not st.get("fin"):
                try:
                    self._quic.stop_stream(stream_id, WT_SESSION_GONE)
                except Exception:
                    pass
        session.streams.clear()

    # -- WebTransport streams -------------------------------------------------

    def on_stream_data(self, session: Session, event: WebTransportStreamDataReceived) -> None:
        sid = event.stream_id
        rec = session.record
        st = session.streams.get(sid)
        if st is None:
            if session.closed:
                self._quic.stop_stream(sid, WT_SESSION_GONE)
                return
            uni = bool(sid & 2)
            client = not (sid & 1)
            st = {"buf": b"", "echoing": False, "fin": False, "kind": "uni" if uni else "bidi", "bytes": 0}
            session.streams[sid] = st
            if client:
                rec["uni_streams" if uni else "bidi_streams"] += 1
            st["client"] = client
        rec["bytes_received"] += len(event.data)
        st["bytes"] += len(event.data)
        if event.stream_ended:
            st["fin"] = True
        if not st["client"]:
            # The client writing back on a stream this origin opened.
            if event.stream_ended:
                emit({"event": "stream_done", "session_id": session.session_id, "stream_id": sid,
                      "kind": "server-bidi", "bytes": st["bytes"]})
                self.forget_if_done(session, sid)
            return
        if st["kind"] == "uni":
            st["buf"] += event.data
            if event.stream_ended:
                out = self.h3.create_webtransport_stream(session.session_id, is_unidirectional=True)
                self._quic.send_stream_data(out, st["buf"], end_stream=True)
                rec["server_streams"] += 1
                emit({"event": "stream_done", "session_id": session.session_id, "stream_id": sid,
                      "kind": "uni", "bytes": st["bytes"], "echo_stream_id": out})
                session.streams.pop(sid, None)
            return
        # bidi
        if st["echoing"]:
            self.send_back(session, sid, event.data, event.stream_ended)
            return
        st["buf"] += event.data
        if len(st["buf"]) > COMMAND_MAX:
            st["echoing"] = True
            data, st["buf"] = st["buf"], b""
            self.send_back(session, sid, data, event.stream_ended)
            return
        if not event.stream_ended:
            return
        data, st["buf"] = st["buf"], b""
        if not self.command(session, sid, data):
            self.send_back(session, sid, data, True)

    def send_back(self, session: Session, sid: int, data: bytes, fin: bool) -> None:
        self._quic.send_stream_data(sid, data, end_stream=fin)
        if fin:
            session.streams[sid]["send_done"] = True
            emit({"event": "stream_done", "session_id": session.session_id, "stream_id": sid,
                  "kind": "bidi", "bytes": session.streams[sid]["bytes"]})
            self.forget_if_done(session, sid)

    def forget_if_done(self, session: Session, sid: int) -> None:
        st = session.streams.get(sid)
        if st is not None and st.get("fin") and st.get("send_done"):
            session.streams.pop(sid, None)

    def command(self, session: Session, sid: int, data: bytes) -> bool:
        text = data.decode("utf-8", errors="replace")
        st = session.streams[sid]
        if data == b"open-bidi":
            out = self.h3.create_webtransport_stream(session.session_id, is_unidirectional=False)
            self.h3.mark_webtransport_bidi(out, session.session_id)
            self._quic.send_stream_data(out, b"hello from origin", end_stream=True)
            session.streams[out] = {"buf": b"", "echoing": False, "fin": False, "kind": "bidi",
                                    "bytes": 0, "client": False, "send_done": True}
            session.record["server_streams"] += 1
            emit({"event": "command", "session_id": session.session_id, "stream_id": sid,
                  "command": "open-bidi", "opened_stream_id": out})
            self.send_back(session, sid, b"", True)
            return True
        if text.startswith("close:"):
            _, code_s, reason = text.split(":", 2) if text.count(":") >= 2 else (None, text[6:], "")
            try:
                code = int(code_s, 0) & 0xFFFFFFFF
            except ValueError:
                return False
            emit({"event": "command", "session_id": session.session_id, "stream_id": sid,
                  "command": "close", "code": code, "reason": reason})
            capsule = encode_capsule(CAPSULE_WT_CLOSE_SESSION,
                                     code.to_bytes(4, "big") + reason.encode()[:1024])
            self.h3.send_data(session.session_id, capsule, end_stream=True)
            session.record["_fin_sent"] = True
            session.record["closed_by_origin"] = {"code": code, "reason": reason}
            self.finish_session(session, how="origin_capsule", code=code, reason=reason)
            return True
        if text.startswith("reset:"):
            try:
                code = int(text[6:], 0) & 0xFFFFFFFF
            except ValueError:
                return False
            emit({"event": "command", "session_id": session.session_id, "stream_id": sid,
                  "command": "reset", "code": code, "h3_code": wt_to_h3(code)})
            self._quic.reset_stream(sid, wt_to_h3(code))
            st["send_done"] = True
            self.forget_if_done(session, sid)
            return True
        if text.startswith("record?"):
            found = RECORDS.get(text[len("record?"):])
            body = {"found": True, **{k: v for k, v in found.items() if not k.startswith("_")}} if found else {"found": False}
            self.send_back(session, sid, json.dumps(body).encode(), True)
            return True
        return False


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def main_async(args: argparse.Namespace) -> int:
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN,
        max_datagram_frame_size=65536,
        idle_timeout=args.idle_timeout,
    )
    config.load_cert_chain(args.cert, args.key)
    OriginProtocol.args = args
    host, port = args.listen
    server = await serve(host, port, configuration=config, create_protocol=OriginProtocol)
    bound = server._transport.get_extra_info("sockname")[1]
    emit({"port": bound})
    # Stops by itself after --lifetime seconds (a driver normally kills it
    # sooner).
    await asyncio.sleep(args.lifetime)
    server.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0), help="HOST:PORT (port 0: any)")
    p.add_argument("--cert", required=True, help="certificate chain (PEM)")
    p.add_argument("--key", required=True, help="private key (PEM)")
    p.add_argument("--wt-settings", choices=["both", "aioquic", "draft14", "draft16", "none"], default="both",
                   help="which WebTransport SETTINGS to send (see above)")
    p.add_argument("--keep-streams-on-close", action="store_true",
                   help="leave the session's streams alone when it ends (a peer that relies on the relay's "
                        "WT_SESSION_GONE resets)")
    p.add_argument("--wt-enabled", type=int, default=1,
                   help="draft16: the SETTINGS_WT_ENABLED value (1; above 1 is the client's H3_SETTINGS_ERROR)")
    p.add_argument("--wt-max-sessions", type=int, default=1,
                   help="SETTINGS_WT_MAX_SESSIONS value (>1 also declares flow control, which this origin does not do)")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="QUIC idle timeout (seconds)")
    p.add_argument("--lifetime", type=float, default=1800.0, help="exit after this many seconds")
    args = p.parse_args()
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
