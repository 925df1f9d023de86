"""The smartbike command against a simulated bike: set, press, watch; and where it connects."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import queue
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import smartbiked
from smartbiked import cli
from smartbiked.mqtt_client import MQTTClient
from tests.conftest import ROOT, bike_config, daemon_env, free_port
from tests.test_tls import make_ca, tls_broker, tls_config  # noqa: F401 (a fixture)

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


def smartbike(*args: str, timeout: float = 20, **env: str) -> subprocess.CompletedProcess:
    """Run the command as a user would, in its own process."""
    return subprocess.run([sys.executable, "-m", "smartbiked.cli", *args], cwd=ROOT,
                          env=daemon_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def at(broker) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port), "--bike", "000001"]


@pytest.fixture
def bike(broker, probe, run_daemon):
    """A simulated bike online on ``broker``; yields the daemon."""
    daemon = run_daemon(bike_config(broker, BIKE), "--simulate", "--seed", "3")
    daemon.notify.wait_for("READY=1")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    return daemon


class Listener(MQTTClient):
    """A test-side app with a login: collects messages in a queue."""

    def __init__(self, broker, username: str = "", password: str = "",
                 topics: tuple[str, ...] = ("bike/#",)) -> None:
        super().__init__(broker.host, username, password, broker.port, client_id="")
        self.got: queue.Queue[MQTTMessage] = queue.Queue()
        self.setup_mqtt_client()
        for topic in topics:
            self.subscribe(topic)
        self.loop_start()
        assert self.connected.wait(10), "listener could not connect"

    def on_message(self, client, userdata, msg) -> None:
        self.got.put(msg)

    def wait_for(self, topic: str, payload: bytes | None = None, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.got.get(timeout=max(0.01, deadline - time.monotonic()))
            if msg.topic == topic and payload in (None, msg.payload):
                return

    def close(self) -> None:
        self.disconnect()
        self.loop_stop()


def retain(broker, messages: dict[str, bytes | object]) -> None:
    """Publish ``messages`` retained, as some other app (or a hostile one) would."""
    app = Listener(broker, topics=())
    try:
        for topic, payload in messages.items():
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            app.publish(topic, body, retain=True).wait_for_publish(5)
    finally:
        app.close()


def in_terminal(args: list[str], rows: int = 24, cols: int = 80, timeout: float = 30,
                **env: str) -> tuple[int, str]:
    """Run ``smartbike ARGS`` on a pseudo-terminal of ``rows`` x ``cols``; status, output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    environ = daemon_env(**env)
    environ.pop("NO_COLOR", None)
    environ.update(env)
    proc = subprocess.Popen([sys.executable, "-m", "smartbiked.cli", *args], cwd=ROOT,
                            env=environ, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], deadline - time.monotonic())[0]:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(5), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


#: Exactly the sequences the watch itself writes: colours, clear-to-end, cursor up/home.
OWN_SEQUENCES = re.compile(r"\x1b\[(?:0|1|2|31|32|33)m|\x1b\[[KJH]|\x1b\[\d+F")


def leaked(text: str) -> list[str]:
    """Control or format characters in ``text`` that the watch did not put there itself."""
    rest = OWN_SEQUENCES.sub("", text)
    return sorted({repr(c) for c in rest if c not in "\r\n"
                   and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})


# --------------------------------------------------------------------------- set and press


def test_set_prints_the_new_value_and_exits_0(broker, probe, bike):
    mark = len(probe.messages)
    done = smartbike(*at(broker), "set", "fan", "40")
    assert (done.returncode, done.stdout) == (0, "fan: 40 percentage\n"), done.stderr
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 40.0, after=mark)
    # Through a serial motor board, flags after the command, broker from the config file.
    done = smartbike("set", "incline", "5.5", "--config", str(bike.config))
    assert (done.returncode, done.stdout) == (0, "incline: 5.5 degree\n"), done.stderr
    probe.json("bike/000001/incline/report", lambda d: d["value"] == 5.5, after=mark)


def test_set_asks_for_its_answer_in_the_bikes_reply_namespace(broker, probe, bike):
    mark = len(probe.messages)
    assert smartbike(*at(broker), "set", "fan", "30").returncode == 0
    answers = [m.topic for m in probe.messages[mark:]
               if m.topic.startswith("bike/000001/reply/")]
    assert len(answers) == 1 and re.fullmatch(r"bike/000001/reply/[0-9a-f]{32}", answers[0])


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


def test_set_refuses_a_sensor_before_sending(broker):
    done = smartbike(*at(broker), "set", "speed", "3")
    assert done.returncode == 2 and "invalid choice: 'speed'" in done.stderr


def test_press_makes_the_bike_report_a_press_and_release(broker, probe, bike):
    mark = len(probe.messages)
    done = smartbike(*at(broker), "press", "left")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "LEFT: pressed\nLEFT: released\n"
    events = [json.loads(m.payload) for m in probe.messages[mark:]
              if m.topic == "bike/000001/button/report"]
    assert [(e["button"], e["state"]) for e in events] == [("LEFT", 1), ("LEFT", 0)]
    assert [m for m in probe.messages[mark:] if m.topic.startswith("bike/000001/reply/")]
    done = smartbike(*at(broker), "press", "UP")
    assert done.returncode == 1
    assert "no button 'UP' (buttons: LEFT, RIGHT, BRAKE)" in done.stderr


def test_press_without_a_simulator_times_out(broker):
    done = smartbike(*at(broker), "--timeout", "1", "press", "LEFT")
    assert done.returncode == 2 and "--simulate" in done.stderr


# --------------------------------------------------------------------------- reply namespace

ACL_BIKE = "user bike\ntopic readwrite bike/000001/#\n"
FAN = '[fan]\ndriver = "gpio_pwm"\npin = 12\n'


def _login_config(broker, extra: str = "") -> str:
    return bike_config(broker, FAN).replace(
        "keepalive = 5", f'keepalive = 5\nusername = "bike"\n{extra}')


def test_set_works_for_an_app_allowed_only_its_bikes_topics(make_broker, run_daemon, tmp_path):
    broker = make_broker(users={"bike": "bike-pw", "app": "app-pw"},
                         acl=ACL_BIKE + "user app\ntopic readwrite bike/000001/#\n")
    app = Listener(broker, "app", "app-pw", ("bike/000001/status",))
    try:
        run_daemon(_login_config(broker), MQTT_PASSWORD="bike-pw")
        app.wait_for("bike/000001/status", b"online")
    finally:
        app.close()
    (tmp_path / "app-pw").write_text("app-pw\n")
    done = smartbike(*at(broker), "--username", "app", "--password-file",
                     str(tmp_path / "app-pw"), "set", "fan", "40")
    assert (done.returncode, done.stdout) == (0, "fan: 40 percentage\n"), done.stderr


def test_set_uses_the_reply_namespace_of_the_config_file(make_broker, run_daemon, tmp_path):
    # The app may read its answers under apps/000001/answers only: not bike/000001/reply.
    broker = make_broker(users={"bike": "bike-pw", "app": "app-pw"}, acl=(
        ACL_BIKE + "topic write apps/000001/answers/#\n"
        "user app\ntopic write bike/000001/+/control\ntopic read bike/000001/status\n"
        "topic read apps/000001/answers/#\n"))
    app = Listener(broker, "app", "app-pw", ("bike/000001/status",))
    try:
        daemon = run_daemon(_login_config(broker, 'reply_topics = ["apps/{id}/answers/#"]'),
                            MQTT_PASSWORD="bike-pw")
        app.wait_for("bike/000001/status", b"online")
    finally:
        app.close()
    (tmp_path / "app-pw").write_text("app-pw\n")
    done = smartbike("--config", str(daemon.config), "--username", "app", "--password-file",
                     str(tmp_path / "app-pw"), "set", "fan", "20")
    assert (done.returncode, done.stdout) == (0, "fan: 20 percentage\n"), done.stderr


def test_reply_topics_follow_the_first_pattern_and_the_bike_flag(tmp_path):
    conf = tmp_path / "bike.toml"
    conf.write_text('[bike]\nid = "000042"\n[broker]\nhost = "h"\n'
                    'reply_topics = ["apps/{id}/answers/+", "other/#"]\n')
    target = cli.resolve(options("--config", str(conf)), environ={})
    topic, correlation = cli.reply_address(target)
    assert re.fullmatch(r"apps/000042/answers/[0-9a-f]{32}", topic)
    assert topic.endswith(correlation.decode())
    assert cli.reply_address(target)[0] != topic  # a fresh token for every request
    moved = cli.resolve(options("--config", str(conf), "--bike", "000007"), environ={})
    assert cli.reply_address(moved)[0].startswith("apps/000007/answers/")
    assert cli.reply_address(cli.Target(bike_id="000003"))[0].startswith("bike/000003/reply/")


# --------------------------------------------------------------------------- hostile input

#: What a buggy or hostile app can leave retained for every later watch to see.
HOSTILE = {
    "bike/000001/status": b"online\x1b]52;c;ZXZpbA==\x07\x1b[2J",
    "bike/000001/speed/report": {"value": "\x1b[2J", "unitName": "m/s"},
    "bike/000001/cadence/report": b"\xff\xfe\x1b[2J not UTF-8",
    "bike/000001/power/report": b'{"value": NaN}',
    "bike/000001/heartrate/report": b"[" * 5000,
    "bike/000001/incline/report": b'{"value": 1' + b"0" * 400 + b"}",
    "bike/000001/fan/report": json.dumps({"value": 1, "x": "\x1b[2J" * 20000}).encode(),
    "bike/000001/resistance/report": {"value": 5, "unitName": "\x1bc\x9b2J\u202e%",
                                      "timestamp": "\x07"},
    "bike/000001/button/report": {"button": "\x1b]0;pwned\x07", "state": 1},
    "bike/000001/\u202eevil\u2028/report": {"value": 1},
    "bike/000001/incline/status": {"ok": False, "error": "\x1b]52;c;AAAA\x07",
                                   "allowed": {"min": "x", "max": [1], "step": {}}},
    "bike/000001/health": {"version": "\x1b[2J", "uptime": "x", "drivers": {
        "fan\x1b[5m": {"state": "failed\x07", "reason": "\x9b2J"}, "power": 7}},
    "smartbike-sim/000001/state": {"buttons": ["\x1b[2J", 5, {"a": 1}]},
}


def test_watch_shows_hostile_retained_messages_as_bad_and_never_sends_them(broker):
    retain(broker, HOSTILE)
    status, screen = in_terminal([*at(broker), "watch", "--count", "2", "--interval", "0.1"])
    assert status == 0, screen
    assert "Traceback" not in screen and leaked(screen) == [], leaked(screen)
    assert "\x1b[31m" in screen  # bad things in red: this is a terminal
    rows = {line.split()[0]: line for line in OWN_SEQUENCES.sub("", screen).splitlines()
            if line.strip()}
    for topic, why in [("speed", "no finite number"), ("cadence", "not UTF-8"),
                       ("power", "NaN in JSON"), ("heartrate", "not JSON"),
                       ("incline", "no finite number"), ("fan", "too large")]:
        assert rows[topic].split()[1] == "bad" and why in rows[topic], rows[topic]
    assert "bad status 'online\\e]5" in screen
    assert "\\e]0;pw" in rows["button"] and "\\ec\\x9b..." in rows["resistance"]
    assert "unknown topics: \\u202eevil\\u2028" in screen
    plain = OWN_SEQUENCES.sub("", screen)
    assert re.search(r"last refusal [0-9.]+ s ago: incline: \\e\]52;c;AAAA\\x07", plain)
    assert "fan\\e[5m failed\\x07" in plain


def test_set_never_prints_a_hostile_answer_raw(broker):
    bike = Listener(broker, topics=("bike/000001/fan/control",))

    def answer() -> None:
        msg = bike.got.get(timeout=15)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData
        bike.publish(msg.properties.ResponseTopic, {"ok": False, "error": "\x1b]52;c;QQ==\x07",
                     "allowed": {"min": "\x1b[2J", "max": 10**400}}, properties=props)

    threading.Thread(target=answer, daemon=True).start()
    try:
        done = smartbike(*at(broker), "set", "fan", "5")
    finally:
        bike.close()
    assert done.returncode == 1
    assert done.stderr == "fan refused: \\e]52;c;QQ==\\x07\n"


def test_a_report_without_a_finite_number_is_bad_not_a_value():
    board = cli.Board("000001")
    for topic, payload in [("speed", b'{"value": 1e400}'), ("power", b'{"value": true}'),
                           ("cadence", b'{"value": "7"}'), ("heartrate", b"72")]:
        board.take(message(f"bike/000001/{topic}/report", payload), 1.0)
        assert board.values[topic].bad, topic
    board.take(message("bike/000001/button/report", {"button": "LEFT", "state": 7}), 1.0)
    assert board.values["button"].bad == "no button and state"


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4), max_leaves=12)
suffixes = st.sampled_from(["status", "health", "speed/report", "button/report", "fan/report",
                            "fan/status", "heartrate/status", "x\u202e/report"])


def _columns(line: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(suffixes, st.binary(max_size=80)
                          | json_values.map(lambda v: json.dumps(v).encode())
                          | st.dictionaries(st.sampled_from(["value", "button", "state", "ok",
                                                             "error", "unitName", "timestamp",
                                                             "drivers", "version"]),
                                            json_values).map(lambda v: json.dumps(v).encode())),
                max_size=8))
def test_any_message_leaves_the_watch_drawable_and_clean(messages):
    board, fleet = cli.Board("000001"), cli.Fleet()
    for suffix, payload in messages:
        board.take(message(f"bike/000001/{suffix}", payload), 1.7e9)
        fleet.take(message(f"bike/000001/{suffix}", payload), 1.7e9)
    for lines in (cli.render(board, "h:1", True, 1.7e9 + 1, "smartbike"),
                  cli.render_all(fleet, "h:1", True, 1.7e9 + 1)):
        assert len(lines) <= 24
        for line in lines:
            assert line.isprintable() and _columns(line) < 80, repr(line)


# --------------------------------------------------------------------------- health

HEALTH = {"version": "0.2.0", "uptime": 12.3, "broker": "127.0.0.1:41883", "reconnects": 2,
          "drivers": {"fan": {"state": "running"},
                      "heartrate": {"state": "stale", "reason": "no reading for 5 s"},
                      "incline": {"state": "failed", "reason": "board motors: no such port"}},
          "counters": {"reports_shed": 0, "refusals_shed": 3}, "timestamp": time.time(),
          "metadata": {"deviceName": "bike000001"}}


def test_watch_shows_the_health_message_and_drivers_not_running(broker):
    retain(broker, {"bike/000001/status": b"online", "bike/000001/health": HEALTH})
    done = smartbike(*at(broker), "watch", "--count", "1")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert rows["heartrate"].split()[1] == "-"
    assert rows["heartrate"].endswith("stale: no reading for 5 s")
    assert rows["incline"].endswith("failed: board motors: no such port")
    assert "running" not in rows["fan"]
    assert rows["health:"] == ("health: v0.2.0, up 12 s, 2 reconnects; "
                               "heartrate stale, incline failed")
    assert rows["counters:"] == "counters: refusals_shed 3"  # the ones that are not 0


def test_watch_shows_the_bluetooth_trainer_and_escapes_what_it_says(broker):
    for ble, shown in [
            ({"state": "unavailable", "reason": "Bluetooth: no adapter hci0"},
             "bluetooth: unavailable (Bluetooth: no adapter hci0)"),
            ({"state": "advertising", "controller": "/org/bluez/hci0/dev_AA"},
             "bluetooth: advertising (controlled by /org/bluez/hci0/dev_AA)"),
            ({"state": "advertising\x1b[2J", "reason": "a\nb"},
             "bluetooth: advertisi... (a\\nb)")]:  # escaped, and cut to fit
        retain(broker, {"bike/000001/status": b"online",
                        "bike/000001/health": {**HEALTH, "bluetooth": ble}})
        done = smartbike(*at(broker), "watch", "--count", "1")
        assert done.returncode == 0, done.stderr
        assert shown in done.stdout.splitlines(), done.stdout


def test_watch_tolerates_a_missing_or_malformed_health_message(broker):
    retain(broker, {"bike/000001/status": b"online"})
    done = smartbike(*at(broker), "watch", "--count", "1")
    assert done.returncode == 0 and "health: none published" in done.stdout
    for bad, shown in [(b"{oops", "not JSON"), (b"[1, 2]", "not a JSON object"),
                       (b'{"drivers": 5}', "drivers is not an object")]:
        retain(broker, {"bike/000001/health": bad})
        done = smartbike(*at(broker), "watch", "--count", "1")
        assert done.returncode == 0, done.stderr
        assert f"health: bad message ({shown})" in done.stdout


def test_a_sensor_status_says_lost_and_back_and_is_no_refusal():
    board = cli.Board("000001")
    board.take(message("bike/000001/heartrate/status", {
        "ok": False, "state": "stale", "error": "no reading for 5 s"}), 100.0)
    text = "\n".join(cli.render(board, "h:1", connected=True, now=101.0))
    assert "stale: no reading for 5 s" in text and "last refusal: none" in text
    board.take(message("bike/000001/heartrate/status", {"ok": True, "state": "running"}), 102)
    row = next(ln for ln in cli.render(board, "h:1", connected=True, now=103.0)
               if ln.split()[:1] == ["heartrate"])
    assert row.split() == ["heartrate", "-", "BPM"]  # back: nothing to say about it
    # A health message is the daemon's whole picture: it replaces older states.
    board.take(message("bike/000001/power/status", {"ok": False, "state": "stale"}), 104)
    board.take(message("bike/000001/health", HEALTH), 105)
    text = "\n".join(cli.render(board, "h:1", connected=True, now=106.0))
    assert "power" not in text.split("health:")[1] and "heartrate stale" in text


# --------------------------------------------------------------------------- the table


def test_watch_prints_plain_snapshots_when_not_a_terminal(broker, probe, bike):
    mark = len(probe.messages)
    # The virtual world says it is one once a second (not retained): three seconds' worth.
    done = smartbike(*at(broker), "watch", "--count", "3", "--interval", "1")
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
    board.take(message("bike/000001/reply/abc", {"ok": True}), 100)      # someone's answer
    lines = cli.render(board, "h:1", connected=True, now=100.0)
    text = "\n".join(lines)
    assert lines[0].startswith("bike 000001 on h:1: online")
    assert any(ln.split()[:4] == ["speed", "8.12", "m/s", "0.5"] for ln in lines), text
    assert any(ln.split()[:3] == ["incline", "5.5", "degree"] and "10 s" in ln for ln in lines)
    assert any(ln.split()[:3] == ["button", "BRAKE", "pressed"] for ln in lines), text
    assert any(ln.split()[:2] == ["fan", "-"] for ln in lines), text
    assert ("last refusal 3.0 s ago: incline: 25 is out of range (allowed -10..19 step 0.5)"
            in lines)
    assert "unknown topics" not in text
    assert "connecting" in cli.render(board, "h:1", connected=False, now=100.0, ever=False)[0]
    assert "connection lost" in cli.render(board, "h:1", connected=False, now=100.0)[0]


def test_a_values_age_comes_from_its_own_timestamp():
    board = cli.Board("000001")
    now = 1_722_834_200.0
    board.take(message("bike/000001/incline/report", {"value": 8, "timestamp": now - 40}), now)
    board.take(message("bike/000001/fan/report", {"value": 60, "timestamp": now - 7200}), now)
    # A bike clock far ahead, or no time at all: the arrival counts.
    board.take(message("bike/000001/speed/report", {"value": 3, "timestamp": now + 999}), now)
    board.take(message("bike/000001/power/report", {"value": 99, "timestamp": "x"}), now - 2)
    ages = {ln.split()[0]: ln.split()[3:5] for ln in cli.render(board, "h", True, now + 0.5)
            if len(ln.split()) > 4}
    assert ages["incline"] == ["40", "s"] and ages["fan"] == ["2", "h"]
    assert ages["speed"] == ["0.5", "s"] and ages["power"] == ["2.5", "s"]


def test_values_are_rounded_to_each_topics_resolution():
    assert [cli.show_number(v, t) for v, t in [
        (180.123456789, "power"), (71.5000001, "heartrate"), (8.123456789, "speed"),
        (85.04999, "cadence"), (33.333333333333336, "fan"), (40.0, "fan"), (5.5, "incline"),
        (-0.0001, "incline"), (1e300, "fan"), (-2.5e9, "power")]] == [
        "180", "72", "8.12", "85.0", "33.3", "40", "5.5", "0", "1e+300", "-2.5e+09"]
    board = cli.Board("000001")
    board.take(message("bike/000001/fan/report", {"value": 33.333333333333336}), 1.0)
    assert any(ln.split()[:2] == ["fan", "33.3"] for ln in cli.render(board, "h", True, 2.0))


def test_the_watch_fits_80_by_24_with_everything_on_it():
    board = cli.Board("000001")
    for topic in cli.ROW_ORDER:
        body = ({"button": "BRAKE" * 9, "state": 0} if topic == "button"
                else {"value": -123456.789, "unitName": "u" * 40})
        board.take(message(f"bike/000001/{topic}/report", body), 1.0)
        board.take(message(f"bike/000001/{topic}/status", {"ok": False, "state": "failed",
                                                           "error": "why " * 40}), 1.0)
    for i in range(30):
        board.take(message(f"bike/000001/made-up-{i}/report", {"value": 1}), 1.0)
    board.take(message("bike/000001/incline/status", {"ok": False, "error": "e " * 99}), 1.0)
    board.take(message("smartbike-sim/000001/state", {"buttons": ["LEFT" * 20]}), 1.0)
    board.take(message("bike/000001/status", b"online"), 1.0)
    lines = cli.render(board, "a-very-long-broker-host-name.example.org:41234", True, 9e5,
                       "smartbike --config /etc/smartbiked/a/long/path/smartbike.toml "
                       "--port 41234 --bike 000001", colour=False)
    table = lines[: lines.index("From another terminal:")]
    assert len(lines) <= 24 and all(len(line) < 80 for line in table), "\n".join(lines)
    # The commands to copy stay whole; the redraw counts the rows they wrap onto.
    assert lines[-1].endswith(" --port 41234 --bike 000001 press LEFTLEFTL...")
    assert cli.screen_rows(lines, 80) == len(lines) + 2
    assert cli.screen_rows(["\x1b[31m" + "x" * 80 + "\x1b[0m", "", "y" * 81], 80) == 4
    narrow = cli.render(board, "h:1", True, 9e5, colour=True, width=39)
    assert all(len(re.sub(r"\x1b\[\d*m", "", ln)) <= 39 for ln in narrow)


def test_colour_only_on_a_terminal_and_never_with_no_color():
    assert cli.use_colour(Terminal(), {}) is True
    assert cli.use_colour(Terminal(), {"NO_COLOR": "1"}) is False
    assert cli.use_colour(Terminal(), {"NO_COLOR": ""}) is True  # no-color.org: non-empty
    assert cli.use_colour(Terminal(), {"TERM": "dumb"}) is False
    pipe = Terminal()
    pipe.isatty = lambda: False
    assert cli.use_colour(pipe, {}) is False


def test_watch_colours_a_terminal_unless_no_color(broker):
    retain(broker, {"bike/000001/status": b"online"})
    status, screen = in_terminal([*at(broker), "watch", "--count", "1"])
    assert status == 0 and "\x1b[32monline" in screen, screen
    status, screen = in_terminal([*at(broker), "watch", "--count", "1"], NO_COLOR="1")
    assert status == 0 and "online" in screen and "m" not in re.findall(r"\x1b\[\d*(.)",
                                                                      screen), screen


def test_watch_fits_a_narrow_terminal(broker):
    retain(broker, {"bike/000001/status": b"online", "bike/000001/health": HEALTH})
    status, screen = in_terminal([*at(broker), "watch", "--count", "1"], cols=50)
    lines = OWN_SEQUENCES.sub("", screen).splitlines()
    table = lines[: lines.index("From another terminal:")]
    assert status == 0 and len(table) > 10 and max(map(len, table)) == 49, screen


def test_watch_draws_first_once_the_retained_values_are_in(broker):
    stamp = time.time() - 40
    retain(broker, {"bike/000001/status": b"online", "bike/000001/health": HEALTH,
                    **{f"bike/000001/{t}/report": {"value": 5.5, "timestamp": stamp}
                       for t in ("incline", "fan", "resistance")}})
    done = smartbike(*at(broker), "watch", "--count", "1", "--interval", "0.01")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert ": online" in lines[0] and "health: v0.2.0" in done.stdout
    for topic in ("incline", "fan", "resistance"):
        row = next(ln.split() for ln in lines if ln.split()[:1] == [topic])
        assert row[1] == "5.5" and row[3] in ("40", "41") and row[4] == "s", row


def test_watch_all_shows_every_bike_on_the_broker(broker):
    retain(broker, {
        "bike/000001/status": b"online", "bike/000001/health": HEALTH,
        "bike/000001/power/report": {"value": 181.4}, "bike/000001/speed/report": {"value": 7},
        "bike/000002/status": b"lost", "bike/000002/cadence/report": {"value": 85.04},
        "bike/000002/heartrate/report": {"value": 71.6},
        "bike/000002/fan/status": {"ok": False, "error": "150 is out of range"},
        "bike/000003/health": b"junk",
        "bike/000004/health": {"drivers": {"fan": {"state": "failed"}}},
    })
    done = smartbike("--host", broker.host, "--port", str(broker.port), "watch", "--all",
                     "--count", "1")
    assert done.returncode == 0, done.stderr
    rows = {ln.split()[0]: ln for ln in done.stdout.splitlines() if ln[:1].isdigit()}
    assert rows["000001"].split()[:7] == ["000001", "online", "181", "-", "7.00", "-", "-"]
    assert rows["000001"].endswith("1 failed, 1 stale")  # no room to name them
    assert rows["000004"].endswith("fan failed")
    assert rows["000002"].split()[:6] == ["000002", "lost", "-", "85.0", "-", "72"]
    assert "fan: 150 is..." in rows["000002"]
    assert rows["000003"].endswith("bad health message")
    assert "4 bikes" in done.stdout.splitlines()[0]


def test_watch_all_fits_the_screen_with_many_bikes():
    fleet = cli.Fleet(limit=40)
    for i in range(60):
        fleet.take(message(f"bike/{i:06d}/status", b"online"), 1.0)
    lines = cli.render_all(fleet, "h:1", True, 2.0)
    assert len(lines) == 24 and lines[-1] == "(+40 more bikes)"
    assert all(len(line) < 80 for line in lines)


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


def test_version_flag_prints_the_package_version():
    done = smartbike("--version")
    assert (done.returncode, done.stdout) == (0, f"smartbike {smartbiked.__version__}\n")


def test_version_comes_from_the_package(monkeypatch, capsys):
    monkeypatch.setattr(cli, "__version__", "9.8.7")
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out == "smartbike 9.8.7\n"


def test_port_flag_must_be_a_port_number():
    for bad in ("abc", "0", "65536", "12\n3", "-1", "１２"):
        done = smartbike("--port", bad, "watch")
        assert done.returncode == 2 and "not a port number" in done.stderr, bad


# --------------------------------------------------------------------------- connecting


def test_a_refused_login_fails_at_once_with_a_hint(make_broker):
    broker = make_broker(users={"bike1": "secret"})
    started = time.monotonic()
    done = smartbike(*at(broker), "--timeout", "20", "set", "fan", "10", timeout=30)
    assert done.returncode == 2 and time.monotonic() - started < 10
    assert "refused the connection" in done.stderr and "not authorised" in done.stderr
    assert "--password-file" in done.stderr


def test_nothing_listening_fails_at_once_and_says_so():
    port = free_port()
    for command in (["set", "fan", "10"], ["watch"], ["press", "LEFT"]):
        started = time.monotonic()
        done = smartbike("--host", "127.0.0.1", "--port", str(port), "--timeout", "20",
                         *command, timeout=30)
        assert done.returncode == 2 and time.monotonic() - started < 10, command
        assert f"nothing is listening at 127.0.0.1:{port} (connection refused)" in done.stderr


def test_an_unknown_host_is_named():
    done = smartbike("--host", "no-such-broker.invalid", "--timeout", "20", "set", "fan", "1",
                     timeout=30)
    assert done.returncode == 2
    assert "unknown host 'no-such-broker.invalid'" in done.stderr, done.stderr


def test_a_tls_failure_says_the_certificate_is_not_trusted(tls_broker, tmp_path):  # noqa: F811
    broker, _ = tls_broker
    other = tmp_path / "other"
    other.mkdir()
    stranger, _ = make_ca(other, "stranger-ca")
    conf = tmp_path / "tls.toml"
    conf.write_text(tls_config(broker, stranger))
    started = time.monotonic()
    done = smartbike("--config", str(conf), "--timeout", "20", "set", "fan", "1", timeout=30)
    assert done.returncode == 2 and time.monotonic() - started < 10
    assert f"TLS failure with 127.0.0.1:{broker.port}: the broker's certificate is not " \
           "trusted" in done.stderr, done.stderr


def test_watch_gives_up_after_the_timeout_when_nothing_connects():
    # Something accepts the TCP connection but never speaks MQTT.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        done = smartbike("--host", "127.0.0.1", "--port", str(port), "--timeout", "1",
                         "watch", timeout=30)
    assert done.returncode == 2 and time.monotonic() - started < 10
    assert f"cannot connect to the broker at 127.0.0.1:{port} within 1 s" in done.stderr


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


def test_watch_redraws_in_place_on_a_terminal(broker, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
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


def test_clean_escapes_what_a_terminal_would_obey():
    assert cli.clean("a\x1b[2Jb\x07\x9b\u202e\u0301\tz") == "a\\e[2Jb\\x07\\x9b\\u202e\\u0301\\tz"
    assert cli.clean("x" * 100, 10) == "xxxxxxx..."
    assert cli.clean("\x1b" * 1_000_000, 8) == "\\e\\e..."
    assert cli.clean("漢字漢字", 5) == "漢..."
