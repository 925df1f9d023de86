"""smartbike record and replay against a real broker and smartbiked --simulate."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from smartbiked import cli
from smartbiked.simulator import parse_ride
from tests.conftest import ROOT, bike_config, daemon_env, wait_until

# Sensors on a board and on pins, reported four times a second; a button.
BIKE = r"""
[serial.sensors]
url = "/dev/serial/by-id/usb-Arduino_Uno_sensors-if00"

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

[speed]
driver = "gpio_pulse"
pin = 6
interval = 0.25

[button]
driver = "gpio_buttons"
pins = { LEFT = 17 }
"""


def smartbike(broker, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smartbiked.cli", "--host", "127.0.0.1",
                           "--port", str(broker.port), *args], env=daemon_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def bike(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, BIKE), "--simulate", "--seed", "3")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online", timeout=20)
    probe.json("bike/000001/power/report", timeout=15)
    return daemon


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def reports(probe, topic: str, after: int = 0) -> list[dict]:
    return [json.loads(m.payload) for m in probe.messages[after:]
            if m.topic == f"bike/000001/{topic}/report"]


def test_record_writes_the_reports_with_their_own_timestamps(broker, probe, bike, tmp_path):
    path = tmp_path / "ride.csv"
    mark = len(probe.messages)
    done = smartbike(broker, "record", str(path), "--duration", "3")
    assert done.returncode == 0, done.stderr
    rows = read_csv(path)
    assert list(rows[0]) == ["time", "topic", "value", "unit"]
    seen = {(f"{r['timestamp']:.3f}", t, f"{r['value']:g}")
            for t in ("power", "heartrate", "speed") for r in reports(probe, t, mark)}
    for topic, unit in (("power", "W"), ("heartrate", "BPM"), ("speed", "m/s")):
        mine = [r for r in rows if r["topic"] == topic]
        assert len(mine) >= 6, (topic, rows)
        assert {r["unit"] for r in mine} == {unit}
        # Each row is a report the bike really published, value and timestamp alike.
        assert all((r["time"], topic, r["value"]) in seen for r in mine), (topic, mine)
    assert f"{len(rows)} values recorded" in done.stderr


def test_record_keeps_button_events_and_refuses_to_overwrite(broker, probe, bike, tmp_path):
    path = tmp_path / "ride.csv"
    recorder = subprocess.Popen([sys.executable, "-m", "smartbiked.cli", "--host", "127.0.0.1",
                                 "--port", str(broker.port), "record", str(path),
                                 "--duration", "4"], env=daemon_env(), cwd=ROOT,
                                stderr=subprocess.PIPE, text=True)
    # Once the recorder's header and a first row are there, it is subscribed.
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) > 1, 15)
    assert smartbike(broker, "press", "LEFT", "--hold", "0.3").returncode == 0
    assert recorder.wait(30) == 0
    buttons = [(r["topic"], r["value"]) for r in read_csv(path) if r["topic"].startswith("b")]
    assert buttons == [("button/LEFT", "1"), ("button/LEFT", "0")]
    again = smartbike(broker, "record", str(path), "--duration", "1")
    assert again.returncode == 2 and "exists; use --force" in again.stderr
    assert len(read_csv(path)) > 2  # untouched


RIDE = """time,topic,value,unit
1000.0,power,251,W
1000.0,heartrate,111,BPM
1000.0,speed,3.5,m/s
1000.0,incline,4,degree
1001.0,power,252,W
1002.0,power,253,W
1003.0,power,254,W
1004.0,power,255,W
1004.0,heartrate,112,BPM
"""


def test_replay_makes_the_sensors_ride_the_file(broker, probe, bike, tmp_path):
    path = tmp_path / "ride.csv"
    path.write_text(RIDE)
    mark = len(probe.messages)
    done = smartbike(broker, "replay", str(path))
    assert done.returncode == 0, done.stderr
    # The last row is sent at its time; the bike reports it a moment later.
    probe.json("bike/000001/power/report", lambda d: d["value"] == 255, after=mark)
    probe.json("bike/000001/heartrate/report", lambda d: d["value"] == 112, after=mark)
    power = [r["value"] for r in reports(probe, "power", mark)]
    # The rider model never holds whole watts this steady: these are the file's values,
    # in its order, each for about its second.
    replayed = [v for v in power if 251 <= v <= 255]
    assert sorted(set(replayed)) == [251, 252, 253, 254, 255], power
    assert replayed == sorted(replayed), power
    assert replayed.count(252) >= 2, power
    hr = [r["value"] for r in reports(probe, "heartrate", mark)]
    assert 111 in hr and 112 in hr, hr
    speed = [r["value"] for r in reports(probe, "speed", mark)]
    assert any(abs(v - 3.5) < 0.3 for v in speed), speed
    # The incline row is the app's business: nothing moved it.
    assert not reports(probe, "incline", mark)


def test_a_recorded_ride_replays_on_a_bike(broker, probe, bike, tmp_path):
    path = tmp_path / "ride.csv"
    assert smartbike(broker, "record", str(path), "--duration", "3").returncode == 0
    recorded = [float(r["value"]) for r in read_csv(path) if r["topic"] == "power"]
    mark = len(probe.messages)
    assert smartbike(broker, "replay", str(path)).returncode == 0
    power = [r["value"] for r in reports(probe, "power", mark)]
    # Nearly every report during the replay shows a recorded value (the model's own may
    # show at the very start or end).
    assert sum(v in recorded for v in power) >= len(power) - 3, (recorded, power)
    assert len(set(power) & set(recorded)) >= 3


@pytest.mark.parametrize("text, why", [
    ("", "line 1 must be the header"),
    ("a,b,c\n1,power,2\n", "line 1 must be the header"),
    ("time,topic,value\n1,power,x\n", "line 2: time and value must be numbers"),
    ("time,topic,value\n1,power,nan\n", "line 2: time and value must be finite"),
    ("time,topic,value\n1,power\n", "line 2: expected time,topic,value"),
    ("time,topic,value\n1,incline,5\n", "no speed, cadence, power, heartrate or button"),
    ("time,topic,value\n1,power,1e9\n", "out of range"),
])
def test_a_bad_file_is_refused_before_anything_is_sent(broker, probe, bike, tmp_path,
                                                       text, why):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    probe.subscribe("smartbike-sim/+/ride")
    done = smartbike(broker, "replay", str(path), "--timeout", "2")
    assert done.returncode == 2 and why in done.stderr, done.stderr
    assert not [m for m in probe.messages if m.topic.endswith("/ride")]


def test_replay_needs_a_simulated_bike(broker, tmp_path):
    path = tmp_path / "ride.csv"
    path.write_text(RIDE)
    done = smartbike(broker, "replay", str(path), "--timeout", "1")
    assert done.returncode == 2 and "no simulated bike 000001 answered" in done.stderr


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(cli.Failure, match="cannot read"):
        cli.load_ride(str(tmp_path / "nope.csv"))


@pytest.mark.parametrize("payload, why", [
    (b"[1]", "not a JSON object"), (b"{", "not JSON"), (b'{"hold": 1}', "no value"),
    (b'{"power": true}', "power: not a number"), (b'{"power": 1e999}', "power: not a"),
    (b'{"incline": 5}', "unknown key"), (b'{"power": 5, "hold": 0}', "hold must be"),
    (b'{"power": 5, "hold": 61}', "hold must be"), (b'{"power": -1}', "from 0 to"),
])
def test_ride_messages_are_checked(payload, why):
    with pytest.raises(ValueError, match=why):
        parse_ride(payload)


def test_a_bad_ride_message_is_refused_and_changes_nothing(broker, probe, bike):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    probe.subscribe("answers/#")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "answers/1"
    probe.publish("smartbike-sim/000001/ride", {"power": 999, "hold": 0}, properties=props)
    answer = probe.json("answers/1")
    assert answer["ok"] is False and "hold must be" in answer["error"]
    mark = len(probe.messages)
    probe.json("bike/000001/power/report", after=mark)
    assert 999 not in [r["value"] for r in reports(probe, "power", mark)]
