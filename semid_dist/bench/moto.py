"""moto's S3 server for the benchmarks and tests that need an object store on this machine
(the `dev` extra installs it): started as a process of its own, stopped by the caller."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
