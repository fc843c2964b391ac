"""The hostile catalog: snippets that try to escape, starve or poison a sandbox worker.

One home for the cases, used by `mathtir sandbox selftest` and by tests/test_sandbox_hostile.py.
Each case is run on a worker (after its `history`, the trajectory's earlier blocks, is replayed) and then
checked: the status is one of the expected ones, the host is untouched (planted secrets unread, bait files
and listeners untouched, no leaked processes), and the SAME worker (not restarted) then runs `print(2+3)`
correctly, plus an optional probe for leftover state.

Snippet placeholders, filled in from HostBait: @KEY_PATH@ (a planted private key file), @SECRET_ENV@
(name of a planted environment variable), @BAIT_DIR@ (a host directory), @TCP_PORT@/@UDP_PORT@
(listeners on the host's loopback), @HOST_FILE@ (a file of this repository).
Network cases use only loopback and 192.0.2.1 (TEST-NET-1, reserved for documentation): never any
other address.
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mathtir.sandbox.pool import ExecResult, Worker


@dataclass(frozen=True)
class HostileCase:
    name: str
    code: str
    expect: tuple[str, ...]  # acceptable statuses
    timeout: float = 2.0
    stdout_has: str | None = None
    stdout_lacks: str | None = None
    error_has: str | None = None
    probe: str | None = None  # run next on the same worker; its stdout must equal probe_stdout
    probe_stdout: str | None = None
    history: tuple[str, ...] = ()  # earlier blocks of the trajectory, replayed before `code`


TIMEOUT = ("timeout",)
ERROR = ("error",)
KILLED = ("killed",)
OUTPUT_LIMIT = ("output_limit",)
EMPTY_SCRATCH = ("import os\nprint(os.listdir('/tmp'), os.listdir('/dev/shm'))", "[] []\n")

# Asks the kernel to signal the fork server (the snippet's parent) when a pipe becomes readable: fcntl owner +
# O_ASYNC, a route the kill() family's seccomp rule does not see. @TARGET@ and @SIGNAL@ are filled per case.
SIGIO_TO_SERVER = ("import fcntl, os, signal\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, @TARGET@)\n"
                   "fcntl.fcntl(r, 10, @SIGNAL@)  # F_SETSIG\nfcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\n"
                   "os.write(w, b'x')\nprint('signal sent')")
# The other owner-setting routes (F_SETOWN_EX, ioctl FIOSETOWN on a pipe, SIOCSPGRP on a socket pair); any
# that succeeds arms SIGIO (whose default action kills) towards the server.
OWNER_ROUTES = (
    "import ctypes, fcntl, os, socket, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nserver = os.getppid()\n"
    "r, w = os.pipe()\na, b = socket.socketpair()\nowner = ctypes.create_string_buffer(struct.pack('ii', 1, server))\n"
    "got = [('F_SETOWN_EX', libc.fcntl(r, 15, owner))]\n"
    "for name, fd, request in (('FIOSETOWN', r, 0x8901), ('SIOCSPGRP', a.fileno(), 0x8902)):\n"
    "    try:\n        fcntl.ioctl(fd, request, struct.pack('i', server))\n        got.append((name, 0))\n"
    "    except OSError:\n        got.append((name, -1))\n"
    "for fd in (r, a.fileno()):\n    fcntl.fcntl(fd, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)\n"
    "os.write(w, b'x')\nb.send(b'x')\nprint(got)")
# Threads made by raw clone(CLONE_THREAD) on the caller's own stack, each parked in pause(): no stack, so no
# address space, but ~30 KiB of kernel memory each. x86_64 machine code; returns how many it made.
RAW_THREADS = (
    "import ctypes, mmap, platform, struct\nif platform.machine() != 'x86_64':\n"
    "    print('capped (nothing to try on this architecture)')\nelse:\n"
    "    code = (bytes.fromhex('BF000F0500' '4531C9' '31F6' '31D2' '4531D2' '4531C0' 'B838000000' '0F05' '4885C0'\n"
    "                          '7412' '780C' '49FFC1' '4981F9') + struct.pack('<I', 10000)\n"
    "            + bytes.fromhex('72DC' '4C89C8' 'C3' 'B822000000' '0F05' 'EBF7'))\n"
    "    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n    page.write(code)\n"
    "    spawn = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(page)))\n"
    "    made = spawn()\n    print('capped' if made < 10000 else 'uncapped', made)")
# Scans this process's anonymous memory (the memory a child is forked from) for a canary printed by an earlier
# sample. The needle is built from numbers, so the only copy of it is the one whose address is skipped.
PREVIOUS_CANARY = "mathtir-previous-sample-canary-5d1c0e"
MEMORY_SCAN = (
    "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.memmem.restype = ctypes.c_void_p\n"
    "libc.memmem.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]\n"
    f"needle = bytes({list(PREVIOUS_CANARY.encode())})\n"
    "own = ctypes.cast(ctypes.c_char_p(needle), ctypes.c_void_p).value\nhits = 0\n"
    "for line in open('/proc/self/maps').read().splitlines():\n    fields = line.split()\n"
    "    if 'r' not in fields[1] or (len(fields) > 5 and fields[5] not in ('[heap]', '[stack]')):\n        continue\n"
    "    at, end = (int(x, 16) for x in fields[0].split('-'))\n    while True:\n"
    "        hit = libc.memmem(at, end - at, needle, len(needle))\n        if not hit:\n            break\n"
    "        hits += hit != own\n        at = hit + 1\nprint('found' if hits else 'clean')")
# Every route from a snippet to the other processes of its sandbox (the fork server, the zygote, bwrap's init,
# and the stopped children the server keeps for other trajectories): signals, /proc files that show memory or
# state, /proc/<pid>/mem for writing. Prints whether it saw enough processes to mean anything, and what it reached
# (the canary of an earlier sample, built from numbers so that its own code does not hold it).
REACH_OTHER_PROCESSES = """
import os, signal
me = os.getpid()
needle = bytes(@NEEDLE@)
others = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != me]
reached = []
for pid in others:
    for sig in (signal.SIGCONT, signal.SIGKILL, 0):
        try:
            os.kill(pid, sig)
            reached.append(('kill', pid, sig))
        except OSError:
            pass
    for name in ('environ', 'maps', 'cmdline', 'stat', 'status', 'io', 'syscall', 'stack', 'auxv', 'smaps',
                 'pagemap', 'root/tmp', 'cwd', 'fd', 'fd/0', 'fd/1', 'fd/2', 'fd/3', 'fd/4'):
        path = f'/proc/{pid}/{name}'
        try:
            if os.path.isdir(path):
                data = ' '.join(os.listdir(path)).encode()
            else:  # non-blocking: fd/N of another process may be a pipe
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    data = os.read(fd, 1 << 20)
                finally:
                    os.close(fd)
                if name.startswith(('fd/', 'environ')):  # opening one is reaching it
                    reached.append(('open', pid, name))
        except OSError:
            continue
        if needle in data:
            reached.append(('read', pid, name))
    try:
        os.close(os.open(f'/proc/{pid}/mem', os.O_RDWR))
        reached.append(('mem', pid))
    except OSError:
        pass
print(len(others) >= 3, reached)
""".replace("@NEEDLE@", repr(list(PREVIOUS_CANARY.encode())))
SYSV_IPC = ("import ctypes\nlibc = ctypes.CDLL(None)\nkey, flags = 0x4D415448, @FLAGS@\n"
            "print([libc.shmget(key, 4096, flags), libc.msgget(key, flags), libc.semget(key, 1, flags), "
            "libc.mq_open(b'/mathtir', 0o100 | 2 if flags else 2, 0o666, None)])")

CATALOG: tuple[HostileCase, ...] = (
    # --- time ---
    HostileCase("infinite_loop", "while True:\n    pass", TIMEOUT, timeout=1),
    HostileCase("sleep_forever", "import time\ntime.sleep(10**6)", TIMEOUT, timeout=1),
    HostileCase("ignore_all_signals_then_spin",
                "import signal\nfor s in signal.valid_signals():\n    try:\n        signal.signal(s, signal.SIG_IGN)\n"
                "    except (OSError, ValueError):\n        pass\nwhile True:\n    pass", TIMEOUT, timeout=1),
    HostileCase("handlers_swallow_alarm_term_xcpu",
                "import signal\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGXCPU, signal.SIGINT):\n"
                "    signal.signal(s, lambda *a: None)\nwhile True:\n    pass", TIMEOUT, timeout=1),
    HostileCase("catastrophic_regex_in_c", "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')", TIMEOUT, timeout=1),
    # A stop ends the block (the server keeps stopped children for their trajectory's next block): the rest of
    # the snippet never runs in this block, and nothing of it runs until that next block continues it.
    HostileCase("stop_self", "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\nprint('resumed')",
                ("ok",), timeout=1, stdout_lacks="resumed"),
    HostileCase("slow_output_drip", "import time\nwhile True:\n    print('.', end='', flush=True)\n    time.sleep(0.05)",
                TIMEOUT, timeout=1, stdout_has="."),
    HostileCase("cpu_burn_in_threads",
                "import threading\nfor _ in range(4):\n    threading.Thread(target=lambda: any(iter(int, 1)), daemon=True)"
                ".start()\nwhile True:\n    pass", TIMEOUT, timeout=1),
    HostileCase("handler_for_sigkill", "import signal\nsignal.signal(signal.SIGKILL, lambda *a: None)", ERROR,
                error_has="OSError"),
    # --- processes ---
    HostileCase("fork", "import os\nos.fork()", ERROR, error_has="PermissionError"),
    HostileCase("fork_bomb", "import os\nwhile True:\n    os.fork()", ERROR, error_has="PermissionError"),
    HostileCase("multiprocessing_pool",
                "import multiprocessing\nwith multiprocessing.Pool(4) as p:\n    print(p.map(abs, range(8)))", ERROR),
    HostileCase("subprocess_run", "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo pwned'])", ERROR,
                stdout_lacks="pwned"),
    HostileCase("os_system", "import os\nprint('rc', os.system('echo pwned'))", ("ok",), stdout_lacks="pwned"),
    HostileCase("os_execv", "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo pwned'])", ERROR,
                stdout_lacks="pwned"),
    HostileCase("posix_spawn", "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'echo pwned'], {})", ERROR,
                stdout_lacks="pwned"),
    HostileCase("thread_bomb",
                "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,), "
                "daemon=True).start()", ERROR),
    HostileCase("spinning_threads_outlive_main",
                "import threading\nfor _ in range(8):\n    threading.Thread(target=lambda: any(iter(int, 1)))"
                ".start()\nprint('main done')", TIMEOUT, timeout=1),
    # --- memory ---
    HostileCase("raw_clone_threads_beyond_memory_limit", RAW_THREADS, ("ok",), stdout_has="capped",
                stdout_lacks="uncapped"),
    HostileCase("memory_list", "x = [0] * (10**10)", ERROR, error_has="MemoryError"),
    HostileCase("memory_growth", "x = []\nwhile True:\n    x.append(bytearray(10**7))", ERROR, timeout=10,
                error_has="MemoryError"),
    HostileCase("memory_bytes", "b = b'x' * (10**11)", ERROR, error_has="MemoryError"),
    HostileCase("memory_numpy", "import numpy as np\na = np.ones((10**6, 10**5))", ERROR, error_has="MemoryError"),
    HostileCase("memory_mmap", "import mmap\nm = mmap.mmap(-1, 10**11)", ERROR),
    HostileCase("memfd_beyond_memory_limit",  # memfd pages count against no rlimit but the file size, per memfd
                "import os\nfds = [os.memfd_create('hoard') for _ in range(4)]\nfor fd in fds:\n"
                "    os.write(fd, b'0' * 15 * 2**20)\nprint('hoarded')", ERROR, error_has="PermissionError",
                stdout_lacks="hoarded"),
    HostileCase("sysv_and_posix_ipc_objects", SYSV_IPC.replace("@FLAGS@", "0o1666"), ("ok",),
                stdout_has="[-1, -1, -1, -1]", probe=SYSV_IPC.replace("@FLAGS@", "0"),
                probe_stdout="[-1, -1, -1, -1]\n"),
    HostileCase("exhaust_host_aio_contexts",  # aio-max-nr is one pool for the whole host
                "import ctypes, platform\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "number = {'x86_64': 206, 'aarch64': 0, 'ppc64le': 227}[platform.machine()]\n"
                "contexts = [ctypes.c_ulong(0) for _ in range(64)]\n"
                "print('made', sum(libc.syscall(number, 1024, ctypes.byref(c)) == 0 for c in contexts))", ("ok",),
                stdout_has="made 0\n"),
    HostileCase("fill_dev_shm",
                "for i in range(100):\n    with open(f'/dev/shm/f{i}', 'wb') as f:\n        f.write(b'0' * 15 * 2**20)",
                ERROR, error_has="No space left", probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("recursion", "def f(n):\n    return f(n + 1)\nf(0)", ERROR, error_has="RecursionError"),
    HostileCase("c_stack_overflow", "x = ()\nfor _ in range(10**6):\n    x = (x,)\nhash(x)", KILLED, timeout=8),
    # --- output ---
    HostileCase("stdout_flood", "while True:\n    print('A' * 1000)", OUTPUT_LIMIT),
    HostileCase("stderr_flood", "import sys\nwhile True:\n    sys.stderr.write('B' * 1000)", OUTPUT_LIMIT),
    HostileCase("both_streams_flood", "import sys\nwhile True:\n    print('A' * 500)\n    sys.stderr.write('B' * 500)",
                OUTPUT_LIMIT),
    HostileCase("single_huge_write", "import sys\nsys.stdout.write('x' * (50 * 2**20))", OUTPUT_LIMIT),
    HostileCase("raw_fd_flood", "import os\nwhile True:\n    os.write(1, b'C' * 65536)", OUTPUT_LIMIT),
    HostileCase("non_utf8_output", "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x80 abc\\n')", ("ok",),
                stdout_has="abc"),
    HostileCase("lone_surrogate_output", "print('\\udcff marker')", ("ok",), stdout_has="marker"),
    HostileCase("closed_stdout_then_spin", "import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass", TIMEOUT,
                timeout=1),
    HostileCase("closed_stdout_then_print", "import os\nos.close(1)\nprint('x' * 10000)", ERROR),
    # --- files ---
    HostileCase("huge_file", "with open('/tmp/big', 'wb') as f:\n    while True:\n        f.write(b'0' * 2**20)",
                ERROR, error_has="File too large", probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("fill_tmpfs",
                "for i in range(100):\n    with open(f'/tmp/f{i}', 'wb') as f:\n        f.write(b'0' * 15 * 2**20)",
                ERROR, error_has="No space left", probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("many_files",  # every inode pins kernel memory outside any rlimit: the count is capped
                "for i in range(10**6):\n    open(f'/tmp/f{i}', 'w').close()", ERROR, timeout=10,
                error_has="No space left", probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("many_hard_links",
                "import os\nopen('/tmp/f', 'w').close()\nfor i in range(10**6):\n    os.link('/tmp/f', f'/tmp/l{i}')",
                ERROR, timeout=10, error_has="No space left", probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("many_symlinks_and_dirs_in_shm",
                "import os\nfor i in range(10**6):\n    os.symlink('x', f'/dev/shm/s{i}')\n    os.mkdir(f'/dev/shm/d{i}')",
                ERROR, timeout=10, error_has="No space left", probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("deep_directories",
                "import os\nos.chdir('/tmp')\nfor _ in range(3000):  # 6000 chars: deeper than PATH_MAX\n    os.mkdir('d')\n    os.chdir('d')\n"
                "open('leaf', 'w').close()", ("ok",), probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("locked_directory",
                "import os\nos.makedirs('/tmp/locked/inner')\nopen('/tmp/locked/inner/f', 'w').close()\n"
                "os.chmod('/tmp/locked/inner', 0)\nos.chmod('/tmp/locked', 0)", ("ok",),
                probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("write_outside_tmp",
                "written = []\nfor p in ['/pwned', '/usr/pwned', '/usr/lib/pwned', '/etc/pwned', '/root/pwned', "
                "'/dev/pwned', '/proc/pwned', '@BAIT_DIR@/pwned', '/opt/mathtir-sandbox/server.py']:\n"
                "    try:\n        open(p, 'a').write('x')\n        written.append(p)\n    except OSError:\n"
                "        pass\nprint('written:', written)", ("ok",), stdout_has="written: []"),
    HostileCase("write_host_bait_dir", "open('@BAIT_DIR@/pwned', 'w').write('x')", ERROR),
    HostileCase("fd_exhaustion", "files = [open('/dev/null') for _ in range(10**6)]", ERROR,
                error_has="Too many open files"),
    # --- secrets ---
    HostileCase("read_planted_key", "print(open('@KEY_PATH@').read())", ERROR),
    HostileCase("read_planted_env", "import os\nprint(os.environ.get('@SECRET_ENV@'))\nprint(sorted(os.environ))",
                ("ok",), stdout_has="None"),
    HostileCase("scan_proc_environ_and_cmdline",
                "import os\nfor pid in os.listdir('/proc'):\n    for f in ('environ', 'cmdline'):\n        try:\n"
                "            print(pid, f, open(f'/proc/{pid}/{f}', 'rb').read())\n        except OSError as e:\n"
                "            print(pid, f, e)", ("ok",)),
    HostileCase("read_system_secrets",
                "readable = []\nfor p in ['/etc/shadow', '/etc/passwd', '/root/.ssh/id_rsa', '/root/.bash_history',"
                " '/etc/munge/munge.key', '/home']:\n    try:\n        open(p).read()\n        readable.append(p)\n"
                "    except OSError:\n        pass\nprint('readable:', readable)", ("ok",), stdout_has="readable: []"),
    HostileCase("see_host_files",
                "import os\nprint(os.path.exists('@HOST_FILE@'), os.path.exists('/home'))",
                ("ok",), stdout_has="False False"),
    # --- network (loopback and TEST-NET only) ---
    HostileCase("tcp_to_host_loopback",
                "import socket\nsocket.create_connection(('127.0.0.1', @TCP_PORT@), timeout=1).sendall(b'pwned')",
                ERROR),
    HostileCase("udp_to_host_loopback",
                "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'pwned', "
                "('127.0.0.1', @UDP_PORT@))", ERROR),
    HostileCase("tcp_to_testnet", "import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)", ERROR),
    HostileCase("http_to_testnet", "import urllib.request\nurllib.request.urlopen('http://192.0.2.1/', timeout=1)",
                ERROR),
    HostileCase("ipv6_loopback", "import socket\ns = socket.socket(socket.AF_INET6)\ns.connect(('::1', @TCP_PORT@))",
                ERROR),
    # --- other processes ---
    HostileCase("sigio_sigkill_to_server", SIGIO_TO_SERVER.replace("@TARGET@", "os.getppid()")
                .replace("@SIGNAL@", "signal.SIGKILL"), ERROR, error_has="PermissionError", stdout_lacks="sent"),
    HostileCase("sigio_sigstop_to_server_group", SIGIO_TO_SERVER.replace("@TARGET@", "-os.getpgid(os.getppid())")
                .replace("@SIGNAL@", "signal.SIGSTOP"), ERROR, error_has="PermissionError", stdout_lacks="sent"),
    HostileCase("sigio_sigterm_to_pid_1", SIGIO_TO_SERVER.replace("@TARGET@", "1")
                .replace("@SIGNAL@", "signal.SIGTERM"), ERROR, error_has="PermissionError", stdout_lacks="sent"),
    HostileCase("owner_ex_and_ioctl_signal_routes", OWNER_ROUTES, ("ok",),
                stdout_has="[('F_SETOWN_EX', -1), ('FIOSETOWN', -1), ('SIOCSPGRP', -1)]"),
    HostileCase("signal_every_pid_every_route",
                "import ctypes, os\nlibc = ctypes.CDLL(None)\nhits = []\n"
                "for pid in [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:\n"
                "    try:\n        os.kill(pid, 9)\n        hits.append(('kill', pid))\n    except OSError:\n        pass\n"
                "    if libc.tgkill(pid, pid, 9) == 0:\n        hits.append(('tgkill', pid))\n"
                "    try:\n        pidfd = os.open(f'/proc/{pid}', os.O_RDONLY | os.O_DIRECTORY)\n"
                "    except OSError:\n        continue\n"
                "    if libc.syscall(424, pidfd, 9, None, 0) == 0:  # pidfd_send_signal, same number on every arch\n"
                "        hits.append(('pidfd', pid))\nprint('hits', hits)", ("ok",), stdout_has="hits []"),
    HostileCase("reach_other_processes_through_proc",
                "import os\nreached = []\nfor pid in [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:\n"
                "    for how, path in (('fd', 'fd'), ('cwd', 'cwd'), ('root', 'root')):\n        try:\n"
                "            os.listdir(f'/proc/{pid}/{path}')\n            reached.append((pid, how))\n"
                "        except OSError:\n            pass\n    for path in ('environ', 'maps', 'mem'):\n        try:\n"
                "            open(f'/proc/{pid}/{path}', 'rb').read(1)\n            reached.append((pid, path))\n"
                "        except OSError:\n            pass\nprint('reached', reached)", ("ok",), stdout_has="reached []"),
    HostileCase("x32_abi_kill_of_server",  # x32 numbers skip arch-checked rules unless the filter kills them
                "import ctypes, os, platform\nif platform.machine() != 'x86_64':\n    os.abort()  # nothing to try here\n"
                "ctypes.CDLL(None).syscall(0x40000000 | 62, os.getppid(), 9)\nprint('survived')", KILLED,
                stdout_lacks="survived"),
    HostileCase("newer_process_and_kernel_interfaces",  # numbers shared by every architecture since 5.1
                "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nserver = os.getppid()\n"
                "pidfd = os.open(f'/proc/{server}', os.O_RDONLY | os.O_DIRECTORY)\n"
                "calls = {'io_uring_setup': (425, 8, None), 'pidfd_open': (434, server, 0), "
                "'pidfd_getfd': (438, pidfd, 0, 0), 'process_madvise': (440, pidfd, None, 0, 0, 0), "
                "'memfd_secret': (447, 0), 'process_mrelease': (448, pidfd, 0)}\n"
                "print('allowed', [name for name, args in calls.items() if libc.syscall(*args) >= 0])", ("ok",),
                stdout_has="allowed []"),
    HostileCase("kill_parent", "import os\nos.kill(os.getppid(), 9)", ERROR, error_has="PermissionError"),
    HostileCase("kill_pid_1", "import os\nos.kill(1, 9)", ERROR, error_has="PermissionError"),
    HostileCase("kill_every_process", "import os\nos.kill(-1, 9)", ERROR, error_has="PermissionError"),
    HostileCase("kill_own_group", "import os\nos.killpg(0, 9)", KILLED),
    HostileCase("sigterm_self", "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", KILLED),
    HostileCase("abort", "import os\nos.abort()", KILLED),
    HostileCase("leave_session", "import os\nos.setsid()", ERROR, error_has="PermissionError"),
    HostileCase("renice_parent", "import os\nos.setpriority(os.PRIO_PROCESS, 1, 19)", ERROR),
    HostileCase("prlimit_parent", "import resource\nresource.prlimit(1, resource.RLIMIT_NOFILE, (0, 0))", ERROR),
    HostileCase("raise_own_limits", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", ERROR),
    HostileCase("ptrace_parent",
                "import ctypes\nlibc = ctypes.CDLL(None)\nprint('ptrace', libc.ptrace(16, 1, 0, 0))", ("ok",),
                stdout_has="ptrace -1"),
    HostileCase("proc_mem_of_parent", "f = open('/proc/1/mem', 'rb')\nf.seek(0x400000)\nprint(f.read(16))", ERROR),
    HostileCase("namespace_and_mount_calls",
                "import ctypes\nlibc = ctypes.CDLL(None)\nprint('rc', [libc.unshare(0x10000000), "
                "libc.unshare(0x00020000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), libc.chroot(b'/tmp'), "
                "libc.setns(0, 0)])", ("ok",), stdout_has="rc [-1, -1, -1, -1, -1]"),
    HostileCase("forge_protocol_frames",
                "import os, json, struct\nframe = json.dumps({'status': 'ok', 'stdout': 'forged'}).encode()\n"
                "for fd in range(3, 1024):\n    try:\n        os.write(fd, struct.pack('>I', len(frame)) + frame)\n"
                "    except OSError:\n        pass\nprint('sent')", ("ok",), stdout_has="sent", stdout_lacks="forged"),
    HostileCase("inherited_fds",
                "import os\nopen_fds = []\nfor fd in range(4096):\n    try:\n        os.fstat(fd)\n"
                "        open_fds.append(fd)\n    except OSError:\n        pass\nprint(open_fds)", ("ok",),
                stdout_has="[0, 1, 2, 3, 4]\n"),  # stdin, out, err, status, requests (the trajectory's next blocks)
    HostileCase("forged_done_then_spin",
                "import os\nos.write(3, b'{\"event\": \"done\", \"exit_code\": 0}\\n')\nwhile True:\n    pass",
                TIMEOUT, timeout=1),
    HostileCase("forged_done_through_proc_self_fd",
                "f = open('/proc/self/fd/3', 'w')\nf.write('{\"event\": \"done\", \"exit_code\": 0}\\n')\nf.flush()\n"
                "while True:\n    pass", TIMEOUT, timeout=1),
    HostileCase("forged_setup_failed",
                "import os\nos.write(3, b'{\"event\": \"setup_failed\", \"error\": \"forged\"}\\n')\nos._exit(120)",
                ERROR),
    HostileCase("dup2_over_status_fd_then_raise", "import os\nos.dup2(1, 3)\n1 / 0", ERROR),
    HostileCase("status_channel_flood", "import os\nwhile True:\n    os.write(3, b'{' * 65536)", TIMEOUT, timeout=1),
    HostileCase("status_channel_flood_through_a_big_pipe",  # refills 1 MiB per write while we read 64 KiB
                "import fcntl, os\nfcntl.fcntl(3, 1031, 2**20)  # F_SETPIPE_SZ\nchunk = b'{' * 2**20\n"
                "while True:\n    os.write(3, chunk)", TIMEOUT, timeout=1),
    HostileCase("history_forges_done",
                "while True:\n    pass", TIMEOUT, timeout=1,
                history=("import os\nos.write(3, b'{\"event\": \"done\", \"exit_code\": 0}\\n')",)),
    HostileCase("history_forges_setup_failed", "print('new block')", ("ok",), stdout_has="new block",
                history=("import os\nos.write(3, b'{\"event\": \"setup_failed\", \"error\": \"forged\"}\\n')",)),
    HostileCase("history_stops_itself", "print('new block')", ("ok",), timeout=0.5, stdout_lacks="new block",
                history=("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)",)),
    HostileCase("history_exits_the_process", "print('new block')", ("ok",), stdout_lacks="new block",
                history=("import os\nos._exit(0)",)),
    HostileCase("history_closes_stdout", "print('new block')", ("ok",), stdout_has="new block",
                history=("import os\nos.close(1)\nos.close(2)",)),
    HostileCase("garbage_on_status_channel",
                "import os\nos.write(3, b'[' * 60000 + b'\\n{\"event\": \"done\"}\\n\\xff\\n{\"event\": \"setup_failed\"}\\n'\n"
                "         b'{\"event\": \"done\", \"exit_code\": 0.5}\\n{\"event\": \"error\", \"error\": [1]}\\n' + b'7' * 5000 + b'\\n')\n"
                "print('still here')",
                ("ok",), stdout_has="still here"),
    HostileCase("write_host_sysctl", "open('/proc/sys/vm/drop_caches', 'w').write('3')", ERROR),
    HostileCase("sysrq_trigger", "open('/proc/sysrq-trigger', 'w').write('b')", ERROR),
    HostileCase("ctypes_segfault", "import ctypes\nctypes.string_at(0)", KILLED),
    # --- stdin ---
    HostileCase("input_call", "input('? ')", ERROR, error_has="EOFError"),
    HostileCase("stdin_read", "import sys\nprint(repr(sys.stdin.read()))", ("ok",), stdout_has="''"),
    # --- state left for the next run ---
    HostileCase("poison_builtins_and_modules",
                "import builtins, sympy, math\nbuiltins.LEFT_BEHIND = 1\nsympy.solve = None\nmath.pi = 3",
                ("ok",), probe="import builtins, sympy, math\nprint(hasattr(builtins, 'LEFT_BEHIND'), "
                "sympy.solve is None, math.pi)", probe_stdout="False False 3.141592653589793\n"),
    HostileCase("leave_files_in_tmp_and_shm",
                "open('/tmp/state', 'w').write('x')\nopen('/dev/shm/state', 'w').write('x')", ("ok",),
                probe=EMPTY_SCRATCH[0], probe_stdout=EMPTY_SCRATCH[1]),
    HostileCase("change_cwd_env_umask", "import os\nos.chdir('/')\nos.environ['LEFT'] = '1'\nos.umask(0)", ("ok",),
                probe="import os\nprint(os.getcwd(), 'LEFT' in os.environ, oct(os.umask(0o22)))",
                probe_stdout="/tmp False 0o22\n"),
    HostileCase("previous_sample_in_memory", f"secret = {PREVIOUS_CANARY!r}\nprint(secret * 3)", ("ok",), probe=MEMORY_SCAN,
                probe_stdout="clean\n"),
    HostileCase("advance_random_generators",
                "import random, numpy as np\nnp.random.seed(123)\nnp.random.rand(1000)\nrandom.seed(5)", ("ok",),
                probe="import random, numpy as np\nprint(np.random.rand(), random.random())",
                probe_stdout="0.5488135039273248 0.8444218515250481\n"),
    HostileCase("replace_sys_modules_and_print",
                "import sys, types, builtins\nsys.modules['math'] = types.SimpleNamespace(sqrt=lambda x: 'poisoned')\n"
                "sys.path.insert(0, '/tmp')\nbuiltins.print = lambda *a, **k: None", ("ok",),
                probe="import math, sys\nprint(math.sqrt(16), '/tmp' in sys.path)", probe_stdout="4.0 False\n"),
    HostileCase("daemon_thread_outlives_main",
                "import threading, time\ndef late():\n    time.sleep(0.3)\n    open('/tmp/late', 'w').write('x')\n"
                "threading.Thread(target=late, daemon=True).start()\nprint('main done')", ("ok",),
                stdout_has="main done", probe="import time, os\ntime.sleep(0.5)\nprint(os.listdir('/tmp'))",
                probe_stdout="[]\n"),
    HostileCase("keyboard_interrupt", "raise KeyboardInterrupt", ERROR, error_has="KeyboardInterrupt"),
    # --- the stopped children kept for other trajectories (and the other processes of the sandbox) ---
    HostileCase("reach_kept_children", REACH_OTHER_PROCESSES, ("ok",), timeout=20, stdout_has="True []\n"),
)


@dataclass
class HostBait:
    """Things on the host a snippet must not reach: a private key file, an environment variable, a bait
    directory, TCP and UDP listeners on loopback. Create it BEFORE the pool, so the workers are started
    from a process that holds the secret."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mathtir-bait-")))
    env_name: str = "MATHTIR_PLANTED_SECRET"

    def __post_init__(self):
        self.key_secret = "KEY-" + secrets.token_hex(16)
        self.env_secret = "ENV-" + secrets.token_hex(16)
        self.key_path = self.root / "id_ed25519"
        self.key_path.write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{self.key_secret}\n")
        self.key_path.chmod(0o600)
        (self.root / "canary.txt").write_text(self.key_secret)
        self._previous_env = os.environ.get(self.env_name)
        os.environ[self.env_name] = self.env_secret
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.tcp.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self._snapshot = self._listing()

    def _listing(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.root.iterdir())}

    def fill(self, code: str) -> str:
        return (code.replace("@KEY_PATH@", str(self.key_path)).replace("@SECRET_ENV@", self.env_name)
                .replace("@BAIT_DIR@", str(self.root)).replace("@TCP_PORT@", str(self.tcp.getsockname()[1]))
                .replace("@UDP_PORT@", str(self.udp.getsockname()[1])).replace("@HOST_FILE@", __file__))

    def problems(self, result: ExecResult) -> list[str]:
        """What the snippet reached on the host (empty when nothing)."""
        found = []
        seen = "\n".join([result.stdout, result.stderr, result.error or ""])
        for label, value in (("planted key", self.key_secret), ("planted env var", self.env_secret)):
            if value in seen:
                found.append(f"{label} leaked into the output")
        if self._listing() != self._snapshot:
            found.append(f"bait directory {self.root} changed")
        try:
            conn, _ = self.tcp.accept()
            conn.close()
            found.append("host TCP listener on loopback got a connection")
        except BlockingIOError:
            pass
        try:
            self.udp.recv(4096)
            found.append("host UDP socket on loopback got a datagram")
        except BlockingIOError:
            pass
        return found

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()
        if self._previous_env is None:
            os.environ.pop(self.env_name, None)
        else:
            os.environ[self.env_name] = self._previous_env
        for p in self.root.iterdir():
            p.unlink()
        self.root.rmdir()


@dataclass
class CaseReport:
    case: HostileCase
    result: ExecResult
    problems: list[str]
    seconds: float

    @property
    def contained(self) -> bool:
        return not self.problems


def descendant_pids(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _process_count_settles(pid: int, expected: int, within: float = 3.0) -> bool:
    """The worker's process tree returns to its usual size (bwrap, its init, the fork server, one spare
    child forked ahead of the next request, and the stopped children it keeps for trajectories). The server
    replaces the spare right after answering, so a moment's difference is normal; a process that outlives that
    is a leak."""
    deadline = time.monotonic() + within
    while len(descendant_pids(pid)) != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_case(worker: Worker, case: HostileCase, bait: HostBait, process_count: int) -> CaseReport:
    """`process_count`: size of the worker's process tree when idle and keeping no trajectory (measured before
    any case ran)."""
    starts, pid = worker.starts, worker.pid
    t0 = time.monotonic()
    result = worker.run(bait.fill(case.code), timeout=case.timeout, history=case.history)
    seconds = time.monotonic() - t0
    problems = bait.problems(result)
    if result.status not in case.expect:
        problems.append(f"status {result.status!r} (error: {result.error}), expected {'/'.join(case.expect)}")
    if case.stdout_has is not None and case.stdout_has not in result.stdout:
        problems.append(f"stdout lacks {case.stdout_has!r}: {result.stdout[:200]!r}")
    if case.stdout_lacks is not None and case.stdout_lacks in result.stdout:
        problems.append(f"stdout contains {case.stdout_lacks!r}")
    if case.error_has is not None and case.error_has not in (result.error or ""):
        problems.append(f"error {result.error!r} lacks {case.error_has!r}")
    if worker.starts != starts or worker.pid != pid or not worker.alive:
        problems.append("the worker died or was restarted")
    elif not _process_count_settles(pid, process_count + worker.holding):
        problems.append("processes leaked in the worker's sandbox")
    follow = worker.run("print(2+3)", timeout=5)
    if (follow.status, follow.stdout) != ("ok", "5\n"):
        problems.append(f"print(2+3) afterwards gave {follow.status} {follow.stdout!r} {follow.error}")
    if case.probe is not None:
        probe = worker.run(case.probe, timeout=5)
        if probe.stdout != case.probe_stdout:
            problems.append(f"state leaked to the next run: probe printed {probe.stdout!r} "
                            f"(expected {case.probe_stdout!r}; {probe.error})")
    if worker.starts != starts:
        problems.append("the worker was restarted")
    return CaseReport(case, result, problems, seconds)


def run_catalog(workers: list[Worker], bait: HostBait,
                cases: tuple[HostileCase, ...] = CATALOG) -> list[CaseReport]:
    """Run the cases spread over the workers (each worker runs its share in order)."""
    reports: dict[str, CaseReport] = {}
    lock = threading.Lock()

    def serve(worker_index: int) -> None:
        worker = workers[worker_index]
        worker.run("pass", timeout=5)  # idle afterwards: the spare child for the next request is forked
        time.sleep(0.5)
        idle_count = len(descendant_pids(worker.pid)) - worker.holding  # without the trajectories it keeps
        for case in cases[worker_index::len(workers)]:
            report = run_case(worker, case, bait, idle_count)
            with lock:
                reports[case.name] = report

    with ThreadPoolExecutor(len(workers)) as executor:
        list(executor.map(serve, range(len(workers))))
    return [reports[case.name] for case in cases]
