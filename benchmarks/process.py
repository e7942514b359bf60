"""What the memory benchmarks share: a fresh Python process per contender,
and the kernel's figures for the current one (Linux `/proc`)."""

import os
import subprocess
import sys


def last_line_of_python(code, **env):
    """Runs `code` in a fresh interpreter; returns its last printed line."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return out.stdout.strip().splitlines()[-1]


def status_kb(field):
    """A `/proc/self/status` figure in KB: `VmRSS` (resident now) or
    `VmHWM` (the high-water mark, reset by writing 5 to `clear_refs`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
