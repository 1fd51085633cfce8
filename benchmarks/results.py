"""Appending one benchmark run to a JSON-lines file, stamped so runs compare across machines and commits."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def cpu_model() -> str | None:
    """The CPU's model name (Linux), to tell runs on different hosts apart."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def append_result(path: str | None, figures: dict) -> None:
    if not path:
        return
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        commit = None
    stamped = {**figures, "commit": commit, "cpus": os.cpu_count(), "host_machine": platform.machine(),
               "cpu_model": cpu_model(),
               "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(path, "a") as fh:
        fh.write(json.dumps(stamped) + "\n")
