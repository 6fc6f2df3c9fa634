"""Peak resident memory of this process, for the bench scripts."""
from __future__ import annotations


def peak_rss_mib() -> float:
    """VmHWM of this process (Linux). Unlike ru_maxrss it is not inherited from the parent across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
