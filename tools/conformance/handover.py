"""Live handover (`kythera --handover-socket` / `--take-over`), tested as a deploy would
use it: a running kythera with clients on it, a new kythera taking over.

Scenarios (all by default; `--scenario NAME` for one):

- `continuous`: 1,000 echo clients sending continuously and chat clients in rooms
  across 2 shards; a new process whose echo gear puts `B|` before its answers takes
  over, then a third (`C|`) takes over from it. No client may see a close or an
  error; every message is answered exactly once and in order, the answers switch
  prefix at one point per connection and per handover; room messages keep flowing.
  Prints the pause each connection saw (its longest wait for an answer while the
  handovers ran: p50 / p99 / max) and the handover times from the logs.
- `killed`: the new process dies after taking 100 of 300 connections
  (`KYTHERA_TEST_TAKER_DIES_AFTER`): the old one keeps serving the other 200 and
  accepting; a second new process then takes those 200.
- `opt_out`: connections of a gear that does not opt in (`/stats`) get 1001 while the
  echo connections move.
- `deflate`: permessage-deflate without context takeover moves; with context takeover
  (the server allowing it) gets 1001.
- `half_frame`: clients that have sent half a frame, or the first fragment and half
  the last of a compressed message, when the handover starts: they move with what was
  received, and the new process answers once the rest arrives; one that has sent
  150 KB of a frame (more than a connection takes along) finishes it on the old
  process and moves after.

`--old-io` and `--new-io` pick the drivers of the two processes (a deploy from an
io_uring host image to an epoll one, say).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import websockets
from websockets.asyncio.client import connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kythera_proc import DEFAULT_BINARY, LOG_DIR, free_port  # noqa: E402

BANNER = re.compile(r"kythera listening on ws://(\S+) \(")


class Proc:
    """One kythera process on `port`, its stderr in a log file."""

    def __init__(self, name: str, port: int, sock: Path, io: str, args: list[str], env=None):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"handover-{name}.log"
        self.log = open(self.log_path, "w")
        cmd = [
            str(DEFAULT_BINARY),
            "--listen",
            f"127.0.0.1:{port}",
            "--shards",
            "2",
            "--io",
            io,
            "--handover-socket",
            str(sock),
            *args,
        ]
        environ = {**os.environ, "NO_COLOR": "1", "RUST_LOG": "info", **(env or {})}
        environ.pop("KYTHERA_IO", None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, env=environ, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )
        line = self.proc.stdout.readline()
        if not BANNER.search(line):
            raise SystemExit(f"{name}: no banner ({line!r})\n{self.tail()}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        print(f"started {name}: {' '.join(cmd)}", flush=True)

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])

    def wait(self, within: float) -> int:
        try:
            return self.proc.wait(within)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{self.name} did not exit within {within} s\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def metric(self, port: int, name: str, label: str) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        total = 0
        for line in data.decode().splitlines():
            if line.startswith(name) and label in line:
                total += int(float(line.rsplit(" ", 1)[1]))
        return total


def check(cond: bool, what: str, procs=()) -> None:
    if not cond:
        tails = "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)
        raise SystemExit(f"FAILED: {what}\n{tails}")


class EchoClient:
    """Sends `i:seq` texts one at a time and checks each answer; records prefixes in the
    order they appeared and its longest wait."""

    def __init__(self, i: int, url: str, extensions=None) -> None:
        self.i, self.url, self.extensions = i, url, extensions
        self.seq = 0
        self.prefixes: list[str] = []
        self.longest = 0.0
        self.error: str | None = None
        self.close_code: int | None = None
        self.answered_after: dict[str, int] = {}

    async def run(self, stop: asyncio.Event, period: float) -> None:
        try:
            async with connect(
                self.url,
                compression=None,
                extensions=self.extensions,
                ping_interval=None,
                open_timeout=30,
                max_queue=None,
            ) as ws:
                self.ws = ws
                while not stop.is_set():
                    text = f"{self.i}:{self.seq}"
                    t = time.monotonic()
                    await ws.send(text)
                    reply = await ws.recv()
                    self.longest = max(self.longest, time.monotonic() - t)
                    prefix, _, body = reply.rpartition("|")
                    if body != text:
                        self.error = f"client {self.i}: sent {text!r}, got {reply!r}"
                        return
                    if not self.prefixes or self.prefixes[-1] != prefix:
                        if prefix in self.prefixes:
                            self.error = f"client {self.i}: prefix {prefix!r} came back"
                            return
                        self.prefixes.append(prefix)
                    self.answered_after[prefix] = self.answered_after.get(prefix, 0) + 1
                    self.seq += 1
                    await asyncio.sleep(period)
        except websockets.ConnectionClosed as e:
            self.close_code = e.rcvd.code if e.rcvd else None
            self.error = f"client {self.i}: closed ({e})"
        except Exception as e:  # noqa: BLE001
            self.error = f"client {self.i}: {type(e).__name__}: {e}"


class ChatClient:
    """Joins a room and sends a numbered room message every `period`; checks that
    messages from each sender arrive in order and never twice, and counts the ones
    that did not arrive (a gap in a sender's numbers)."""

    def __init__(self, i: int, base: str, rooms: int) -> None:
        self.name = f"u{i}"
        self.room = f"r{i % rooms}"
        self.url = f"{base}/chat?name={self.name}&room={self.room}"
        self.last: dict[str, int] = {}
        self.received = 0
        self.missed = 0
        self.received_at: list[float] = []
        self.error: str | None = None
        self.sent = 0

    async def run(self, stop: asyncio.Event, period: float) -> None:
        try:
            async with connect(self.url, compression=None, ping_interval=None, open_timeout=30) as ws:

                async def reader() -> None:
                    async for raw in ws:
                        m = json.loads(raw)
                        if "error" in m:
                            self.error = f"{self.name}: {m}"
                            return
                        sender, seq = m["from"], int(m["text"])
                        if seq <= self.last.get(sender, -1):
                            self.error = f"{self.name}: {sender}'s {seq} after {self.last[sender]}"
                            return
                        # A member joins a room after some of its messages were sent: count
                        # gaps only after the first message from each sender.
                        if sender in self.last:
                            self.missed += seq - self.last[sender] - 1
                        self.last[sender] = seq
                        self.received += 1
                        self.received_at.append(time.monotonic())

                task = asyncio.create_task(reader())
                while not stop.is_set() and self.error is None:
                    await ws.send(json.dumps({"text": str(self.sent)}))
                    self.sent += 1
                    await asyncio.sleep(period)
                await asyncio.sleep(0.5)
                task.cancel()
        except websockets.ConnectionClosed as e:
            self.error = f"{self.name}: closed ({e})"
        except Exception as e:  # noqa: BLE001
            self.error = f"{self.name}: {type(e).__name__}: {e}"


def pauses(clients) -> str:
    longest = sorted(c.longest * 1000 for c in clients)
    p = lambda q: longest[min(len(longest) - 1, int(q * len(longest)))]  # noqa: E731
    return f"p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {longest[-1]:.1f} ms"


def handover_times(proc: Proc) -> list[str]:
    return re.findall(r"handover complete moved=(\d+) took_ms=(\d+)", proc.log_text())


async def scenario_continuous(args, tmp: Path) -> None:
    port, sock = free_port(), tmp / "handover.sock"
    base = f"ws://127.0.0.1:{port}"
    a = Proc("a", port, sock, args.old_io, [])
    procs = [a]
    try:
        stop = asyncio.Event()
        echo = [EchoClient(i, f"{base}/echo") for i in range(args.clients)]
        chat = [ChatClient(i, base, 4) for i in range(args.chat)]
        tasks = [asyncio.create_task(c.run(stop, 0.05)) for c in echo]
        await asyncio.sleep(1.5)
        tasks += [asyncio.create_task(c.run(stop, 0.1)) for c in chat]
        await asyncio.sleep(1.0)
        check(all(c.seq > 0 for c in echo), "every echo client answered before", procs)
        b = Proc("b", port, sock, args.new_io, ["--take-over", str(sock), "--echo-prefix", "B|"])
        procs.append(b)
        check(a.wait(20) == 0, "the first process exits 0 once it holds nothing", procs)
        await asyncio.sleep(1.0)
        c = Proc("c", port, sock, args.old_io, ["--take-over", str(sock), "--echo-prefix", "C|"])
        procs.append(c)
        check(b.wait(20) == 0, "the second process exits 0 once it holds nothing", procs)
        after = time.monotonic()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
        errors = [x.error for x in echo + chat if x.error]
        check(not errors, f"{len(errors)} clients failed, first: {errors[:3]}", procs)
        for x in echo:
            check(x.prefixes == ["", "B", "C"], f"client {x.i} saw prefixes {x.prefixes}", procs)
        # Room messages flow after the handovers, to every member.
        for x in chat:
            check(any(t > after for t in x.received_at), f"{x.name} got no room message after", procs)
        moved = [handover_times(p) for p in (a, b)]
        taken = c.metric(port, "kythera_handover_connections_total", 'result="taken"')
        check(taken == args.clients + args.chat, f"the third process took {taken}", procs)
        sent = sum(x.seq for x in echo)
        expected = sum(x.sent for x in chat) * (args.chat // 4)
        got = sum(x.received for x in chat)
        missed = sum(x.missed for x in chat)
        print(
            f"continuous ({args.old_io} -> {args.new_io} -> {args.old_io}): {len(echo)} echo "
            f"clients, {sent} messages answered exactly once and in order; pause per connection "
            f"{pauses(echo)}; handovers (moved, ms): {moved}; {len(chat)} chat clients in 4 "
            f"rooms: {got} of about {expected} room messages delivered, none twice or out of order, "
            f"{missed} missing between two that arrived",
            flush=True,
        )
    finally:
        for p in procs:
            p.stop()


async def scenario_killed(args, tmp: Path) -> None:
    port, sock = free_port(), tmp / "handover.sock"
    base = f"ws://127.0.0.1:{port}"
    a = Proc("a", port, sock, args.old_io, [])
    procs = [a]
    try:
        stop = asyncio.Event()
        echo = [EchoClient(i, f"{base}/echo") for i in range(300)]
        tasks = [asyncio.create_task(c.run(stop, 0.05)) for c in echo]
        await asyncio.sleep(1.5)
        b = Proc(
            "b",
            port,
            sock,
            args.new_io,
            ["--take-over", str(sock), "--echo-prefix", "B|"],
            env={"KYTHERA_TEST_TAKER_DIES_AFTER": "100"},
        )
        procs.append(b)
        check(b.wait(20) == 70, "the new process died as told", procs)
        await asyncio.sleep(1.5)
        died = [x for x in echo if x.error]
        alive = [x for x in echo if not x.error]
        check(len(died) <= 100, f"{len(died)} connections lost; the new process held at most 100", procs)
        check(len(alive) >= 200, f"only {len(alive)} connections left on the old process", procs)
        marks = {x.i: x.seq for x in alive}
        await asyncio.sleep(1.0)
        check(all(x.seq > marks[x.i] for x in alive if not x.error), "the old process keeps answering", procs)
        check(all(x.prefixes == [""] for x in alive), "answers still from the old process", procs)
        # It accepts again.
        fresh = EchoClient(999, f"{base}/echo")
        fresh_stop = asyncio.Event()
        fresh_task = asyncio.create_task(fresh.run(fresh_stop, 0.05))
        await asyncio.sleep(0.5)
        fresh_stop.set()
        await fresh_task
        check(fresh.error is None and fresh.seq > 0, f"a new connection: {fresh.error}", procs)
        c = Proc("c", port, sock, args.new_io, ["--take-over", str(sock), "--echo-prefix", "C|"])
        procs.append(c)
        check(a.wait(20) == 0, "the old process exits 0 after the second taker", procs)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        for x in alive:
            check(x.error is None, f"survivor failed: {x.error}", procs)
            check(x.prefixes == ["", "C"], f"survivor {x.i} saw {x.prefixes}", procs)
        print(
            f"killed ({args.old_io} -> {args.new_io}): the new process died after taking 100; "
            f"{len(died)} connections lost with it, {len(alive)} kept answering on the old one "
            f"and then moved to a second new process",
            flush=True,
        )
    finally:
        for p in procs:
            p.stop()


async def scenario_opt_out(args, tmp: Path) -> None:
    port, sock = free_port(), tmp / "handover.sock"
    base = f"ws://127.0.0.1:{port}"
    a = Proc("a", port, sock, args.old_io, [])
    procs = [a]
    try:
        stop = asyncio.Event()
        echo = [EchoClient(i, f"{base}/echo") for i in range(50)]
        tasks = [asyncio.create_task(c.run(stop, 0.05)) for c in echo]
        stats = []
        for _ in range(10):
            stats.append(await connect(f"{base}/stats", ping_interval=None))
        await asyncio.sleep(1.0)
        b = Proc("b", port, sock, args.new_io, ["--take-over", str(sock), "--echo-prefix", "B|"])
        procs.append(b)
        codes = []
        for ws in stats:
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed as e:
                codes.append(e.rcvd.code if e.rcvd else None)
        check(codes == [1001] * 10, f"the /stats connections got {codes}", procs)
        check(a.wait(20) == 0, "the old process exits 0", procs)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        check(all(x.error is None and x.prefixes == ["", "B"] for x in echo), "echo moved", procs)
        closed = b.metric(port, "kythera_handover_connections_total", 'result="taken"')
        check(closed == 50, f"taken {closed}", procs)
        print(f"opt_out ({args.old_io} -> {args.new_io}): 10 /stats connections closed with 1001, 50 echo moved", flush=True)
    finally:
        for p in procs:
            p.stop()


async def scenario_deflate(args, tmp: Path) -> None:
    for takeover in (False, True):
        port, sock = free_port(), tmp / "handover.sock"
        base = f"ws://127.0.0.1:{port}"
        server_args = (
            ["--deflate-server-no-context-takeover", "false", "--deflate-client-no-context-takeover", "false"]
            if takeover
            else []
        )
        a = Proc("a", port, sock, args.old_io, server_args)
        procs = [a]
        try:
            stop = asyncio.Event()
            ext = [ClientPerMessageDeflateFactory()] if takeover else [
                ClientPerMessageDeflateFactory(server_no_context_takeover=True, client_no_context_takeover=True)
            ]
            echo = [EchoClient(i, f"{base}/echo", extensions=ext) for i in range(50)]
            tasks = [asyncio.create_task(c.run(stop, 0.05)) for c in echo]
            await asyncio.sleep(1.0)
            check(all(c.seq > 0 for c in echo), "deflate clients answered before", procs)
            b = Proc("b", port, sock, args.new_io, ["--take-over", str(sock), "--echo-prefix", "B|", *server_args])
            procs.append(b)
            check(a.wait(20) == 0, "the old process exits 0", procs)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
            if takeover:
                codes = sorted({x.close_code for x in echo})
                check(codes == [1001], f"context takeover: closes {codes}", procs)
            else:
                errors = [x.error for x in echo if x.error]
                check(not errors, f"no context takeover: {errors[:3]}", procs)
                check(all(x.prefixes == ["", "B"] for x in echo), "deflate moved", procs)
            print(
                f"deflate ({args.old_io} -> {args.new_io}): "
                + ("with context takeover: 50 closed with 1001" if takeover else "without context takeover: 50 moved"),
                flush=True,
            )
        finally:
            for p in procs:
                p.stop()


def frame(
    payload: bytes,
    opcode: int = 1,
    fin: bool = True,
    rsv1: bool = False,
    mask: bytes = b"\x01\x02\x03\x04",
) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack(">Q", n)
    return bytes([first]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frame(s: socket.socket) -> tuple[int, bytes]:
    """One server frame: its first byte and its payload."""

    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise SystemExit("half_frame: connection closed")
            out += chunk
        return out

    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", exact(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", exact(8))
    return b0, exact(n)


def read_text(s: socket.socket) -> bytes:
    """A server text frame's payload, inflated if it is compressed (no context takeover)."""
    b0, payload = read_frame(s)
    if b0 & 0x40:
        payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
    return payload


def upgrade(port: int, extensions: str | None = None) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port))
    ext = f"Sec-WebSocket-Extensions: {extensions}\r\n".encode() if extensions else b""
    s.sendall(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + ext + b"\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    return s, head


async def scenario_half_frame(args, tmp: Path) -> None:
    port, sock = free_port(), tmp / "handover.sock"
    a = Proc("a", port, sock, args.old_io, [])
    procs = [a]
    try:
        # A frame half received: moves with its connection.
        s1, head = upgrade(port)
        check(head.startswith(b"HTTP/1.1 101"), f"upgrade: {head[:40]!r}", procs)
        payload = b"x" * 1000
        whole = frame(payload)
        s1.sendall(whole[:500])
        # A compressed message (no context takeover): its first fragment whole, half of
        # its last one.
        s2, head = upgrade(port, "permessage-deflate; client_no_context_takeover; server_no_context_takeover")
        check(b"permessage-deflate" in head, f"deflate agreed: {head!r}", procs)
        message = b"compressed and fragmented " * 40
        c = zlib.compressobj(wbits=-15)
        deflated = (c.compress(message) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
        half = len(deflated) // 2
        first = frame(deflated[:half], fin=False, rsv1=True)
        last = frame(deflated[half:], opcode=0)
        s2.sendall(first + last[: len(last) // 2])
        # More of a frame than a connection takes along: it waits on the old process.
        s3, head = upgrade(port)
        check(head.startswith(b"HTTP/1.1 101"), f"upgrade: {head[:40]!r}", procs)
        large = b"y" * 200_000
        big = frame(large)
        s3.sendall(big[:150_000])
        await asyncio.sleep(0.5)  # the old process reads all of it
        b = Proc("b", port, sock, args.new_io, ["--take-over", str(sock), "--echo-prefix", "B|"])
        procs.append(b)
        await asyncio.sleep(0.5)
        check(a.proc.poll() is None, "the old process waits for the large frame", procs)
        s1.sendall(whole[500:])
        check(read_text(s1) == b"B|" + payload, "the half frame answered by the new process", procs)
        s2.sendall(last[len(last) // 2 :])
        check(read_text(s2) == b"B|" + message, "the half compressed message answered by the new process", procs)
        s3.sendall(big[150_000:])
        check(read_text(s3) == large, "the large frame answered by the old process", procs)
        check(a.wait(20) == 0, "then that connection moves and the old process exits", procs)
        s3.sendall(frame(b"after"))
        check(read_text(s3) == b"B|after", "its next message answered by the new process", procs)
        for s in (s1, s2, s3):
            s.close()
        print(
            f"half_frame ({args.old_io} -> {args.new_io}): a half frame and a half compressed "
            "message moved with their connections; 150 KB of a frame completed on the old process, then moved",
            flush=True,
        )
    finally:
        for p in procs:
            p.stop()


SCENARIOS = {
    "continuous": scenario_continuous,
    "killed": scenario_killed,
    "opt_out": scenario_opt_out,
    "deflate": scenario_deflate,
    "half_frame": scenario_half_frame,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--old-io", default="uring", choices=["uring", "epoll"])
    parser.add_argument("--new-io", default="uring", choices=["uring", "epoll"])
    parser.add_argument("--clients", type=int, default=1000, help="echo clients in `continuous`")
    parser.add_argument("--chat", type=int, default=40, help="chat clients in `continuous` (4 rooms)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenario or list(SCENARIOS):
            asyncio.run(SCENARIOS[name](args, Path(tmp)))


if __name__ == "__main__":
    main()
