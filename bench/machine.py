"""What the benchmarks ran on: CPU, cores, memory, tool and library versions, concurrent load."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from tests.e2e.peers import ORTHANC, STORESCU


def _first_line_matching(path: Path, pattern: str) -> str:
    try:
        for line in path.read_text().splitlines():
            match = re.match(pattern, line)
            if match:
                return match.group(1).strip()
    except OSError:
        pass
    return "unknown"


def _tool_version(args: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def other_load() -> list[str]:
    """Command lines of other CPU-heavy processes known to share the machine (model training)."""
    out = subprocess.run(["pgrep", "-af", "--", "-m inference.training"], capture_output=True, text=True, check=False)
    return [line[:200] for line in out.stdout.splitlines() if "pgrep" not in line]


def describe() -> dict[str, str]:
    """Machine and software versions, as display strings."""
    mem_kb = _first_line_matching(Path("/proc/meminfo"), r"MemTotal:\s+(\d+)")
    ram = f"{int(mem_kb) / 1024**2:.1f} GiB" if mem_kb.isdigit() else "unknown"
    return {
        "CPU": _first_line_matching(Path("/proc/cpuinfo"), r"model name\s*:\s*(.*)"),
        "cores (usable)": str(len(os.sched_getaffinity(0))),
        "RAM": ram,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "dcmtk": _tool_version([str(STORESCU), "--version"], r"storescu v([\d.]+)"),
        "Orthanc": _tool_version([str(ORTHANC), "--version"], r"Orthanc ([\d.]+)"),
        "pynetdicom": _package("pynetdicom"),
        "pydicom": _package("pydicom"),
        "onnxruntime": _package("onnxruntime"),
        "SimpleITK": _package("SimpleITK"),
        "numpy": _package("numpy"),
    }
