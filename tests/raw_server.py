"""A misbehaving HTTP server on 127.0.0.1 for the tests: each connection gets the next behaviour of a
list (drip the body a byte at a time, cut the connection mid-body, answer properly). Bounded: every
behaviour stops within its own time limit, and the server stops when the test leaves it."""

import json
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit


def read_request(connection: socket.socket) -> tuple[str, str, str, bytes]:
    """(method, path, query, body) of one HTTP/1.1 request."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")), 0)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    parts = urlsplit(target)
    return method, parts.path, parts.query, body


def head(status: int, length: int) -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        f"Connection: close\r\n\r\n"
    ).encode()


def drip(interval: float = 1.0, limit_seconds: float = 30.0):
    """Send a whole body's worth of headers, then one byte of it every `interval` seconds."""

    def behave(connection, request):
        body = b"[" + b" " * 10_000 + b"]"
        connection.sendall(head(200, len(body)))
        started = time.monotonic()
        for byte in body:
            if time.monotonic() - started > limit_seconds:
                return
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                return  # the client gave up, as it should
            time.sleep(interval)

    return behave


def cut_off():
    """Promise a long body, send part of it, close."""

    def behave(connection, request):
        connection.sendall(head(200, 5000) + b'[{"paperId": "')

    return behave


def answer(api):
    """What the fake API answers (tests/fake_s2.py)."""

    def behave(connection, request):
        status, body = api.answer(*request)
        data = json.dumps(body).encode()
        connection.sendall(head(status, len(data)) + data)

    return behave


@contextmanager
def raw_server(behaviours: list):
    """Yields the base URL (…/graph/v1); connection i gets behaviours[i], later ones the last."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    served = []

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            behaviour = behaviours[min(len(served), len(behaviours) - 1)]
            served.append(behaviour)
            with connection:
                try:
                    behaviour(connection, read_request(connection))
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/graph/v1", served
    finally:
        stop.set()
        thread.join(timeout=40)
        listener.close()
