"""How long torch's OpenMP workers spin before they sleep, set once, before torch loads its OpenMP.

torch's CPU build runs its intra-op pool on GNU OpenMP (libgomp).  A libgomp worker that waits at
a barrier spins 300,000 ``pause`` iterations (GOMP_SPINCOUNT's default, milliseconds) before it
sleeps.  Alone on its cores that costs nothing.  On a shared machine it is the dominant cost: when
another process holds a core, the thread a barrier waits for is descheduled, and its peer burns
its own time slice spinning.  Measured with two busy processes on a 2-core EPYC
(``benchmarks/results/extract-cpu-shared.md``, 5 rounds): tlfast's torch extraction path slowed
4.21x (fair share: 2x), its process spending twice the CPU time of the same call alone (12.4 s
against 6.0 s); with GOMP_SPINCOUNT=10000 it slowed 2.29x (5.2 s against 4.7 s), and alone it ran
as fast as before (probes in one process: 2.32-2.34 s against 2.34-2.68 s; batch-1 latency,
sentence-transformers and a small-op training loop in the same process within noise).  10,000
spins is 0.1-0.5 ms: the gaps between the ops of one forward stay hot, an idle pool lets go of the
cores.  (PyTorch's own CPU launcher sets Intel OpenMP's
KMP_BLOCKTIME=1, 1 ms, for the same reason.)

libgomp reads the variable once, when it is loaded (``import torch``), so this can only act if
tlfast is imported before torch.  It never overrides the user: GOMP_SPINCOUNT or OMP_WAIT_POLICY
set in the environment are left alone (GOMP_SPINCOUNT=300000 restores libgomp's default).  The
variable is removed from the environment again once torch is loaded, so child processes and any
other OpenMP runtime loaded later see the environment the user gave.  ``tlfast info`` reports
what was done.
"""
from __future__ import annotations

import os
import sys

SPINCOUNT = "10000"
_USER_KNOBS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

# One line for `tlfast info`: what this import did to the OpenMP wait, and why.
STATE = "not configured"


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:  # not Linux: say nothing was known
        return False


def configure() -> None:
    """Set GOMP_SPINCOUNT for torch's libgomp (see the module docstring), then import torch."""
    global STATE
    if "torch" in sys.modules:
        STATE = ("libgomp's default wait (300,000 spins): torch was imported before tlfast; set "
                 f"GOMP_SPINCOUNT={SPINCOUNT} before importing torch for the shorter wait")
        return
    user = [k for k in _USER_KNOBS if k in os.environ]
    if user:
        STATE = "as the environment sets it: " + ", ".join(f"{k}={os.environ[k]}" for k in user)
        import torch  # noqa: F401
        return
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    try:
        import torch  # noqa: F401  (loads libgomp, which reads GOMP_SPINCOUNT now)
    finally:
        os.environ.pop("GOMP_SPINCOUNT", None)
    STATE = (f"GOMP_SPINCOUNT={SPINCOUNT} (set by tlfast for torch's libgomp: workers sleep after "
             "~0.1-0.5 ms instead of spinning for milliseconds)") if _libgomp_loaded() else \
        "no libgomp in this process (torch's OpenMP is another runtime): nothing set"
