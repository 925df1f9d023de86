"""A fake serial board on a pseudo-terminal, for tests and the simulator.

:class:`FakeBoard` plays the microcontroller end of a USB serial cable. The daemon
opens :attr:`FakeBoard.path` exactly as it would open ``/dev/serial/by-id/...``;
the fake prints readings with :meth:`FakeBoard.send_line`, records every command
line the daemon writes, and can answer commands through a ``responder``::

    with FakeBoard(tmp_path, responder=lambda cmd: "ok") as board:
        # config: [serial.bike] url = str(board.path)
        board.send_line("hr=72,power=180")
        assert board.next_line(timeout=2) == "resistance=40"

:meth:`FakeBoard.unplug` and :meth:`FakeBoard.replug` imitate pulling the cable and
plugging it back: the same symlink then points at a fresh pseudo-terminal, as udev
re-points ``/dev/serial/by-id`` links.

Where pseudo-terminals do not exist (Windows), or when asked (``in_process=True``),
the board is an in-process port instead: no device node, a URL ``fakeboard://N/NAME``
(:attr:`FakeBoard.url`) that pyserial's ``serial_for_url`` opens through our URL
handler (:mod:`smartbiked.protocol_fakeboard`, registered when this module is
imported). It behaves like the pty: bytes the board prints wait (up to
:data:`BUFFER` bytes, then :meth:`FakeBoard.send` blocks) until the daemon reads
them, one opener at a time, unplug makes the open port's reads and writes fail, and
:meth:`~InProcessPort.fileno` is a socket that is readable exactly while bytes (or
an unplug) wait, so the daemon's board thread sleeps in ``select`` as on a pty.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import serial

log = logging.getLogger("smartbiked.fakeboard")

#: The URL scheme of in-process boards; pyserial finds its handler in the package below.
SCHEME = "fakeboard"
_HANDLER_PACKAGE = "smartbiked"
#: Bytes an in-process board holds for the daemon before :meth:`FakeBoard.send` blocks
#: (a pty's buffer is of this order): a board nobody reads cannot fill the memory.
BUFFER = 4096

if _HANDLER_PACKAGE not in serial.protocol_handler_packages:
    serial.protocol_handler_packages.append(_HANDLER_PACKAGE)

# The in-process boards by URL, for InProcessPort.open (pyserial hands it only the URL).
_BOARDS: dict[str, FakeBoard] = {}
_BOARDS_LOCK = threading.Lock()
_NUMBERS = itertools.count(1)


def have_ptys() -> bool:
    """True where pseudo-terminals exist (Linux, macOS; not Windows)."""
    try:
        import termios  # noqa: F401  (tty needs it; Windows has none)
    except ImportError:
        return False
    return hasattr(os, "openpty")


class FakeBoard:
    """The board side of a pty pair, reachable through a stable symlink (or in-process).

    ``directory``: where the symlink ``name`` is made (a test's tmp_path, or a
    run-time directory for the simulator); unused in-process.
    ``in_process``: no pty, an in-process port at :attr:`url` (see the module docstring).
    ``responder``: called on the reader thread with each command line received
    (without its line end); a returned string is sent back as one or more lines
    (``"ok 40"``, or ``"ok 40\\nok 40"`` for two), None sends nothing. It may be
    replaced at any time.

    Commands are recorded in :attr:`received`; :meth:`next_line` waits for them in
    order, with a deadline, on a condition variable (never by sleeping and hoping).
    """

    def __init__(self, directory: str | os.PathLike[str] | None,
                 name: str = "usb-Fake_Board-if00",
                 responder: Callable[[str], str | None] | None = None,
                 in_process: bool = False) -> None:
        self.in_process = in_process
        self.name = name
        #: The symlink to the pty (None in-process).
        self.path: Path | None = None
        if in_process:
            # Numbered: two boards of one name (two virtual bikes in a test) stay apart.
            self.url = f"{SCHEME}://{next(_NUMBERS)}/{name}"
            with _BOARDS_LOCK:
                _BOARDS[self.url] = self
        else:
            if directory is None:
                raise ValueError("a pty board needs a directory for its symlink")
            self.path = Path(directory) / name
            #: What the daemon opens: the symlink's path, or the in-process URL.
            self.url = str(self.path)
        self.responder = responder
        self._cond = threading.Condition()
        self._received: list[str] = []
        self._taken = 0
        self._write_lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._stop_w: int | None = None
        self._cable: _Cable | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        #: How many times the board was plugged in (in-process: its identity per plug-in).
        self.plugs = 0
        self.replug()

    # -- cable

    @property
    def plugged(self) -> bool:
        """True between :meth:`replug` and :meth:`unplug`."""
        return self._master is not None or self._cable is not None

    def replug(self) -> None:
        """Plug in (again): a new pty, the symlink re-pointed at its slave end."""
        if self._closed:
            raise RuntimeError(f"fake board {self.name} is closed")
        if self.plugged:
            return
        self.plugs += 1
        if self.in_process:
            # A new cable: a port still open on the old one stays dead, as after a replug.
            self._cable = _Cable()
            self._thread = threading.Thread(target=self._cable_loop, args=(self._cable,),
                                            name=f"fakeboard-{self.name}", daemon=True)
            self._thread.start()
            return
        import tty  # POSIX only: imported here so in-process boards work on Windows

        assert self.path is not None
        master, slave = os.openpty()
        # Raw: no echo of commands back to the daemon, no \n -> \r\n translation,
        # no line buffering of what the fake prints before the daemon opens the port.
        tty.setraw(slave)
        # The fake keeps the slave open too: with no slave open at all, reading the
        # master fails with EIO and the reader thread could not tell that from unplug.
        self._master, self._slave = master, slave
        link = self.path.with_name(self.path.name + ".new")
        link.unlink(missing_ok=True)
        os.symlink(os.ttyname(slave), link)
        os.replace(link, self.path)  # atomic: the daemon never sees a missing link
        stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._read_loop, args=(master, stop_r),
                                        name=f"fakeboard-{self.path.name}", daemon=True)
        self._thread.start()

    def unplug(self) -> None:
        """Pull the cable: the daemon's reads and writes fail, the symlink disappears."""
        if not self.plugged:
            return
        if self._cable is not None:
            cable, self._cable = self._cable, None
            cable.unplug()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._thread = None
            return
        assert self.path is not None
        self.path.unlink(missing_ok=True)
        assert self._stop_w is not None and self._thread is not None
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._stop_w)
        with self._write_lock:
            for fd in (self._master, self._slave):
                if fd is not None:
                    os.close(fd)
            self._master = self._slave = self._stop_w = None
        self._thread = None

    def close(self) -> None:
        """Unplug for good; safe to call twice."""
        self.unplug()
        self._closed = True
        with _BOARDS_LOCK:
            if _BOARDS.get(self.url) is self:
                del _BOARDS[self.url]

    def __enter__(self) -> FakeBoard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what the board prints

    def send(self, data: bytes) -> None:
        """Print raw bytes (half a line, garbage, a binary burst).

        Blocks while the port's buffer is full and nobody reads it, as on a pty.
        """
        cable = self._cable
        if cable is not None:
            cable.put(data)
            return
        with self._write_lock:
            if self._master is None:
                raise RuntimeError(f"fake board {self.name} is unplugged")
            view = memoryview(data)
            while view:
                written = os.write(self._master, view)
                view = view[written:]

    def send_line(self, text: str, end: str = "\n") -> None:
        """Print ``text`` and a line end (Arduino's ``println`` would use ``"\\r\\n"``)."""
        self.send((text + end).encode("utf-8"))

    # -- what the board receives

    @property
    def received(self) -> list[str]:
        """A copy of every command line received so far, oldest first."""
        with self._cond:
            return list(self._received)

    def next_line(self, timeout: float = 2.0) -> str:
        """The next command line not yet returned; TimeoutError if none comes in time."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._received) > self._taken, timeout):
                raise TimeoutError(f"fake board {self.name}: no command within {timeout} s"
                                   f" (received so far: {self._received!r})")
            line = self._received[self._taken]
            self._taken += 1
            return line

    def wait_received(self, count: int, timeout: float = 2.0) -> list[str]:
        """Wait until ``count`` command lines have arrived in all; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._received) >= count, timeout):
                raise TimeoutError(f"fake board {self.name}: {len(self._received)} of "
                                   f"{count} commands within {timeout} s")
            return list(self._received)

    def _read_loop(self, master: int, stop_r: int) -> None:
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([master, stop_r], [], [])
                if stop_r in ready:
                    return
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return  # the pty is gone
                if not data:
                    return
                pending += data
                *lines, pending = pending.replace(b"\r\n", b"\n").split(b"\n")
                for raw in lines:
                    self._got(raw.rstrip(b"\r").decode("utf-8", "replace"))
        finally:
            os.close(stop_r)

    def _cable_loop(self, cable: _Cable) -> None:
        pending = b""
        while (data := cable.take_from_port()) is not None:
            pending += data
            *lines, pending = pending.replace(b"\r\n", b"\n").split(b"\n")
            for raw in lines:
                self._got(raw.rstrip(b"\r").decode("utf-8", "replace"))

    def _got(self, line: str) -> None:
        with self._cond:
            self._received.append(line)
            self._cond.notify_all()
        responder = self.responder
        if responder is None:
            return
        try:
            answer = responder(line)
            if answer is not None:
                self.send_line(answer)
        except Exception:
            # A broken responder must not kill the reader: the test then sees no answer.
            log.exception("fake board %s: responder failed on %r", self.name, line)

    def __repr__(self) -> str:
        return f"<FakeBoard {self.url} {'plugged' if self.plugged else 'unplugged'}>"


class _Cable:
    """One plug-in of an in-process board: a byte stream each way, and a doorbell.

    The doorbell is a socket pair whose reading end (the port's fileno) holds one byte
    exactly while bytes for the port are waiting or the cable is unplugged, so
    ``select`` on it works like ``select`` on a pty (and on Windows, where select only
    takes sockets). Everything below is done holding :attr:`cond`.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.to_port = bytearray()
        self.to_board = bytearray()
        self.alive = True
        self.opened = False
        self.bell_r, self._bell_w = socket.socketpair()
        self.bell_r.setblocking(False)
        self._rung = False
        self._sockets_closed = False

    def _ring(self) -> None:
        if not self._rung:
            self._bell_w.send(b"x")
            self._rung = True

    def _quiet(self) -> None:
        if self._rung and self.alive:
            try:
                self.bell_r.recv(16)
            except BlockingIOError:  # not arrived yet: cannot happen on a socket pair
                pass
            self._rung = False

    def _close_sockets(self) -> None:
        # Only when no port holds the cable: a daemon's select on a closed descriptor
        # would fail instead of seeing the unplug.
        if not self._sockets_closed and not self.opened:
            self._sockets_closed = True
            self.bell_r.close()
            self._bell_w.close()

    # -- the board's side

    def put(self, data: bytes) -> None:
        """Queue bytes for the port, waiting while :data:`BUFFER` bytes are unread."""
        view = memoryview(data)
        with self.cond:
            while view:
                self.cond.wait_for(lambda: len(self.to_port) < BUFFER or not self.alive)
                if not self.alive:
                    raise RuntimeError("fake board is unplugged")
                room = BUFFER - len(self.to_port)
                self.to_port += view[:room]
                view = view[room:]
                self._ring()
                self.cond.notify_all()

    def take_from_port(self) -> bytes | None:
        """Wait for what the port wrote; None once unplugged."""
        with self.cond:
            self.cond.wait_for(lambda: self.to_board or not self.alive)
            if not self.alive:
                return None
            data = bytes(self.to_board)
            self.to_board.clear()
            return data

    def unplug(self) -> None:
        """Pull the cable: the port's operations fail from now on, its fileno is readable."""
        with self.cond:
            self.alive = False
            self._ring()
            self.cond.notify_all()
            self._close_sockets()

    # -- the port's side

    def open(self, url: str) -> None:
        with self.cond:
            if not self.alive:
                raise serial.SerialException(f"could not open port {url}: unplugged")
            if self.opened:
                # As an exclusive (flock) open of a native port: one program at a time.
                raise serial.SerialException(f"could not open port {url}: busy")
            self.opened = True

    def close(self) -> None:
        with self.cond:
            self.opened = False
            if not self.alive:
                self._close_sockets()

    def read(self, size: int, timeout: float | None) -> bytes:
        with self.cond:
            if timeout is None or timeout > 0:
                self.cond.wait_for(lambda: self.to_port or not self.alive, timeout)
            if not self.alive:
                raise serial.SerialException("device reports readiness to read but returned "
                                             "no data (device disconnected?)")
            data = bytes(self.to_port[:size])
            del self.to_port[:size]
            if not self.to_port:
                self._quiet()
            self.cond.notify_all()  # a board waiting for room may go on
            return data

    def write(self, data: bytes) -> None:
        with self.cond:
            if not self.alive:
                raise serial.SerialException("write failed: device disconnected")
            self.to_board += data
            self.cond.notify_all()

    def waiting(self) -> int:
        with self.cond:
            return len(self.to_port)

    def discard_input(self) -> None:
        with self.cond:
            self.to_port.clear()
            self._quiet()
            self.cond.notify_all()


class InProcessPort(serial.SerialBase):
    """The daemon's end of an in-process :class:`FakeBoard`: a pyserial port.

    Made by ``serial.serial_for_url("fakeboard://...")``; serial settings (baud rate,
    parity...) are accepted and mean nothing, as on a pty.
    """

    _cable: _Cable | None = None

    def open(self) -> None:
        """Connect to the board the URL names; SerialException if absent or busy."""
        if self.port is None:
            raise serial.SerialException("Port must be configured before it can be used.")
        if self.is_open:
            raise serial.SerialException("Port is already open.")
        url = str(self.port)
        with _BOARDS_LOCK:
            board = _BOARDS.get(url)
        cable = board._cable if board is not None else None
        if cable is None:
            raise serial.SerialException(f"could not open port {url}: no such board "
                                         "(unplugged, or closed)")
        cable.open(url)
        self._cable = cable
        self.is_open = True

    def close(self) -> None:
        """Let go of the board; safe to call twice."""
        cable, self._cable = self._cable, None
        if cable is not None:
            cable.close()
        self.is_open = False

    def _open_cable(self) -> _Cable:
        if not self.is_open or self._cable is None:
            raise serial.PortNotOpenError()
        return self._cable

    def read(self, size: int = 1) -> bytes:
        """Up to ``size`` bytes: what waits, waiting at most ``timeout`` (None: for some)."""
        return self._open_cable().read(size, self.timeout)

    def write(self, data: Any) -> int:
        """Hand bytes to the board (never blocks: the board reads as they come)."""
        cable = self._open_cable()
        payload = bytes(data)
        cable.write(payload)
        return len(payload)

    def fileno(self) -> int:
        """A socket readable while bytes or an unplug wait: for select, as with a pty."""
        return self._open_cable().bell_r.fileno()

    @property
    def in_waiting(self) -> int:
        """Bytes waiting to be read."""
        return self._open_cable().waiting()

    def reset_input_buffer(self) -> None:
        """Drop what waits to be read."""
        self._open_cable().discard_input()

    def reset_output_buffer(self) -> None:
        """Nothing is ever held back on the way to the board."""
        self._open_cable()

    def flush(self) -> None:
        """Writes reach the board at once."""

    def _reconfigure_port(self, *args: Any) -> None:
        pass  # baud rate and framing mean nothing in-process

    def _update_rts_state(self) -> None:
        pass

    def _update_dtr_state(self) -> None:
        pass

    def _update_break_state(self) -> None:
        pass


def wait_until(predicate: Callable[[], bool], step: Callable[[float], object],
               timeout: float = 2.0) -> None:
    """Call ``step(time_left)`` until ``predicate()`` holds; AssertionError after ``timeout``.

    ``step`` must block on an event (e.g. ``SerialBoard.wait_readable`` after a poll),
    so this never sleeps blindly.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"condition not met within {timeout} s")
        step(left)
