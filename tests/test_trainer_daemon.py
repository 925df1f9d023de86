"""Trainer modes through the real daemon: topics, mode report, refusals, leaving ERG."""

from __future__ import annotations

import json

from tests.conftest import bike_config, retained
from tests.test_daemon import send
from tests.test_simulator import FULL

TRAINER = FULL + "\n[trainer]\nenabled = true\n"


def start(run_daemon, broker, probe, body: str = TRAINER):
    daemon = run_daemon(bike_config(broker, body), "--simulate", "--seed", "3")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    # ERG needs a fresh power reading: wait for the virtual rider's first one.
    probe.json("bike/000001/power/report")
    return daemon


def test_target_power_enters_erg_moves_resistance_and_a_resistance_command_leaves(
        broker, probe, run_daemon):
    start(run_daemon, broker, probe)
    mode = probe.json("bike/000001/mode/report")
    assert mode["mode"] == "resistance"
    mark = len(probe.messages)
    send(broker, "bike/000001/targetpower/control", b'{"targetpower": 220}')
    erg = probe.json("bike/000001/mode/report", lambda d: d["mode"] == "erg", after=mark)
    assert erg["target"] == 220.0
    # The trainer moves resistance through the ordinary command path.
    probe.json("bike/000001/resistance/report", after=mark, timeout=15)
    mark = len(probe.messages)
    send(broker, "bike/000001/resistance/control", b"10")
    probe.json("bike/000001/mode/report", lambda d: d["mode"] == "resistance", after=mark)
    probe.json("bike/000001/resistance/report", lambda d: d["value"] == 10.0, after=mark)


def test_a_grade_enters_simulation_and_bad_road_values_are_refused(broker, probe, run_daemon):
    start(run_daemon, broker, probe)
    probe.json("bike/000001/speed/report")
    mark = len(probe.messages)
    send(broker, "bike/000001/grade/control", b'{"value": 4, "wind": 2.0, "crr": 0.005}')
    sim = probe.json("bike/000001/mode/report", lambda d: d["mode"] == "sim", after=mark)
    assert sim["target"] == 4.0 and sim["params"]["wind"] == 2.0
    mark = len(probe.messages)
    send(broker, "bike/000001/grade/control", b'{"value": 4, "crr": -1}')
    refusal = probe.json("bike/000001/grade/status", after=mark)
    assert refusal["ok"] is False and "crr" in refusal["error"]


def test_without_a_trainer_target_power_is_refused(broker, probe, run_daemon):
    start(run_daemon, broker, probe, FULL)
    mark = len(probe.messages)
    send(broker, "bike/000001/targetpower/control", b"200")
    refusal = probe.json("bike/000001/targetpower/status", after=mark)
    assert refusal["ok"] is False
    assert not [m for m in probe.messages if m.topic == "bike/000001/mode/report"
                and json.loads(m.payload).get("mode") == "erg"]


def test_home_assistant_discovery_is_retained_and_sent_again_when_it_restarts(
        broker, probe, run_daemon):
    probe.subscribe("homeassistant/#")
    run_daemon(bike_config(broker, FULL + "\n[homeassistant]\nenabled = true\n"),
               "--simulate")
    config = probe.wait_for("homeassistant/sensor/smartbike_000001_power/config")
    assert json.loads(config.payload)["state_topic"] == "bike/000001/power/report"
    assert retained(broker, "homeassistant/sensor/smartbike_000001_power/config")
    mark = len(probe.messages)
    send(broker, "homeassistant/status", b"online")
    probe.wait_for("homeassistant/sensor/smartbike_000001_power/config", after=mark)
    # The status message is Home Assistant's, not a command: nothing is refused for it.
    send(broker, "bike/000001/fan/control", b"5")
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 5.0, after=mark)
    assert not [m for m in probe.messages[mark:] if m.topic.endswith("/status")
                and m.topic.startswith("bike/") and m.topic != "bike/000001/status"]


def test_commands_reach_the_trainer_in_the_order_they_were_sent(broker, probe, run_daemon):
    # An app's resistance (which leaves ERG) and then a target power (which enters it),
    # published back to back on one connection: whatever the daemon reads them in one
    # go or two, the bike ends in ERG at the new target.
    start(run_daemon, broker, probe)
    mark = len(probe.messages)
    probe.client.publish("bike/000001/resistance/control", b"10", qos=1)
    probe.client.publish("bike/000001/targetpower/control", b'{"targetpower": 180}', qos=1)
    erg = probe.json("bike/000001/mode/report", lambda d: d["mode"] == "erg", after=mark)
    assert erg["target"] == 180.0
    # ERG moves resistance itself: by then a resistance command handled after the
    # target power would have left ERG again.
    probe.json("bike/000001/resistance/report", lambda d: d["value"] != 10.0, after=mark,
               timeout=15)
    modes = [json.loads(m.payload)["mode"] for m in probe.messages[mark:]
             if m.topic == "bike/000001/mode/report"]
    assert modes[-1] == "erg", modes
