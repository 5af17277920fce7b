"""kythera's echo gear against an independent client: Python's `websockets` library.

Starts `target/release/kythera --listen 127.0.0.1:PORT --shards 2` (or uses `--url`),
then, on the echo route:

1. one connection, sequential round trips: text and binary messages of 0, 1, 125,
   126, 1000, 65535, 65536 and 500000 bytes (the frame-length encodings on both sides
   of each boundary), several rounds, random content (multi-byte UTF-8 in text);
2. one connection, pipelined: 100 messages of mixed sizes and types sent before any
   reply is read, replies checked in order;
3. four connections at once (spread over the shards), interleaved round trips;

each echo must come back with the same type and content, and each connection ends with
a clean close: the client sends close 1000 and must see the server's close with 1000.
With `--compression deflate` every connection offers permessage-deflate (websockets'
default offer: `client_max_window_bits`, context takeover allowed) and must get it;
`--server-arg` passes flags to kythera (its deflate settings, say). With `--tls` the
same runs over `wss://`: a test CA and a certificate for `localhost` are made with
`trustme`, kythera gets a `--tls-listen` address with them, and the client trusts that
CA only.
Exits 0 when all of that holds, 1 on the first mismatch, and stops the server
(SIGTERM, then checks that it exits 0) in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

# The asyncio client, not the threaded sync one: the sync client reads on a background
# thread while the caller writes, and an OpenSSL connection is not safe for that. Over
# wss:// a request written while that thread reads the server's TLS 1.3 session tickets
# now and then never reaches the wire (seen here: the client's socket had sent its
# ClientHello and Finished, never the upgrade request; the same bug as CPython's
# gh-137583 / websockets#1648).
from websockets.asyncio.client import ClientConnection, connect

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kythera_proc import (  # noqa: E402
    DEFAULT_BINARY,
    KytheraServer,
    ServerError,
    add_server_arg_option,
    tls_options,
    wait_tls_url,
)

SIZES = [0, 1, 125, 126, 1000, 65535, 65536, 500_000]
# Characters of each UTF-8 length, so that text messages cross code-point boundaries at
# frame and buffer edges.
CHARS = ["a", "z", " ", "é", "ß", "€", "✓", "😀", "𝄞"]
TIMEOUT = 30.0


class Mismatch(Exception):
    """An echo or a close did not come back as expected."""


def text_of(rng: random.Random, nbytes: int) -> str:
    """Random text whose UTF-8 encoding is exactly `nbytes` long."""
    out: list[str] = []
    left = nbytes
    while left >= 4:
        c = rng.choice(CHARS)
        out.append(c)
        left -= len(c.encode())
    out.append("x" * left)
    text = "".join(out)
    assert len(text.encode()) == nbytes
    return text


def message(rng: random.Random, kind: str, size: int) -> str | bytes:
    if kind == "text":
        return text_of(rng, size)
    return rng.randbytes(size)


def describe(m: str | bytes) -> str:
    kind = "text" if isinstance(m, str) else "binary"
    n = len(m.encode()) if isinstance(m, str) else len(m)
    return f"{kind} of {n} bytes"


def check_echo(sent: str | bytes, got: str | bytes, what: str) -> None:
    if type(sent) is not type(got):
        raise Mismatch(f"{what}: sent {describe(sent)}, got {describe(got)}")
    if sent != got:
        a = sent.encode() if isinstance(sent, str) else sent
        b = got.encode() if isinstance(got, str) else got
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise Mismatch(f"{what}: sent {describe(sent)}, got {describe(got)} differing at byte {at}")


COMPRESSION: str | None = None
# The TLS client context, for wss:// URLs.
SSL_CONTEXT = None


async def open_ws(url: str) -> ClientConnection:
    ws = await connect(
        url,
        ssl=SSL_CONTEXT if url.startswith("wss://") else None,
        max_size=None,
        compression=COMPRESSION,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
        ping_interval=None,
    )
    agreed = [e.name for e in ws.protocol.extensions]
    if COMPRESSION == "deflate" and agreed != ["permessage-deflate"]:
        await ws.close()
        raise Mismatch(f"permessage-deflate was offered, the server agreed to {agreed}")
    if COMPRESSION is None and agreed:
        await ws.close()
        raise Mismatch(f"no extension was offered, the server agreed to {agreed}")
    return ws


async def recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def close_clean(ws: ClientConnection, what: str) -> None:
    await ws.close(1000, "done")
    if ws.close_code != 1000:
        raise Mismatch(
            f"{what}: sent close 1000, the server closed with {ws.close_code} "
            f"{ws.close_reason!r} (expected 1000)"
        )


async def sequential(url: str, rng: random.Random, rounds: int) -> int:
    n = 0
    async with await open_ws(url) as ws:
        for r in range(rounds):
            for size in SIZES:
                for kind in ("text", "binary"):
                    m = message(rng, kind, size)
                    await ws.send(m)
                    check_echo(m, await recv(ws), f"sequential round {r}")
                    n += 1
        await close_clean(ws, "sequential")
    return n


async def pipelined(url: str, rng: random.Random, count: int) -> int:
    sent = [
        message(rng, rng.choice(["text", "binary"]), rng.choice(SIZES[:-1])) for _ in range(count)
    ]
    async with await open_ws(url) as ws:
        for m in sent:
            await ws.send(m)
        for i, m in enumerate(sent):
            check_echo(m, await recv(ws), f"pipelined message {i}")
        await close_clean(ws, "pipelined")
    return count


async def concurrent(url: str, rng: random.Random, conns: int, per_conn: int) -> int:
    n = 0
    async with contextlib.AsyncExitStack() as stack:
        wss = [await stack.enter_async_context(await open_ws(url)) for _ in range(conns)]
        for i in range(per_conn):
            batch = []
            for ws in wss:
                m = message(rng, rng.choice(["text", "binary"]), rng.choice(SIZES))
                await ws.send(m)
                batch.append((ws, m))
            for c, (ws, m) in enumerate(batch):
                check_echo(m, await recv(ws), f"connection {c}, message {i}")
                n += 1
        for c, ws in enumerate(wss):
            await close_clean(ws, f"concurrent connection {c}")
    return n


def run(url: str, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    t = time.monotonic()

    async def all_parts() -> int:
        n = await sequential(url, rng, rounds)
        n += await pipelined(url, rng, 100)
        return n + await concurrent(url, rng, 4, 25)

    n = asyncio.run(all_parts())
    print(
        f"python_client: {n} round trips on {url} matched, every close was 1000 "
        f"(compression: {COMPRESSION or 'none'}; {time.monotonic() - t:.1f} s, seed {seed})",
        flush=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="test this running server instead of starting kythera")
    p.add_argument("--path", default="/echo", help="echo route (default /echo)")
    p.add_argument("--binary", type=Path, default=DEFAULT_BINARY)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compression", choices=["none", "deflate"], default="none")
    p.add_argument("--tls", action="store_true", help="run over wss:// (a test CA made here)")
    add_server_arg_option(p)
    args = p.parse_args()
    global COMPRESSION, SSL_CONTEXT
    COMPRESSION = None if args.compression == "none" else args.compression
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    try:
        if args.url:
            run(args.url, args.rounds, seed)
        elif args.tls:
            with tempfile.TemporaryDirectory() as tmp:
                tls_args, SSL_CONTEXT = tls_options(Path(tmp))
                with KytheraServer(
                    args.binary,
                    args.shards,
                    extra_args=[*args.server_arg, *tls_args],
                    name="python_client_tls",
                ) as srv:
                    # The certificate names localhost.
                    url = wait_tls_url(srv).replace("127.0.0.1", "localhost").rstrip("/")
                    run(url + args.path, args.rounds, seed)
        else:
            with KytheraServer(
                args.binary, args.shards, extra_args=args.server_arg, name="python_client"
            ) as srv:
                run(srv.url.rstrip("/") + args.path, args.rounds, seed)
    except (Mismatch, ServerError) as e:
        print(f"python_client: FAILED (seed {seed}): {e}", file=sys.stderr)
        return 1
    except Exception as e:  # connection refused, closed early, timeouts
        print(
            f"python_client: FAILED (seed {seed}): {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        # Where it happened and what lay under it (an EOF, a reset, a timeout).
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
