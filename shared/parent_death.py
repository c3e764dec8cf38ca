"""A child process that must not outlive its parent: the kernel stops it when the parent dies.

An orphaned server would go on holding its port (an inference worker, a
service `make services` started) or its data (the embedded Redis), with
nothing left to stop it. PR_SET_PDEATHSIG (prctl(2)) has the kernel send
the child SIGTERM the moment its parent dies, however the parent dies (even
SIGKILL, which gives it no chance to stop anything), and it survives the
child's exec. The kernel means the parent *thread* that started the child:
start such children from a thread that lives as long as the process (the
main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl(2)
# Looked up once, in the parent: in a child between fork and exec (a subprocess's preexec_fn)
# only the call itself is made.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def stop_when_parent_dies(parent_pid: int | None) -> None:
    """Have the kernel SIGTERM this process when its parent, `parent_pid`, dies.

    Call it first thing in the child (or as a subprocess's preexec_fn, with the parent's pid
    taken before the fork). A parent that has died already (before prctl took effect: this
    process has another parent now), or none at all (None), means SIGTERM now.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
