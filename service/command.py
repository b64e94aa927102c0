"""`braincam serve`: the HTTP service, as `python -m service` runs it.

The service adds this command to the `braincam` CLI through the `braincam.commands`
entry point (pyproject.toml): the core (braincam/) never imports the service.
Every setting is a BRAINCAM_* environment variable (service/core/config.py); the
few options here set the common ones for this run and take precedence.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "serve the HTTP API and web page (the same BRAINCAM_* settings as python -m service)"

# option -> environment variable of service.core.config.Settings
_OPTIONS = {
    "model_dir": "BRAINCAM_MODEL_DIR",
    "host": "BRAINCAM_HOST",
    "port": "BRAINCAM_PORT",
    "workers": "BRAINCAM_WORKERS",
    "log_level": "BRAINCAM_LOG_LEVEL",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, help="default: $BRAINCAM_MODEL_DIR or models/demo")
    p.add_argument("--host", help="default: $BRAINCAM_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: $BRAINCAM_PORT or 8000")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    p.add_argument("--log-level", help="default: $BRAINCAM_LOG_LEVEL or info")


def run(args: argparse.Namespace) -> int:
    for option, variable in _OPTIONS.items():
        value = getattr(args, option)
        if value is not None:  # worker processes read the same environment
            os.environ[variable] = str(value)
    from service.__main__ import main  # the web stack loads only for this command

    return main()
