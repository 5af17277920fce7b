"""Server memory per idle websocket connection, until kythera-load's `connect --hold`
exists (issue 5).

Opens N connections to a running server (upgrade to /echo, then idle), and reports the
growth of the server's resident memory (VmRSS) divided by N. The server's kernel-side
socket memory is not in its RSS and not counted.

    target/release/kythera --listen 127.0.0.1:18080 --shards 1 &
    python3 tools/idle_memory.py 18080 10000 $(pgrep -f 'kythera --listen 127.0.0.1:18080')

Stay under the per-process open-file limit (20,000 here) for N.
"""

import resource
import socket
import sys
import time

REQUEST = (
    b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main():
    port, count, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    time.sleep(0.5)
    before = rss(pid)
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(REQUEST)
        socks.append(s)
    for s in socks:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("server closed during the handshake")
            buf += chunk
        if not buf.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"not upgraded: {buf[:80]!r}")
    time.sleep(2)
    after = rss(pid)
    print(
        f"connections={count} rss_before={before} rss_after={after} "
        f"per_connection={(after - before) / count:.0f} bytes"
    )


if __name__ == "__main__":
    main()
