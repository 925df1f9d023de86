"""The smartbike command against a simulated bike: set, press, watch; and where it connects."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest
from paho.mqtt.client import MQTTMessage

from smartbiked import cli
from tests.conftest import ROOT, bike_config, daemon_env, free_port

BIKE = r"""
[serial.motors]
url = "/dev/serial/by-id/usb-Arduino_Nano_motors-if00"

[button]
driver = "gpio_buttons"

[fan]
driver = "gpio_pwm"
pin = 13

[speed]
driver = "gpio_pulse"
pin = 6
interval = 0.2

[incline]
driver = "serial_actuator"
port = "motors"
template = "I{value}\n"
ack = 'OK I(?P<value>-?[0-9.]+)'
"""


def smartbike(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run the command as a user would, in its own process."""
    return subprocess.run([sys.executable, "-m", "smartbiked.cli", *args], cwd=ROOT,
                          env=daemon_env(), capture_output=True, text=True, timeout=timeout)


def at(broker) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port), "--bike", "000001"]


@pytest.fixture
def bike(broker, probe, run_daemon):
    """A simulated bike online on ``broker``; yields the daemon."""
    daemon = run_daemon(bike_config(broker, BIKE), "--simulate", "--seed", "3")
    daemon.notify.wait_for("READY=1")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    return daemon


def test_set_prints_the_new_value_and_exits_0(broker, probe, bike):
    mark = len(probe.messages)
    done = smartbike(*at(broker), "set", "fan", "40")
    assert (done.returncode, done.stdout) == (0, "fan: 40 percentage\n"), done.stderr
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 40.0, after=mark)
    # Through a serial motor board, flags after the command, broker from the config file.
    done = smartbike("set", "incline", "5.5", "--config", str(bike.config))
    assert (done.returncode, done.stdout) == (0, "incline: 5.5 degree\n"), done.stderr
    probe.json("bike/000001/incline/report", lambda d: d["value"] == 5.5, after=mark)


def test_set_prints_the_refusal_and_exits_1(broker, probe, bike):
    done = smartbike(*at(broker), "set", "incline", "25")
    assert done.returncode == 1
    assert "incline refused: 25 is out of range (allowed -10..19 step 0.5)" in done.stderr
    done = smartbike(*at(broker), "set", "incline", "5.25")
    assert done.returncode == 1 and "5.25 is not on a step" in done.stderr
    assert not [m for m in probe.messages if m.topic == "bike/000001/incline/report"]


def test_set_times_out_with_2_when_nobody_answers(broker):
    done = smartbike(*at(broker), "--timeout", "1", "set", "fan", "10")
    assert done.returncode == 2
    assert "no answer from bike 000001 within 1 s" in done.stderr
    assert "never been online" in done.stderr
    done = smartbike("--host", "127.0.0.1", "--port", str(free_port()), "--timeout", "1",
                     "set", "fan", "10")
    assert done.returncode == 2 and "cannot connect to the broker" in done.stderr


def test_set_refuses_a_sensor_before_sending(broker):
    done = smartbike(*at(broker), "set", "speed", "3")
    assert done.returncode == 2 and "invalid choice: 'speed'" in done.stderr


def test_press_makes_the_bike_report_a_press_and_release(broker, probe, bike):
    mark = len(probe.messages)
    done = smartbike(*at(broker), "press", "LEFT")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "LEFT: pressed\nLEFT: released\n"
    events = [json.loads(m.payload) for m in probe.messages[mark:]
              if m.topic == "bike/000001/button/report"]
    assert [(e["button"], e["state"]) for e in events] == [("LEFT", 1), ("LEFT", 0)]
    done = smartbike(*at(broker), "press", "UP")
    assert done.returncode == 1
    assert "no button 'UP' (buttons: LEFT, RIGHT, BRAKE)" in done.stderr


def test_press_without_a_simulator_times_out(broker):
    done = smartbike(*at(broker), "--timeout", "1", "press", "LEFT")
    assert done.returncode == 2 and "--simulate" in done.stderr


def test_watch_prints_plain_snapshots_when_not_a_terminal(broker, probe, bike):
    mark = len(probe.messages)
    done = smartbike(*at(broker), "watch", "--count", "3", "--interval", "0.4")
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout
    snapshots = done.stdout.split("\nbike 000001 ")
    assert len(snapshots) == 3
    last = snapshots[-1]
    assert last.startswith("(simulated) on 127.0.0.1:") and ": online" in last.splitlines()[0]
    speed = next(line for line in last.splitlines() if line.strip().startswith("speed"))
    assert 2 < float(speed.split()[1]) < 15 and "m/s" in speed
    assert "--port" in last and "set incline 5.5" in last and "press LEFT" in last
    assert [m for m in probe.messages[mark:] if m.topic == "bike/000001/speed/report"]


def message(topic: str, payload: object) -> MQTTMessage:
    msg = MQTTMessage(topic=topic.encode())
    msg.payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return msg


def test_watch_table_shows_values_availability_buttons_and_the_last_refusal():
    board = cli.Board("000001")
    board.take(message("bike/000001/status", b"online"), 100.0)
    board.take(message("bike/000001/speed/report", {"value": 8.123, "unitName": "m/s"}), 99.5)
    board.take(message("bike/000001/incline/report", {"value": 5.5, "unitName": "degree"}), 90)
    board.take(message("bike/000001/button/report", {"button": "BRAKE", "state": 1}), 95)
    board.take(message("bike/000001/incline/status", {
        "ok": False, "error": "25 is out of range",
        "allowed": {"min": -10, "max": 19, "step": 0.5}}), 97)
    board.take(message("bike/000002/speed/report", {"value": 1}), 100)   # another bike
    board.take(message("bike/000001/fan/control", {"value": 1}), 100)    # a command: no value
    lines = cli.render(board, "h:1", connected=True, now=100.0)
    text = "\n".join(lines)
    assert lines[0].startswith("bike 000001 on h:1: online")
    assert any(ln.split()[:4] == ["speed", "8.12", "m/s", "0.5"] for ln in lines), text
    assert any(ln.split()[:3] == ["incline", "5.5", "degree"] and "10 s" in ln for ln in lines)
    assert any(ln.split()[:3] == ["button", "BRAKE", "pressed"] for ln in lines), text
    assert any(ln.split()[:2] == ["fan", "-"] for ln in lines), text
    assert ("last refusal: incline refused: 25 is out of range (allowed -10..19 step 0.5), "
            "3.0 s ago") in text
    assert "connecting" in cli.render(board, "h:1", connected=False, now=100.0)[0]


def options(*argv: str) -> argparse.Namespace:
    return cli.parser().parse_args([*argv, "watch"])


def test_target_from_config_file_then_environment_then_flags(tmp_path, monkeypatch):
    conf = tmp_path / "bike.toml"
    conf.write_text('[bike]\nid = "000042"\n[broker]\nhost = "broker.lan"\nport = 8883\n'
                    'username = "bike42"\n')
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    t = cli.resolve(options("--config", str(conf)), environ={})
    assert (t.host, t.port, t.bike_id, t.username) == ("broker.lan", 8883, "000042", "bike42")
    t = cli.resolve(options("--config", str(conf)), environ={"MQTT_PORT": "1884"})
    assert t.port == 1884  # the loader's environment overrides, as for the daemon
    t = cli.resolve(options("--config", str(conf), "--port", "41234", "--bike", "000007",
                            "--password-file", str(pw)), environ={})
    assert (t.host, t.port, t.bike_id, t.password) == ("broker.lan", 41234, "000007", "s3cret")
    # No config file at the default place: localhost, bike 000001, or the environment's.
    monkeypatch.setattr(cli.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    none = tmp_path / "absent.env"
    assert cli.resolve(options(), environ={}, daemon_env=none) == cli.Target()
    t = cli.resolve(options(), environ={"MQTT_HOSTNAME": "h", "DEVICE_ID": "000009"},
                    daemon_env=none)
    assert (t.host, t.bike_id) == ("h", "000009")
    # A bike moved from the old scripts keeps MQTT_* in the daemon's env file: honoured.
    daemon_env = tmp_path / "env"
    daemon_env.write_text('# moved from ~/.env\nexport MQTT_HOSTNAME="old.lan"\n'
                          "DEVICE_ID='000005'\nMQTT_PORT=1999\n")
    t = cli.resolve(options(), environ={"MQTT_PORT": "1884"}, daemon_env=daemon_env)
    assert (t.host, t.bike_id, t.port) == ("old.lan", "000005", 1884)  # own env wins
    # An explicit config that cannot be used is an error, not a silent default.
    with pytest.raises(cli.Failure, match="invalid configuration"):
        cli.resolve(options("--config", str(tmp_path / "absent.toml")), environ={})


def test_watch_hints_repeat_the_connection_flags():
    board = cli.Board("000001")
    command = cli._command(options("--port", "41234"))
    assert command == "smartbike --port 41234"
    lines = cli.render(board, "h:1", connected=True, now=0.0, command=command)
    assert lines[-1] == "  smartbike --port 41234 set incline 5.5"
    # A simulated bike (its virtual world speaks) also gets the press hint.
    board.take(message("smartbike-sim/000001/state", {"buttons": ["LEFT", "RIGHT"]}), 0.0)
    lines = cli.render(board, "h:1", connected=True, now=0.0, command=command)
    assert lines[0].startswith("bike 000001 (simulated) on h:1")
    assert lines[-1] == "  smartbike --port 41234 press LEFT"


def test_a_refused_login_fails_at_once_with_a_hint(make_broker):
    broker = make_broker(users={"bike1": "secret"})
    started = time.monotonic()
    done = smartbike(*at(broker), "--timeout", "20", "set", "fan", "10", timeout=30)
    assert done.returncode == 2 and time.monotonic() - started < 10
    assert "refused the connection" in done.stderr and "--password-file" in done.stderr


def test_set_waits_only_as_long_as_asked(broker):
    started = time.monotonic()
    done = smartbike(*at(broker), "--timeout", "0.5", "set", "fan", "10")
    assert done.returncode == 2 and time.monotonic() - started < 5


class Terminal:
    """A stdout that says it is a terminal and keeps what is written."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_watch_redraws_in_place_on_a_terminal(broker):
    screen = Terminal()
    args = cli.parser().parse_args(["watch", "--count", "2", "--interval", "0.2"])
    target = cli.Target(host=broker.host, port=broker.port)
    assert cli.cmd_watch(args, target, out=screen) == 0
    # The second draw goes back up over the first, clearing what it leaves below.
    first, second = screen.text.split("\x1b[J")[:2]
    assert screen.text.count("\x1b[J") == 2 and "\x1b[" not in first.replace("\x1b[K", "")
    assert second.startswith(f"\x1b[{first.count(chr(10))}F")
    assert "no status yet" in second
    assert cli.redraw(["a"], 50, rows=24).startswith("\x1b[H")  # too tall to move up over
