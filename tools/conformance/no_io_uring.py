"""kythera where io_uring is refused: with `--io auto` (the default) it must start on
the epoll driver, say why in its log, name the driver in its banner and `/metrics`,
echo, and drain; with `--io uring` it must stop at start with a message that says what
is wrong and how to fix it, and a non-zero exit code (issues 3 and 17).

The refusal is real, not simulated: the child process installs a seccomp filter
(through prctl, with ctypes) that answers the three io_uring system calls with EPERM
(what Docker's default profile does) or ENOSYS (what a kernel without io_uring, or
gVisor, does), or only `io_uring_enter` with EPERM (a profile that lets a ring be
created but not used), then execs kythera. Run: `python3 tools/conformance/no_io_uring.py
[--binary PATH]`.
"""

import argparse
import base64
import ctypes
import errno
import os
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
import threading

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
# io_uring_setup, io_uring_enter, io_uring_register: the same numbers on every
# architecture since 5.1.
NR_IO_URING = (425, 426, 427)
NR_IO_URING_ENTER = 426
CALL_NAMES = {425: "io_uring_setup", 426: "io_uring_enter", 427: "io_uring_register"}

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06


def _filter(refusal_errno, refused=NR_IO_URING):
    """A BPF program: the calls `refused` fail with `refusal_errno`, all else is allowed."""
    n = len(refused)
    insns = [
        (BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (BPF_JEQ_K, 0, n + 1, AUDIT_ARCH_X86_64),  # another arch: allow
        (BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    # Each comparison jumps to the refusal on a match (the refusal sits after the
    # remaining comparisons) and falls through to the next otherwise.
    for i, nr in enumerate(refused):
        insns.append((BPF_JEQ_K, n - i, 0, nr))
    insns += [
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | refusal_errno),
    ]
    return b"".join(struct.pack("HBBI", *i) for i in insns), len(insns)


def _install(refusal_errno, refused=NR_IO_URING):
    libc = ctypes.CDLL(None, use_errno=True)
    raw, count = _filter(refusal_errno, refused)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def _env():
    env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
    env.pop("KYTHERA_IO", None)
    return env


def _name(refusal_errno, refused):
    calls = "all" if refused == NR_IO_URING else "+".join(CALL_NAMES[nr] for nr in refused)
    return f"{errno.errorcode[refusal_errno]} ({calls})"


def refused_with_io_uring(binary, refusal_errno, must_say, refused=NR_IO_URING):
    """`--io uring` must stop with the probe's explanation."""
    name = _name(refusal_errno, refused)
    try:
        proc = subprocess.run(
            [binary, "--listen", "127.0.0.1:0", "--shards", "1", "--io", "uring"],
            preexec_fn=lambda: _install(refusal_errno, refused),
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(),
        )
    except subprocess.TimeoutExpired as e:  # run() has killed it
        print(f"no_io_uring: {name} --io uring: FAILED: still running after {e.timeout} s")
        return False
    problems = []
    if proc.returncode == 0:
        problems.append("exited 0")
    if "listening on" in proc.stdout:
        problems.append("claimed to be listening")
    for words in must_say:
        if words not in proc.stderr:
            problems.append(f"stderr lacks {words!r}")
    if problems:
        print(f"no_io_uring: {name} --io uring: FAILED: {', '.join(problems)}")
        print(f"  exit {proc.returncode}; stderr: {proc.stderr.strip()}")
        return False
    print(f"no_io_uring: {name} --io uring: exit {proc.returncode}: {proc.stderr.strip()}")
    return True


def _echo(addr):
    """Upgrades /echo, sends one masked text frame, returns the echoed payload."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            (f"GET /echo HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise OSError(f"no 101: {head[:40]!r}")
        rest = head.split(b"\r\n\r\n", 1)[1]
        payload, mask = b"epoll here", os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        while len(rest) < 2 + len(payload):
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("closed before the echo")
            rest += chunk
        return rest[2 : 2 + len(payload)]


def _get(addr, path):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out.decode(errors="replace")


def falls_back_to_epoll(binary, refusal_errno, must_say, refused=NR_IO_URING):
    """`--io auto` (the default) must run on epoll, say why, echo and drain."""
    name = _name(refusal_errno, refused)
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--shards", "1"],
        preexec_fn=lambda: _install(refusal_errno, refused),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    problems = []
    # A server that never prints its banner must fail the check, not hang it.
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        banner = proc.stdout.readline().strip()
        watchdog.cancel()
        m = re.match(r"kythera listening on ws://(\S+) \((\d+ shards?), (\w+)\)$", banner)
        if not m:
            problems.append(f"banner {banner!r}")
        else:
            addr, driver = m.group(1), m.group(3)
            if driver != "epoll":
                problems.append(f"banner names {driver}")
            echoed = _echo(addr)
            if echoed != b"epoll here":
                problems.append(f"echoed {echoed!r}")
            metrics = _get(addr, "/metrics")
            if 'kythera_io_driver{driver="epoll"} 1' not in metrics:
                problems.append("/metrics does not name epoll")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        if code != 0:
            problems.append(f"exit {code} after SIGTERM")
    except Exception as e:  # noqa: BLE001 - any failure is the test's failure
        problems.append(repr(e))
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    fallback = [line for line in stderr.splitlines() if "running on epoll" in line]
    if len(fallback) != 1:
        problems.append(f"{len(fallback)} log lines say 'running on epoll' (want 1)")
    for words in must_say:
        if not any(words in line for line in fallback):
            problems.append(f"the fallback line lacks {words!r}")
    if problems:
        print(f"no_io_uring: {name} --io auto: FAILED: {', '.join(problems)}")
        print(f"  stderr: {stderr.strip()}")
        return False
    print(f"no_io_uring: {name} --io auto: epoll, echoed, drained: {fallback[0].strip()}")
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/kythera")
    args = parser.parse_args()
    if platform.machine() != "x86_64":
        print("no_io_uring: the filter is written for x86_64; skipped")
        return 0
    cases = [
        (errno.EPERM, ["io_uring is unavailable", "seccomp", "io_uring_setup"], NR_IO_URING),
        (errno.ENOSYS, ["io_uring is unavailable", "does not provide io_uring"], NR_IO_URING),
        # A profile that lets a ring be created and refuses to submit to it: the probe
        # must find out, not the shards (which would fail one by one).
        (
            errno.EPERM,
            ["io_uring is unavailable", "seccomp", "io_uring_enter"],
            (NR_IO_URING_ENTER,),
        ),
    ]
    ok = [refused_with_io_uring(args.binary, e, words, nrs) for e, words, nrs in cases]
    ok += [falls_back_to_epoll(args.binary, e, words[1:], nrs) for e, words, nrs in cases]
    print(f"no_io_uring: {sum(ok)} passed, {len(ok) - sum(ok)} failed")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
