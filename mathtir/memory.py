"""Peak memory of a process tree, sampled: what a whole pipeline (or one training launch) costs the machine.

    with TreeMemory(os.getpid()) as memory:      # samples in a background thread
        subprocess.run(...)
    print(memory.peak_bytes, memory.peak_by_process)

Each sample sums the proportional set size (PSS: shared pages such as torch's libraries split between the
processes mapping them, so the sum is what the tree takes from the machine) over the root and all its
descendants; RSS stands in where the kernel offers no smaps_rollup. The machine may run other work: this
counts only the tree. Peaks shorter than the interval can be missed; the interval is the price of reading
/proc while the work runs.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import psutil


def process_bytes(pid: int) -> int:
    """PSS of one process (RSS where smaps_rollup is unavailable); 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


class TreeMemory:
    """Samples the memory of `root_pid` and its descendants every `interval` seconds until stopped."""

    def __init__(self, root_pid: int, interval: float = 0.5):
        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.peak_bytes = 0  # the largest sum over the tree at one sample
        self.peak_by_process: dict[int, tuple[str, int]] = {}  # pid -> (command line, its own peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the tree as it ends

    def sample(self) -> int:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            used = process_bytes(proc.pid)
            total += used
            if used > self.peak_by_process.get(proc.pid, ("", 0))[1]:
                try:
                    name = " ".join(proc.cmdline()[:6])
                except psutil.Error:
                    name = str(proc.pid)
                self.peak_by_process[proc.pid] = (name, used)
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def release_free_heap() -> None:
    """Hands the heap's free pages back to the kernel (glibc ``malloc_trim``; elsewhere nothing happens).

    glibc raises its mmap threshold as large blocks are freed, so a training step's activations of a few MB come
    from the heap, and the pages they leave free stay with the process: a demo-shaped rank kept 2.4 GiB after
    its steps for 1.2 GiB live. The trainer calls this before every step and before a checkpoint save, so each
    starts from the live memory instead of on top of the retained pages."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None
