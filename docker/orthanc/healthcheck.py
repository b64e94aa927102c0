"""Orthanc's container health: its DICOMweb root answers QIDO-RS (the plugin is loaded)."""

import sys
import urllib.request

try:
    with urllib.request.urlopen("http://127.0.0.1:8042/dicom-web/studies", timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as exc:
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
