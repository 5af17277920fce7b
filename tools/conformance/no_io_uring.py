"""kythera where io_uring is refused: it must stop at start with a message that says
what is wrong and how to fix it, and a non-zero exit code (issue 3, item 6).

The refusal is real, not simulated: the child process installs a seccomp filter
(through prctl, with ctypes) that answers `io_uring_setup` with EPERM (what Docker's
default profile does) or ENOSYS (what a kernel without io_uring, or gVisor, does), then
execs kythera. Run: `python3 tools/conformance/no_io_uring.py [--binary PATH]`.
"""

import argparse
import ctypes
import errno
import platform
import struct
import subprocess
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
NR_IO_URING_SETUP = 425  # the same number on every architecture since 5.1

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06


def _filter(refusal_errno):
    """A BPF program: io_uring_setup fails with `refusal_errno`, all else is allowed."""
    insns = [
        (BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (BPF_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),  # another arch: allow
        (BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (BPF_JEQ_K, 0, 1, NR_IO_URING_SETUP),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | refusal_errno),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return b"".join(struct.pack("HBBI", *i) for i in insns), len(insns)


def _install(refusal_errno):
    libc = ctypes.CDLL(None, use_errno=True)
    raw, count = _filter(refusal_errno)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def run_case(binary, refusal_errno, must_say):
    proc = subprocess.run(
        [binary, "--listen", "127.0.0.1:0", "--shards", "1"],
        preexec_fn=lambda: _install(refusal_errno),
        capture_output=True,
        text=True,
        timeout=30,
    )
    name = errno.errorcode[refusal_errno]
    problems = []
    if proc.returncode == 0:
        problems.append("exited 0")
    if "listening on" in proc.stdout:
        problems.append("claimed to be listening")
    for words in must_say:
        if words not in proc.stderr:
            problems.append(f"stderr lacks {words!r}")
    if problems:
        print(f"no_io_uring: {name}: FAILED: {', '.join(problems)}")
        print(f"  exit {proc.returncode}; stderr: {proc.stderr.strip()}")
        return False
    print(f"no_io_uring: {name}: exit {proc.returncode}: {proc.stderr.strip()}")
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/kythera")
    args = parser.parse_args()
    if platform.machine() != "x86_64":
        print("no_io_uring: the filter is written for x86_64; skipped")
        return 0
    cases = [
        (errno.EPERM, ["io_uring is unavailable", "seccomp", "io_uring_setup"]),
        (errno.ENOSYS, ["io_uring is unavailable", "does not provide io_uring"]),
    ]
    ok = [run_case(args.binary, e, words) for e, words in cases]
    print(f"no_io_uring: {sum(ok)} passed, {len(ok) - sum(ok)} failed")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
