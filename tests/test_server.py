"""app.server: the socket `saescope serve --workers N` shares must give accepted connections TCP_NODELAY."""

from __future__ import annotations

import asyncio
import socket
from multiprocessing.reduction import ForkingPickler

import pytest

from app.server import PER_WORKER_SOCKETS, _Config


def test_shared_socket_gives_accepted_connections_nodelay():
    # uvicorn's own bind_socket leaves proto at 0 and asyncio then leaves Nagle on (uvicorn#3149):
    # each keep-alive response waited ~40 ms for the client's delayed ACK.
    listener = _Config("app.main:create_app", factory=True, host="127.0.0.1", port=0, workers=1).bind_socket()
    assert listener.proto == socket.IPPROTO_TCP

    async def accepted_nodelay() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            value = await asyncio.wait_for(seen, 5)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


@pytest.mark.skipif(not PER_WORKER_SOCKETS, reason="per-worker SO_REUSEPORT sockets are used on Linux only")
def test_each_worker_gets_its_own_socket_and_connections_spread():
    # What uvicorn's supervisor does: pickle the bound socket into each spawned worker.
    shared = _Config("app.main:create_app", factory=True, host="127.0.0.1", port=0, workers=2).bind_socket()
    workers = [ForkingPickler.loads(bytes(ForkingPickler.dumps(shared))) for _ in range(2)]
    for sock in workers:
        assert sock.fileno() != shared.fileno() and sock.getsockname() == shared.getsockname()
        assert sock.proto == socket.IPPROTO_TCP
        sock.listen(64)
        sock.setblocking(False)
    clients = [socket.create_connection(shared.getsockname()) for _ in range(64)]
    accepted = [0, 0]
    for i, sock in enumerate(workers):
        while True:
            try:
                sock.accept()[0].close()
                accepted[i] += 1
            except BlockingIOError:
                break
    assert sum(accepted) == 64 and min(accepted) > 0, accepted
    for c in clients:
        c.close()
