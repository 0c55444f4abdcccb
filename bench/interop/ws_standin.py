#!/usr/bin/env python3
"""A stand-in for the relay's WebSocket relaying, to check ws_client.py's
HTTP/2 and HTTP/3 code without the relay (it is not used by the tests).

It serves RFC 8441 on HTTP/2 (the ``h2`` package; cleartext with prior
knowledge, and TLS with ALPN h2) and RFC 9220 on HTTP/3 (aioquic, a self-signed certificate for
"localhost" it writes to --state), and turns each extended CONNECT with
``:protocol websocket`` into an HTTP/1.1 Upgrade to --origin, the way the
relay's design says: Sec-WebSocket-Protocol / -Extensions / Origin passed
on, 200 with the origin's choices for its 101, 502 with Proxy-Status
``error=http_upgrade_failed; received-status=N`` for anything else, 502
``connection_refused`` when nothing listens, 501 for another
``:protocol``; then bytes both ways. A request path starting with /down/
goes to --down (a port where nothing listens) instead.

Prints ``{"h2": PORT, "h2_tls": PORT, "h3": PORT, "ca": PATH}`` on stdout
once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamReset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PASSED = ("sec-websocket-protocol", "sec-websocket-extensions", "origin")


def self_signed(state: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(state, exist_ok=True)
    cert_path, key_path = os.path.join(state, "cert.pem"), os.path.join(state, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


async def upstream(args, headers: dict[str, str]):
    """Opens the origin's WebSocket; returns (status, response fields,
    reader, writer) with reader/writer None when refused."""
    path = headers.get(":path", "/")
    port = args.down if path.startswith("/down/") else args.origin
    if headers.get(":protocol") != "websocket":
        return 501, [], None, None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 502, [("proxy-status", "ws_standin; error=connection_refused")], None, None
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {headers[k]}" for k in PASSED if k in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ")[1])
    got = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields if ":" in f)}
    if status != 101:
        writer.close()
        return 502, [("proxy-status", f"ws_standin; error=http_upgrade_failed; received-status={status}")], \
            None, None
    return 200, [(k, got[k]) for k in PASSED[:2] if k in got], reader, writer


# -- HTTP/2 ---------------------------------------------------------------


async def h2_connection(args, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
    writer.write(conn.data_to_send())
    ups: dict[int, asyncio.StreamWriter] = {}
    window = asyncio.Event()
    tasks = set()

    def flush() -> None:
        out = conn.data_to_send()
        if out:
            writer.write(out)

    async def down(sid: int, r: asyncio.StreamReader) -> None:
        while True:
            data = await r.read(65536)
            if not data:
                break
            while data:
                if conn.state_machine.state == h2.connection.ConnectionState.CLOSED:
                    return
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(data))
                if n <= 0:
                    window.clear()
                    await window.wait()
                    continue
                conn.send_data(sid, data[:n])
                data = data[n:]
                flush()
        try:
            conn.end_stream(sid)
            flush()
        except h2.exceptions.H2Error:
            pass  # the client reset the stream or closed the connection

    async def open_stream(sid: int, headers: dict[str, str]) -> None:
        status, fields, r, w = await upstream(args, headers)
        conn.send_headers(sid, [(":status", str(status))] + fields, end_stream=r is None)
        flush()
        if r is not None:
            ups[sid] = w
            t = asyncio.ensure_future(down(sid, r))
            tasks.add(t)

    while True:
        data = await reader.read(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                t = asyncio.ensure_future(open_stream(ev.stream_id, dict(ev.headers)))
                tasks.add(t)
            elif isinstance(ev, h2.events.DataReceived):
                w = ups.get(ev.stream_id)
                if w is not None:
                    w.write(ev.data)
                    await w.drain()
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                w = ups.get(ev.stream_id)
                if w is not None and w.can_write_eof():
                    w.write_eof()
            elif isinstance(ev, h2.events.StreamReset):
                w = ups.pop(ev.stream_id, None)
                if w is not None:
                    w.transport.abort()
            elif isinstance(ev, h2.events.WindowUpdated):
                window.set()
        flush()
    for w in ups.values():
        w.transport.abort()


# -- HTTP/3 ---------------------------------------------------------------


class H3Standin(QuicConnectionProtocol):
    args: argparse.Namespace

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.h3 = H3Connection(self._quic)
        self.ups: dict[int, asyncio.StreamWriter] = {}
        self.early: dict[int, bytearray] = {}

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamReset):
            w = self.ups.pop(event.stream_id, None)
            if w is not None:
                w.transport.abort()
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                headers = {k.decode(): v.decode() for k, v in ev.headers}
                asyncio.ensure_future(self.open_stream(ev.stream_id, headers))
            elif isinstance(ev, DataReceived):
                w = self.ups.get(ev.stream_id)
                if w is not None:
                    w.write(ev.data)
                    if ev.stream_ended and w.can_write_eof():
                        w.write_eof()
                else:
                    self.early.setdefault(ev.stream_id, bytearray()).extend(ev.data)

    async def open_stream(self, sid: int, headers: dict[str, str]) -> None:
        status, fields, r, w = await upstream(self.args, headers)
        self.h3.send_headers(sid, [(b":status", str(status).encode())] +
                             [(k.encode(), v.encode()) for k, v in fields], end_stream=r is None)
        self.transmit()
        if r is None:
            return
        self.ups[sid] = w
        w.write(bytes(self.early.pop(sid, b"")))
        while True:
            data = await r.read(65536)
            if not data:
                break
            self.h3.send_data(sid, data, end_stream=False)
            self.transmit()
        try:
            self.h3.send_data(sid, b"", end_stream=True)
            self.transmit()
        except Exception:
            pass


async def main_async(args) -> int:
    cert, key = self_signed(args.state)
    server = await asyncio.start_server(lambda r, w: h2_connection(args, r, w), "127.0.0.1", 0)
    h2_port = server.sockets[0].getsockname()[1]
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    tls.set_alpn_protocols(["h2"])
    tls_server = await asyncio.start_server(lambda r, w: h2_connection(args, r, w), "127.0.0.1", 0, ssl=tls)
    h2_tls_port = tls_server.sockets[0].getsockname()[1]
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    config.load_cert_chain(cert, key)
    H3Standin.args = args
    quic = await serve("127.0.0.1", 0, configuration=config, create_protocol=H3Standin)
    h3_port = quic._transport.get_extra_info("sockname")[1]
    print(json.dumps({"h2": h2_port, "h2_tls": h2_tls_port, "h3": h3_port, "ca": cert}), flush=True)
    await asyncio.get_running_loop().create_future()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--origin", type=int, required=True, help="the origin's port on 127.0.0.1")
    p.add_argument("--down", type=int, default=9, help="a port on 127.0.0.1 where nothing listens")
    p.add_argument("--state", default="/tmp/ws-standin")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
