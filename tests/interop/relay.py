"""A TCP relay on 127.0.0.1 that counts the bytes each way: how the suite sees whether a
response was compressed on the wire (grpcio does not show the grpc-encoding header)."""

import socket
import threading


class ByteCounter:
    """Relays every connection made to `addr` to `target`, counting bytes each way."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.to_server = 0
        self.to_client = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, "to_server"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "to_client"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def reset(self) -> None:
        with self._lock:
            self.to_server = self.to_client = 0

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
