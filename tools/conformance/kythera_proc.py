"""Start and stop a `kythera` server for the conformance scripts beside this file.

`KytheraServer` runs `target/release/kythera --listen 127.0.0.1:PORT --shards N` on a
free port, waits for its `kythera listening on ws://ADDR (N shards)` line, and on exit
sends SIGTERM and checks that the server drained and exited with status 0. The
server's stderr (its logs) goes to a file under `target/conformance/`, whose tail is
printed when something goes wrong.

Also usable on its own, to keep a server running by hand:

    python3 tools/conformance/kythera_proc.py [--shards 2]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO / "target" / "release" / "kythera"
LOG_DIR = REPO / "target" / "conformance"

LISTENING = re.compile(r"kythera listening on (ws://\S+) \(([^)]*)\)")
LISTENING_TLS = re.compile(r"kythera listening on (wss://\S+) \(")
# The banner's name for each --io / KYTHERA_IO choice that names one driver.
DRIVER_NAMES = {"uring": "io_uring", "epoll": "epoll"}


class ServerError(Exception):
    """The server did not start, or did not stop cleanly."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_options(tmp: Path):
    """A test CA (from `trustme`) and a certificate for localhost and 127.0.0.1 from it,
    written to `tmp`: kythera's TLS options on a free port, and a client SSL context
    that trusts that CA only."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    with open(tmp / "cert.pem", "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    context = ssl.create_default_context()
    ca.configure_trust(context)
    args = [
        "--tls-listen",
        f"127.0.0.1:{free_port()}",
        "--tls-cert",
        str(tmp / "cert.pem"),
        "--tls-key",
        str(tmp / "key.pem"),
    ]
    return args, context


def wait_tls_url(srv: "KytheraServer", within: float = 10.0) -> str:
    """The server's first wss:// address (its line follows the ws:// one)."""
    deadline = time.monotonic() + within
    while not srv.tls_url and time.monotonic() < deadline:
        time.sleep(0.01)
    if not srv.tls_url:
        raise ServerError(f"no wss:// listening line\n{srv.output_tail()}")
    return srv.tls_url


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwinds through `with KytheraServer()`, which then stops the server.
    raise SystemExit(128 + signum)


def add_server_arg_option(parser: "argparse.ArgumentParser") -> None:
    """The `--server-arg` option the conformance scripts share: extra flags for kythera."""
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for kythera (repeatable), e.g. --server-arg=--flag",
    )


class KytheraServer:
    """A kythera process, as a context manager: `with KytheraServer() as srv: srv.url`."""

    def __init__(
        self,
        binary: Path = DEFAULT_BINARY,
        shards: int = 2,
        extra_args: list[str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
        name: str = "kythera",
    ) -> None:
        self.binary = Path(binary)
        self.shards = shards
        self.extra_args = extra_args or []
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_path = LOG_DIR / f"{name}.log"
        self.url = ""
        # The first wss:// address, when kythera was given a --tls-listen.
        self.tls_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._log = None
        self._old_sigterm: object = None

    def __enter__(self) -> "KytheraServer":
        if not self.binary.is_file():
            raise ServerError(
                f"{self.binary} does not exist: build it with "
                "`cargo build --release --bin kythera`"
            )
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        # The port is free when chosen but may be taken before kythera binds it: try a
        # few.
        last = ""
        for _attempt in range(3):
            try:
                self._start(free_port())
                return self
            except ServerError as e:
                last = str(e)
                self._kill()
        raise ServerError(last)

    def _start(self, port: int) -> None:
        cmd = [
            str(self.binary),
            "--listen",
            f"127.0.0.1:{port}",
            "--shards",
            str(self.shards),
            *self.extra_args,
        ]
        self._log = open(self.log_path, "w")
        self._lines = []
        self._ready = threading.Event()
        # Plain log lines in the file (tracing-subscriber honours NO_COLOR).
        env = {**os.environ, "NO_COLOR": "1"}
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            # Its own process group: a Ctrl-C meant for this script reaches kythera only
            # as the SIGTERM that stop() sends.
            start_new_session=True,
            # And should this script die without stopping it, kythera gets SIGTERM.
            preexec_fn=_terminate_with_parent,
        )
        # Read stdout on a thread for the whole run, so that the pipe never fills.
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                print(f"started: {' '.join(cmd)} -> {self.url} ({self.banner})", flush=True)
                # A run meant for one driver must not pass on the other.
                want = DRIVER_NAMES.get(os.environ.get("KYTHERA_IO", ""))
                if want and not self.banner.endswith(f", {want}") and f", {want}," not in self.banner:
                    self.stop()
                    raise ServerError(f"KYTHERA_IO asks for {want}, the banner says ({self.banner})")
                return
            if self.proc.poll() is not None:
                self._ready.wait(0.5)  # let the reader thread see the last lines
                raise ServerError(
                    f"kythera exited with status {self.proc.returncode} before "
                    f"listening\n{self.output_tail()}"
                )
        raise ServerError(
            f"kythera printed no 'listening' line within {self.start_timeout} s\n"
            f"{self.output_tail()}"
        )

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line.rstrip("\n"))
            t = LISTENING_TLS.search(line)
            if t and not self.tls_url:
                self.tls_url = t.group(1)
            m = LISTENING.search(line)
            if m and not self._ready.is_set():
                self.url = m.group(1)
                self.banner = m.group(2)
                self._ready.set()

    def output_tail(self, n: int = 30) -> str:
        """The last lines of the server's stdout and log."""
        out = ["--- kythera stdout (tail):", *self._lines[-n:]]
        try:
            log = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            log = []
        out += [f"--- kythera log {self.log_path} (tail):", *log[-n:]]
        return "\n".join(out)

    def stop(self) -> int:
        """SIGTERM, then wait for the drain; returns the exit status. Raises if the
        server had to be killed or exited non-zero."""
        proc = self.proc
        if proc is None:
            return 0
        self.proc = None
        try:
            if proc.poll() is not None:
                raise ServerError(
                    f"kythera died during the run (status {proc.returncode})\n"
                    f"{self.output_tail()}"
                )
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise ServerError(
                    f"kythera did not exit within {self.stop_timeout} s of SIGTERM; "
                    f"killed\n{self.output_tail()}"
                ) from None
            if rc != 0:
                raise ServerError(
                    f"kythera exited with status {rc} after SIGTERM (expected 0)\n"
                    f"{self.output_tail()}"
                )
            print("stopped: kythera drained and exited 0", flush=True)
            return rc
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.stop()
                return
            # The run already failed: still stop the server, and report a failed stop
            # without hiding the original error.
            try:
                self.stop()
            except ServerError as e:
                print(f"also: {e}", file=sys.stderr)
            finally:
                self._kill()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", type=Path, default=DEFAULT_BINARY)
    p.add_argument("--shards", type=int, default=2)
    args = p.parse_args()
    with KytheraServer(args.binary, args.shards) as srv:
        print(f"serving on {srv.url}; Ctrl-C to stop", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
