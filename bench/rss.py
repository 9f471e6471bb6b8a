"""Resident memory of the current process, shared by the benchmark scripts (Linux only)."""

import resource
from pathlib import Path


def rss_now_mb():
    """Return the current resident set size of this process in MiB, read from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb():
    """Return the peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # Linux reports KiB
