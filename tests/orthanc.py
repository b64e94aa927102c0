"""A private Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`) for the DICOMweb tests.

Started on free loopback ports with its own storage folder and configuration, so a
system Orthanc (the package starts one where init scripts run) never matters. Absent
packages skip the tests with the reason, unless BRAINCAM_REQUIRE_ORTHANC is set
(.ci/run sets it): there they must run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*",
)


def _missing(reason: str) -> None:
    if os.environ.get("BRAINCAM_REQUIRE_ORTHANC"):
        pytest.fail(f"{reason}, and BRAINCAM_REQUIRE_ORTHANC is set")
    pytest.skip(f"{reason} (apt-get install orthanc orthanc-dicomweb)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def orthanc(workdir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """Run Orthanc with its DICOMweb plugin; yields the DICOMweb root URL."""
    exe = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None
    )
    if exe is None:
        _missing("Orthanc is not installed")
    plugins = sorted(p for pattern in PLUGIN_GLOBS for p in glob.glob(pattern))
    if not plugins:
        _missing("the Orthanc DICOMweb plugin is not installed")
    assert exe is not None
    http_port, dicom_port = _free_port(), _free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "braincam-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomServerEnabled": False,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [plugins[0]],
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpsVerifyPeers": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("w")
    proc = subprocess.Popen([exe, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {proc.returncode}:\n"
                    + (workdir / "orthanc.log").read_text()[-3000:]
                )
            try:
                with urllib.request.urlopen(f"{base}/dicom-web/studies", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Orthanc did not start in time")
            time.sleep(0.2)
        yield f"{base}/dicom-web"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
