"""moto's S3 server for the benchmarks and tests that need an object store on this machine
(the `dev` extra installs it): started as a process of its own, stopped by the caller; and a
proxy in front of it that adds a round trip's latency."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int, log_path: str | Path) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:`port`, its log in `log_path`, once it accepts
    connections; RuntimeError where it exits or does not within 60 s."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto's server exited: {Path(log_path).read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's server did not start within 60 s") from None
            time.sleep(0.2)


def start_proxy(target: int, latency_s: float) -> int:
    """A TCP proxy on 127.0.0.1 to `target` (moto's port) in a daemon thread, each chunk a
    client sends held latency_s before it goes on, as a distant store's round trip; returns
    its port."""
    async def pipe(reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_r, server_w, latency_s), pipe(server_r, client_w, 0))

    port = free_port()
    ready = threading.Event()

    def serve() -> None:
        async def run() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", port)
            ready.set()
            async with server:
                await server.serve_forever()
        asyncio.run(run())

    threading.Thread(target=serve, daemon=True, name="semid-latency-proxy").start()
    if not ready.wait(10):
        raise RuntimeError("the latency proxy did not start within 10 s")
    return port
