"""`python -m service` (uvicorn) as a subprocess on 127.0.0.1, for the HTTP figures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


@dataclass
class Server:
    host: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def peak_rss_mb(self) -> float:
        """VmHWM: the process's peak resident set since it started."""
        return _status_kb(self.process.pid, "VmHWM") / 1024.0

    @property
    def rss_mb(self) -> float:
        return _status_kb(self.process.pid, "VmRSS") / 1024.0

    @property
    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def serve(
    model_dir: Path, env: dict[str, str], log: Path, timeout: float = 120
) -> Iterator[Server]:
    """Start the service with BRAINCAM_* overrides, wait until /ready, stop it after."""
    port = free_port()
    full_env = {
        **os.environ,
        "BRAINCAM_MODEL_DIR": str(model_dir),
        "BRAINCAM_PROVIDERS": "CPUExecutionProvider",
        "BRAINCAM_LOG_LEVEL": "warning",
        "BRAINCAM_HOST": "127.0.0.1",
        "BRAINCAM_PORT": str(port),
        **env,
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=full_env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited during start-up; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as res:
                    if res.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s; see {log}")
            time.sleep(0.1)
        yield Server("127.0.0.1", port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
