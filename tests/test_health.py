"""The bike says what is wrong with it: a retained health message, and a version."""

from __future__ import annotations

import json
import subprocess
import sys

from gpiozero import DigitalOutputDevice

from smartbiked import __version__
from tests.conftest import ROOT, bike_config, daemon_env, retained
from tests.test_daemon import FAN
from tests.test_service import BUTTONS_AND_FAN, factory, serve  # noqa: F401  (fixtures)


def test_health_is_retained_with_version_drivers_and_counters(broker, probe, run_daemon):
    run_daemon(bike_config(broker, FAN))
    health = probe.json("bike/000001/health")
    assert health["version"] == __version__
    assert health["drivers"] == {"fan": {"state": "running"}}
    assert health["broker"] == f"127.0.0.1:{broker.port}" and health["reconnects"] == 0
    assert health["metadata"] == {"deviceName": "testbike"}
    assert isinstance(health["counters"], dict) and isinstance(health["uptime"], float)
    assert json.loads(retained(broker, "bike/000001/health").payload)["version"] == __version__


def test_health_names_a_driver_that_failed_and_why(broker, probe, serve, factory):  # noqa: F811
    holder = DigitalOutputDevice("GPIO12", pin_factory=factory)  # the fan's pin is taken
    serve(bike_config(broker, BUTTONS_AND_FAN))
    holder.close()
    health = probe.json("bike/000001/health", lambda d: "fan" in d["drivers"])
    assert health["drivers"]["fan"]["state"] == "failed"
    assert "did not start" in health["drivers"]["fan"]["reason"]
    assert health["drivers"]["button"] == {"state": "running"}


def test_version():
    done = subprocess.run([sys.executable, "-m", "smartbiked", "--version"], env=daemon_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == f"smartbiked {__version__}"
