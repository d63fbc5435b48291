"""Review plumbing under bad peers: a stalled webhook caller is dropped, and a lost pull request says how to
recover from a pull (not a push)."""

from __future__ import annotations

import socket
import threading

import pytest

from labeling.client import Client
from loop.errors import LabelStudioError
from loop.workspace import open_workspace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_webhook_caller_that_stalls_mid_request_is_disconnected(ws, monkeypatch) -> None:
    from labeling.webhook import Receiver

    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__WEBHOOK_PORT", str(free_port()))
    ws = open_workspace(ws.root)
    with Receiver(ws, on_event=lambda: None, socket_timeout_s=0.5) as receiver:
        port = ws.settings.labelstudio.webhook_port
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /labelstudio/webhook HTTP/1.1\r\nHost: x\r\nContent-Len")  # ... and nothing more
            conn.settimeout(60)  # a bound for the test only: without a server timeout this recv never returns
            assert conn.recv(1024) == b""  # the receiver closed the connection
        assert receiver.calls == 0


class _Silent:
    """A server that accepts connections, reads the request, and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


def test_a_lost_pull_request_hints_at_a_pull_not_a_push() -> None:
    from labeling.pull import changed_tasks

    silent = _Silent()
    try:
        client = Client(silent.url, "legacy-token", attempts=1, timeout_s=0.5)
        with pytest.raises(LabelStudioError) as err:
            changed_tasks(client, 1, "2026-01-01T00:00:00.000000Z")
        text = str(err.value)
        assert "run the pull again" in text and "push" not in text
        client.close()
    finally:
        silent.close()


def test_webhook_callers_dripping_bytes_are_cut_at_a_total_deadline_and_connections_are_capped(ws,
                                                                                             monkeypatch) -> None:
    """60 connections dripping one byte every few seconds held every thread before (the timeout is per read)."""
    import time

    from labeling.webhook import HEADER, Receiver

    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__WEBHOOK_PORT", str(free_port()))
    ws = open_workspace(ws.root)
    with Receiver(ws, on_event=lambda: None, socket_timeout_s=5.0, request_deadline_s=1.5,
                  max_connections=4) as receiver:
        port = ws.settings.labelstudio.webhook_port
        drips = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(3)
        assert extra.recv(1024) == b""  # over the cap: closed at once
        extra.close()
        started = time.monotonic()
        closed: set[int] = set()
        while len(closed) < len(drips) and time.monotonic() - started < 10:
            for i, conn in enumerate(drips):
                if i in closed:
                    continue
                try:
                    conn.sendall(b"P")  # one byte at a time: each read succeeds, the request never ends
                except OSError:
                    closed.add(i)
                    continue
                conn.settimeout(0.05)
                try:
                    if conn.recv(1024) == b"":
                        closed.add(i)
                except TimeoutError:
                    pass
            time.sleep(0.2)
        assert len(closed) == 4 and time.monotonic() - started < 5  # cut at the total deadline
        for conn in drips:
            conn.close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as ok:  # the slots are free again
            ok.sendall(f"POST /labelstudio/webhook HTTP/1.1\r\nHost: x\r\n{HEADER}: {receiver.secret}\r\n"
                       "Content-Length: 0\r\n\r\n".encode())
            ok.settimeout(5)
            assert ok.recv(1024).startswith(b"HTTP/1.0 204")
        assert receiver.calls == 1


def test_the_webhook_pull_thread_survives_a_pull_that_raises(ws, monkeypatch) -> None:
    """A KeyError in one pull (a malformed annotation before) ended the thread while the receiver kept
    answering 204: every later save went unpulled."""
    import time

    from labeling.webhook import HEADER, Receiver

    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__WEBHOOK_PORT", str(free_port()))
    ws = open_workspace(ws.root)

    def broken() -> None:
        raise KeyError(0)

    with Receiver(ws, on_event=broken, debounce_s=0.05) as receiver:
        port = ws.settings.labelstudio.webhook_port
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(f"POST /labelstudio/webhook HTTP/1.1\r\nHost: x\r\n{HEADER}: {receiver.secret}\r\n"
                             "Content-Length: 0\r\n\r\n".encode())
                conn.settimeout(5)
                assert conn.recv(1024).startswith(b"HTTP/1.0 204")
            deadline = time.monotonic() + 10
            before = receiver.runs
            while receiver.runs == before and time.monotonic() < deadline:
                time.sleep(0.05)
        assert receiver.runs == 2
