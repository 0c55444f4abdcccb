#!/usr/bin/env python3
"""An independent HTTP/2 client (the Python ``h2`` package) for the relay's
TCP front: extended CONNECT (RFC 8441) connect-udp, connect-ip and bound
UDP (draft-ietf-masque-connect-udp-listen) tunnels carried as capsules,
classic CONNECT to TCP targets, the status endpoint, and requests that must
be refused. Bound UDP also runs over HTTP/1.1 (``--http1``: the Upgrade form
of RFC 9298 section 3.2, on a plain socket).

``h2`` shares no code with the relay (whose HTTP/2 is the Rust ``h2``
crate): framing, HPACK and flow control are its own. curl and nghttp cannot
send ``:protocol``; this client can.

Usage::

    h2_client.py --relay 127.0.0.1:4433 [--tls --ca cert.pem] --token T CASE [CASE ...]

Each case runs on its own TCP connection and prints one JSON object on one
line (``{"case": NAME, ...}``); bench/tests/tcp_front.rs asserts on them. A
case that cannot run prints ``{"case": NAME, "error": "..."}``. Every wait
has a deadline (``--timeout``), every loop a bound.
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

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

TEMPLATE = "/.well-known/masque/udp/{host}/{port}/"
IP_TEMPLATE = "/.well-known/masque/ip/{target}/{ipproto}/"
CAPSULE_DATAGRAM = 0x00
CAPSULE_ADDRESS_ASSIGN = 0x01
CAPSULE_ADDRESS_REQUEST = 0x02
CAPSULE_ROUTE_ADVERTISEMENT = 0x03
# draft-ietf-masque-connect-udp-listen section 3.
CAPSULE_COMPRESSION_ASSIGN = 0x11
CAPSULE_COMPRESSION_ACK = 0x12
CAPSULE_COMPRESSION_CLOSE = 0x13
STUN_COOKIE = 0x2112A442


class ClientError(Exception):
    """A case could not run."""


def encode_varint(v: int) -> bytes:
    if v < 0x40:
        return bytes([v])
    if v < 0x4000:
        return struct.pack(">H", 0x4000 | v)
    if v < 0x40000000:
        return struct.pack(">I", 0x80000000 | v)
    return struct.pack(">Q", 0xC000000000000000 | v)


def decode_varint(b: bytes, i: int) -> tuple[int, int] | None:
    if i >= len(b):
        return None
    prefix = b[i] >> 6
    n = 1 << prefix
    if i + n > len(b):
        return None
    v = b[i] & 0x3F
    for k in range(1, n):
        v = (v << 8) | b[i + k]
    return v, i + n


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    return encode_varint(capsule_type) + encode_varint(len(value)) + value


class CapsuleReader:
    """Splits a capsule stream (RFC 9297 section 3.2) into (type, value)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while True:
            t = decode_varint(self.buf, 0)
            if t is None:
                break
            ln = decode_varint(self.buf, t[1])
            if ln is None:
                break
            end = ln[1] + ln[0]
            if end > len(self.buf):
                break
            out.append((t[0], self.buf[ln[1]:end]))
            self.buf = self.buf[end:]
        return out


class H2Client:
    """One HTTP/2 connection to the relay, TLS (ALPN h2) or cleartext
    (prior knowledge)."""

    def __init__(self, args: argparse.Namespace, validate: bool = True) -> None:
        self.args = args
        host, port = args.relay.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=args.timeout)
        if args.tls:
            ctx = ssl.create_default_context(cafile=args.ca)
            ctx.set_alpn_protocols(["h2"])
            self.sock = ctx.wrap_socket(raw, server_hostname=args.server_name)
            if self.sock.selected_alpn_protocol() != "h2":
                raise ClientError(f"ALPN picked {self.sock.selected_alpn_protocol()!r}")
        else:
            self.sock = raw
        self.sock.settimeout(0.05)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        self.conn.increment_flow_control_window(8 << 20)
        self.flush()
        self.responses: dict[int, dict] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.terminated: int | None = None
        self.settings_seen = False
        self.closed = False

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self, wait: float = 0.05) -> None:
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(1 << 16)
        except (socket.timeout, ssl.SSLWantReadError, BlockingIOError):
            return
        except (ConnectionResetError, ssl.SSLError, OSError):
            self.closed = True
            return
        if not data:
            self.closed = True
            return
        for ev in self.conn.receive_data(data):
            self.on_event(ev)
        self.flush()

    def on_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            self.settings_seen = True
        elif isinstance(ev, h2.events.ResponseReceived):
            self.responses[ev.stream_id] = {k: v for k, v in ev.headers}
            if ev.stream_ended:
                self.ended.add(ev.stream_id)
        elif isinstance(ev, h2.events.DataReceived):
            self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if ev.stream_ended:
                self.ended.add(ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            self.ended.add(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            self.resets[ev.stream_id] = int(ev.error_code)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.terminated = int(ev.error_code)

    def wait(self, cond, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout or self.args.timeout)
        while time.monotonic() < deadline:
            if cond():
                return True
            if self.closed:
                return cond()
            self.pump()
        return cond()

    def wait_settings(self) -> None:
        if not self.wait(lambda: self.settings_seen):
            raise ClientError("no SETTINGS from the relay")

    def connect_protocol_enabled(self) -> bool:
        return self.conn.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == 1

    def auth(self) -> list[tuple[str, str]]:
        if self.args.authorization:
            return [("proxy-authorization", self.args.authorization)]
        return [("proxy-authorization", f"Bearer {self.args.token}")] if self.args.token else []

    def request(self, headers: list[tuple[str, str]], end_stream: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        # h2 validates every request as if it had :scheme and :path; a
        # classic CONNECT (RFC 9113 section 8.5) has neither, so its
        # outbound check is skipped for it.
        classic_connect = dict(headers).get(":method") == "CONNECT" and ":protocol" not in dict(headers)
        saved = self.conn.config.validate_outbound_headers
        if classic_connect:
            self.conn.config.validate_outbound_headers = False
        try:
            self.conn.send_headers(sid, headers, end_stream=end_stream)
        finally:
            self.conn.config.validate_outbound_headers = saved
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """Sends within flow control, pumping while the window is closed."""
        off = 0
        deadline = time.monotonic() + self.args.timeout
        while off < len(data):
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                if time.monotonic() > deadline:
                    raise ClientError("flow control window stayed closed")
                self.pump(0.01)
                continue
            chunk = data[off:off + window]
            self.conn.send_data(sid, chunk)
            off += len(chunk)
            self.flush()
            self.pump(0)
        if end_stream:
            self.conn.end_stream(sid)
            self.flush()

    def answer(self, sid: int) -> dict:
        self.wait(lambda: sid in self.responses or sid in self.resets)
        if sid in self.responses:
            h = self.responses[sid]
            return {"answer": "response", "status": int(h.get(":status", "0")), "headers": h}
        if sid in self.resets:
            return {"answer": "reset", "code": self.resets[sid]}
        return {"answer": "none"}

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
            self.sock.close()
        except OSError:
            pass


def authority(args: argparse.Namespace) -> str:
    return f"{args.server_name}:{args.relay.rsplit(':', 1)[1]}"


def case_status(args: argparse.Namespace) -> dict:
    c = H2Client(args)
    c.wait_settings()
    sid = c.request([(":method", "GET"), (":scheme", "https"), (":authority", authority(args)), (":path", "/")], True)
    r = c.answer(sid)
    c.wait(lambda: sid in c.ended)
    body = bytes(c.data.get(sid, b""))
    try:
        r["body"] = json.loads(body)
    except ValueError:
        r["body"] = body.decode("utf-8", "replace")
    r["connect_protocol"] = c.connect_protocol_enabled()
    c.close()
    return r


def udp_payloads(count: int) -> list[bytes]:
    return [os.urandom(1 + (i * 37) % 1200) for i in range(count)]


def case_connect_udp(args: argparse.Namespace) -> dict:
    c = H2Client(args)
    c.wait_settings()
    if not c.connect_protocol_enabled():
        raise ClientError("the relay did not enable extended CONNECT")
    path = TEMPLATE.format(host=args.target_host, port=args.target_port)
    headers = [
        (":method", "CONNECT"),
        (":protocol", "connect-udp"),
        (":scheme", "https"),
        (":authority", authority(args)),
        (":path", path),
        ("capsule-protocol", "?1"),
    ] + c.auth()
    sid = c.request(headers)
    r = c.answer(sid)
    if r.get("status") != 200:
        c.close()
        return r
    payloads = udp_payloads(args.count)
    want = {hashlib.sha256(p).digest() for p in payloads}
    reader = CapsuleReader()
    got = 0
    mismatched = 0
    other = 0
    # A window of capsules in flight: loopback UDP loses nothing, but the
    # relay drops what its bounded queues cannot take, never buffering
    # without bound; keep the burst small.
    sent = 0
    deadline = time.monotonic() + args.timeout
    seen = set()
    while time.monotonic() < deadline and (got < len(payloads)):
        while sent < len(payloads) and sent - got < 32:
            c.send(sid, encode_capsule(CAPSULE_DATAGRAM, encode_varint(0) + payloads[sent]))
            sent += 1
        c.pump(0.02)
        for t, v in reader.feed(bytes(c.data.pop(sid, b""))):
            if t != CAPSULE_DATAGRAM:
                other += 1
                continue
            ctx = decode_varint(v, 0)
            if ctx is None or ctx[0] != 0:
                other += 1
                continue
            digest = hashlib.sha256(v[ctx[1]:]).digest()
            if digest in want and digest not in seen:
                seen.add(digest)
                got += 1
            else:
                mismatched += 1
        if sid in c.resets or sid in c.ended:
            break
    # RFC 9298 section 3: ending the stream closes the tunnel.
    c.conn.end_stream(sid)
    c.flush()
    c.wait(lambda: sid in c.ended or sid in c.resets, 5)
    r.update({"sent": sent, "matched": got, "mismatched": mismatched, "other_capsules": other,
              "ended": sid in c.ended, "reset": c.resets.get(sid)})
    c.close()
    return r


def icmp_checksum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\x00"
    s = sum(struct.unpack(f">{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo_request(src: bytes, dst: bytes, ident: int, seq: int) -> bytes:
    payload = b"masque-h2-" + bytes([seq % 256]) * 32
    icmp = struct.pack(">BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack(">H", icmp_checksum(icmp)) + icmp[4:]
    total = 20 + len(icmp)
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, seq, 0, 64, 1, 0, src, dst)
    hdr = hdr[:10] + struct.pack(">H", icmp_checksum(hdr)) + hdr[12:]
    return hdr + icmp


def address_entries(v: bytes) -> list[tuple[int, str, int]]:
    """The (request ID, address, prefix length) entries of an ADDRESS_ASSIGN
    value (RFC 9484 section 4.7.1)."""
    out = []
    i = 0
    while i < len(v):
        rid = decode_varint(v, i)
        if rid is None:
            raise ClientError("truncated ADDRESS_ASSIGN")
        version = v[rid[1]]
        n = 4 if version == 4 else 16
        start = rid[1] + 1
        addr = v[start:start + n]
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        out.append((rid[0], socket.inet_ntop(family, addr), v[start + n]))
        i = start + n + 1
    return out


def case_connect_ip(args: argparse.Namespace) -> dict:
    """connect-ip over HTTP/2: ADDRESS_ASSIGN, then pings to --ping-target
    through the tunnel (IPv4). With --request-address, that IPv4 address is
    asked for first (ADDRESS_REQUEST, request ID 5) and, when granted, the
    pings go from it."""
    c = H2Client(args)
    c.wait_settings()
    path = IP_TEMPLATE.format(target="*", ipproto="*")
    headers = [
        (":method", "CONNECT"),
        (":protocol", "connect-ip"),
        (":scheme", "https"),
        (":authority", authority(args)),
        (":path", path),
        ("capsule-protocol", "?1"),
    ] + c.auth()
    sid = c.request(headers)
    r = c.answer(sid)
    if r.get("status") != 200:
        c.close()
        return r
    reader = CapsuleReader()
    assigned = None
    routes = 0
    replies = 0
    deadline = time.monotonic() + args.timeout
    sent = 0
    ident = os.getpid() & 0xFFFF
    dst = socket.inet_aton(args.ping_target)
    requested = None  # the answer to request 5, once it came
    asked = False
    source = None  # where the pings come from
    while time.monotonic() < deadline and replies < args.count:
        c.pump(0.02)
        for t, v in reader.feed(bytes(c.data.pop(sid, b""))):
            if t == CAPSULE_ADDRESS_ASSIGN:
                entries = address_entries(v)
                if assigned is None:
                    first = [a for (rid, a, _) in entries if rid == 0 and ":" not in a]
                    assigned = socket.inet_aton(first[0]) if first else None
                for rid, a, _ in entries:
                    if rid == 5 and asked:
                        requested = a
            elif t == CAPSULE_ROUTE_ADVERTISEMENT:
                routes += 1
            elif t == CAPSULE_DATAGRAM:
                ctx = decode_varint(v, 0)
                pkt = v[ctx[1]:] if ctx else b""
                if len(pkt) >= 28 and pkt[9] == 1 and pkt[20] == 0 and pkt[12:16] == dst:
                    replies += 1
        if assigned is not None and args.request_sibling is not None and not args.request_address:
            args.request_address = socket.inet_ntoa(assigned[:3] + bytes([(assigned[3] & 0x80) | args.request_sibling]))
        if assigned is not None and args.request_address and not asked:
            value = encode_varint(5) + bytes([4]) + socket.inet_aton(args.request_address) + bytes([32])
            c.send(sid, encode_capsule(CAPSULE_ADDRESS_REQUEST, value))
            asked = True
        if source is None and assigned is not None:
            if not args.request_address:
                source = assigned
            elif requested is not None:
                source = socket.inet_aton(requested) if requested != "0.0.0.0" else assigned
        if source is not None and sent < args.count and sent <= replies:
            pkt = echo_request(source, dst, ident, sent + 1)
            c.send(sid, encode_capsule(CAPSULE_DATAGRAM, encode_varint(0) + pkt))
            sent += 1
        if sid in c.resets or sid in c.ended:
            break
    r.update({"assigned": socket.inet_ntoa(assigned) if assigned else None, "routes": routes,
              "sent": sent, "replies": replies, "requested": requested,
              "source": socket.inet_ntoa(source) if source else None})
    c.close()
    return r


def case_tcp_connect(args: argparse.Namespace) -> dict:
    """Classic CONNECT to --target-host:--target-port (an echo server):
    --bytes random bytes up, the same back, then half-close both ways."""
    c = H2Client(args)
    c.wait_settings()
    target = f"{args.target_host}:{args.target_port}"
    if ":" in args.target_host:
        target = f"[{args.target_host}]:{args.target_port}"
    sid = c.request([(":method", "CONNECT"), (":authority", target)] + c.auth())
    r = c.answer(sid)
    if r.get("status") != 200:
        c.close()
        return r
    data = os.urandom(args.bytes)
    started = time.monotonic()
    c.send(sid, data, end_stream=True)
    c.wait(lambda: len(c.data.get(sid, b"")) >= len(data) or sid in c.resets, args.timeout)
    # The echo server closes after our FIN: the relay passes its FIN on.
    c.wait(lambda: sid in c.ended or sid in c.resets, 10)
    back = bytes(c.data.get(sid, b""))
    r.update({"sent": len(data), "received": len(back), "identical": back == data,
              "ended": sid in c.ended, "reset": c.resets.get(sid),
              "seconds": round(time.monotonic() - started, 3)})
    c.close()
    return r


def case_refusals(args: argparse.Namespace) -> dict:
    """Requests the relay must refuse, each on its own stream."""
    out = {}
    c = H2Client(args)
    c.wait_settings()
    auth = c.auth()
    a = authority(args)
    udp_path = TEMPLATE.format(host=args.target_host, port=args.target_port)
    cases = {
        "denied_tcp": [(":method", "CONNECT"), (":authority", "10.1.2.3:22")] + auth,
        "bad_authority": [(":method", "CONNECT"), (":authority", "no-port.example")] + auth,
        "no_token": [(":method", "CONNECT"), (":protocol", "connect-udp"), (":scheme", "https"),
                     (":authority", a), (":path", udp_path)],
        "wrong_template": [(":method", "CONNECT"), (":protocol", "connect-udp"), (":scheme", "https"),
                           (":authority", a), (":path", "/nope/")] + auth,
        "unknown_protocol": [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                             (":authority", a), (":path", "/chat")] + auth,
        "post": [(":method", "POST"), (":scheme", "https"), (":authority", a), (":path", "/")],
        "not_found": [(":method", "GET"), (":scheme", "https"), (":authority", a), (":path", "/nope")],
    }
    sids = {name: c.request(h, end_stream=name in ("post", "not_found")) for name, h in cases.items()}
    for name, sid in sids.items():
        out[name] = c.answer(sid)
    c.close()
    # A malformed request (uppercase field name, RFC 9113 section 8.2.1)
    # on a client that does not validate what it sends.
    c = H2Client(args, validate=False)
    c.wait_settings()
    sid = c.request([(":method", "CONNECT"), (":authority", "127.0.0.1:9"), ("X-Upper", "1")] + auth)
    r = c.answer(sid)
    r["terminated"] = c.terminated
    out["uppercase"] = r
    c.close()
    return out


def stun_binding_request(txid: bytes) -> bytes:
    """RFC 8489 section 5: a Binding request without attributes."""
    return struct.pack(">HHI", 0x0001, 0, STUN_COOKIE) + txid


def stun_mapped_address(resp: bytes, txid: bytes) -> str | None:
    """The XOR-MAPPED-ADDRESS (RFC 8489 section 14.2) of a Binding success
    response to `txid`, as "ip:port" ("[ip]:port" for IPv6)."""
    if len(resp) < 20 or resp[0:2] != b"\x01\x01" or resp[4:8] != struct.pack(">I", STUN_COOKIE) or resp[8:20] != txid:
        return None
    i = 20
    while i + 4 <= len(resp):
        kind, ln = struct.unpack(">HH", resp[i:i + 4])
        value = resp[i + 4:i + 4 + ln]
        if kind == 0x0020 and len(value) >= 8:
            port = struct.unpack(">H", value[2:4])[0] ^ (STUN_COOKIE >> 16)
            if value[1] == 1:
                ip = bytes(a ^ b for a, b in zip(value[4:8], struct.pack(">I", STUN_COOKIE)))
                return f"{socket.inet_ntoa(ip)}:{port}"
            key = struct.pack(">I", STUN_COOKIE) + txid
            ip = bytes(a ^ b for a, b in zip(value[4:20], key))
            return f"[{socket.inet_ntop(socket.AF_INET6, ip)}]:{port}"
        i += 4 + ln + (-ln % 4)
    return None


def encode_peer(host: str, port: int) -> bytes:
    """IP Version, IP Address, UDP Port (the bind draft's sections 3.1 and 4)."""
    if ":" in host:
        return bytes([6]) + socket.inet_pton(socket.AF_INET6, host) + struct.pack(">H", port)
    return bytes([4]) + socket.inet_aton(host) + struct.pack(">H", port)


def decode_peer(v: bytes) -> tuple[str, bytes] | None:
    """The peer ("ip:port") and UDP payload of an uncompressed payload."""
    if not v:
        return None
    n = {4: 4, 6: 16}.get(v[0])
    if n is None or len(v) < 1 + n + 2:
        return None
    family = socket.AF_INET if v[0] == 4 else socket.AF_INET6
    ip = socket.inet_ntop(family, v[1:1 + n])
    port = struct.unpack(">H", v[1 + n:3 + n])[0]
    host = f"[{ip}]" if family == socket.AF_INET6 else ip
    return f"{host}:{port}", v[3 + n:]


class H2Stream:
    """A capsule tunnel on one HTTP/2 stream."""

    def __init__(self, args: argparse.Namespace, path: str, fields: list[tuple[str, str]]) -> None:
        self.c = H2Client(args)
        self.c.wait_settings()
        if not self.c.connect_protocol_enabled():
            raise ClientError("the relay did not enable extended CONNECT")
        headers = [
            (":method", "CONNECT"),
            (":protocol", "connect-udp"),
            (":scheme", "https"),
            (":authority", authority(args)),
            (":path", path),
        ] + fields + self.c.auth()
        self.sid = self.c.request(headers)
        r = self.c.answer(self.sid)
        self.status = r.get("status")
        self.headers = r.get("headers", {})

    def send(self, data: bytes) -> None:
        self.c.send(self.sid, data)

    def recv(self) -> bytes:
        self.c.pump(0.02)
        return bytes(self.c.data.pop(self.sid, b""))

    def close(self) -> None:
        self.c.close()


class Http1Stream:
    """A capsule tunnel after an HTTP/1.1 Upgrade (RFC 9298 section 3.2) on
    a plain socket to the relay's cleartext listener."""

    def __init__(self, args: argparse.Namespace, path: str, fields: list[tuple[str, str]]) -> None:
        host, port = args.relay.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=args.timeout)
        lines = [f"GET {path} HTTP/1.1", f"Host: {authority(args)}", "Connection: Upgrade", "Upgrade: connect-udp"]
        lines += [f"{k}: {v}" for k, v in fields]
        if args.token:
            lines.append(f"Proxy-Authorization: Bearer {args.token}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        deadline = time.monotonic() + args.timeout
        while b"\r\n\r\n" not in head:
            if time.monotonic() > deadline:
                raise ClientError("no response head")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ClientError("the relay closed before answering")
            head += chunk
        head, self.rest = head.split(b"\r\n\r\n", 1)
        status_line, *field_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1])
        self.headers = {}
        for line in field_lines:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.sock.settimeout(0.02)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        out, self.rest = self.rest, b""
        try:
            out += self.sock.recv(1 << 16)
        except (socket.timeout, BlockingIOError):
            pass
        return out

    def close(self) -> None:
        self.sock.close()


def case_bind_stun(args: argparse.Namespace) -> dict:
    """Bound UDP (draft-ietf-masque-connect-udp-listen) over HTTP/2, or
    HTTP/1.1 with --http1: the request with Connect-UDP-Bind, the
    uncompressed context registered (COMPRESSION_ASSIGN with IP version 0,
    then its ACK), and a STUN Binding request to --stun through it; the
    mapping the STUN server saw is the relay's announced public address."""
    path = TEMPLATE.format(host="%2A", port="%2A")
    fields = [("capsule-protocol", "?1"), ("connect-udp-bind", "?1")]
    t = (Http1Stream if args.http1 else H2Stream)(args, path, fields)
    r = {"status": t.status, "bind": t.headers.get("connect-udp-bind"),
         "public": [p.strip().strip('"') for p in t.headers.get("proxy-public-address", "").split(",") if p.strip()]}
    if t.status not in (101, 200):
        t.close()
        return r
    reader = CapsuleReader()
    ctx = 2
    t.send(encode_capsule(CAPSULE_COMPRESSION_ASSIGN, encode_varint(ctx) + bytes([0])))
    stun_host, stun_port = args.stun.rsplit(":", 1)
    txid = os.urandom(12)
    acked = False
    mapped = source = None
    last_sent = 0.0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and mapped is None:
        if acked and time.monotonic() - last_sent > 0.2:
            payload = encode_peer(stun_host, int(stun_port)) + stun_binding_request(txid)
            t.send(encode_capsule(CAPSULE_DATAGRAM, encode_varint(ctx) + payload))
            last_sent = time.monotonic()
        for kind, v in reader.feed(t.recv()):
            if kind == CAPSULE_COMPRESSION_ACK and decode_varint(v, 0) == (ctx, len(v)):
                acked = True
            elif kind == CAPSULE_DATAGRAM:
                c = decode_varint(v, 0)
                if c is None or c[0] != ctx:
                    continue
                peer = decode_peer(v[c[1]:])
                if peer is not None:
                    found = stun_mapped_address(peer[1], txid)
                    if found is not None:
                        mapped, source = found, peer[0]
    r.update({"acked": acked, "mapped": mapped, "from": source})
    t.close()
    return r


def case_h2c_window(args: argparse.Namespace) -> dict:
    """An h2c Upgrade (RFC 7540 section 3.2) of GET / on the cleartext
    listener: the relay answers stream 1 itself, using part of the client's
    connection window. Then a classic CONNECT to the TCP echo at
    --target-host:--target-port carries --bytes both ways while the client
    withholds every WINDOW_UPDATE: the relay's DATA must stop at the
    client's true connection window (this client's h2 raises
    FLOW_CONTROL_ERROR on an overshoot). Then the client grants window and
    the rest arrives."""
    host, port = args.relay.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=args.timeout)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    settings = conn.initiate_upgrade_connection().decode()
    head = (f"GET / HTTP/1.1\r\nHost: {authority(args)}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            f"Upgrade: h2c\r\nHTTP2-Settings: {settings}\r\n\r\n")
    sock.sendall(head.encode())
    got = b""
    deadline = time.monotonic() + args.timeout
    while b"\r\n\r\n" not in got:
        if time.monotonic() > deadline:
            raise ClientError("no answer to the upgrade")
        chunk = sock.recv(4096)
        if not chunk:
            raise ClientError("closed before the 101")
        got += chunk
    status_line, rest = got.split(b"\r\n\r\n", 1)
    r: dict = {"upgrade": int(status_line.split(b" ")[1])}
    if r["upgrade"] != 101:
        return r
    sock.sendall(conn.data_to_send())
    data: dict[int, bytearray] = {}
    flow: dict[int, int] = {}
    responses: dict[int, dict] = {}
    ended: set[int] = set()
    error = None

    def feed(b: bytes) -> None:
        nonlocal error
        if not b or error:
            return
        try:
            events = conn.receive_data(b)
        except h2.exceptions.FlowControlError as e:
            error = str(e)
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                responses[ev.stream_id] = dict(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                flow[ev.stream_id] = flow.get(ev.stream_id, 0) + ev.flow_controlled_length
            elif isinstance(ev, h2.events.StreamEnded):
                ended.add(ev.stream_id)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)

    def pump(wait: float) -> bool:
        sock.settimeout(wait)
        try:
            b = sock.recv(1 << 16)
        except socket.timeout:
            return False
        if not b:
            return False
        feed(b)
        return True

    feed(rest)
    deadline = time.monotonic() + args.timeout
    while 1 not in ended and time.monotonic() < deadline and not error:
        pump(0.05)
    r["stream1_status"] = int(responses.get(1, {}).get(":status", "0"))
    r["stream1_bytes"] = flow.get(1, 0)
    r["window"] = 65535 - r["stream1_bytes"]
    target = f"{args.target_host}:{args.target_port}"
    sid = conn.get_next_available_stream_id()
    conn.config.validate_outbound_headers = False
    conn.send_headers(sid, [(":method", "CONNECT"), (":authority", target),
                            ("proxy-authorization", f"Bearer {args.token}")])
    sock.sendall(conn.data_to_send())
    while sid not in responses and time.monotonic() < deadline and not error:
        pump(0.05)
    r["status"] = int(responses.get(sid, {}).get(":status", "0"))
    if r["status"] != 200:
        r["flow_control_error"] = error
        return r
    payload = os.urandom(args.bytes)
    off = 0
    while off < len(payload) and time.monotonic() < deadline and not error:
        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if window > 0:
            conn.send_data(sid, payload[off:off + window])
            off += window
            sock.sendall(conn.data_to_send())
        else:
            pump(0.01)
    conn.end_stream(sid)
    sock.sendall(conn.data_to_send())
    # Withholding: read until nothing more comes for a second.
    quiet = time.monotonic()
    while time.monotonic() - quiet < 1.0 and time.monotonic() < deadline and not error:
        if pump(0.1):
            quiet = time.monotonic()
    r["before_update"] = flow.get(sid, 0)
    # Now grant the window consumed so far, on both streams.
    if not error:
        for stream, n in flow.items():
            conn.acknowledge_received_data(n, stream)
        flow_acked = dict(flow)
        sock.sendall(conn.data_to_send())
        while (len(data.get(sid, b"")) < len(payload) or sid not in ended) and time.monotonic() < deadline \
                and not error:
            if pump(0.05):
                extra = flow.get(sid, 0) - flow_acked.get(sid, 0)
                if extra > 0:
                    conn.acknowledge_received_data(extra, sid)
                    flow_acked[sid] = flow[sid]
                    out = conn.data_to_send()
                    if out:
                        sock.sendall(out)
    back = bytes(data.get(sid, b""))
    r.update({"flow_control_error": error, "received": len(back), "identical": back == payload,
              "ended": sid in ended})
    sock.close()
    return r


CASES = {
    "status": case_status,
    "h2c_window": case_h2c_window,
    "bind_stun": case_bind_stun,
    "connect_udp": case_connect_udp,
    "connect_ip": case_connect_ip,
    "tcp_connect": case_tcp_connect,
    "refusals": case_refusals,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relay", required=True, help="host:port of the relay's TCP listener")
    p.add_argument("--tls", action="store_true", help="TLS with ALPN h2 (else cleartext prior knowledge)")
    p.add_argument("--ca", help="CA certificate to verify the relay with")
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--token")
    p.add_argument("--authorization", help="the whole Proxy-Authorization value (overrides --token), "
                   "e.g. a Privacy Pass credential")
    p.add_argument("--target-host", default="127.0.0.1")
    p.add_argument("--target-port", type=int, default=7)
    p.add_argument("--ping-target", default="192.0.2.1")
    p.add_argument("--request-address", help="connect_ip: ask for this IPv4 address first")
    p.add_argument("--request-sibling", type=int,
                   help="connect_ip: ask first for the assigned IPv4 address with the low 7 bits of "
                        "its last octet set to this (the same /25: the worker's share of a /24 pool "
                        "split between two workers)")
    p.add_argument("--stun", default="127.0.0.1:3478", help="bind_stun: the STUN server (ip:port)")
    p.add_argument("--http1", action="store_true", help="bind_stun: HTTP/1.1 Upgrade on a plain socket")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("cases", nargs="+", choices=sorted(CASES))
    args = p.parse_args()
    for name in args.cases:
        try:
            result = CASES[name](args)
        except (ClientError, OSError, h2.exceptions.H2Error) as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        result["case"] = name
        print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
