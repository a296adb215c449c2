"""A real kill in the middle of a write: the start of scripts run as ``python -c SCRIPT``.

The script's arguments are the store root, N and the name of a :class:`tasks.store.SiteStore`
method: the N-th call of that method kills the process with SIGKILL (no cleanup, no
``finally``), as the operating system or an operator would. The rest of the script writes.
"""

KILL_AT_STORE_CALL = """
import os, signal, sys
from tasks.store import SiteStore

root, victim_call, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = {"n": 0}
real = getattr(SiteStore, name)

def killing(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == victim_call:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)

setattr(SiteStore, name, killing)
"""
