"""TVM RPC plumbing for profiling: start a tracker and servers (loopback by default), reach them with bounded
waits.

A TVM RPC server has no authentication and runs whatever it is sent: everything here binds 127.0.0.1 unless
the caller passes another host on purpose. Nothing here compiles or measures (edgecompact.profiling does).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from tvm import rpc
from tvm.rpc import base
from tvm.rpc.tracker import Tracker

from edgecompact.errors import ConfigError, DeployError

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0  # longest wait for a free server under a key before a job is given up


def parse_address(text: str, argument: str = "--rpc") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); ConfigError naming `argument` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{argument}: expected HOST:PORT, got '{text}'")
    return host, int(port)


def start_tracker(host: str = LOOPBACK, port: int = 9190, port_end: int = 9290) -> Tracker:
    """A TVM RPC tracker in a child process, on the first free port in [port, port_end) (`.port`)."""
    return Tracker(host=host, port=port, port_end=port_end, silent=True)


def start_server(
    tracker: tuple[str, int], key: str, host: str = LOOPBACK, port: int = 9090, port_end: int = 9190
) -> rpc.Server:
    """A TVM RPC server in a child process, registered under `key` at `tracker`; `.terminate()` stops it."""
    return rpc.Server(host=host, port=port, port_end=port_end, tracker_addr=tracker, key=key, silent=True)


def servers_under_key(tracker: tuple[str, int], key: str, timeout: float = CONNECT_TIMEOUT_S) -> int:
    """How many servers are registered under `key`; ConfigError if the tracker is unreachable in `timeout`."""
    session = _tracker_session(tracker, timeout)
    try:
        summary = session.summary()
    finally:
        session.close()
    return sum(1 for s in summary.get("server_info", []) if s.get("key", "").split(":", 1)[-1] == key)


def request_board(tracker: tuple[str, int], key: str, timeout: float) -> tuple[str, int, str]:
    """(host, port, matchkey) of a free server under `key`, from the tracker. ConfigError when the tracker cannot
    be reached (it is down or went away), DeployError when no server frees up within `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        session = _tracker_session(tracker, max(0.5, deadline - time.monotonic()))
        try:
            base.sendjson(session._sock, [base.TrackerCode.REQUEST, key, "", 1])
            code, value = base.recvjson(session._sock)
            if code != base.TrackerCode.SUCCESS:
                raise RuntimeError(f"tracker answered {code}")
            host, port, matchkey = value
            return str(host), int(port), str(matchkey)
        except (OSError, RuntimeError, ValueError, TypeError) as e:  # a timeout, or the tracker dropped us
            last = e
            time.sleep(0.5)
        finally:
            session.close()
    raise DeployError(
        f"RPC: no server under key '{key}' at tracker {tracker[0]}:{tracker[1]} was free within "
        f"{timeout:.0f} s ({type(last).__name__ if last else 'timeout'})"
    )


def connect_board(board: tuple[str, int, str], session_timeout: float = 600.0) -> Any:
    """An RPC session with the server `board` (from `request_board`). The server ends the session after
    `session_timeout` s. The handshake has no timeout of its own (TVM's C++ client): callers that must not
    hang run this in a thread they can abandon (edgecompact.profiling does)."""
    host, port, matchkey = board
    return rpc.connect(host, port, matchkey, session_timeout)


def _tracker_session(tracker: tuple[str, int], timeout: float) -> rpc.client.TrackerSession:
    host, port = tracker
    try:
        socket.create_connection((host, port), timeout=min(timeout, CONNECT_TIMEOUT_S)).close()
        session = rpc.connect_tracker(host, port)
    except (OSError, RuntimeError) as e:  # RuntimeError: TVM's own retries of a tracker that just went away
        raise ConfigError(
            f"--rpc: cannot reach the RPC tracker at {host}:{port} "
            f"({getattr(e, 'strerror', None) or type(e).__name__})"
        ) from None
    # The tracker queues a request until a server frees up; the socket timeout bounds that wait.
    session._sock.settimeout(timeout)
    return session


def serve(
    key: str,
    host: str = LOOPBACK,
    port: int = 9090,
    tracker: tuple[str, int] | None = None,
    tracker_port: int = 9190,
) -> None:
    """Run an RPC server under `key` (and a tracker on `tracker_port` when `tracker` is None) until Ctrl-C.

    This is `edgecompact rpc-server`: a loopback farm of one for trying `edgecompact profile --rpc`.
    """
    own_tracker = None
    if tracker is None:
        own_tracker = start_tracker(host, tracker_port, tracker_port + 100)
        tracker = (host, own_tracker.port)
    else:
        servers_under_key(tracker, key)  # fail now, in one line, if the tracker is unreachable
    server = start_server(tracker, key, host, port, port + 100)
    print(
        f"RPC server on {host}:{server.port} under key '{key}', tracker {tracker[0]}:{tracker[1]} "
        f"(no authentication: {'loopback only' if host == LOOPBACK else 'reachable from the network'}); "
        "Ctrl-C stops it",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        if own_tracker is not None:
            own_tracker.terminate()
