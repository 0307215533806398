"""The control socket: a unix socket (0600) speaking JSON lines, and the live trace feed behind `vduproxy trace`.

One request per line, one reply per line:

    {"verb": "stats"}                                   -> {"ok": true, "stats": {...}}
    {"verb": "mode", "pair": "g1", "mode": "svq"}       -> {"ok": true, "pair": "g1", "mode": "svq"}
    {"verb": "state", "op": "save", "pair": "g1"}       -> {"ok": true, "pair": "g1", "bytes": N, "blob": BASE64}
    {"verb": "state", "op": "load", "pair": "g1", "blob": BASE64}  -> {"ok": true, "pair": "g1", "bytes": N}
    {"verb": "trace", "pair": "g1", "all": false}       -> {"ok": true, "trace": "started"}, then one
                                                           {"trace": {event}} line per event until the client goes
    anything wrong                                      -> {"ok": false, "code": "...", "error": "..."}

`pair` may be left out when the daemon serves exactly one pair.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any, Protocol

import structlog
import trio

from .log import LEVELS, get_logger

log = get_logger(__name__)

# A state blob is at most ~1 MiB (migration.state.MAX_BODY); base64 and the JSON around it fit in 2 MiB.
MAX_LINE = 2 << 20
MAX_CLIENTS = 64
TRACE_BUFFER = 1024  # events queued per trace client before new ones are dropped (and counted)
# What `trace` follows unless --all: the vhost-user conversation, the data plane's reaction, the CVQ.
PROTOCOL_LOGGERS = frozenset({"vduproxy.server", "vduproxy.backend", "vduproxy.dataplane", "vduproxy.vdpa.cvq"})
MODES = {"svq": True, "passthrough": False, "auto": None}


class ControlError(Exception):
    """A request the daemon refuses; `code` is machine-readable (bad_request, unknown_pair, failed, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ControlUnavailable(Exception):
    """No daemon answers on the control socket."""


# ------------------------------------------------------------------------------------------------ trace tee


class _Subscriber:
    def __init__(self, send: trio.MemorySendChannel[dict[str, Any]], pair: str | None, all_events: bool) -> None:
        self.send = send
        self.pair = pair
        self.all_events = all_events
        self.dropped = 0

    def wants(self, ev: dict[str, Any]) -> bool:
        if self.pair is not None and ev.get("pair") != self.pair:
            return False
        return self.all_events or ev.get("logger_name") in PROTOCOL_LOGGERS


class TraceHub:
    """A structlog processor that copies events to live `trace` subscribers.

    It sits first in the chain, ahead of the level gate, so a subscriber sees debug events (every vhost-user
    request) even when the log output is at info. With no subscriber it costs one truth test per event.
    """

    def __init__(self) -> None:
        self._subs: list[_Subscriber] = []
        # Trio channels are not thread-safe: only events logged on the trio thread are teed.
        self._thread = threading.get_ident()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if self._subs and threading.get_ident() == self._thread:
            self._publish(method_name, event_dict)
        return event_dict

    def _publish(self, method_name: str, event_dict: MutableMapping[str, Any]) -> None:
        ev = {**structlog.contextvars.get_contextvars(), **event_dict}
        ev.setdefault("level", "error" if method_name == "exception" else method_name)
        ev.setdefault("timestamp", time.time())
        ev.pop("exc_info", None)  # a traceback object is neither JSON nor the subscriber's business
        for sub in self._subs:
            if not sub.wants(ev):
                continue
            try:
                sub.send.send_nowait(ev)
            except trio.WouldBlock:
                sub.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    @contextlib.contextmanager
    def subscribe(
        self, pair: str | None = None, *, all_events: bool = False
    ) -> Iterator[tuple[_Subscriber, trio.MemoryReceiveChannel[dict[str, Any]]]]:
        self._thread = threading.get_ident()
        send, recv = trio.open_memory_channel[dict[str, Any]](TRACE_BUFFER)
        sub = _Subscriber(send, pair, all_events)
        self._subs.append(sub)
        try:
            yield sub, recv
        finally:
            self._subs.remove(sub)
            send.close()
            recv.close()


class _LevelGate:
    """Drops events below the output level (the wrapper lets everything through so the tee can see it)."""

    def __init__(self, level: str) -> None:
        self.minimum = LEVELS.get(level, logging.INFO)

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if (
            LEVELS.get("error" if method_name in ("exception", "critical") else method_name, logging.INFO)
            < self.minimum
        ):
            raise structlog.DropEvent
        return event_dict


def install_trace(hub: TraceHub, level: str) -> None:
    """Put `hub` in front of the configured processors (call after log.configure, before loggers are bound)."""
    cfg = structlog.get_config()
    rest = [p for p in cfg["processors"] if not isinstance(p, TraceHub | _LevelGate)]
    structlog.configure(
        processors=[hub, _LevelGate(level), *rest],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )


# ------------------------------------------------------------------------------------------------ server


class ControlTarget(Protocol):
    """What the control socket drives (the daemon)."""

    trace: TraceHub

    def stats(self) -> dict[str, Any]: ...
    async def set_mode(self, pair: str | None, mode: str) -> dict[str, Any]: ...
    async def save_state(self, pair: str | None) -> tuple[str, bytes]: ...
    async def load_state(self, pair: str | None, blob: bytes) -> str: ...


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, default=str, separators=(",", ":")).encode() + b"\n"


class _Lines:
    """Newline-delimited messages from a stream, each bounded by MAX_LINE."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def next(self) -> bytes | None:
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line
            if len(self.buf) > MAX_LINE:
                raise ControlError("bad_request", f"request longer than {MAX_LINE} bytes")
            data = await self.stream.receive_some(65536)
            if not data:
                return None  # a partial last line without newline is ignored: the client went away
            self.buf += data


def _parse(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError("bad_request", f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("verb"), str):
        raise ControlError("bad_request", 'a request is a JSON object with a "verb"')
    pair = msg.get("pair")
    if pair is not None and not isinstance(pair, str):
        raise ControlError("bad_request", '"pair" must be a string')
    return msg


async def _handle(target: ControlTarget, msg: dict[str, Any]) -> dict[str, Any]:
    verb = msg["verb"]
    pair = msg.get("pair")
    if verb == "stats":
        return {"ok": True, "stats": target.stats()}
    if verb == "mode":
        mode = msg.get("mode")
        if mode not in MODES:
            raise ControlError("bad_request", f'"mode" must be one of {", ".join(MODES)}')
        return {"ok": True, **await target.set_mode(pair, mode)}
    if verb == "state":
        op = msg.get("op")
        if op == "save":
            name, blob = await target.save_state(pair)
            return {"ok": True, "pair": name, "bytes": len(blob), "blob": base64.b64encode(blob).decode()}
        if op == "load":
            text = msg.get("blob")
            if not isinstance(text, str):
                raise ControlError("bad_request", '"blob" (base64) is required to load a state')
            try:
                blob = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ControlError("bad_request", f'"blob" is not base64: {exc}') from None
            name = await target.load_state(pair, blob)
            return {"ok": True, "pair": name, "bytes": len(blob)}
        raise ControlError("bad_request", '"op" must be "save" or "load"')
    raise ControlError("bad_request", f"unknown verb {verb!r} (known: stats, mode, state, trace)")


async def _stream_trace(target: ControlTarget, stream: trio.SocketStream, msg: dict[str, Any]) -> None:
    pair = msg.get("pair")
    with target.trace.subscribe(pair, all_events=bool(msg.get("all"))) as (sub, events):
        await stream.send_all(encode({"ok": True, "trace": "started", "pair": pair}))
        reported = 0
        async with trio.open_nursery() as nursery:

            async def watch_hangup() -> None:
                # The client only listens; any byte or EOF from it ends the feed.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.receive_some(1)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_hangup)
            try:
                async for ev in events:
                    if sub.dropped > reported:
                        lost = {"event": "trace_dropped", "count": sub.dropped - reported}
                        await stream.send_all(encode({"trace": lost}))
                        reported = sub.dropped
                    await stream.send_all(encode({"trace": ev}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                nursery.cancel_scope.cancel()  # the client went away mid-event


async def _serve_client(target: ControlTarget, stream: trio.SocketStream, client: int) -> None:
    clog = log.bind(control_client=client)
    lines = _Lines(stream)
    try:
        while True:
            try:
                line = await lines.next()
                if line is None:
                    return
                if not line.strip():
                    continue
                msg = _parse(line)
                clog.debug("control_request", verb=msg["verb"], pair=msg.get("pair"))
                if msg["verb"] == "trace":
                    await _stream_trace(target, stream, msg)
                    return
                reply = await _handle(target, msg)
            except ControlError as exc:
                reply = {"ok": False, "code": exc.code, "error": exc.message}
                if exc.code == "bad_request" and len(lines.buf) > MAX_LINE:
                    # The stream is no longer framed: answer, then drop the client. Its unread bytes are
                    # drained (briefly) first, or closing would reset the connection before it reads the reply.
                    await stream.send_all(encode(reply))
                    await stream.send_eof()
                    with trio.move_on_after(1.0):
                        while len(await stream.receive_some(65536)):
                            pass
                    return
            await stream.send_all(encode(reply))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception as exc:
        # A bug in one verb must not take the daemon's control plane (or the pairs) down.
        clog.exception("control_failure", error=repr(exc))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(encode({"ok": False, "code": "internal", "error": repr(exc)}))
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def serve_control(
    path: str, target: ControlTarget, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on `path` (mode 0600: the control socket can stop a guest's network) until cancelled."""
    from .server import _bind_listener

    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    listener = _bind_listener(path, 0o600, None)
    log.info("control_listening", socket=path)
    ids = itertools.count(1)
    limiter = trio.CapacityLimiter(MAX_CLIENTS)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                stream = trio.SocketStream(sock)
                if limiter.borrowed_tokens >= MAX_CLIENTS:
                    await _refuse(stream)
                    continue
                nursery.start_soon(_limited, limiter, target, stream, next(ids))
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _refuse(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError), trio.move_on_after(1):
        await stream.send_all(encode({"ok": False, "code": "busy", "error": f"more than {MAX_CLIENTS} clients"}))
    await stream.aclose()


async def _limited(limiter: trio.CapacityLimiter, target: ControlTarget, stream: trio.SocketStream, n: int) -> None:
    async with limiter:
        await _serve_client(target, stream, n)


# ------------------------------------------------------------------------------------------------ client


class ControlClient:
    """The CLI's side: one connection, requests answered in order."""

    def __init__(self, stream: trio.SocketStream, path: str) -> None:
        self.stream = stream
        self.path = path
        self.lines = _Lines(stream)

    @classmethod
    async def connect(cls, path: str) -> ControlClient:
        try:
            stream = await trio.open_unix_socket(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(
                f"no vduproxy daemon on {path} ({exc.strerror}); start one with `vduproxy serve --config FILE` "
                "or `vduproxy serve ... --control PATH`, or pass --control"
            ) from None
        except PermissionError:
            raise ControlUnavailable(
                f"{path}: permission denied (the control socket is 0600: run as its owner)"
            ) from None
        return cls(stream, path)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self.lines.next()
        except ControlError as exc:
            raise ControlUnavailable(f"{self.path}: {exc.message}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ControlUnavailable(f"{self.path}: connection lost ({exc})") from None
        if line is None:
            raise ControlUnavailable(f"{self.path}: the daemon closed the connection")
        try:
            msg = json.loads(line)
        except ValueError:
            raise ControlUnavailable(f"{self.path}: the daemon sent something that is not JSON") from None
        if not isinstance(msg, dict):
            raise ControlUnavailable(f"{self.path}: the daemon sent a non-object")
        return msg

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request; returns the reply, raises ControlError when the daemon refused it."""
        try:
            await self.stream.send_all(encode(msg))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ControlUnavailable(f"{self.path}: connection lost ({exc})") from None
        reply = await self._read()
        if not reply.get("ok"):
            raise ControlError(str(reply.get("code", "failed")), str(reply.get("error", "request refused")))
        return reply

    async def trace(self, pair: str | None = None, *, all_events: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Events as the daemon logs them, until the daemon goes away or the caller stops iterating."""
        await self.request({"verb": "trace", "pair": pair, "all": all_events})
        while True:
            try:
                msg = await self._read()
            except ControlUnavailable:
                return
            ev = msg.get("trace")
            if isinstance(ev, dict):
                yield ev


async def call(path: str, msg: dict[str, Any]) -> dict[str, Any]:
    """One request on a fresh connection."""
    async with await ControlClient.connect(path) as client:
        return await client.request(msg)
