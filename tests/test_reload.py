"""Reloads: what changed changes, nothing else moves, and ``--reload`` tells the truth."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.conftest import ROOT, bike_config, daemon_env
from tests.test_daemon import FAN, send


def reload(daemon, timeout: float = 30) -> subprocess.CompletedProcess:
    """What systemd's ExecReload runs: ``smartbiked --config FILE --reload MAINPID``."""
    return subprocess.run(
        [sys.executable, "-m", "smartbiked", "--config", str(daemon.config),
         "--reload", str(daemon.proc.pid)],
        env=daemon.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def online(probe) -> None:
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")


def set_fan(broker, probe, value: float) -> int:
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", str(value))
    probe.json("bike/000001/fan/report", lambda d: d["value"] == value, after=mark)
    return mark


def test_reload_returns_once_the_new_limits_are_in_force(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    online(probe)
    set_fan(broker, probe, 30.0)
    daemon.config.write_text(bike_config(broker, FAN + "max = 50\n"))
    done = reload(daemon)
    assert done.returncode == 0, done.stderr
    assert "configuration reloaded" in done.stdout
    # No wait: the moment --reload returned, 60 is already out of range.
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", "60")
    refusal = probe.json("bike/000001/fan/status", after=mark)
    assert refusal["allowed"]["max"] == 50.0


def test_reload_of_an_invalid_file_fails_with_the_reason_and_signals_nothing(
        broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    online(probe)
    daemon.notify.wait_for("READY=1")
    daemon.config.write_text(bike_config(broker, FAN + "max = 800\n"))
    done = reload(daemon)
    assert done.returncode == 78
    assert "[fan] max" in done.stderr and "800" in done.stderr
    set_fan(broker, probe, 70.0)  # the old limits still hold, and the daemon serves
    assert "RELOADING=1" not in daemon.notify.lines


def test_reload_says_so_when_the_daemon_refuses(broker, probe, run_daemon, tmp_path):
    """The file passes the check here but not in the daemon's environment: exit 1, reason."""
    daemon = run_daemon(bike_config(broker, FAN))
    online(probe)
    bad = dict(daemon.env, DEVICE_ID="000001")
    daemon.config.write_text(bike_config(broker, FAN, bike_id="bad id"))
    done = subprocess.run(
        [sys.executable, "-m", "smartbiked", "--config", str(daemon.config),
         "--reload", str(daemon.proc.pid)],
        env=bad, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "reload refused" in done.stderr and "[bike] id" in done.stderr


def test_an_unchanged_reload_moves_nothing(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    online(probe)
    mark = set_fan(broker, probe, 60.0)
    assert reload(daemon).returncode == 0
    set_fan(broker, probe, 61.0)  # a barrier: anything the reload did is in by now
    fan = [probe.json("bike/000001/fan/report", after=i)["value"]
           for i, m in enumerate(probe.messages) if i >= mark and
           m.topic == "bike/000001/fan/report"]
    assert fan == [60.0, 61.0], f"the reload moved the fan: {fan}"


def test_a_burst_of_sighups_is_one_or_two_reloads(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    online(probe)
    set_fan(broker, probe, 40.0)
    for _ in range(50):
        daemon.signal(signal.SIGHUP)
    assert reload(daemon).returncode == 0  # returns after a reload that began after the burst
    reloads = daemon.notify.lines.count("RELOADING=1")
    # Without coalescing this is one reload per signal. A loaded machine may spread the
    # burst over a few reloads (each takes whatever was queued when it began).
    assert 1 <= reloads <= 5, f"{reloads} reloads for a burst of 50 SIGHUPs and one more"
    set_fan(broker, probe, 41.0)


def test_reload_needs_a_running_daemon(tmp_path):
    cfg = tmp_path / "bike.toml"
    cfg.write_text(bike_config(None, FAN))
    done = subprocess.run(
        [sys.executable, "-m", "smartbiked", "--config", str(cfg), "--reload", "999999999"],
        env=daemon_env(), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "no process 999999999" in done.stderr
