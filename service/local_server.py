"""`python -m service` as a child process on a free port of 127.0.0.1, until /ready.

For the tests and benchmarks that need a real uvicorn server (not TestClient):
one way to start it, wait for readiness and stop it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalServer:
    host: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


@contextmanager
def serve(
    model_dir: Path,
    settings: Mapping[str, str],
    log: Path,
    *,
    inherit_settings: bool = True,
    timeout: float = 120.0,
) -> Iterator[LocalServer]:
    """Start the service on `model_dir` (CPU provider) with BRAINCAM_* `settings`.

    Output is appended to `log`. With `inherit_settings=False` no BRAINCAM_*
    variable of this process reaches the server: only `settings` apply. On exit the
    server gets SIGTERM; if it is still running after 20 s it is killed and
    RuntimeError is raised. Its exit status is then `process.returncode`.
    """
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if inherit_settings or not k.startswith("BRAINCAM_")
    }
    env.update(
        BRAINCAM_MODEL_DIR=str(Path(model_dir).resolve()),
        BRAINCAM_PROVIDERS="CPUExecutionProvider",
        BRAINCAM_LOG_LEVEL="warning",
        BRAINCAM_HOST=HOST,
        BRAINCAM_PORT=str(port),
    )
    env.update(settings)
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=out, stderr=out)
    server = LocalServer(HOST, port, proc)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited during start-up:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(f"{server.url}/ready", timeout=2) as res:
                    if res.status == 200:
                        break
            except OSError:  # not listening yet, or 503 while the model loads
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server was not ready after {timeout:.0f} s:\n{_log_tail(log)}"
                )
            time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                f"the server did not stop within {STOP_TIMEOUT_S:.0f} s:\n{_log_tail(log)}"
            ) from None
