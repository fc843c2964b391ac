"""The fork server: one per sandbox worker, run as a script inside the worker's bwrap sandbox.

    python -S -B server.py CONFIG_JSON

It mounts its scratch tmpfs (size and inode caps), imports the math stack once, compiles the seccomp
filter once, then forks the zygote: a copy of itself taken before any request, which from then on only
forks children. The server serves requests read as length-prefixed JSON frames on fd 0 and answers on
fd 1; request and output text live only in the server, never in the zygote, so no child starts with an
earlier sample in its memory. Each request goes to a child forked ahead of time, which isolated itself
right after the fork (new session, fds, rlimits, no privileges, seccomp) and said "ready" before it
got the request; it replays the trajectory's earlier blocks silently and runs the new block REPL-style.
The server enforces the wall-clock limit by waiting on the process (never on pipe EOF), caps output
keeping head and tail, answers from the exit status once the child is gone, then kills any leftovers,
wipes the scratch dirs and has the zygote fork the next child. With warm trajectories a child that ended
its block normally stops itself instead, and the server keeps it (stopped) for the trajectory's next block
if the block left nothing outside its memory (_keep_warm); that block then continues it without replay.
docs/sandbox.md gives the threat model.

The module top level uses only the standard library: the host imports it for the frame format.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from dataclasses import dataclass

FRAME_HEADER = struct.Struct(">I")
CHILD_PID = struct.Struct("=i")
CELL_FILENAME = "<cell>"
NOBODY = 65534
SETUP_FAILED_EXIT = 120  # the child could not isolate itself; it never ran the snippet
SETUP_TIMEOUT = 2.0  # seconds a spare may still need to say "ready" once its request came (it had a head start)

# Linux constants (uapi; identical on x86_64, aarch64 and ppc64le).
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
SECCOMP_MODE_FILTER = 2
MADV_COLLAPSE = 25
CLONE_THREAD = 0x00010000
CLONE_PARENT = 0x00008000
CLONE_NEWNS = 0x00020000
MS_NOSUID = 2
MS_NODEV = 4
CAP_SETGID = 6
CAP_SETUID = 7
# fcntl/ioctl commands that make the kernel signal a chosen process when a file becomes ready (SIGIO, or any
# signal with F_SETSIG): a route to other processes that the kill() family's rule cannot see.
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000


def history_digest(blocks) -> str:
    """Names a trajectory's state: the code blocks run so far, in order. A kept child that ran exactly these
    blocks holds what replaying them would rebuild."""
    import hashlib

    h = hashlib.sha256()
    for block in blocks:
        data = block.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def encode_frame(message: dict) -> bytes:
    payload = json.dumps(message).encode()
    return FRAME_HEADER.pack(len(payload)) + payload


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict | None:
    """Blocking read of one frame; None at EOF (the host went away)."""
    header = _read_exactly(fd, FRAME_HEADER.size)
    if header is None:
        return None
    payload = _read_exactly(fd, FRAME_HEADER.unpack(header)[0])
    return None if payload is None else json.loads(payload)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ----------------------------------------------------------------------------------------------
# seccomp: the main filter is compiled once by libseccomp; a tiny per-child filter (built by hand,
# because it embeds the child's pid) confines signals to the child itself. Filters stack: the
# kernel applies the most restrictive verdict.

# Denied with EPERM: new processes/programs, network sockets, tracing other processes, mounts and
# namespaces, leaving the process group, memory outside the address-space limit (memfd pages and SysV
# shared memory are charged to no rlimit; IPC objects would also outlive the child, as would POSIX message
# queues), Linux AIO (its contexts draw on a host-wide pool, aio-max-nr, that other programs need), and
# kernel interfaces a snippet has no business with (io_uring would bypass this filter).
DENIED_SYSCALLS = (
    "fork", "vfork", "execve", "execveat",
    "socket",
    "memfd_create", "memfd_secret", "shmget", "msgget", "semget", "mq_open", "io_setup",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "process_mrelease", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "tkill",
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "setsid", "setpgid",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "iopl",
    "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog",
    "name_to_handle_at", "open_by_handle_at", "lookup_dcookie", "ioprio_set",
)
# Denied when the first argument names another process (0 = the caller).
OTHER_PROCESS_SYSCALLS = ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam",
                          "sched_setattr", "migrate_pages", "move_pages")
# Allowed only when the target (first argument) is the child itself or its own process group.
SIGNAL_SYSCALLS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


def compile_main_filter() -> bytes:
    """The libseccomp filter as raw BPF, exported once and loaded by every child with prctl."""
    import errno
    import tempfile

    import pyseccomp as seccomp

    filt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    eperm = seccomp.ERRNO(errno.EPERM)

    def add(action, name, *args):
        if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) == -1:  # unknown to this libseccomp
            return
        filt.add_rule(action, name, *args)

    for name in DENIED_SYSCALLS:
        add(eperm, name)
    # Threads are clone(CLONE_THREAD|...); anything else is a new process.
    add(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    # clone3 passes its flags in memory, out of the filter's sight: ENOSYS makes glibc fall back to clone.
    add(seccomp.ERRNO(errno.ENOSYS), "clone3")
    # The kernel reads these commands as 32-bit: compare the low word only, or high bits would slip past.
    for command in (F_SETOWN, F_SETSIG, F_SETOWN_EX):
        add(eperm, "fcntl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, command))
    for request in (FIOSETOWN, SIOCSPGRP):
        add(eperm, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    for name in OTHER_PROCESS_SYSCALLS:
        add(eperm, name, seccomp.Arg(0, seccomp.NE, 0))
    add(eperm, "setpriority", seccomp.Arg(1, seccomp.NE, 0))
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read()


def signal_syscall_numbers() -> tuple[int, list[int]]:
    import pyseccomp as seccomp

    numbers = [seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) for name in SIGNAL_SYSCALLS]
    return seccomp.system_arch(), [n for n in numbers if n >= 0]


def clone_syscall_number() -> int:
    import pyseccomp as seccomp

    return seccomp.resolve_syscall(seccomp.Arch.NATIVE, "clone")


def signal_filter(arch: int, numbers: list[int], pid: int) -> bytes:
    """BPF: signal syscalls may only target `pid` itself or its process group (0 or -pid)."""
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    arg0_low = 16 if sys.byteorder == "little" else 20  # offsetof(seccomp_data, args[0]), low word
    n = len(numbers)
    # Layout: [0] ld arch, [1] jeq arch, [2] ret allow, [3] ld nr, [4..4+n) jeq nr -> check,
    # [4+n] ret allow, [5+n] ld arg0, [6+n..8+n] jeq targets, [9+n] ret allow, [10+n] ret EPERM.
    check, allow, deny = 5 + n, 9 + n, 10 + n
    insns = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, SECCOMP_RET_ALLOW), (ld, 0, 0, 0)]
    for i, nr in enumerate(numbers):
        here = 4 + i
        insns.append((jeq, check - here - 1, 0, nr))
    insns.append((ret, 0, 0, SECCOMP_RET_ALLOW))
    insns.append((ld, 0, 0, arg0_low))
    for k, target in enumerate((pid, 0, (-pid) & 0xFFFFFFFF)):
        here = 6 + n + k
        last = k == 2
        insns.append((jeq, allow - here - 1, (deny - here - 1) if last else 0, target))
    insns.append((ret, 0, 0, SECCOMP_RET_ALLOW))
    insns.append((ret, 0, 0, SECCOMP_RET_ERRNO | 1))  # EPERM
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


# ----------------------------------------------------------------------------------------------
# The child: isolates itself, replays history silently, runs the new block.


class ReplayBlockTimeout(BaseException):
    """Raised by SIGALRM inside a replayed block that runs longer than the per-block timeout."""


def _load_bpf(libc, bpf: bytes) -> None:
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "loading the seccomp filter failed")


def _drop_capabilities(libc, keep: int = 0) -> None:
    """Effective and permitted capabilities reduced to the `keep` mask (of the first 32), none inheritable."""
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)(keep, keep)  # effective, permitted, inheritable; then the upper 32 caps
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _isolate_child(ctx: dict) -> None:
    """Everything between fork and reading the request. Raises if any step fails."""
    import resource
    import signal

    libc = ctx["libc"]
    for signum, handler in ctx["signal_handlers"].items():  # the server ignores most signals; the snippet
        signal.signal(signum, handler)                       # gets Python's usual handlers back
    os.setsid()
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError("PR_SET_PDEATHSIG failed")
    os.chdir(ctx["workdir"])
    os.umask(0o022)
    for res, value in ((resource.RLIMIT_AS, ctx["address_space"]),
                       (resource.RLIMIT_FSIZE, ctx["file_size"]),
                       (resource.RLIMIT_NOFILE, ctx["open_files"]),
                       (resource.RLIMIT_NPROC, ctx["user_threads"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    _drop_capabilities(libc)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError("PR_SET_NO_NEW_PRIVS failed")
    _load_bpf(libc, ctx["main_filter"])
    arch, numbers = ctx["signal_syscalls"]
    _load_bpf(libc, signal_filter(arch, numbers, os.getpid()))


def _compile_cell(code: str):
    """(statements, last_expression) code objects; the last bare expression is echoed like a REPL."""
    import ast
    import linecache

    linecache.cache[CELL_FILENAME] = (len(code), None, code.splitlines(True), CELL_FILENAME)
    tree = ast.parse(code, CELL_FILENAME)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), CELL_FILENAME, "eval")
    return compile(tree, CELL_FILENAME, "exec"), last


def _run_cell(compiled, namespace: dict) -> None:
    statements, last = compiled
    exec(statements, namespace)
    if last is not None:
        value = eval(last, namespace)
        if value is not None:
            print(repr(value))


def _print_exception(exc: BaseException) -> str:
    """Traceback without the server's frames (as `python file.py` would show); returns the last line."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL_FILENAME:
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    if tb is None:  # compile-time error: no cell frame, just the exception (SyntaxError shows the line)
        lines = traceback.format_exception_only(type(exc), exc)
    sys.stderr.write("".join(lines))
    return lines[-1].strip() if lines else type(exc).__name__


def _replay(history: list[str], namespace: dict, block_timeout: float) -> None:
    """Earlier blocks re-run silently: output to /dev/null at the fd level, every exception swallowed."""
    import signal

    def on_alarm(signum, frame):
        raise ReplayBlockTimeout

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    signal.signal(signal.SIGALRM, on_alarm)
    for block in history:
        try:  # nested: an alarm that fires inside the inner `finally` is swallowed too (it is one-shot)
            try:
                signal.setitimer(signal.ITIMER_REAL, block_timeout)
                _run_cell(_compile_cell(block), namespace)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException:  # noqa: B036 — replay must survive anything the block did before
            pass
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: B036
            pass
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])


def _child_main(ctx: dict, fds: tuple[int, int, int, int]) -> None:
    """A spare child: isolates itself right after the fork, says "ready" on fd 3, then waits for its
    request on fd 4. With warm trajectories on, after a block that did not exit it stops itself and, once
    continued, reads the trajectory's next block from fd 4 (the server keeps it only when the block left
    nothing outside its own memory, see _keep_warm).

    Events on fd 3 before the request are trusted (no snippet code has run in this process yet); after it,
    fd 3 is the snippet's as much as ours, so the server takes what comes from it as hints only.
    """
    import builtins
    import fcntl
    import io
    import math
    import random
    import resource
    import signal

    # Out of the way first: a pipe end may sit on a number that the dup2 below is about to overwrite.
    out_w, err_w, status_w, request_r = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds)
    os.dup2(ctx["devnull"], 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(status_w, 3)
    os.dup2(request_r, 4)
    os.closerange(5, ctx["max_fd"])
    status = io.FileIO(3, "w", closefd=False)

    def report(**event) -> None:
        try:
            status.write((json.dumps(event) + "\n").encode())
        except BaseException:  # noqa: B036 — the snippet may have closed fd 3
            pass

    try:
        _isolate_child(ctx)
    except BaseException as exc:  # noqa: B036
        report(event="setup_failed", error=f"{type(exc).__name__}: {exc}")
        os._exit(SETUP_FAILED_EXIT)
    report(event="ready")
    request = read_frame(4)
    if request is None:  # the server dropped this spare
        os._exit(0)
    if not ctx["warm"]:
        os.close(4)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.argv = [""]
    random.seed(ctx["seed"])  # `random` reseeds itself after every fork; numpy was seeded in the server

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    # A kept child serves up to warm_blocks blocks: the hard CPU limit covers them all, the soft one (SIGXCPU)
    # is moved on for each block.
    cpu_hard = cpu_limit(request) * (ctx["warm_blocks"] if ctx["warm"] else 1) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit(request), cpu_hard))
    channels = _channel_inodes()
    exit_code, exiting = _run_block(request, namespace, report, replay=True)
    # A block that closed or replaced one of the pipes the next block needs (its output, the status hints, the
    # requests) ends its interpreter instead: exit status and pipes stay the kernel's and the server's.
    while ctx["warm"] and not exiting and _channel_inodes() == channels:
        # Kept for the trajectory's next block: stopped, so that nothing of it runs until the server continues
        # it (SIGCONT) with that block on fd 4. The server learns of the stop from the kernel.
        os.kill(os.getpid(), signal.SIGSTOP)
        request = read_frame(4)
        if request is None:
            os._exit(0)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = math.ceil(usage.ru_utime + usage.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (min(used + cpu_limit(request), cpu_hard), cpu_hard))
        exit_code, exiting = _run_block(request, namespace, report, replay=False)
    os._exit(exit_code & 0xFF)


def _channel_inodes() -> list[int | None]:
    inodes = []
    for fd in (1, 2, 3, 4):
        try:
            inodes.append(os.fstat(fd).st_ino)
        except OSError:
            inodes.append(None)
    return inodes


def _run_block(request: dict, namespace: dict, report, *, replay: bool) -> tuple[int, bool]:
    """Run one block (after replaying the history when `replay`): (exit code, whether it raised SystemExit,
    which ends the process). An exception is exit code 1, its last line reported on fd 3."""
    import threading

    exit_code, exiting = 0, False
    try:
        compiled = _compile_cell(request["code"])
        if replay and request["history"]:
            _replay(request["history"], namespace, request["timeout"])
            report(event="replayed")
        _run_cell(compiled, namespace)
    except SystemExit as exc:
        code = exc.code
        exiting = True
        exit_code = code if isinstance(code, int) else (0 if code is None else 1)
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
        if exit_code:
            report(event="error", error=f"SystemExit: {code}")
    except BaseException as exc:  # noqa: B036 — KeyboardInterrupt, MemoryError... all are results
        try:
            report(event="error", error=_print_exception(exc))
        except BaseException:  # noqa: B036 — e.g. stderr closed by the snippet
            report(event="error", error=type(exc).__name__)
        exit_code = 1
    try:
        for thread in threading.enumerate():  # like interpreter shutdown: wait for non-daemon threads
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: B036
        pass
    # No "done" event: any thread of the snippet could forge it. The server learns the end from the kernel.
    return exit_code, exiting


def cpu_limit(request: dict) -> int:
    import math

    margin = float(request["replay_margin"]) if request["history"] else 0.0
    return math.ceil(float(request["timeout"]) + margin) + 1


# ----------------------------------------------------------------------------------------------
# The server side of one execution.


class StreamCapture:
    """Keeps the first and last `keep // 2` bytes of a stream and counts what falls in between."""

    def __init__(self, keep: int):
        self.half = max(keep // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> str:
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        if self.dropped:
            return f"{head}\n[... {self.dropped} bytes dropped ...]\n{tail}"
        return head + tail


def _kill_child(pid: int) -> None:
    import signal

    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_leftovers(ctx: dict, keep: set[int]) -> set[int]:
    """Kill and reap anything still alive. In the sandbox's pid namespace every pid but bwrap's init (1), ours,
    the zygote's and those in `keep` (kept children, the spare) is a leftover."""
    import signal

    if ctx["own_pid_namespace"]:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in (1, os.getpid(), ctx["zygote_pid"], *keep):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    return _reap()


def _await_request(ctx: dict, proto_in: int) -> set[int]:
    """Wait until the host's next request starts to arrive, reaping children as they exit meanwhile (SIGCHLD
    wakes us); the pids reaped."""
    import select

    poller = select.poll()
    poller.register(proto_in, select.POLLIN | select.POLLHUP)
    poller.register(ctx["wakeup_r"], select.POLLIN)
    reaped = _reap()
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if ctx["wakeup_r"] in ready:
            try:
                os.read(ctx["wakeup_r"], 4096)
            except BlockingIOError:
                pass
            reaped |= _reap()
        if proto_in in ready:
            return reaped


def _reap() -> set[int]:
    """Reap every child that has exited (we are the child subreaper: every orphan is ours); their pids."""
    reaped = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)


def _wipe(path: str) -> bool:
    """Empty a scratch directory, undoing permission tricks; False if anything survived.

    Walks by chdir and relative names, iteratively: a snippet can nest directories deeper than PATH_MAX
    and than Python's recursion limit. The child is dead by now, so nothing changes under our feet.
    """
    import stat

    descended: list[str] = []  # names of the directories we are in, below `path`
    try:
        os.chdir(path)
        while True:
            with os.scandir(".") as it:
                entries = list(it)
            subdir = None  # one that is not empty: we go into it, then look at this directory again
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.name)
                    continue
                try:
                    os.rmdir(entry.name)  # empty ones go at once: thousands of siblings must not cost n² scans
                except OSError:
                    subdir = entry.name
            if subdir is not None:
                os.chmod(subdir, stat.S_IRWXU)
                os.chdir(subdir)
                descended.append(subdir)
            elif descended:
                os.chdir("..")
                os.rmdir(descended.pop())
            else:
                return True
    except OSError:
        return False
    finally:
        os.chdir("/")


@dataclass
class Child:
    """A forked child and the server's ends of its pipes."""

    pid: int
    stdout: int
    stderr: int
    status: int
    request: int  # write end: the child reads its requests from here
    reaped: bool = False
    blocks: int = 0  # blocks it ran (kept children: of one trajectory, whose history_digest is `digest`)
    digest: str = ""
    cpu_used: float = 0.0  # CPU seconds at the end of its last block

    def close_pipes(self) -> None:
        for fd in (self.stdout, self.stderr, self.status, self.request):
            os.close(fd)


def _fork_sibling(ctx: dict) -> int:
    """os.fork(), except that the new process is the zygote's sibling (CLONE_PARENT): a child of the fork
    server, which can then wait for it, read its rusage and get its SIGCHLD."""
    import ctypes
    import signal

    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    # Through a PyDLL: the GIL stays held across the clone, as os.fork() does it.
    pid = ctx["libc_holding_gil"].syscall(ctypes.c_long(ctx["clone_nr"]),
                                          ctypes.c_long(CLONE_PARENT | signal.SIGCHLD), *(ctypes.c_long(0),) * 4)
    if pid == 0:
        api.PyOS_AfterFork_Child()
    else:
        api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone failed")
    return pid


def _zygote_main(ctx: dict, server: socket.socket) -> None:
    """Forks one child per byte received from the server and sends back its pid and the server's ends of its
    pipes. The zygote was forked before the server read any request and never reads one: what it holds, and
    every child copies, is the pristine state of the interpreter after startup."""
    import ctypes
    import signal

    ctx["libc"].prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for fd in ctx["server_only_fds"]:
        os.close(fd)
    ctx["libc_holding_gil"] = ctypes.PyDLL(None, use_errno=True)
    ctx["libc_holding_gil"].syscall.restype = ctypes.c_long
    while server.recv(1):
        (out_r, out_w), (err_r, err_w), (status_r, status_w), (request_r, request_w) = (
            os.pipe2(os.O_CLOEXEC) for _ in range(4))
        pid = _fork_sibling(ctx)
        if pid == 0:
            try:
                _child_main(ctx, (out_w, err_w, status_w, request_r))
            finally:
                os._exit(SETUP_FAILED_EXIT)
        socket.send_fds(server, [CHILD_PID.pack(pid)], [out_r, err_r, status_r, request_w])
        # Closed at once: a child's pipes must have no writer but the child, or the server's final reads
        # would wait on a holder that is not going away.
        for fd in (out_r, out_w, err_r, err_w, status_r, status_w, request_r, request_w):
            os.close(fd)
    os._exit(0)


def start_zygote(ctx: dict) -> tuple[int, socket.socket]:
    server_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        server_end.close()
        try:
            _zygote_main(ctx, zygote_end)
        finally:
            os._exit(1)
    zygote_end.close()
    return pid, server_end


def spawn_child(ctx: dict) -> Child:
    """Have the zygote fork the next child ahead of its request, so fork and isolation are off the
    request's path."""
    zygote = ctx["zygote"]
    zygote.send(b"f")
    message, fds, _, _ = socket.recv_fds(zygote, CHILD_PID.size, 4)
    if len(message) != CHILD_PID.size or len(fds) != 4:
        sys.exit("mathtir sandbox: the zygote is gone")
    return Child(CHILD_PID.unpack(message)[0], *fds)


def finish_child(ctx: dict, child: Child, keep: set[int]) -> tuple[bool, set[int]]:
    """Kill and reap the child (if execute() did not) and anything it left, wipe the scratch dirs: (whether
    they are clean, the pids reaped besides the child). `keep`: the live children that are not leftovers."""
    if not child.reaped:
        _kill_child(child.pid)
        os.waitpid(child.pid, 0)
        child.reaped = True
    child.close_pipes()
    gone = _kill_leftovers(ctx, keep)
    return all(_wipe(d) for d in ctx["scratch_dirs"]), gone


def _scratch_usage(ctx: dict) -> list[tuple[int, int]]:
    """Free blocks and inodes of each scratch mount."""
    return [(st.f_bfree, st.f_ffree) for st in map(os.statvfs, ctx["scratch_dirs"])]


def _keep_warm(ctx: dict, child: Child) -> bool:
    """Whether a child that stopped at the end of a block may be kept for its trajectory's next one.

    Only a child that left nothing outside its own memory: one thread (no thread of it runs on once
    continued, or pins threads of the shared user), the scratch mounts as empty as when the server mounted
    them (no file, and no deleted file it still holds open, that another trajectory would see or run short
    of space by), and memory grown by at most warm_memory_mb over the zygote's. It is stopped, so none of
    this can change until the server continues it. Anything else: the trajectory replays its history in a
    fresh child, which rebuilds the same state."""
    if child.blocks >= ctx["warm_blocks"] or _scratch_usage(ctx) != ctx["scratch_baseline"]:
        return False
    try:
        with open(f"/proc/{child.pid}/stat") as f:
            threads = int(f.read().rsplit(")", 1)[1].split()[17])
        with open(f"/proc/{child.pid}/statm") as f:
            resident = int(f.read().split()[1])
        with open(f"/proc/{ctx['zygote_pid']}/statm") as f:
            resident -= int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return False
    return threads == 1 and resident * ctx["page_size"] <= ctx["warm_memory_bytes"]


def _await_ready(child: Child) -> str | None:
    """None once the spare child said "ready", else why it never will. Nothing but our own code has run in
    the child yet, so what it says here can be believed."""
    import select

    poller = select.poll()
    poller.register(child.status, select.POLLIN)
    said = b""
    while b"\n" not in said:
        if not poller.poll(SETUP_TIMEOUT * 1000):
            return f"no word from the child in {SETUP_TIMEOUT:g} s"
        chunk = os.read(child.status, 4096)
        if not chunk:
            return "the child exited during setup"
        said += chunk
    event = json.loads(said.partition(b"\n")[0])
    return None if event["event"] == "ready" else event.get("error", repr(event))


def execute(ctx: dict, child: Child, request: dict) -> dict:
    """Hand the request to the child (a spare that waits for it, or a kept one of its trajectory, which is
    continued) and supervise it until it exits, stops, or is stopped by us.

    Trusted: the child's "ready" (before the request), its wait status and rusage (from the kernel), the
    clock and the byte counts. Everything the child writes after the request (output, and the "replayed"
    and "error" hints on fd 3) comes from the snippet's process and is treated as the snippet's own words.
    """
    import select
    import signal
    import time

    resumed = child.blocks > 0
    if not resumed:
        setup_problem = _await_ready(child) or ("the child exited before its request" if child.reaped else None)
        if setup_problem is not None:
            # The snippet never reached a child: the caller may safely run it again elsewhere.
            return {"status": "internal_error", "error": f"sandbox child setup failed: {setup_problem}",
                    "snippet_started": False}
    timeout = float(request["timeout"])
    margin = float(request["replay_margin"]) if request["history"] and not resumed else 0.0
    keep, max_output = ctx["keep_output_bytes"], ctx["max_output_bytes"]
    start = time.monotonic()
    try:
        write_all(child.request, encode_frame(request))
    except BrokenPipeError:  # the child died after "ready" (or closed fd 4): the wait status says how
        pass
    if resumed:
        try:
            os.kill(child.pid, signal.SIGCONT)
        except ProcessLookupError:  # gone while stopped: the wait status says how
            pass

    # Replay time is free up to the margin; beyond it, it eats into the new block's budget.
    hard_deadline = start + timeout + margin
    deadline = hard_deadline
    captures = {child.stdout: StreamCapture(keep), child.stderr: StreamCapture(keep)}
    status_buf = bytearray()
    events: list[dict] = []
    replay_ms = None
    verdict = None  # "timeout" | "output_limit" when the server stopped the child
    poller = select.poll()
    for fd in (child.stdout, child.stderr, child.status, ctx["wakeup_r"]):
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    open_fds = {child.stdout, child.stderr, child.status}
    exited = None  # (wait status, rusage) once reaped, or once stopped (warm trajectories)
    wait_flags = os.WNOHANG | (os.WUNTRACED if ctx["warm"] else 0)

    def output_total() -> int:
        return sum(c.total for c in captures.values())

    def read_available(fd: int) -> bool:
        """Take what the pipe holds, 16 reads at most; True if there may be more. Bounded: a child that
        writes fd 3 as fast as we read it (no output limit counts that channel) must not keep the loop
        from the clock."""
        for _ in range(16):
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return False
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
                return False
            if fd == child.status:
                if len(status_buf) < 65536:
                    status_buf.extend(data)
            else:
                captures[fd].feed(data)
                if output_total() > max_output:
                    return False
        return True

    def parse_status() -> None:
        nonlocal replay_ms, deadline
        while b"\n" in status_buf:
            line, _, rest = bytes(status_buf).partition(b"\n")
            status_buf[:] = rest
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):  # the snippet can write anything to fd 3
                continue
            # Hints only, which a snippet can forge without gaining anything: "replayed" can only bring the
            # deadline forward (never past start + timeout + margin), and "error" is the snippet's own words.
            kind = event.get("event") if isinstance(event, dict) else None
            if kind == "replayed" and replay_ms is None:
                now = time.monotonic()
                replay_ms = (now - start) * 1000
                deadline = min(now + timeout, hard_deadline)
            elif kind == "error" and isinstance(event.get("error"), str):
                events.append({"event": kind, "error": event["error"][:2000]})

    while exited is None:
        for fd, _ in poller.poll(max(deadline - time.monotonic(), 0) * 1000):
            if fd == ctx["wakeup_r"]:
                try:
                    os.read(fd, 4096)
                except BlockingIOError:
                    pass
            else:
                read_available(fd)
        parse_status()
        got, wait_status, rusage = os.wait4(child.pid, wait_flags)
        if got == child.pid:
            exited = (wait_status, rusage)
        elif output_total() > max_output:
            verdict = "output_limit"
        elif time.monotonic() >= deadline:
            verdict = "timeout"
        if verdict:
            _kill_child(child.pid)
            _, wait_status, rusage = os.wait4(child.pid, 0)
            exited = (wait_status, rusage)
    stopped = os.WIFSTOPPED(exited[0])
    child.reaped = not stopped
    wall_ms = (time.monotonic() - start) * 1000
    # Everything the child wrote is in the pipes now (no fork was allowed and the zygote closed its copies,
    # so only the child held their write ends, and it is dead or stopped): take it.
    for fd in list(open_fds):
        if verdict != "output_limit" or fd == child.status:
            while read_available(fd):
                pass
    parse_status()
    cpu_used = exited[1].ru_utime + exited[1].ru_stime
    block_cpu, child.cpu_used = cpu_used - child.cpu_used, cpu_used

    out, err = captures[child.stdout], captures[child.stderr]
    result = {
        "stdout": out.text(), "stderr": err.text(),
        "stdout_dropped": out.dropped, "stderr_dropped": err.dropped,
        "truncated": bool(out.dropped or err.dropped or verdict == "output_limit"),
        "wall_ms": wall_ms, "replay_ms": replay_ms, "warm": resumed,
        "exit_code": None, "signal": None, "error": None, "snippet_started": True, "stopped": stopped,
    }
    cpu_seconds = cpu_limit(request)
    if stopped:  # the block ended and the process was kept: an exception is the one failure it reports
        result["exit_code"] = 1 if events else 0
    elif os.WIFSIGNALED(exited[0]):
        result["signal"] = os.WTERMSIG(exited[0])
    else:
        result["exit_code"] = os.WEXITSTATUS(exited[0])
    if verdict == "timeout":
        phase = " while replaying earlier blocks" if margin and replay_ms is None else ""
        result.update(status="timeout", error=f"Timeout: exceeded the {timeout:g} s time limit{phase}")
    elif verdict == "output_limit":
        result.update(status="output_limit",
                      error=f"Output limit: more than {max_output} bytes written; execution stopped")
    elif result["signal"] is not None:
        sig = result["signal"]
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and block_cpu >= cpu_seconds):
            result.update(status="timeout", error=f"Timeout: exceeded the {cpu_seconds} s CPU limit")
        else:
            result.update(status="killed", error=f"Killed by signal {signal.Signals(sig).name}")
    elif result["exit_code"] == 0:
        result["status"] = "ok"
    else:
        result.update(status="error", error=events[-1]["error"] if events else
                      f"Exited with code {result['exit_code']}")
    return result


# ----------------------------------------------------------------------------------------------


def _warm_up_sympy(sp) -> None:
    """Typical TIR calls, once: sympy imports ~40 modules lazily on first use, which every forked child
    would otherwise redo (a first cubic `solve` costs ~100 ms cold, ~30 ms after this)."""
    x, y = sp.symbols("x y")
    sp.solve(x**2 - 2 * x - 3, x)
    sp.solve(x**3 - 2 * x + 1, x)
    sp.solve([x + y - 3, x - y - 1], [x, y])
    sp.factor(x**4 - 1)
    sp.expand((x + 1) ** 5)
    sp.simplify(sp.sin(x) ** 2 + sp.cos(x) ** 2)
    sp.integrate(x**2, (x, 0, 1))
    sp.diff(sp.exp(x) * x, x)
    sp.limit(sp.sin(x) / x, x, 0)
    sp.series(sp.exp(x), x, 0, 4)
    sp.nsimplify(0.5)
    sp.N(sp.pi, 20)
    sp.Rational(3, 4) + sp.sqrt(8)
    sp.binomial(10, 3)
    sp.isprime(97)
    sp.factorint(360)
    sp.summation(x**2, (x, 1, 10))
    sp.Matrix([[1, 2], [3, 4]]).det()
    sp.nsolve(x**2 - 2, x, 1)


def _collapse_into_huge_pages(libc) -> None:
    """Back the heap that every child is forked from with transparent huge pages (MADV_COLLAPSE, Linux 6.1+;
    elsewhere it fails and changes nothing), before the zygote shares it.

    A fork copies, and an exit tears down, one page-table entry per page the parent has populated; in 2 MiB
    pages that is one per 512. For a trivial snippet those two were the largest items of the kernel's time.
    A child's first write into such a page still copies 4 KiB only: since Linux 5.8 a copy-on-write fault on
    a shared huge page splits the child's mapping instead of copying the 2 MiB (so the zygote's and each
    child's own writes split some back: here 48 MiB collapse, the zygote keeps 22 MiB mapped whole, a spare
    child after its setup ~10 MiB). A collapse also fills a chunk's empty pages, so only chunks the heap
    (nearly) fills are collapsed: ~0.4 MiB more resident memory here."""
    import ctypes

    huge = 2 << 20  # the PMD size with 4 KiB pages (x86-64, most arm64); other sizes just fail the call
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    resident = ctypes.create_string_buffer(huge // os.sysconf("SC_PAGE_SIZE"))
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    for fields in regions:
        perms, name = fields[1], fields[5] if len(fields) > 5 else ""
        if perms[:2] != "rw" or perms[3] != "p" or name not in ("", "[heap]"):  # private anonymous only
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        for chunk in range(-(-start // huge) * huge, end // huge * huge, huge):
            if (libc.mincore(chunk, huge, resident) == 0
                    and 8 * sum(b & 1 for b in resident.raw) >= 7 * len(resident.raw)):
                libc.madvise(chunk, huge, MADV_COLLAPSE)


def _empty_bounding_set(libc) -> None:
    """No capability can come back, even through an exec of a setuid or file-capability program (needs
    CAP_SETPCAP; without it, a no-op)."""
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def _drop_privileges(libc, uid: int) -> None:
    _empty_bounding_set(libc)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _drop_capabilities(libc)


def _mount_scratch(libc, mounts: list[dict]) -> None:
    """Fresh tmpfs over each scratch dir, capped in bytes AND in inodes: every file, directory and link pins
    about 1 KiB of kernel memory that no rlimit counts, and bwrap's own --tmpfs cannot cap the count."""
    import ctypes

    # A mount namespace of our own first: unprivileged, bwrap leaves us in a user namespace nested below the
    # one that owns its mount namespace, and CAP_SYS_ADMIN does not reach up there.
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    for mount in mounts:
        options = f"mode=1777,size={mount['size']},nr_inodes={mount['inodes']}".encode()
        if libc.mount(b"tmpfs", mount["path"].encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
            raise OSError(ctypes.get_errno(), f"mounting the scratch tmpfs on {mount['path']} failed")


def _ignore_signals(signal) -> dict:
    """Ignore every signal a process may ignore, but SIGCHLD and the faults; return the handlers they had.

    Defence in depth: seccomp denies every known route from a snippet to another process, and a route we
    do not know of could then still only stop or kill the server (SIGSTOP, SIGKILL), not interrupt it."""
    kept = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
            signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGABRT, signal.SIGSYS}
    handlers = {}
    for signum in signal.valid_signals() - kept:
        try:
            handlers[signum] = signal.signal(signum, signal.SIG_IGN)
        except (OSError, ValueError):  # reserved by the C library
            pass
    return handlers


def _within_hard_limit(resource, limit: int, wanted: int) -> int:
    """`wanted`, or less if the hard limit we inherited is lower (a child cannot raise it)."""
    hard = resource.getrlimit(limit)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def main() -> None:
    import ctypes
    import fcntl  # noqa: F401 — imported once here for every child (_child_main)
    import gc
    import importlib
    import resource
    import signal
    import site

    config = json.loads(sys.argv[1])
    signal_handlers = _ignore_signals(signal)
    libc = ctypes.CDLL(None, use_errno=True)
    if config["scratch_mounts"]:
        _mount_scratch(libc, config["scratch_mounts"])
        _empty_bounding_set(libc)
        # CAP_SYS_ADMIN and CAP_SETPCAP were lent for the two steps above: gone before any site-packages code.
        _drop_capabilities(libc, keep=(1 << CAP_SETUID | 1 << CAP_SETGID) if config["drop_to_uid"] is not None
                           else 0)
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints (warnings, library chatter) must not corrupt the protocol
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if config["host_pid"] and os.getppid() != config["host_pid"]:
        sys.exit("mathtir sandbox: the host process is gone")
    for path in config["site_dirs"]:
        site.addsitedir(path)
    site.setquit()  # `python -S` skips it: snippets calling exit() or quit() expect them defined
    for name in config["preload"]:
        importlib.import_module(name)
    if "sympy" in sys.modules:
        _warm_up_sympy(sys.modules["sympy"])
    if "numpy" in sys.modules:
        # Seeded here, once: children inherit the state. Seeding in each child would cost ~2,000 page
        # copies (tens of ms) on every run.
        sys.modules["numpy"].random.seed(config["seed"])
    main_filter = compile_main_filter()
    signal_syscalls = signal_syscall_numbers()

    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if config["drop_to_uid"] is not None:
        _drop_privileges(libc, config["drop_to_uid"])
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a credential change cleared it
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # children cannot read our memory via /proc/<pid>/mem

    # SIGCHLD wakes the poll loop the moment a child exits (no pidfd needed: works on old kernels).
    wakeup_r, wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * resource.getpagesize()
    ctx = {
        "libc": libc,
        "devnull": devnull,
        "wakeup_r": wakeup_r,
        "server_only_fds": (proto_in, proto_out, wakeup_r, wakeup_w),
        "signal_handlers": signal_handlers,
        "main_filter": main_filter,
        "signal_syscalls": signal_syscalls,
        "clone_nr": clone_syscall_number(),
        "workdir": config["workdir"],
        "scratch_dirs": config["scratch_dirs"],
        "own_pid_namespace": config["own_pid_namespace"],
        "address_space": vm_bytes + config["memory_mb"] * 2**20,
        "file_size": config["file_size_mb"] * 2**20,
        "open_files": config["max_open_files"],
        "user_threads": _within_hard_limit(resource, resource.RLIMIT_NPROC, config["max_user_threads"]),
        "keep_output_bytes": config["keep_output_bytes"],
        "max_output_bytes": config["max_output_bytes"],
        "max_fd": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "seed": config["seed"],
        # Warm trajectories need scratch mounts of the sandbox's own to tell "left nothing behind" (_keep_warm).
        "warm": config["warm_trajectories"] > 0 and config["own_pid_namespace"],
        "warm_trajectories": config["warm_trajectories"],
        "warm_blocks": config["warm_blocks"],
        "warm_memory_bytes": config["warm_memory_mb"] * 2**20,
        "page_size": resource.getpagesize(),
    }
    ctx["scratch_baseline"] = _scratch_usage(ctx) if ctx["warm"] else None
    gc.freeze()  # objects imported so far stay shared with every forked child instead of being copied
    _collapse_into_huge_pages(libc)
    # Before the first request: the zygote, and so every child, never holds a request or its output.
    ctx["zygote_pid"], ctx["zygote"] = start_zygote(ctx)
    signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    spare = spawn_child(ctx)
    kept: dict[int, Child] = {}  # pid -> stopped child of a trajectory, least recently used first
    write_all(proto_out, encode_frame({"ready": True, "pid": os.getpid(), "vm_bytes": vm_bytes}))
    while True:
        gone = _await_request(ctx, proto_in)
        for pid in gone & kept.keys():  # died while stopped (the OOM killer): its trajectory replays
            kept.pop(pid).reaped = True
        spare.reaped = spare.reaped or spare.pid in gone
        request = read_frame(proto_in)
        if request is None:
            for child in [*kept.values(), spare]:
                _kill_child(child.pid)
            return
        state = history_digest(request["history"])
        child = next((c for c in reversed(kept.values()) if c.digest == state), None)
        if child is not None:
            del kept[child.pid]
        else:
            child, spare = spare, None
        result = execute(ctx, child, request)
        keep = result.pop("stopped", False) and _keep_warm(ctx, child)
        if keep:
            child.blocks += 1
            child.digest = history_digest([*request["history"], request["code"]])
            kept[child.pid] = child
        evicted = []
        while len(kept) > ctx["warm_trajectories"]:
            evicted.append(kept.pop(next(iter(kept))))
        result["kept"], result["holding"] = keep, len(kept)
        write_all(proto_out, encode_frame(result))
        # After answering, while the host is busy elsewhere: clean up and fork the next spare.
        for old in evicted:
            # Stopped since _keep_warm found its scratch clean and no other process of it: killing it is all.
            # Reaped once it is gone (_await_request), not waited for: its teardown need not hold the server up.
            _kill_child(old.pid)
            old.close_pipes()
        if not keep:
            clean, gone = finish_child(ctx, child, {*kept, *([spare.pid] if spare else [])})
            if not clean:
                sys.exit("mathtir sandbox: the scratch space could not be wiped; exiting so that a fresh "
                         "sandbox replaces this one")
            for pid in gone & kept.keys():
                kept.pop(pid).reaped = True
            if spare is not None and spare.pid in gone:  # it died before its request: execute() says so
                spare.reaped = True
        if spare is None:
            spare = spawn_child(ctx)


if __name__ == "__main__":
    main()
