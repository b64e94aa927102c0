"""The service as a subprocess on 127.0.0.1 for the HTTP figures, with its /proc facts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.local_server import LocalServer
from service.local_server import serve as serve_locally


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class Server(LocalServer):
    @property
    def peak_rss_mb(self) -> float:
        """VmHWM: the process's peak resident set since it started."""
        return _status_kb(self.process.pid, "VmHWM") / 1024.0

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
    with serve_locally(model_dir, env, log, timeout=timeout) as server:
        yield Server(server.host, server.port, server.process)
