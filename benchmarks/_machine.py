"""What every benchmark prints about the machine it ran on (figures mean nothing without it)."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_machine_note() -> str | None:
    """A warning when other processes compete for the cores (then multi-threaded ops stall)."""
    if not hasattr(os, "getloadavg") or torch.get_num_threads() == 1:
        return None
    if os.getloadavg()[0] <= (os.cpu_count() or 1) - 0.5:
        return None
    return ("note: the load average is near or above the CPU count: every multi-threaded op may stall "
            "waiting for a descheduled thread, which inflates the cost of many small ops; "
            "compare with --threads 1")


def machine_header() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"torch {torch.__version__} | threads {torch.get_num_threads()} | cpus {os.cpu_count()} | "
            f"CPU {cpu_model()} | load avg {load}")
