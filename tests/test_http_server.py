"""services/common/http_server.py: the connections it accepts send small writes at once."""

from __future__ import annotations

import asyncio
import socket

from services.common.http_server import start_http


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_accepted_connections_have_nagle_off():
    # A streamed answer is many small writes (server-sent events); with Nagle on, each waits for
    # the ACK of the previous one, which a client delays by up to ~40 ms on a keep-alive connection.
    hs = await start_http(_ok, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", hs.port)
        for _ in range(2):  # a keep-alive connection's first and second requests
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"ok")
        (conn,) = hs._server.server_state.connections
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        writer.close()
        await writer.wait_closed()
    finally:
        await hs.stop(grace=1)
