"""smartbiked end to end: a real subprocess, a real broker, a fake systemd notify socket."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smartbiked.errors import EX_CONFIG
from smartbiked.fakeboard import FakeBoard
from tests.conftest import MOTORS, ROOT, bike_config, daemon_env, wait_until

FAN = """
[fan]
driver = "gpio_pwm"
pin = 12
"""


def heartrate(board_path) -> str:
    return f"""
[serial.arduino]
url = "{board_path}"
format = "number"

[heartrate]
driver = "serial_sensor"
port = "arduino"
scale = 0.5
interval = 0.2
"""


def send(broker, topic, payload, retain=False, properties=None):
    """Publish as an app would, from a short-lived connection of its own."""
    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    app.connect(broker.host, broker.port)
    app.loop_start()
    try:
        app.publish(topic, payload, qos=1, retain=retain,
                    properties=properties).wait_for_publish(5)
    finally:
        app.disconnect()
        app.loop_stop()


def retained(broker, topic: str) -> tuple[bool, bytes]:
    """What an app connecting now first gets on ``topic``: (retain flag, payload)."""
    got: list[tuple[bool, bytes]] = []
    arrived = threading.Event()

    def on_message(client, userdata, msg):
        got.append((msg.retain, msg.payload))
        arrived.set()

    late = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    late.on_message = on_message
    late.connect(broker.host, broker.port)
    late.subscribe(topic, qos=1)
    late.loop_start()
    try:
        assert arrived.wait(10), f"nothing retained on {topic}"
    finally:
        late.disconnect()
        late.loop_stop()
    return got[0]


def everything_sent(notify) -> list[str]:
    """All the daemon told systemd so far: a marker sent after it is read after it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"X_TEST_MARK=1", notify.path)
    notify.wait_for("X_TEST_MARK=1")
    return list(notify.lines)


@pytest.fixture
def board(tmp_path):
    with FakeBoard(tmp_path) as b:
        yield b


def test_ready_reports_commands_refusals_and_clean_stop(broker, probe, run_daemon, board):
    daemon = run_daemon(bike_config(broker, FAN + heartrate(board.path)))
    daemon.notify.wait_for("READY=1")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")

    # A sensor reading crosses serial -> driver -> scheduler -> MQTT, scaled.
    board.send_line("144")
    report = probe.json("bike/000001/heartrate/report", lambda d: d["value"] == 72.0)
    assert report["unitName"] == "BPM" and report["metadata"] == {"deviceName": "testbike"}
    assert abs(report["timestamp"] - time.time()) < 30

    # A legacy command shape moves the fan and the new value is reported.
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", '{"level": 3}')
    fan = probe.json("bike/000001/fan/report", after=mark)
    assert fan["value"] == 60.0 and fan["unitName"] == "percentage"
    # An actuator's report is retained: an app that starts now still learns the fan's state.
    flag, payload = retained(broker, "bike/000001/fan/report")
    assert flag is True and json.loads(payload)["value"] == 60.0

    # A bad command is refused on the status sub-topic and moves nothing.
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", '{"value": 150}')
    refusal = probe.json("bike/000001/fan/status", after=mark)
    assert refusal["ok"] is False and "out of range" in refusal["error"]
    assert refusal["allowed"] == {"min": 0.0, "max": 100.0, "step": 0.0}
    # A good command sent after it is a barrier: once its report is in, anything the bad
    # one caused would have shown up before it.
    send(broker, "bike/000001/fan/control", "20")
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 20.0, after=mark)
    moved = [json.loads(m.payload)["value"] for m in probe.messages[mark:]
             if m.topic == "bike/000001/fan/report"]
    assert moved == [20.0]

    # SIGTERM: STOPPING, fan to its safe value (reported), offline retained, exit 0.
    mark = len(probe.messages)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    daemon.notify.wait_for("STOPPING=1")
    assert probe.json("bike/000001/fan/report", after=mark)["value"] == 0.0
    offline = probe.wait_for("bike/000001/status", lambda m: m.payload == b"offline", after=mark)
    assert offline.payload == b"offline"


def test_availability_is_retained_and_a_crash_says_lost(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    assert retained(broker, "bike/000001/status") == (True, b"online")
    mark = len(probe.messages)
    daemon.signal(signal.SIGKILL)  # no goodbye: the broker publishes the Last Will
    daemon.wait(10)
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"lost", after=mark,
                   timeout=20)
    # An app that starts after the crash learns it too: the will is retained.
    assert retained(broker, "bike/000001/status") == (True, b"lost")


def test_only_own_control_topics_and_no_retained_commands(broker, probe, run_daemon):
    # A retained command left on the broker must not move the fan at boot.
    send(broker, "bike/000001/fan/control", "80", retain=True)
    daemon = run_daemon(bike_config(broker, FAN))
    daemon.notify.wait_for("READY=1")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    mark = len(probe.messages)
    send(broker, "bike/000002/fan/control", "70")          # another bike's command
    send(broker, "bike/000001/fan/control", "30")          # ours, sent after
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 30.0, after=mark)
    values = [json.loads(m.payload)["value"] for m in probe.messages
              if m.topic == "bike/000001/fan/report"]
    assert 80.0 not in values and 70.0 not in values
    assert "ignoring a retained command on bike/000001/fan/control" in daemon.output()
    assert not [m for m in probe.messages if m.topic == "bike/000002/fan/status"]


def test_v5_request_gets_its_correlated_answer(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    daemon.notify.wait_for("READY=1")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    for payload, corr in ((b"45", b"req-1"), (b"450", b"req-2")):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "bike/000001/reply/app"
        props.CorrelationData = corr
        send(broker, "bike/000001/fan/control", payload, properties=props)
    ok = probe.wait_for("bike/000001/reply/app",
                        lambda m: getattr(m.properties, "CorrelationData", None) == b"req-1")
    assert json.loads(ok.payload)["ok"] is True and json.loads(ok.payload)["value"] == 45.0
    bad = probe.wait_for("bike/000001/reply/app",
                         lambda m: getattr(m.properties, "CorrelationData", None) == b"req-2")
    assert json.loads(bad.payload)["ok"] is False
    assert "out of range" in json.loads(bad.payload)["error"]


def test_wildcard_response_topic_is_refused_and_the_daemon_carries_on(broker, probe,
                                                                      run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "apps/x/#"
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", b"50", properties=props)
    refusal = probe.json("bike/000001/fan/status", after=mark)
    assert "ResponseTopic must not contain wildcards" in refusal["error"]
    send(broker, "bike/000001/fan/control", b"20")
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 20.0, after=mark)
    values = [json.loads(m.payload)["value"] for m in probe.messages[mark:]
              if m.topic == "bike/000001/fan/report"]
    assert 50.0 not in values
    assert daemon.proc.poll() is None


def test_watchdog_pings_while_both_loops_live(broker, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN), WATCHDOG_USEC="200000")
    first = daemon.notify.wait_for("WATCHDOG=1")
    daemon.notify.wait_for("WATCHDOG=1", after=first + 1)  # keeps pinging


def test_ready_without_broker_and_prompt_stop(run_daemon):
    daemon = run_daemon(bike_config(None, FAN))  # nothing listens on that port
    daemon.notify.wait_for("READY=1")
    daemon.notify.wait_for("STATUS=connecting to 127.0.0.1*")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert time.monotonic() - started < 6
    daemon.notify.wait_for("STOPPING=1")


def test_reconnects_after_the_broker_restarts(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    first = daemon.notify.wait_for("STATUS=connected to*")
    broker.stop()
    daemon.notify.wait_for("STATUS=reconnecting to*", after=first)
    broker.start()
    daemon.notify.wait_for("STATUS=connected to*", after=first + 1, timeout=20)


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad(
        broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    daemon.notify.wait_for("READY=1")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")

    # Narrow the fan: 80 becomes a refusal after the reload.
    daemon.config.write_text(bike_config(broker, FAN + "max = 50\n"))
    mark = daemon.notify.wait_for("READY=1")
    daemon.signal(signal.SIGHUP)
    reloaded = daemon.notify.wait_for("STATUS=configuration reloaded", after=mark)
    m = len(probe.messages)
    send(broker, "bike/000001/fan/control", "80")
    assert "out of range" in probe.json("bike/000001/fan/status", after=m)["error"]

    # A broken file is refused; the running config (max 50) stays.
    daemon.config.write_text("[bike]\nid = 1\n")
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("STATUS=reload refused: configuration invalid", after=reloaded)
    m = len(probe.messages)
    send(broker, "bike/000001/fan/control", "40")
    assert probe.json("bike/000001/fan/report", after=m)["value"] == 40.0
    assert 'must be a quoted string such as "000001"' in daemon.output()
    assert daemon.proc.poll() is None


def test_bad_config_exits_78_and_says_not_ready(run_daemon):
    daemon = run_daemon("[bike]\nid = \"000001\"\n[broker]\nport = -1\n")
    assert daemon.wait(20) == EX_CONFIG
    assert "READY=1" not in everything_sent(daemon.notify)
    assert "[broker] port: must be a port number from 1 to 65535 (found -1)" in daemon.output()


def test_password_never_appears_in_logs(make_broker, run_daemon, tmp_path):
    broker = make_broker(users={"bike1": "right-secret"})
    pw = tmp_path / "pw"
    pw.write_text("wrong-secret-42\n")
    text = bike_config(broker, FAN).replace(
        "keepalive = 5", f'keepalive = 5\nusername = "bike1"\npassword_file = "{pw}"')
    daemon = run_daemon(text, "--log-level", "DEBUG")
    daemon.notify.wait_for("READY=1")
    wait_until(lambda: "refused the connection" in daemon.output(), 10, "the refusal logged")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert "wrong-secret-42" not in daemon.output()




@pytest.fixture
def motors(tmp_path):
    """A motor-controller board that acknowledges each command ("R40" -> "OK R40")."""
    with FakeBoard(tmp_path, "usb-motors", responder=lambda line: f"OK {line}") as b:
        yield b


@pytest.fixture
def whole_bike(broker, probe, run_daemon, motors):
    daemon = run_daemon(bike_config(broker, FAN + MOTORS.format(url=motors.path, min_interval=0)))
    daemon.notify.wait_for("READY=1")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    assert motors.next_line() == "R0"  # resistance to its safe value at boot
    for topic in ("fan", "resistance"):  # ...and both reported, before any test's mark
        probe.json(f"bike/000001/{topic}/report", lambda d: d["value"] == 0.0)
    return daemon


@pytest.mark.parametrize(("topic", "payload", "line", "value"), [
    ("fan", '{"value": 5.5}', None, 5.5),
    ("fan", '{"power": 60}', None, 60.0),
    ("fan", '{"level": 3}', None, 60.0),
    ("incline", '{"incline": 5.5}', "I5.5", 5.5),
    ("incline", "-10", "I-10", -10.0),
    ("resistance", '{"resistance": 40, "timestamp": 1722834170.6}', "R40", 40.0),
    ("resistance", "100", "R100", 100.0),
])
def test_each_legacy_shape_moves_the_right_actuator(broker, probe, whole_bike, motors,
                                                    topic, payload, line, value):
    mark = len(probe.messages)
    send(broker, f"bike/000001/{topic}/control", payload)
    probe.json(f"bike/000001/{topic}/report", lambda d: d["value"] == value, after=mark)
    if line is not None:
        assert motors.next_line() == line
    assert not [m for m in probe.messages[mark:] if m.topic.endswith("/status")]


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("incline", b"\xc3\x28", "not UTF-8"),
    ("incline", b"up", "neither JSON nor a number"),
    ("incline", b'{"incline": true}', "not a boolean"),
    ("incline", b'{"incline": "5"}', "not a string"),
    ("incline", b"NaN", "NaN is not a number"),
    ("incline", b"1e999", "finite"),
    ("incline", b"25", "out of range"),
    ("incline", b"2.3", "not on a step"),
    ("resistance", b"-1", "out of range"),
    ("resistance", b"7" * 600, "too large"),
    ("gear", b"3", "unknown topic"),
    ("cadence", b"90", "takes no commands"),
])
def test_each_bad_command_is_refused_and_moves_nothing(broker, probe, whole_bike, motors,
                                                       topic, payload, reason):
    mark = len(probe.messages)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "bike/000001/reply/bad"
    send(broker, f"bike/000001/{topic}/control", payload, properties=props)
    answer = probe.json("bike/000001/reply/bad", after=mark)
    assert answer["ok"] is False and reason in answer["error"]
    # A good command sent afterwards is the next thing the motor board sees.
    send(broker, "bike/000001/resistance/control", b"33")
    assert motors.next_line() == "R33"
    probe.json("bike/000001/resistance/report", lambda d: d["value"] == 33.0, after=mark)
    moved = [json.loads(m.payload)["value"] for m in probe.messages[mark:]
             if m.topic == f"bike/000001/{topic}/report"]
    assert set(moved) <= {33.0}, moved  # only the follow-up command moved anything
    status = [json.loads(m.payload) for m in probe.messages[mark:]
              if m.topic == f"bike/000001/{topic}/status"]
    if topic in ("incline", "resistance"):
        assert [s["error"] for s in status] == [answer["error"]]
    else:
        # A sensor's status topic carries its health; an unknown name is nobody's.
        assert status == []


def test_stops_promptly_when_the_broker_never_answers(run_daemon):
    # A TCP listener that accepts but never speaks MQTT: the CONNACK never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        daemon = run_daemon(bike_config(None, FAN, port=silent.getsockname()[1]))
        daemon.notify.wait_for("READY=1")
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
        assert time.monotonic() - started < 6


def test_a_machine_without_gpio_gets_one_line_not_four_warnings(broker, probe, tmp_path):
    """gpiozero warns once per back end it tries; the daemon says it once, with a hint."""
    cfg = tmp_path / "bike.toml"
    cfg.write_text(bike_config(broker, FAN))
    env = {k: v for k, v in daemon_env().items() if not k.startswith("GPIOZERO_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "smartbiked", "--config", str(cfg)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    finally:
        proc.terminate()
        err = proc.communicate(timeout=10)[1]
    assert "PinFactoryFallback" not in err and "warnings.warn" not in err, err
    # On a machine with GPIO (a Pi) there is nothing to say; elsewhere, one line.
    assert err.count("no GPIO on this machine") <= 1
    if "Unable to load any default pin factory" in err:
        assert err.count("no GPIO on this machine") == 1 and "--simulate" in err
