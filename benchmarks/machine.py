"""What the figures were measured on: CPU, cores, versions, load before and after."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": sys.version.split()[0],
        "onnxruntime": version("onnxruntime"),
        "tensorflow": version("tensorflow-cpu")
        if version("tensorflow-cpu") != "not installed"
        else version("tensorflow"),
        "keras": version("keras"),
        "numpy": version("numpy"),
        "load average (1/5/15 min) at start": load_average(),
    }
