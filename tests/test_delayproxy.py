"""testkit/delayproxy.py, the TCP proxy that adds real latency for the probe and latency tests."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from testkit.delayproxy import DelayProxy
from testkit.pgcluster import free_port


@pytest.fixture
def echo_server():
    """A blocking TCP echo server on 127.0.0.1 (its own threads)."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        srv.close()
        acceptor.join(5)
        assert not acceptor.is_alive(), "the echo server's accept thread did not end"


def rtt(sock: socket.socket, n: int = 5) -> float:
    """Median round trip of a small message, seconds."""
    times = []
    for i in range(n):
        msg = b"ping %d\n" % i
        start = time.perf_counter()
        sock.sendall(msg)
        got = b""
        while len(got) < len(msg):
            got += sock.recv(65536)
        times.append(time.perf_counter() - start)
        assert got == msg
    return sorted(times)[n // 2]


def test_delay_proxy_adds_latency_both_ways_adjustable_at_runtime(echo_server):
    with DelayProxy("127.0.0.1", echo_server) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        base = rtt(sock)
        proxy.delay = 0.020
        slow = rtt(sock)
        proxy.delay = 0.0
        time.sleep(0.05)  # let chunks scheduled under the old delay drain
        back = rtt(sock)
        print(f"\nRTT through the proxy: {base * 1e3:.2f} ms; with 20 ms delay {slow * 1e3:.2f} ms; "
              f"delay removed {back * 1e3:.2f} ms")
        assert slow >= 0.040  # each direction waits at least the delay
        assert slow - base < 0.040 + 0.100  # ~2 x delay; a generous upper bound for a busy machine
        assert back < 0.020


def test_delay_proxy_keeps_order_and_does_not_cap_throughput(echo_server):
    payload = os.urandom(4 << 20)
    with DelayProxy("127.0.0.1", echo_server, delay=0.050) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        received = bytearray()

        def reader() -> None:
            while len(received) < len(payload):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                received.extend(chunk)

        t = threading.Thread(target=reader)
        start = time.monotonic()
        t.start()
        for i in range(0, len(payload), 4096):  # ~1000 chunks: in series that would take ~100 s
            sock.sendall(payload[i:i + 4096])
        t.join(60)
        elapsed = time.monotonic() - start
        print(f"\n4 MiB echoed through a 50 ms proxy in {elapsed:.2f} s")
        assert bytes(received) == payload  # every byte, in order
        assert elapsed < 20


def test_delay_proxy_close_drops_connections_and_target_down(echo_server):
    proxy = DelayProxy("127.0.0.1", echo_server).start()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        assert rtt(sock, 1) < 1
        proxy.close()
        sock.settimeout(5)
        try:
            assert sock.recv(10) == b""  # closed by the proxy
        except ConnectionResetError:
            pass
    finally:
        sock.close()
        proxy.close()
    with DelayProxy("127.0.0.1", free_port()) as dead, \
            socket.create_connection(("127.0.0.1", dead.port), timeout=10) as s:
        s.settimeout(5)
        try:
            assert s.recv(10) == b""  # nothing behind it: the client's connection is closed
        except ConnectionResetError:
            pass
