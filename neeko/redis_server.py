"""A private `redis-server` on a free port in a temporary folder (tests and benchmarks).

It can be killed and restarted on the same port and folder, so its append-only file (AOF,
fsync on every write) carries the data across the restart.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from neeko.errors import NeekoError


class RedisServer:
    """`with RedisServer() as server:` -> `server.url`; `kill()`, `start()`, `stop()`."""

    def __init__(self, folder: str | Path | None = None, appendonly: bool = True) -> None:
        """A server to be started in `folder` (default: a new temporary folder)."""
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise NeekoError("redis-server is not installed (apt-get install redis-server)")
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="neeko-redis-")
        self.folder = Path(folder or self._tmp.name)
        self.port = _free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                raise NeekoError(f"redis-server exited with {self.proc.returncode}:\n{log}")
            if _answers(self.port):
                return self
            time.sleep(0.02)
        raise NeekoError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL the server (what a crash looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Terminate the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RedisServer:
        """Start."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop and remove the temporary folder."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
