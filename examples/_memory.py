"""The peak memory of a piece of work in this process, for the examples' tables: the rise
of the resident set's high-water mark over where it stood when the work began.

On Linux the mark is reset to the current resident set first (`/proc/self/clear_refs`),
so a work's peak is its own even when an earlier moment of the process was higher.
Elsewhere the process's peak so far (`ru_maxrss`) is the baseline: only a fresh process
then measures a rise."""

import resource
import sys


def status_kb(field):
    """A `/proc/self/status` field (`VmRSS`, `VmHWM`) in KiB, or None where there is none."""
    try:
        with open("/proc/self/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith(field + ":")),
                        None)
    except OSError:
        return None


def peak_kb():
    """The process's peak resident set in KiB: `VmHWM` (Linux), else `ru_maxrss`."""
    peak = status_kb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else peak  # bytes on macOS


def reset_peak_kb():
    """Starts a measurement: the resident set now in KiB, with the peak reset to it where
    Linux allows, else the peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return peak_kb()
    return status_kb("VmRSS") or peak_kb()


def peak_rise_mb(start_kb):
    """The peak's rise in MB (MiB / 1.024) since `reset_peak_kb()` returned `start_kb`."""
    return (peak_kb() - start_kb) / 1024


def peak_memory_mb(fn):
    """Runs `fn()`; returns its result and the rise of the peak resident set it caused,
    in MB."""
    start = reset_peak_kb()
    out = fn()
    return out, peak_rise_mb(start)
