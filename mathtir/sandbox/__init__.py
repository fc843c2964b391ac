"""Isolated, fast execution of model-written Python (issue 3).

    from mathtir.sandbox import SandboxPool
    with SandboxPool(workers=4) as pool:
        result = pool.run(code, timeout=10, history=earlier_blocks)   # or: await pool.arun(...)

SandboxPool runs snippets in fork servers inside bubblewrap sandboxes; ExecResult is what comes back. A block
whose trajectory's interpreter a worker kept runs there, warm; otherwise the history is replayed first.
Importing this package is light: the math stack is imported inside the sandbox workers, not here.
The Ray wrappers live in mathtir.sandbox.ray_actor (imports ray; import it only where Ray is used).
`mathtir sandbox selftest` runs the hostile catalog (mathtir/sandbox/catalog.py).

What a snippet gets: no network (empty network namespace, and no socket() at all), no view of the host's
files except read-only /usr and the Python install, a private /tmp and /dev/shm (64 MiB and 16384 inodes
each) wiped after every run, a cleared environment, the nobody user (or the caller's own uid without root),
no fork/exec, signals only to itself (by every route known: kill, pidfds, fcntl/ioctl owners), no memfd or SysV/POSIX
IPC, rlimits on address space, CPU time, file size, open files and threads, and a fresh copy of an interpreter that
never saw an earlier sample. Its status and exit code come from the kernel's wait status, never from anything it could write.
docs/sandbox.md gives the threat model and the known limits, among them: degraded mode (no bwrap) exposes
every file the user can read.
"""

from mathtir.sandbox.pool import STATUSES, ExecResult, SandboxPool, SandboxUnavailable, TrajectoryHolders

__all__ = ["STATUSES", "ExecResult", "SandboxPool", "SandboxUnavailable", "TrajectoryHolders"]
