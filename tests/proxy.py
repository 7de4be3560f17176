"""A TCP forwarder that a test can cut and restore (a broker outage for one client only), or
freeze (a broker that keeps the connection open and answers nothing on it)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse


class CuttableProxy:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._frozen: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.port = 0

    @property
    def url_netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` (its credentials, vhost and query) through this proxy."""
        parts = urllib.parse.urlsplit(amqp_url)
        credentials = parts.netloc.rpartition("@")[0]
        return parts._replace(netloc=f"{credentials}@{self.url_netloc}").geturl()

    def start(self) -> CuttableProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Drop every forwarded connection and refuse new ones until :meth:`start`."""
        with self._lock:
            if self._listener is not None:
                # shutdown() wakes the thread blocked in accept(); close() alone would not,
                # and the port would go on accepting.
                try:
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets.clear()

    def freeze(self) -> None:
        """Forward nothing more on the connections open now, either way, and close none of
        them; new connections are forwarded as ever."""
        with self._lock:
            self._frozen.update(self._sockets)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while source in self._frozen:  # held, never sent: frozen is for good
                    if source.fileno() < 0:
                        return  # cut
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
