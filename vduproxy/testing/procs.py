"""Child-process helpers for the real-client test bed: timestamped output capture and teardown by PID.

Every helper process (QEMU, dpdk-testpmd) is started in its own session so that teardown can signal its
process group without touching anything else, and is always reaped before the helper returns.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trio

from vduproxy.log import get_logger

log = get_logger(__name__)

# Bytes kept in the partial-line buffer before it is flushed as a line: a guest that prints without
# newlines must not grow memory without bound.
MAX_PARTIAL = 64 * 1024
# Terminal control sequences (SeaBIOS and the guest console reset the screen): noise for line matching.
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-~])")


class ProcessError(Exception):
    """Base class for test-bed process failures; `output` holds the tail of the process's output."""

    def __init__(self, message: str, *, name: str, output: str = "") -> None:
        super().__init__(f"{name}: {message}" + (f"\n--- last output ---\n{output}" if output else ""))
        self.name = name
        self.output = output


class OutputTimeout(ProcessError, TimeoutError):
    """An expected line did not appear in time."""


class ProcessExited(ProcessError):
    """The process ended (or closed its output) before the expected line appeared."""


@dataclass(frozen=True)
class Line:
    """One output line; `t` is seconds since the process started."""

    t: float
    text: str


class LineLog:
    """Timestamped lines from a child's output; tasks can wait for a regex on lines from an index on."""

    def __init__(self, name: str, *, path: Path | None = None) -> None:
        self.name = name
        self.lines: list[Line] = []
        self.t0 = time.monotonic()
        self.closed = False
        self._partial = b""
        self._changed = trio.Event()
        self.path = path
        self._file: IO[str] | None = None

    def mark(self) -> int:
        """Index of the next line: pass it as `since` to wait only for output produced from now on."""
        return len(self.lines)

    @property
    def partial(self) -> str:
        """Text after the last newline (prompts such as `testpmd> ` are never newline-terminated)."""
        return self._partial.decode("utf-8", "replace")

    def feed(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = re.split(rb"\r?\n", self._partial)
        if len(self._partial) > MAX_PARTIAL:
            complete.append(self._partial)
            self._partial = b""
        now = time.monotonic() - self.t0
        for raw in complete:
            # Serial consoles emit \r\r\n and stray \r: they carry no meaning for matching.
            self._append(Line(now, _ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r", "")))
        self._wake()

    def close(self) -> None:
        if self._partial:
            self._append(Line(time.monotonic() - self.t0, self._partial.decode("utf-8", "replace")))
            self._partial = b""
        self.closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        self._wake()

    def _append(self, line: Line) -> None:
        self.lines.append(line)
        if self.path is not None and self._file is None and not self.closed:
            # Opened on first output, so a process that never starts leaves no file and no open fd.
            self._file = self.path.open("a", encoding="utf-8")
        if self._file is not None:
            self._file.write(f"[{line.t:9.3f}] {line.text}\n")
            self._file.flush()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def text(self, since: int = 0) -> str:
        return "\n".join(line.text for line in self.lines[since:])

    def tail(self, n: int = 30) -> str:
        return "\n".join(f"[{line.t:8.3f}] {line.text}" for line in self.lines[-n:])

    def search(self, pattern: str | re.Pattern[str], since: int = 0) -> tuple[int, re.Match[str]] | None:
        """First line at or after `since` matching `pattern`: (index, match), or None."""
        rx = re.compile(pattern)
        for i in range(since, len(self.lines)):
            m = rx.search(self.lines[i].text)
            if m is not None:
                return i, m
        return None

    async def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float, *, since: int = 0, partial: bool = False
    ) -> tuple[int, re.Match[str]]:
        """Wait for a line at or after index `since` matching `pattern`; returns (index, match).

        With `partial`, the unterminated tail also counts (index is then the next line's index).
        Raises OutputTimeout, or ProcessExited if the output ends first.
        """
        rx = re.compile(pattern)
        scanned = since
        with trio.move_on_after(timeout):
            while True:
                found = self.search(rx, scanned)
                if found is not None:
                    return found
                scanned = max(scanned, len(self.lines))
                if partial:
                    m = rx.search(self.partial)
                    if m is not None:
                        return len(self.lines), m
                if self.closed:
                    raise ProcessExited(
                        f"output ended before {rx.pattern!r} appeared", name=self.name, output=self.tail()
                    )
                await self._changed.wait()
        raise OutputTimeout(f"{rx.pattern!r} did not appear within {timeout:.0f} s", name=self.name, output=self.tail())


class ManagedProcess:
    """A child process in its own session, its stdout+stderr captured into a LineLog by a nursery task."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.output = LineLog(name, path=log_path)
        self._proc: trio.Process | None = None
        self._log = log.bind(proc=name)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, nursery: trio.Nursery) -> None:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        env = None if self.env is None else {**os.environ, **self.env}
        self._proc = await trio.lowlevel.open_process(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=self.cwd,
        )
        self._log.info("process started", pid=self._proc.pid, argv=" ".join(self.argv))
        nursery.start_soon(self._pump)

    async def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            async for chunk in self._proc.stdout:
                self.output.feed(bytes(chunk))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Closed by teardown or the child: EOF is the only signal the waiters need.
            pass
        finally:
            self.output.close()

    async def send(self, text: str) -> None:
        """Write to the child's stdin; raises ProcessExited if the child is gone."""
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError(f"{self.name} was not started")
        try:
            await self._proc.stdin.send_all(text.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ProcessExited("stdin closed", name=self.name, output=self.output.tail()) from e

    async def wait(self, timeout: float) -> int:
        """Wait for the child to exit; raises OutputTimeout (a TimeoutError) if it is still running."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        with trio.move_on_after(timeout):
            return await self._proc.wait()
        raise OutputTimeout(f"still running after {timeout:.0f} s", name=self.name, output=self.output.tail())

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        if self._proc.returncode is not None:
            return  # reaped: the PID may already belong to someone else
        # The child leads its own session, so its PID is the process-group ID of it and its helpers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    async def terminate(self, grace: float = 10.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL after `grace` seconds; always reaps. Safe to repeat.

        Runs shielded so that it completes even while the caller is being cancelled.
        """
        if self._proc is None:
            return None
        proc = self._proc
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                self._signal_group(signal.SIGTERM)
                with trio.move_on_after(grace):
                    await proc.wait()
                if proc.returncode is None:
                    self._log.warning("process ignored SIGTERM, killing", pid=proc.pid, grace=grace)
                    self._signal_group(signal.SIGKILL)
                    await proc.wait()
                self._log.info("process ended", pid=proc.pid, rc=proc.returncode)
            if proc.stdin is not None:
                await proc.stdin.aclose()
        return proc.returncode


def unwrap_group(exc: BaseException) -> BaseException:
    """The single leaf of a chain of one-member exception groups (a nursery wraps the body's error)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextlib.asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for output-pump tasks that lets the body's own exception through unwrapped.

    The pump tasks never raise, so a one-member group can only be the body's error: tests can then
    `pytest.raises(OutputTimeout)` as if no nursery were involved.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaf = unwrap_group(group)
        if leaf is group:
            raise
        raise leaf from None


def short_socket_path(path: Path) -> Path:
    """Check a Unix-socket path against the 108-byte sun_path limit, failing with a clear message."""
    if len(os.fsencode(path)) > 107:
        raise ValueError(f"Unix socket path longer than 107 bytes: {path} (use a short dir under /tmp)")
    return path
