#!/usr/bin/env python3
"""An upstream WebSocket origin for the relay's WebSocket tests, on the
``websockets`` package's asyncio server (an implementation that shares no
code with the relay).

It echoes every message as it came (text stays text, binary stays binary)
and prints one JSON line on stdout once it listens: ``{"port": N}``; then
nothing more on stdout (a driver may stop reading). Diagnostics go to
stderr.

Options change how it answers the handshake:

- ``--subprotocol P`` (repeatable): the subprotocols it supports; it picks
  the first of them the client offered, and goes on without one when the
  client offered none of them.
- ``--refuse STATUS``: refuses every handshake with that HTTP status
  (``process_request``), e.g. 403.
- ``--close CODE [--close-reason TEXT]``: closes every connection right
  after the handshake with that close code and reason.

It records what each request looked like upstream (the relay's side of the
story). Special text messages ask for it instead of being echoed:

- ``headers?``: a JSON text message ``{"path": ..., "headers": {...}}``
  with the request's path and header fields (names lower-cased, repeated
  fields joined with ", "), as this origin received them.
- ``record?TAG``: a JSON text message with the record of the connection
  whose request path carried the query ``tag=TAG`` (``{"found": false}``
  when there was none): ``opened``, ``closed``, ``close_code`` (what the
  client side sent, 1006 for an abrupt end), ``messages`` and ``bytes``
  received, and the path and headers.
- ``close?CODE REASON``: the origin closes this connection with that code
  and reason (after the handshake, whenever the client asks).

Usage::

    ws_origin.py [--host 127.0.0.1] [--port 0] [--subprotocol chat.v1]
                 [--refuse 403] [--close 4000 --close-reason bye]
                 [--tls-cert cert.pem --tls-key key.pem]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import urllib.parse

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

# Records by tag (the `tag` query parameter of the request path) and by
# connection; bounded so a long run cannot grow it without end.
MAX_RECORDS = 10_000
RECORDS: dict[str, dict] = {}


def header_dict(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.headers.raw_items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def tag_of(path: str) -> str | None:
    query = urllib.parse.urlsplit(path).query
    tags = urllib.parse.parse_qs(query).get("tag")
    return tags[0] if tags else None


def new_record(request: Request) -> dict:
    record = {
        "path": request.path,
        "headers": header_dict(request),
        "opened": False,
        "closed": False,
        "close_code": None,
        "close_reason": None,
        "messages": 0,
        "bytes": 0,
    }
    tag = tag_of(request.path)
    if tag is not None and (tag in RECORDS or len(RECORDS) < MAX_RECORDS):
        RECORDS[tag] = record
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--subprotocol", action="append", default=[], help="a subprotocol it supports")
    p.add_argument("--refuse", type=int, help="refuse every handshake with this HTTP status")
    p.add_argument("--close", type=int, help="close right after the handshake with this code")
    p.add_argument("--close-reason", default="")
    p.add_argument("--max-size", type=int, default=64 << 20, help="largest message accepted")
    p.add_argument("--tls-cert", help="serve wss:// with this certificate (PEM; checking clients without the relay)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    args = p.parse_args()
    return asyncio.run(serve_forever(args))


async def serve_forever(args: argparse.Namespace) -> int:
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    def process_request(connection: ServerConnection, request: Request):
        connection.ws_origin_record = new_record(request)
        if args.refuse is not None:
            return connection.respond(args.refuse, f"refused with {args.refuse}\n")
        return None

    def select_subprotocol(connection: ServerConnection, offered):
        for mine in args.subprotocol:
            if mine in offered:
                return mine
        return None

    async def handler(ws: ServerConnection) -> None:
        record = getattr(ws, "ws_origin_record", None) or new_record(ws.request)
        record["opened"] = True
        try:
            if args.close is not None:
                await ws.close(args.close, args.close_reason)
                return
            async for message in ws:
                record["messages"] += 1
                record["bytes"] += len(message)
                if isinstance(message, str) and message == "headers?":
                    await ws.send(json.dumps({"path": record["path"], "headers": record["headers"]}))
                elif isinstance(message, str) and message.startswith("record?"):
                    found = RECORDS.get(message[len("record?"):])
                    await ws.send(json.dumps({"found": True, **found} if found else {"found": False}))
                elif isinstance(message, str) and message.startswith("close?"):
                    code, _, reason = message[len("close?"):].partition(" ")
                    await ws.close(int(code), reason)
                    return
                else:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            # Wait for the closing handshake (or the abrupt end) to settle.
            try:
                await asyncio.wait_for(ws.wait_closed(), 10)
            except asyncio.TimeoutError:
                pass
            record["closed"] = True
            # The code the client side sent, 1006 when it sent none.
            record["close_code"] = ws.close_code
            record["close_reason"] = ws.close_reason

    async with serve(
        handler,
        args.host,
        args.port,
        process_request=process_request,
        select_subprotocol=select_subprotocol,
        ping_interval=None,
        max_size=args.max_size,
        # Large messages both ways: the echo's reads wait on its writes,
        # which is the backpressure the tests look for.
        max_queue=4,
        server_header="ws_origin.py",
        ssl=tls,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await asyncio.get_running_loop().create_future()
    return 0


if __name__ == "__main__":
    sys.exit(main())
