"""Relaying an ssh agent's socket to a socket that a RUN step can reach."""

from __future__ import annotations

import contextlib
import socket
import threading


def serve(listener: socket.socket, upstream: str, name: str) -> None:
    """Relay every connection to ``listener`` to the agent at ``upstream``, in a daemon
    thread, until the listener is closed."""
    threading.Thread(target=_accept_loop, args=(listener, upstream), daemon=True, name=name).start()


def _accept_loop(listener: socket.socket, upstream: str) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            agent.connect(upstream)
        except OSError:
            conn.close()
            agent.close()
            continue
        for a, b in ((conn, agent), (agent, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_RD)
