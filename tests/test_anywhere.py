"""The virtual bike wherever app developers are: no pseudo-terminals, no systemd-python,
an installable wheel. The in-process serial port against the real board code, the
daemon with ptys and systemd taken away, and the wheel built and installed."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import zipfile
from pathlib import Path

import pytest
import serial

from smartbiked import notify
from smartbiked.fakeboard import BUFFER, FakeBoard
from smartbiked.hardware import Hardware, SerialBoard
from smartbiked.simulator import state_topic
from tests.conftest import ROOT, bike_config, wait_until
from tests.test_serial import actuator

# --------------------------------------------------------------------------- the port


@pytest.fixture
def board():
    with FakeBoard(None, "usb-Test-if00", responder=lambda line: f"OK {line}",
                   in_process=True) as b:
        yield b


def open_port(board: FakeBoard) -> serial.SerialBase:
    return serial.serial_for_url(board.url, timeout=0, write_timeout=1.0)


def readable(port: serial.SerialBase, timeout: float = 0.0) -> bool:
    return bool(select.select([port.fileno()], [], [], timeout)[0])


def test_the_url_opens_the_board_and_bytes_flow_both_ways(board):
    assert board.url.startswith("fakeboard://") and board.path is None
    port = open_port(board)
    board.send_line("hr=72")
    assert readable(port, 5)
    assert port.read(100) == b"hr=72\n"
    port.write(b"R40\n")
    assert board.next_line(5) == "R40"
    port.close()


def test_fileno_is_readable_exactly_while_bytes_wait(board):
    """The daemon's board thread sleeps in select on it: never a spin, never deaf."""
    port = open_port(board)
    assert not readable(port)
    board.send(b"abc")
    assert readable(port, 5) and port.in_waiting == 3
    assert port.read(2) == b"ab"
    assert readable(port)  # one byte still waits
    assert port.read(10) == b"c"
    assert not readable(port)
    board.send(b"d")
    port.reset_input_buffer()
    assert not readable(port) and port.read(10) == b""
    port.close()


def test_one_opener_at_a_time_and_a_closed_port_can_be_opened_again(board):
    port = open_port(board)
    with pytest.raises(serial.SerialException, match="busy"):
        open_port(board)
    port.close()
    again = open_port(board)
    again.close()


def test_unplug_fails_the_open_port_and_replug_needs_a_new_open(board):
    port = open_port(board)
    board.unplug()
    assert readable(port, 5)  # the daemon's select wakes up to see it
    with pytest.raises(serial.SerialException):
        port.read(10)
    with pytest.raises(serial.SerialException):
        port.write(b"R1\n")
    with pytest.raises(serial.SerialException, match="no such board"):
        open_port(board)
    board.replug()
    fresh = open_port(board)
    board.send_line("back")
    assert readable(fresh, 5) and fresh.read(100) == b"back\n"
    with pytest.raises(serial.SerialException):
        port.read(10)  # the old port stays dead, as after a real replug
    port.close()
    fresh.close()


def test_a_board_nobody_reads_blocks_its_sender_instead_of_filling_memory(board):
    port = open_port(board)
    done = threading.Event()

    def flood():
        board.send(b"x" * (BUFFER + 100))
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    wait_until(lambda: port.in_waiting == BUFFER, 5, "a full buffer")
    assert not done.is_set()
    got = port.read(BUFFER)
    assert done.wait(5)
    got += port.read(BUFFER)
    assert got == b"x" * (BUFFER + 100)
    port.close()


def test_a_closed_board_is_no_longer_found_and_names_do_not_collide():
    a = FakeBoard(None, "same", in_process=True)
    b = FakeBoard(None, "same", in_process=True)
    assert a.url != b.url
    a.close()
    with pytest.raises(serial.SerialException, match="no such board"):
        serial.serial_for_url(a.url)
    b.close()


def test_the_real_serial_board_reads_and_acknowledges_through_it(board):
    """hardware/serial.py unchanged: its thread waits on our fileno, reopens after a replug."""
    hardware = Hardware(open_serial=serial.serial_for_url,
                        device_identity=lambda url: (url, board.plugs) if board.plugged
                        else None)
    sb = SerialBoard("bike", {"url": board.url, "reconnect_interval": 0.1}, hardware)
    hardware.ports["bike"] = sb
    readings: list[dict] = []
    got = threading.Event()
    sb.subscribe(lambda values: (readings.append(values), got.set()), None)
    sb.start()
    try:
        board.send_line("hr=72,power=180")
        assert got.wait(5)
        assert readings[0] == {"hr": 72.0, "power": 180.0}
        motor = actuator(hardware, "resistance", template="R{value}\n",
                         ack=r"OK R(?P<value>[0-9.]+)")
        assert motor.apply(40) == 40
        board.unplug()
        wait_until(lambda: not sb.connected, 5, "the loss noticed")
        board.replug()
        wait_until(lambda: sb.connected, 5, "reopened after the replug")
        got.clear()
        board.send_line("hr=80")
        assert got.wait(5) and readings[-1] == {"hr": 80.0}
    finally:
        sb.close()


# --------------------------------------------------------------------------- no systemd


def test_notify_reaches_systemd_without_systemd_python(monkeypatch):
    """A plain pip install has no systemd module: READY=1 must still reach a notify unit."""
    monkeypatch.setattr(notify, "_daemon", None)
    directory = tempfile.mkdtemp(prefix="sbn", dir="/tmp")
    path = os.path.join(directory, "notify")
    for address, bind in ((path, path), (f"@sbn-test-{os.getpid()}",
                                         f"\0sbn-test-{os.getpid()}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(bind)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert notify.notify("READY=1", "STATUS=riding")
            assert sock.recv(100) == b"READY=1\nSTATUS=riding"
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(directory, "nobody"))
    assert notify.notify("READY=1") is False
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.notify("READY=1") is False
    os.unlink(path)
    os.rmdir(directory)


def shim(tmp_path: Path) -> Path:
    """A directory for PYTHONPATH: ``import systemd`` fails and there are no ptys."""
    d = tmp_path / "shim"
    (d / "systemd").mkdir(parents=True)
    (d / "systemd" / "__init__.py").write_text(textwrap.dedent("""\
        import sys
        print("shim: import systemd refused", file=sys.stderr)
        raise ImportError("systemd hidden by the test")
        """))
    # As on Windows: no pseudo-terminals at all (pyserial itself still needs termios here).
    (d / "sitecustomize.py").write_text(textwrap.dedent("""\
        import os
        for name in ("openpty", "forkpty"):
            if hasattr(os, name):
                delattr(os, name)
        """))
    return d


def test_journal_wanted_without_systemd_python_logs_plain_lines_and_says_why(tmp_path):
    code = ("import logging; from smartbiked import logs; logs.setup(use_journal=True); "
            "logging.getLogger('smartbiked.x').warning('hello')")
    env = {**os.environ, "PYTHONPATH": f"{shim(tmp_path)}:{ROOT}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "shim: import systemd refused" in done.stderr
    assert "systemd is missing" in done.stderr and "WARNING smartbiked.x: hello" in done.stderr


# A sensor board (power, heart rate), a motor board that acknowledges, pins for cadence.
NO_PTY_BIKE = r"""
[serial.sensors]
url = "COM3"

[serial.motors]
url = "/dev/serial/by-id/usb-Arduino_Nano_motors-if00"

[power]
driver = "serial_sensor"
port = "sensors"
field = "watts"
interval = 0.25

[heartrate]
driver = "serial_sensor"
port = "sensors"
field = "hr"
interval = 0.25

[cadence]
driver = "gpio_pulse"
pin = 5
interval = 0.25

[incline]
driver = "serial_actuator"
port = "motors"
template = "I{value}\n"
ack = 'OK I(?P<value>-?[0-9.]+)'
"""


def test_simulate_without_ptys_or_systemd_python(broker, probe, run_daemon, tmp_path):
    """The daemon as a subprocess where ptys and systemd-python do not exist (forced):
    READY=1 still reaches the notify socket, values flow, a command moves the motor."""
    daemon = run_daemon(bike_config(broker, NO_PTY_BIKE), "--simulate", "--seed", "5",
                        PYTHONPATH=f"{shim(tmp_path)}:{ROOT}")
    daemon.notify.wait_for("READY=1", timeout=20)
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online", timeout=20)
    probe.subscribe("smartbike-sim/#")
    for topic in ("power", "heartrate", "cadence"):
        probe.json(f"bike/000001/{topic}/report", lambda d: d["value"] > 0, timeout=15)
    mark = len(probe.messages)
    probe.publish("bike/000001/incline/control", {"value": 4.5})
    assert probe.json("bike/000001/incline/report", lambda d: True, after=mark)["value"] == 4.5
    # The virtual motor got "I4.5" on the in-process board and the model climbs.
    probe.json(state_topic("000001"), lambda d: d["incline"] > 1.0, timeout=10, after=mark)
    out = daemon.output()
    assert "shim: import systemd refused" in out
    assert "is fakeboard://" in out and "/dev/pts" not in out
    assert "Traceback" not in out


def test_the_pty_stays_the_default_where_there_are_ptys(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, NO_PTY_BIKE), "--simulate", "--seed", "5")
    probe.json("bike/000001/power/report", lambda d: d["value"] > 0, timeout=20)
    assert "is fakeboard://" not in daemon.output()
    assert "usb-Virtual_sensors-if00" in daemon.output()


def test_the_serial_kind_can_be_forced_and_bad_values_are_ignored(caplog):
    from smartbiked.simulator import serial_kind

    assert serial_kind({"SMARTBIKED_SIM_SERIAL": "inprocess"}) == "inprocess"
    assert serial_kind({"SMARTBIKED_SIM_SERIAL": " PTY "}) == "pty"
    assert serial_kind({}) == "pty"
    assert serial_kind({"SMARTBIKED_SIM_SERIAL": "usb"}) == "pty"
    assert "neither pty nor inprocess" in caplog.text


# --------------------------------------------------------------------------- the wheel


def test_the_wheel_builds_installs_without_systemd_and_runs(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "--disable-pip-version-check", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("smartbiked-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "smartbiked/protocol_fakeboard.py" in names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    systemd = [line for line in requires if "systemd-python" in line]
    # Only through an extra: a plain install needs no compiler and no libsystemd-dev.
    assert systemd and all("extra ==" in line for line in systemd), requires
    assert any(line.startswith("Provides-Extra: systemd") for line in metadata.splitlines())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "-q", "--no-deps", "--no-index", "--disable-pip-version-check",
                           str(wheel)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # The dependencies (not the package) from this environment, as pip would have put them.
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    version = subprocess.run([str(venv / "bin" / "smartbiked"), "--version"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("smartbiked ")
    check = subprocess.run([str(python), "-c", textwrap.dedent("""\
        import json, serial, smartbiked
        from smartbiked.fakeboard import FakeBoard
        board = FakeBoard(None, "x", in_process=True)
        port = serial.serial_for_url(board.url, timeout=0)
        print(json.dumps([smartbiked.__file__, type(port).__module__]))
        """)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    where, module = json.loads(check.stdout)
    assert where.startswith(str(venv)) and module == "smartbiked.fakeboard"
