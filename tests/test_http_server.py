"""services/common/http_server.py: the connections it accepts send small writes at once."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from services.common.http_server import start_http

REPO = Path(__file__).resolve().parents[1]


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


def test_the_first_streamed_answer_finds_anyios_backend_loaded():
    # Starlette streams in an anyio task group; anyio imports its asyncio backend on first use,
    # which the first streamed request after start paid before its first event (~25 ms on 2 CPU
    # cores). A fresh interpreter, since this one may have loaded it already.
    code = textwrap.dedent(
        """
        import asyncio, sys
        from services.common.http_server import start_http

        async def app(scope, receive, send):
            pass

        async def main():
            before = "anyio._backends._asyncio" in sys.modules
            hs = await start_http(app, "127.0.0.1", 0)
            print(before, "anyio._backends._asyncio" in sys.modules)
            await hs.stop(grace=1)

        asyncio.run(main())
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"], r.stdout
