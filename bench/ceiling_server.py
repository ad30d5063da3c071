"""The least work a Python gRPC server can do: the ceiling of any grpc.aio server on this machine.

It answers one method (`/kv.v1.KeyValue/Get` by default) with fixed response bytes, read from a
file, and does nothing else: no parsing, no lookup, no metrics, no interceptors. Measured with
the same h2load command as kv's Get, it shows how much of kv's gap to etcd is the grpcio runtime
itself (HTTP/2, the completion queue, the asyncio event loop) rather than kv's code. With
--processes N, N such processes share the port (SO_REUSEPORT; the kernel spreads connections
over them): what running several server processes could add on this machine.

    python bench/ceiling_server.py --port 50199 --response get-response.bin [--processes 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio
import uvloop


async def serve(port: int, service: str, method: str, response: bytes, shared: bool) -> None:
    async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return response

    # Raw bytes in and out (no (de)serialiser), on uvloop: the same loop kv-server runs on.
    handlers = {method: grpc.unary_unary_rpc_method_handler(answer)}
    handler = grpc.method_handlers_generic_handler(service, handlers)
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(shared))])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--response", type=Path, required=True, help="file with the response message bytes")
    p.add_argument("--method", default="/kv.v1.KeyValue/Get", help="the one method answered")
    p.add_argument("--processes", type=int, default=1, help="server processes sharing the port")
    ns = p.parse_args(argv)
    service, method = ns.method.strip("/").split("/")
    args = (ns.port, service, method, ns.response.read_bytes(), ns.processes > 1)
    if ns.processes == 1:
        uvloop.run(serve(*args))
        return
    # Started before any gRPC state exists in this process (grpcio does not survive a fork).
    children = [multiprocessing.Process(target=run_one, args=args) for _ in range(ns.processes)]
    for child in children:
        child.start()

    def stop(*_: object) -> None:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.join()


def run_one(port: int, service: str, method: str, response: bytes, shared: bool) -> None:
    uvloop.run(serve(port, service, method, response, shared))


if __name__ == "__main__":
    main()
