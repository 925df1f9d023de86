"""The daemon logs to the journal under systemd, every record tagged with its bike.

The real daemon runs in a private mount namespace (``unshare -m``) where
``/run/systemd/journal/socket`` is a socket of the test's: systemd-python's
``sd_journal_send`` then speaks journald's native protocol to it, exactly as it
would on a bike. ``JOURNAL_STREAM`` names the daemon's stderr, as systemd sets it.
"""

from __future__ import annotations

import array
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, NotifySocket, bike_config, daemon_env

BIKE = "000042"
FAN = """
[fan]
driver = "gpio_pwm"
pin = 12
"""
#: Inside the namespace: a fresh tmpfs where journald's socket lives (over /run/systemd,
#: or /run on a machine without it), our socket bound onto the path, then the daemon.
NAMESPACE_SCRIPT = """
set -e
if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; else mount -t tmpfs tmpfs /run; fi
mkdir -p /run/systemd/journal
: > /run/systemd/journal/socket
mount --bind "$0" /run/systemd/journal/socket
exec "$@"
"""


def parse_entry(data: bytes) -> dict[str, str]:
    """One datagram of journald's native protocol: KEY=value lines, or KEY, a 64-bit
    little-endian size and that many bytes (values holding a newline)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:
            key = line
            size = int.from_bytes(data[end + 1:end + 9], "little")
            value = data[end + 9:end + 9 + size]
            pos = end + 9 + size + 1
        fields[key.decode()] = value.decode("utf-8", "replace")
    return fields


class FakeJournal:
    """A socket speaking journald's side of the native protocol; keeps every entry."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sbj", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.dir, "socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(self.path)
        self.entries: list[dict[str, str]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            except OSError:
                return
            for level, kind, payload in ancillary:
                # A big entry comes as a sealed memfd instead of the datagram's bytes.
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        with os.fdopen(fd, "rb") as f:
                            data = f.read()
            with self._cond:
                self.entries.append(parse_entry(data))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, str]], bool],
                 timeout: float = 10.0) -> dict[str, str]:
        """The first entry satisfying ``predicate``, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for entry in self.entries:
                    if predicate(entry):
                        return entry
                left = deadline - time.monotonic()
                if left <= 0:
                    messages = [e.get("MESSAGE") for e in self.entries]
                    raise AssertionError(f"no such journal entry; got {messages}")
                self._cond.wait(left)

    def everything(self) -> list[dict[str, str]]:
        """Every entry so far: a marker sent now is read after all of them."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"MESSAGE=test marker\nX_TEST_MARK=1\n", self.path)
        self.wait_for(lambda e: e.get("X_TEST_MARK") == "1")
        with self._cond:
            return [e for e in self.entries if "X_TEST_MARK" not in e]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def journal() -> Iterator[FakeJournal]:
    j = FakeJournal()
    yield j
    j.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


@pytest.fixture
def journaled_daemon(tmp_path: Path, journal: FakeJournal,
                     notify: NotifySocket) -> Iterator[Callable[[str], subprocess.Popen]]:
    """Start smartbiked as systemd would, its journal being ``journal``."""
    procs: list[subprocess.Popen] = []

    def start(text: str) -> subprocess.Popen:
        config = tmp_path / "bike.toml"
        config.write_text(text)
        stderr = tmp_path / "stderr"
        stderr.touch()
        st = os.stat(stderr)  # opening it for writing below keeps this inode
        env = daemon_env(notify, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
                         TMPDIR=str(tmp_path))
        # Root may unshare outright; anyone else through a user namespace of their own.
        unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
        with open(stderr, "w") as err:
            proc = subprocess.Popen(
                [*unshare, "sh", "-c", NAMESPACE_SCRIPT, journal.path,
                 sys.executable, "-m", "smartbiked", "--config", str(config)],
                env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_every_record_of_the_daemon_carries_its_bike_id(broker, probe, journaled_daemon,
                                                        journal, notify, tmp_path):
    daemon = journaled_daemon(bike_config(broker, FAN, bike_id=BIKE))
    notify.wait_for("READY=1")
    probe.wait_for(f"bike/{BIKE}/status", lambda m: m.payload == b"online")
    # Records from each thread: the MQTT loop (a refusal), the hardware thread (a write),
    # the signal handler (the stop).
    probe.publish(f"bike/{BIKE}/fan/control", "150")
    probe.publish(f"bike/{BIKE}/fan/control", "30")
    probe.json(f"bike/{BIKE}/fan/report", lambda d: d["value"] == 30.0)
    refusal = journal.wait_for(lambda e: "command refused" in e.get("MESSAGE", ""))
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0

    entries = journal.everything()
    assert {e.get("BIKE_ID") for e in entries} == {BIKE}
    assert {e.get("SYSLOG_IDENTIFIER") for e in entries} == {"smartbiked"}
    threads = {e.get("THREAD_NAME") for e in entries}
    assert {"MainThread", "hardware", "signals"} <= threads, threads
    # The per-topic fields `journalctl TOPIC=fan` relies on.
    assert refusal["TOPIC"] == "fan" and refusal["PRIORITY"] == "4"
    ready = [e for e in entries if e.get("MESSAGE") == "fan: gpio_pwm driver ready"]
    assert ready and ready[0]["TOPIC"] == "fan" and ready[0]["DRIVER"] == "gpio_pwm"
    # Under systemd the journal gets the records, not stderr as well (no doubles).
    assert "driver ready" not in (tmp_path / "stderr").read_text()
