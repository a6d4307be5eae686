"""The connection a streamed request body goes to an app on (api/appproxy.py): a socket of its
own, read and written apart, so that an app that answers before it has read the body (a 413, a
redirect) and then closes is heard.

With asyncio's streams, a write that fails (the app reset the connection: it closed with the body
unread) closes the transport at once: what the app had sent before, its answer, is dropped with
it, still in the kernel's buffer or in the reader (which then raises the write's error). Here a
failed write only ends the sending; reading goes on until the app's end, and a reset after the
answer counts as that end (the answer's own framing, its length or its chunks, says whether it
is whole). The answer is fed into an ``asyncio.StreamReader`` that pauses the reading when the
visitor is slower than the app (``pause_reading``/``resume_reading``, as a transport's)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

CHUNK = 64 * 1024


class StreamedConnection:
    """One connection to an app for one request: ``send`` the request, read ``reader``."""

    def __init__(self, sock: socket.socket, reader: asyncio.StreamReader) -> None:
        self._sock = sock
        self.reader = reader
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._closed = False
        reader.set_transport(self)  # type: ignore[arg-type]  # the reader asks for pause/resume only
        self._feeder = asyncio.ensure_future(self._feed())

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = 5.0) -> StreamedConnection:
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        family, kind, proto, _, where = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, where), timeout)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, asyncio.StreamReader(limit=2**16))

    async def send(self, data: bytes) -> None:
        """All of ``data`` to the app; ``OSError`` when the app is gone (reading goes on)."""
        if data:
            await self._loop.sock_sendall(self._sock, data)

    async def _feed(self) -> None:
        try:
            while True:
                await self._flowing.wait()
                try:
                    data = await self._loop.sock_recv(self._sock, CHUNK)
                except OSError:  # a reset: what came before it is all there is
                    data = b""
                if not data:
                    self.reader.feed_eof()
                    return
                self.reader.feed_data(data)
        except asyncio.CancelledError:
            self.reader.feed_eof()
            raise

    # what StreamReader asks of its transport
    def pause_reading(self) -> None:
        self._flowing.clear()

    def resume_reading(self) -> None:
        self._flowing.set()

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Reading ends; the socket is closed once the loop let go of it (a wait on it that is
        cancelled lets go on the loop's next turn; closed before, its number could be reused)."""
        if self._closed:
            return
        self._closed = True
        self._feeder.cancel()
        self._feeder.add_done_callback(lambda _: self._close_socket())

    def _close_socket(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
