"""A relay from plain TCP to a TLS server, for runners that speak only plain `ws://`.

kosoku (the Autobahn runner) has no TLS client, so `autobahn.py --tls` points it at this
relay, which opens one TLS connection to kythera's `wss://` listener per connection it
accepts and copies bytes both ways as they come: every byte of every case reaches
kythera inside TLS records, and kythera's answers reach kosoku as it sent them. When
either side closes, the other is closed (TLS has no half-close here), which is what
Autobahn's closing-handshake checks look at.

    with TlsRelay(("127.0.0.1", 8443), ssl_context, "localhost") as relay:
        relay.address  # "127.0.0.1:PORT", plain
"""

from __future__ import annotations

import asyncio
import ssl
import threading


class TlsRelay:
    """A plain listener on 127.0.0.1 (a free port) relaying to `target` over TLS."""

    def __init__(self, target: tuple[str, int], context: ssl.SSLContext, server_name: str):
        self.target = target
        self.context = context
        self.server_name = server_name
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> "TlsRelay":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TLS relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0)
        )
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    async def _relay(self, plain_r: asyncio.StreamReader, plain_w: asyncio.StreamWriter) -> None:
        try:
            tls_r, tls_w = await asyncio.open_connection(
                *self.target, ssl=self.context, server_hostname=self.server_name
            )
        except OSError:
            plain_w.close()
            return

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                pass
            finally:
                for writer in (plain_w, tls_w):
                    writer.close()

        await asyncio.gather(pump(plain_r, tls_w), pump(tls_r, plain_w))
