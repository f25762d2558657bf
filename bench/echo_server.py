"""A gRPC stream that answers every message with the same bytes: the transport's floor beside
``bench.remote_round_trip``'s round trips (its "echo of the same bytes" column).

    python -m bench.echo_server < answer.bin   # prints its port, then serves until terminated

A grpc.aio server with the services' channel options (``extmind.channels.OPTIONS``, SO_REUSEPORT
off as ``services/common/server.py`` sets it), on 127.0.0.1 at a port the kernel picks, so no
other server can be bound to it by a race; standard input holds the answer. It imports grpc and
that module only, so it starts in well under a second.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from extmind.channels import OPTIONS

METHOD = "/bench.Echo/Echo"


async def serve(answer: bytes) -> None:
    async def echo(requests, context):
        async for _ in requests:
            yield answer

    server = grpc.aio.server(options=[*OPTIONS, ("grpc.so_reuseport", 0)])
    service, method = METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(service, {method: grpc.stream_stream_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.stdin.buffer.read()))
