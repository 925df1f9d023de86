"""The bike says what is wrong with it: a retained health message, and a version."""

from __future__ import annotations

import json
import subprocess
import sys

from gpiozero import DigitalOutputDevice

from smartbiked import __version__
from tests.conftest import ROOT, bike_config, daemon_env, retained, wait_until
from tests.test_daemon import FAN, board, send  # noqa: F401  (board: a fixture)
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


def test_a_lost_sensor_says_so_once_and_again_when_it_is_back(broker, probe, run_daemon,
                                                              board):  # noqa: F811
    from tests.test_daemon import heartrate

    run_daemon(bike_config(broker, heartrate(board.path)))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")

    def settled() -> bool:
        """Reading, and not lost: the last word on its status (if any) is ok."""
        board.send_line("150")
        msgs = list(probe.messages)
        said = [i for i, m in enumerate(msgs) if m.topic == "bike/000001/heartrate/status"]
        last_ok = not said or json.loads(msgs[said[-1]].payload)["ok"]
        since = said[-1] if said else 0
        return last_ok and any(m.topic == "bike/000001/heartrate/report"
                               for m in msgs[since:])

    wait_until(settled, 20, "the heart-rate sensor to report")
    mark = len(probe.messages)
    board.unplug()
    lost = probe.json("bike/000001/heartrate/status", after=mark)
    assert lost["ok"] is False and lost["state"] in ("stale", "failed") and lost["error"]
    health = probe.json("bike/000001/health",
                        lambda d: d["drivers"]["heartrate"]["state"] != "running",
                        after=mark)
    assert health["drivers"]["heartrate"]["reason"]
    board.replug()

    def back_again() -> bool:
        board.send_line("160")  # opening the port flushes what was sent before it
        return any(m.topic == "bike/000001/heartrate/status" and json.loads(m.payload)["ok"]
                   for m in probe.messages[mark:])

    wait_until(back_again, 15, "the sensor to be back")
    back = probe.json("bike/000001/heartrate/status", lambda d: d["ok"], after=mark)
    assert back["state"] == "running"
    probe.json("bike/000001/heartrate/report", lambda d: d["value"] == 80.0, after=mark)
    said = [json.loads(m.payload)["state"] for m in probe.messages[mark:]
            if m.topic == "bike/000001/heartrate/status"]
    assert said == [lost["state"], "running"], f"said more than once: {said}"


def test_a_missing_motor_board_is_failed_in_health_and_refuses_no_one(broker, probe,
                                                                      run_daemon, tmp_path):
    from tests.conftest import MOTORS

    text = bike_config(broker, MOTORS.format(url=str(tmp_path / "no-such-board"),
                                             min_interval=0))
    run_daemon(text)
    health = probe.json("bike/000001/health",
                        lambda d: d["drivers"].get("resistance", {}).get("state") == "failed")
    assert health["drivers"]["resistance"]["reason"]
    # A barrier: a command now is refused with the reason; nothing was refused before it.
    mark = len(probe.messages)
    send(broker, "bike/000001/resistance/control", b"10")
    refusal = probe.json("bike/000001/resistance/status", after=mark)
    assert refusal["ok"] is False
    before = [m for m in probe.messages[:mark] if m.topic.endswith("/status")
              and m.topic != "bike/000001/status"]
    assert before == [], "a refusal was published although nobody sent a command"


def test_reports_carry_no_noise_in_the_fifteenth_digit(broker, probe, run_daemon):
    from tests.test_simulator import FULL

    run_daemon(bike_config(broker, FULL), "--simulate", "--seed", "5")
    for topic, decimals in (("speed", 3), ("cadence", 1), ("power", 1), ("heartrate", 1)):
        value = probe.json(f"bike/000001/{topic}/report")["value"]
        assert value == round(value, decimals), (topic, value)
