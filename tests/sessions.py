"""Which processes are still alive in a process session: what "left nothing behind" means.

Flower's processes (SuperLink, SuperExec, ServerApp, SuperNode, ClientApp, simulation, Ray) stay
in the session of the process that started them, so a test that starts each Flower process in a
session of its own can check that session is empty once it has stopped it.
"""

import os

import psutil


def alive_in_session(session: int) -> set[int]:
    """Process ids of the live (not zombie) processes of `session`."""
    alive = set()
    for process in psutil.process_iter(["status"]):
        try:
            if os.getsid(process.pid) == session and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.add(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return alive
