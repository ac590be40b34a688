"""One model process per server, apart from the page handlers (as Neuronpedia keeps its inference
server apart from its web app): `saescope serve` starts it once, whatever the number of uvicorn
workers, and every worker talks to it over a Unix socket in a private folder.

Why a process: a generation holds the CPU (and, in Python, the GIL) for seconds; in the page workers it
would stall every page request queued behind it. The model process runs with fewer torch threads and
a lower priority (nice), so the page workers keep their cores while generations run.

The model process starts loading the model at once (the server starts it with itself), and refuses
requests until the model is loaded and has answered a first request of its own: 503 with a short
Retry-After and a detail saying it is loading (a page shows "loading" and asks again by itself). A
request that waited behind the load would hold its connection for the whole load (24 s measured for
the first steering request after a start); a quick, clear answer lets the client decide.

The model process runs one request at a time. A request arriving when `live_queue` are already
waiting is refused at once with 503 and a Retry-After estimated from recent requests' durations: the
queue never piles up. Each request has its own connection; when the client goes away (the HTTP
client disconnected and the page worker closed the connection) the request is cancelled: dropped if
still queued, stopped after its current token if generating. A generation stops at `live_time_limit`; a
strength sweep (many generations in one request) at `live_sweep_time_limit` as a whole, a graph build
(op "trace", graphs.py) at `graph_time_limit`.

Wire format: each message is 4 bytes of big-endian length, then UTF-8 JSON.
    request   {"op": "encode" | "generate" | "chat" | "sweep" | "trace" | "status", ...arguments, "stream": true to stream}
    events    {"event": {"which": "default" | "steered" | "frozen", "text": "..."}}, or {"event": {"progress": {...}}}
              (sweep, trace), streamed before the answer
    answer    {"ok": true, "result": {...}} or {"ok": false, "status": 404/422/503/500, "detail": "...", "retry_after": s}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from ..config import GenerationConfig, LiveConfig
from .errors import LiveError, Loading, NotFound, Unavailable

if TYPE_CHECKING:
    from .interventions import Intervention
    from .runtime import LiveRuntime, ShouldStop

log = logging.getLogger("saescope.live")
HEADER = struct.Struct(">I")
MAX_MESSAGE = 16 << 20
LOADING_RETRY_AFTER = 2  # seconds: a model loads in seconds to tens of seconds; a client asks again soon


# ---------------------------------------------------------------------- framing


def _send(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    sock.sendall(HEADER.pack(len(data)) + data)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> dict:
    (n,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if n > MAX_MESSAGE:
        raise ConnectionError(f"message of {n} bytes is over the limit")
    return json.loads(_recv_exactly(sock, n))


# ---------------------------------------------------------------------- the model process


@dataclass
class _Job:
    request: dict
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    answer: dict | None = None
    events: queue.Queue[dict] = field(default_factory=queue.Queue)  # streamed tokens, sent before the answer


class ModelServer:
    """What runs in the model process: accepts connections, admits or refuses requests, runs them one by one."""

    def __init__(self, runtime: LiveRuntime, cfg: LiveConfig) -> None:
        self.runtime, self.cfg = runtime, cfg
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0  # admitted and not finished: queued plus running
        self.state, self.detail = "loading", "the model is loading"
        self.started = time.monotonic()
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0, "timed_out": 0, "rejected": 0}
        self.recent: list[float] = []  # seconds of the last requests, for Retry-After

    def load(self) -> None:
        """Load the model (and the store's first SAE) and run it once, so the first user finds it warm."""
        try:
            first = self.runtime.preload()
            if first is not None:
                self.runtime.encode(first, "Hello")
                self.runtime.generate(first, "Hello", [], GenerationConfig(max_new_tokens=2))
            self.state, self.detail = "ready", "ready"
            log.info("the live model is ready after %.1f s", time.monotonic() - self.started)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to the pages, not raised
            self.state, self.detail = "error", f"the model could not be loaded: {exc}"
            log.error(self.detail)

    def status(self) -> dict:
        with self.lock:
            return {
                "state": self.state,
                "detail": self.detail,
                "pending": self.pending,
                "queue_limit": self.cfg.live_queue,
                **self.counts,
                "limits": asdict(self.cfg),
            }

    def _retry_after(self) -> int:
        typical = sorted(self.recent)[len(self.recent) // 2] if self.recent else 2.0
        return max(1, min(120, math.ceil(typical * self.pending)))

    def handle(self, conn: socket.socket) -> None:
        """One connection: one request. Watches the connection while the request waits or runs."""
        with conn:
            try:
                request = _recv(conn)
            except (ConnectionError, ValueError, OSError):
                return
            if request.get("op") == "status":
                _send(conn, {"ok": True, "result": self.status()})
                return
            if self.state == "loading":
                detail = f"the model is loading ({time.monotonic() - self.started:.0f} s so far)"
                _send(conn, {"ok": False, "status": 503, "loading": True, "detail": detail, "retry_after": LOADING_RETRY_AFTER})
                return
            with self.lock:
                if self.pending > self.cfg.live_queue:  # one running plus live_queue waiting
                    self.counts["rejected"] += 1
                    busy = {"ok": False, "status": 503, "detail": "the model is busy: try again shortly"}
                    busy["retry_after"] = self._retry_after()
                else:
                    busy = None
                    self.pending += 1
            if busy is not None:
                _send(conn, busy)
                return
            job = _Job(request)
            self.jobs.put(job)
            try:
                while not job.done.wait(0.02 if request.get("stream") else 0.05):
                    self._send_events(conn, job)
                    readable, _, _ = select.select([conn], [], [], 0)
                    if readable and not conn.recv(1, socket.MSG_PEEK):  # end of file: the client is gone
                        raise ConnectionError("the client is gone")
                self._send_events(conn, job)
            except OSError:  # the client is gone (ConnectionError included): its generation stops after its current token
                job.cancelled.set()
                job.done.wait()
                return
            try:
                _send(conn, job.answer or {"ok": False, "status": 500, "detail": "no answer"})
            except OSError:
                pass

    @staticmethod
    def _send_events(conn: socket.socket, job: _Job) -> None:
        while True:
            try:
                event = job.events.get_nowait()
            except queue.Empty:
                return
            _send(conn, {"event": event})

    def run_jobs(self) -> None:
        """The one thread that runs the model."""
        from .runtime import time_limit

        while True:
            job = self.jobs.get()
            start = time.monotonic()
            try:
                if job.cancelled.is_set():
                    job.answer = {"ok": False, "status": 499, "detail": "cancelled"}
                    self._count("cancelled")
                    continue
                if self.state == "error":
                    raise Unavailable(self.detail)
                sweep = job.request.get("op") == "sweep"  # a whole sweep is many generations: its own limit
                stop = time_limit(self.cfg.live_sweep_time_limit if sweep else self.cfg.live_time_limit, job.cancelled.is_set)
                emit = job.events.put if job.request.get("stream") else lambda event: None  # `call` reads one answer
                job.answer = {"ok": True, "result": self.execute(job.request, stop, emit)}
                result = job.answer["result"]
                stopped = {result.get("default", {}).get("stopped"), result.get("steered", {}).get("stopped"), result.get("stopped")}
                self._count("cancelled" if "cancelled" in stopped else "timed_out" if "time_limit" in stopped else "completed")
            except (LiveError, NotFound) as exc:
                job.answer = {"ok": False, "status": exc.status, "detail": str(exc), "retry_after": exc.retry_after}
                self._count("failed")
            except Exception as exc:  # noqa: BLE001 - the process must keep serving; the client gets a 500 with the reason
                log.exception("live request failed")
                job.answer = {"ok": False, "status": 500, "detail": f"{type(exc).__name__}: {exc}"}
                self._count("failed")
            finally:
                with self.lock:
                    self.pending -= 1
                    self.recent = (self.recent + [time.monotonic() - start])[-20:]
                job.done.set()

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def execute(self, request: dict, stop: ShouldStop, emit: Callable[[dict], None] = lambda event: None) -> dict:
        op = request.get("op")
        if op == "encode":
            features = request.get("features")  # several at once (a feature list's page)
            features = None if features is None else [int(f) for f in features]
            result = self.runtime.encode(request["sae"], request["text"], request.get("feature"), int(request.get("top", 8)), features)
            return asdict(result)
        if op in ("generate", "chat"):
            interventions = [parse_intervention(raw) for raw in request["interventions"]]
            settings = GenerationConfig(**request["settings"])
            prompt_ids, on_token = None, None
            if op == "chat" or request.get("stream"):
                from .streaming import TextDeltas, chat_prompt_ids

                held = self.runtime.sae(request["sae"])
                tokenizer = self.runtime.model(held.run.model).tokenizer
                if op == "chat":
                    prompt_ids = chat_prompt_ids(tokenizer, request["messages"], self.cfg.max_prompt_tokens)
                if request.get("stream"):
                    deltas: dict[str, TextDeltas] = {}

                    def on_token(which: str, token_id: int) -> None:
                        if which not in deltas:
                            for other in deltas.values():
                                other.flush()
                            deltas[which] = TextDeltas(tokenizer, lambda text: emit({"which": which, "text": text}))
                        deltas[which].add(token_id)

            generated = self.runtime.generate(
                request["sae"], request.get("prompt", ""), interventions, settings, stop, on_token, prompt_ids,
                frozen_attention=bool(request.get("frozen_attention")),
            )  # fmt: skip
            if on_token is not None:
                for d in deltas.values():
                    d.flush()
            return asdict(generated)
        if op == "sweep":  # {"op": "sweep", "request": SweepRequest as a dict}; progress events {"progress": {stage, done, total}}
            from .sweep import SweepRequest

            try:
                sweep = SweepRequest.from_dict(request["request"])
            except (KeyError, TypeError, ValueError) as exc:
                raise LiveError(f"not a sweep request: {exc}") from exc
            return asdict(self.runtime.sweep(sweep, lambda p: emit({"progress": asdict(p)}), stop))
        if op == "trace":  # {"op": "trace", "request": GraphRequest as a dict}; progress events {"progress": {stage, done, total, unit}}
            from .graphs import GraphRequest, build_graph

            try:
                graph = GraphRequest.from_dict(request["request"])
            except (KeyError, TypeError, ValueError) as exc:
                raise LiveError(f"not a graph request: {exc}") from exc
            cancelled = lambda: stop() == "cancelled"  # noqa: E731 - stop's own time limit is a generation's, not a graph's
            return build_graph(self.runtime, graph, self.cfg.graph_time_limit, lambda p: emit({"progress": p}), cancelled)
        raise LiveError(f"unknown request {op!r}")

    def serve(self, path: str) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path + ".tmp")
        os.replace(path + ".tmp", path)  # the socket appears whole: clients never connect to a half-bound one
        listener.listen(64)
        threading.Thread(target=self.run_jobs, name="live-model", daemon=True).start()
        threading.Thread(target=self.load, name="live-load", daemon=True).start()
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()


def parse_intervention(raw: object) -> Intervention:
    """An intervention on the wire: [feature, mode, value], [feature, mode, value, condition spec or null],
    or a spec string FEATURE:MODE:VALUE[@CONDITION]."""
    from .interventions import Condition, Intervention

    if isinstance(raw, str):
        return Intervention.parse(raw)
    if isinstance(raw, (list, tuple)) and len(raw) in (3, 4):
        condition = Condition.parse(raw[3]) if len(raw) == 4 and raw[3] else None
        return Intervention(int(raw[0]), raw[1], float(raw[2]), condition)
    raise LiveError(f"not an intervention: {raw!r}")


def _exit_with_parent(parent: int) -> None:
    """End the model process when the server that started it is gone (killed without a chance to stop it)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """The model process: python -m sae_core.live.pool --socket PATH --db URL --config JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--parent", type=int, required=True, help="the server's pid: exit when it is gone")
    args = parser.parse_args(argv)
    # Watched from the first moment: a server killed while this process still imports torch left it
    # running for good when the watch started after the imports (it then took init as its parent).
    threading.Thread(target=_exit_with_parent, args=(args.parent,), daemon=True).start()
    cfg = LiveConfig(**json.loads(args.config))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us (SIGTERM) itself
    os.nice(cfg.live_nice)
    import torch

    from ..store import db
    from .runtime import LiveRuntime

    torch.set_num_threads(cfg.live_threads)
    logging.basicConfig(level=logging.WARNING, format="saescope live: %(message)s")
    ModelServer(LiveRuntime(cfg, engine=db.make_engine(args.db)), cfg).serve(args.socket)


# ---------------------------------------------------------------------- the server side


class ModelPool:
    """Starts and stops the model process (one per server) and says where it listens."""

    def __init__(self, db_url: str, cfg: LiveConfig):
        self.db_url, self.cfg = db_url, cfg
        self.folder = Path(tempfile.mkdtemp(prefix="saescope-live-"))  # mode 0700: only this user may connect
        self.socket = str(self.folder / "model.sock")
        self.process: subprocess.Popen | None = None

    def start(self) -> ModelPool:
        config = json.dumps(asdict(self.cfg))
        cmd = [
            sys.executable, "-m", "sae_core.live.pool", "--socket", self.socket, "--db", self.db_url, "--config", config,
            "--parent", str(os.getpid()),
        ]  # fmt: skip
        self.process = subprocess.Popen(cmd)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ModelPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ClientGone(Exception):
    """The HTTP client disconnected while its request waited for the model."""


class LiveClient:
    """What a page worker uses: one request per connection to the model process."""

    def __init__(self, socket_path: str, poll: float = 0.2):
        self.socket_path, self.poll = socket_path, poll

    async def call(self, request: dict, disconnected: Callable[[], Awaitable[bool]] | None = None) -> dict:
        """The model process's result; raises LiveError subclasses for its refusals and ClientGone when
        `disconnected()` turns true first (the connection is then closed, which cancels the request)."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=MAX_MESSAGE)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Loading("the model process is starting", retry_after=LOADING_RETRY_AFTER) from exc
        try:
            data = json.dumps(request).encode()
            writer.write(HEADER.pack(len(data)) + data)
            await writer.drain()
            answer = asyncio.ensure_future(self._read(reader))
            while True:
                done, _ = await asyncio.wait({answer}, timeout=self.poll)
                if done:
                    break
                if disconnected is not None and await disconnected():
                    answer.cancel()
                    raise ClientGone()
            message = answer.result()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise Unavailable("the model process closed the connection (it may have restarted)", retry_after=2) from exc
        finally:
            writer.close()
        if message.get("ok"):
            return message["result"]
        status, detail = message.get("status"), message.get("detail", "the model process failed")
        if status == 503:
            raise (Loading if message.get("loading") else Unavailable)(detail, message.get("retry_after"))
        if status == 404:
            raise NotFound(detail)
        if status == 422:
            raise LiveError(detail)
        raise RuntimeError(detail)

    async def stream(self, request: dict, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[dict]:
        """The model process's streamed events ({"which", "text"}) as they come, then {"result": ...};
        raises as `call` does. Leaving the iteration early (the HTTP client went away: the response's task
        is cancelled) closes the connection, which stops the generation after its current token."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=MAX_MESSAGE)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Loading("the model process is starting", retry_after=LOADING_RETRY_AFTER) from exc
        try:
            data = json.dumps({**request, "stream": True}).encode()
            writer.write(HEADER.pack(len(data)) + data)
            await writer.drain()
            while True:
                read = asyncio.ensure_future(self._read(reader))
                while True:
                    done, _ = await asyncio.wait({read}, timeout=self.poll)
                    if done:
                        break
                    if disconnected is not None and await disconnected():
                        read.cancel()
                        raise ClientGone()
                try:
                    message = read.result()
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    raise Unavailable("the model process closed the connection (it may have restarted)", retry_after=2) from exc
                if "event" in message:
                    yield message["event"]
                    continue
                yield {"result": self._answer(message)}
                return
        finally:
            writer.close()

    @staticmethod
    def _answer(message: dict) -> dict:
        if message.get("ok"):
            return message["result"]
        status, detail = message.get("status"), message.get("detail", "the model process failed")
        if status == 503:
            raise (Loading if message.get("loading") else Unavailable)(detail, message.get("retry_after"))
        if status == 404:
            raise NotFound(detail)
        if status == 422:
            raise LiveError(detail)
        raise RuntimeError(detail)

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
        (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        return json.loads(await reader.readexactly(n))


if __name__ == "__main__":
    main()
