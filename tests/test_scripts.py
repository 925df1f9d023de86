"""The README's run command, as a newcomer runs it: it comes up, and it cleans up.

The script runs with ``SMARTBIKED_PYTHON`` set to the interpreter running the tests,
so it installs nothing: the suite never touches the project's ``.venv`` or apt.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, wait_until

SCRIPT = ROOT / "scripts" / "run-virtual-bike"


def _venv_state() -> dict[str, float]:
    """What the suite must leave alone: the project's .venv and its install stamps."""
    venv = ROOT / ".venv"
    if not venv.exists():
        return {}
    return {str(p): p.stat().st_mtime for p in [venv, *venv.glob(".installed*")]}


def _start_time(pid: int) -> str | None:
    """The process's start time (tells a live process from a reused pid), None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


class Run:
    """scripts/run-virtual-bike running with its output collected."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 terminal: bool = False) -> None:
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("MQTT_", "DEVICE_ID", "NO_COLOR"))}
        environ["SMARTBIKED_PYTHON"] = sys.executable
        environ.update(env or {})
        self.output: list[str] = []
        self.master: int | None = None
        command = [str(SCRIPT), *args]
        if terminal:
            # As from a terminal window: the script leads its own session, whose
            # controlling terminal is a pseudo-terminal the test can close.
            self.master, slave = pty.openpty()
            self.proc = subprocess.Popen(["setsid", "--ctty", *command], cwd=ROOT, env=environ,
                                         stdin=slave, stdout=slave, stderr=slave)
            os.close(slave)
            threading.Thread(target=self._read_terminal, daemon=True).start()
        else:
            # Its own process group, as a terminal's foreground job: Ctrl-C goes to the
            # whole group (the script and whatever it runs in the foreground just then).
            self.proc = subprocess.Popen(command, cwd=ROOT, env=environ, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         process_group=0)
            threading.Thread(target=lambda: self.output.extend(self.proc.stdout),
                             daemon=True).start()
        self.children: dict[int, str | None] = {}

    def _read_terminal(self) -> None:
        master = self.master
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            self.output.append(data.decode("utf-8", "replace"))

    @property
    def text(self) -> str:
        return "".join(self.output)

    def riding(self, timeout: float = 120) -> str:
        """Wait for values in the watch; remember the children; return the work folder."""
        wait_until(lambda: re.search(r"speed\s+\d+\.\d+", self.text), timeout,
                   f"a speed value in the watch; got:\n{self.text}")
        pid = self.proc.pid
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError):
                    continue
                if ppid == pid:
                    self.children[int(entry.name)] = _start_time(int(entry.name))
        return re.search(r"Log:\s+(\S+)/smartbiked\.log", self.text)[1]

    def alive(self) -> list[int]:
        """The children seen by :meth:`riding` that still run."""
        return [pid for pid, start in self.children.items()
                if start is not None and _start_time(pid) == start]

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Test teardown: whatever happened, leave nothing running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in self.alive():
            os.kill(pid, signal.SIGKILL)
        if self.master is not None:
            try:
                os.close(self.master)
            except OSError:
                pass


@pytest.fixture
def run_script():
    runs: list[Run] = []
    venv = _venv_state()

    def start(*args: str, **kwargs) -> Run:
        runs.append(Run(*args, **kwargs))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()
    assert _venv_state() == venv, "the tests must not install into the project's .venv"


def _stopped_everything(run: Run, work: str) -> None:
    assert len(run.children) == 3, "the broker, the daemon and the watch should have run"
    wait_until(lambda: not run.alive(), 10, "every child to stop")
    assert not Path(work).exists()
    assert "Traceback" not in run.text, run.text


def test_run_virtual_bike_shows_values_and_stops_everything_on_term(run_script):
    run = run_script("--seed", "1")
    work = run.riding()
    port = re.search(r"mqtt://127\.0\.0\.1:(\d+)", run.text)[1]
    assert f"smartbike --port {port} set incline 5.5" in run.text  # the second terminal's
    assert "Virtual bike 000001 is riding" in run.text
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 143  # stopped by TERM, as asked: not a crash
    _stopped_everything(run, work)


def test_any_number_of_ctrl_c_stops_everything(run_script):
    run = run_script()
    work = run.riding()
    deadline = time.monotonic() + 30
    while run.proc.poll() is None and time.monotonic() < deadline:
        os.killpg(run.proc.pid, signal.SIGINT)  # an impatient user's Ctrl-C, every 10 ms
        try:
            run.proc.wait(0.01)
        except subprocess.TimeoutExpired:
            pass
    assert run.wait(1) == 130
    _stopped_everything(run, work)


def test_closing_the_terminal_stops_everything(run_script):
    run = run_script(terminal=True)
    work = run.riding()
    os.close(run.master)  # the window is closed: the kernel hangs up the session
    run.master = None
    assert run.wait() == 129
    _stopped_everything(run, work)


def test_two_virtual_bikes_ride_on_one_broker(run_script):
    first = run_script("--bike", "000005")
    first.riding()
    port = re.search(r"mqtt://127\.0\.0\.1:(\d+)", first.text)[1]
    assert "Virtual bike 000005 is riding" in first.text
    assert f"--port {port} --bike 000005 set incline 5.5" in first.text
    # The second on the first one's broker, its id from the environment as on a bike.
    second = run_script("--host", "127.0.0.1", "--port", port, env={"DEVICE_ID": "000002"})
    second.riding()
    assert "Virtual bike 000002 is riding" in second.text and "the broker you gave" in second.text
    wait_until(lambda: re.search(rf"bike 000002 \(simulated\) on localhost:{port}: online",
                                 second.text), 10, "the second bike's watch")
    assert f"--port {port} --bike 000002 set incline 5.5" in second.text
    done = subprocess.run([sys.executable, "-m", "smartbiked.cli", "--port", port, "--bike",
                           "000002", "set", "fan", "30"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.stdout == "fan: 30 percentage\n", done.stderr
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 143 and not second.alive()
    assert first.proc.poll() is None and len(first.alive()) == 3  # the first rides on


def _run_briefly(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "DEVICE_ID"))}
    environ.update(SMARTBIKED_PYTHON=sys.executable, **(env or {}))
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=60)


def test_a_broker_that_is_not_there_is_named_not_waited_for(run_script):
    port = free_port()
    done = _run_briefly("--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 1
    assert f"nothing answers at 127.0.0.1:{port}" in done.stderr
    assert "riding" not in done.stdout
    with socket.socket() as silent:  # listens, but speaks no MQTT
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        taken = silent.getsockname()[1]
        done = _run_briefly("--host", "127.0.0.1", "--port", str(taken))
        assert done.returncode == 1 and "answers, but not as an MQTT broker" in done.stderr
        # Asked to start a broker on that port: no advice to "use that broker".
        done = _run_briefly("--port", str(taken))
        assert done.returncode == 1 and "taken by another program" in done.stderr
        assert "--host" not in done.stderr


def test_a_port_taken_by_a_broker_suggests_using_it(broker):
    done = _run_briefly("--port", str(broker.port))
    assert done.returncode == 1
    assert f"use it with --host 127.0.0.1 --port {broker.port}" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--port", "abc"], "--port must be a port number from 1 to 65535, not 'abc'"),
    (["--port", "12\n34"], "--port must be a port number"),
    (["--port", "0"], "--port must be a port number"),
    (["--port", "65536"], "--port must be a port number"),
    (["--port"], "--port needs a value"),
    (["--host", "a b"], "--host must be a host name"),
    (["--seed", "x"], "--seed must be a whole number"),
    (["--config", "/nonexistent.toml"], "no config file /nonexistent.toml"),
])
def test_bad_flags_are_refused_before_anything_starts(args, message):
    done = _run_briefly(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "starting" not in done.stdout


def test_a_bad_bike_id_is_refused_with_the_loaders_message():
    done = _run_briefly("--bike", "12/34")
    assert done.returncode == 1
    assert "DEVICE_ID: must be non-empty, without +, #, / or white space (found '12/34')" \
        in done.stderr and "(--bike is handed to the daemon as DEVICE_ID)" in done.stderr


def test_a_config_that_start_up_would_fail_on_is_refused_before_riding(tmp_path):
    """Two topics on one pin: said before anything starts, not found later in a log."""
    conf = tmp_path / "two-on-one-pin.toml"
    conf.write_text('[bike]\nid = "000007"\n\n[broker]\nhost = "127.0.0.1"\n\n'
                    '[fan]\ndriver = "gpio_pwm"\npin = 13\n\n'
                    '[resistance]\ndriver = "gpio_pwm"\npin = 13\n')
    env = dict(os.environ, SMARTBIKED_PYTHON=sys.executable)
    done = subprocess.run([str(ROOT / "scripts" / "run-virtual-bike"), "--config", str(conf)],
                          env=env, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "[resistance] pin: GPIO13 (J8:33) is already used by [fan] pin" in out, out
    assert "is riding" not in out


def test_setup_noise_goes_to_a_log_named_when_setup_fails(tmp_path):
    # A clone of the project whose setup fails: python3 lacks venv, apt-get fails noisily.
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    for name in ("run-virtual-bike", "setup-env"):
        shutil.copy(ROOT / "scripts" / name, clone / "scripts" / name)
    (clone / "config").mkdir()
    (clone / "config" / "smartbike.toml").write_text("")
    (clone / "pyproject.toml").write_text("")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool, body in {"python3": "exit 1", "sudo": 'exec "$@"',
                       "apt-get": 'echo "E: 500 lines of apt noise" >&2; exit 100'}.items():
        (stubs / tool).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SMARTBIKED_PYTHON"}
    env.update(PATH=f"{stubs}:/usr/bin:/bin", TMPDIR=str(tmp_path))
    done = subprocess.run([str(clone / "scripts" / "run-virtual-bike")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout.startswith("run-virtual-bike: installing with apt: ")
    assert len(done.stdout.splitlines()) <= 3  # a few plain lines of progress
    log = re.search(r"setting up failed; what the tools said is in (\S+)", done.stderr)
    assert log, done.stderr
    assert "500 lines of apt noise" in Path(log[1]).read_text()
    assert not (clone / ".venv").exists()


def test_command_latency_bench_runs_without_pytest_or_the_tests():
    # The bench is a tool for a bike or a laptop without the test tools: it must not
    # import pytest or tests/, and its first command must not race the daemon's start.
    blocker = ("import runpy, sys; sys.modules['pytest'] = sys.modules['tests'] = None; "
               "sys.argv = ['command_latency.py', '20']; "
               "runpy.run_path('bench/command_latency.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("20 commands: median ") and "daemon RSS:" in done.stdout
