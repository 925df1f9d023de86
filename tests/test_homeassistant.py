"""Home Assistant discovery: every payload against the documented schema, the templates
against the bike's real payloads, and the numbers' command topics driven end to end.

The schema below is written from Home Assistant's MQTT documentation (the discovery
page, and the sensor, number, fan and event platform pages): which keys each platform
documents, which are required, their types, and the abbreviations discovery accepts.
Templates are rendered with Jinja2, the engine Home Assistant's templates are made of.
"""

from __future__ import annotations

import json
import re
import textwrap

import jinja2
import pytest

from smartbiked import config as configuration
from smartbiked.homeassistant import (
    AVAILABILITY_TEMPLATE,
    HomeAssistantSettings,
    discovery,
    stale_topics,
    status_topic,
)
from smartbiked.topics import (
    Command,
    Refusal,
    button_payload,
    mode_payload,
    parse_command,
    report_payload,
)
from tests.conftest import MOTORS, bike_config

# -- the documented schema --------------------------------------------------------------

#: Keys every MQTT entity platform documents, with their types.
COMMON = {
    "availability": list, "availability_mode": str, "availability_template": str,
    "availability_topic": str, "device": dict, "enabled_by_default": bool, "encoding": str,
    "entity_category": str, "entity_picture": str, "icon": str,
    "json_attributes_template": str, "json_attributes_topic": str, "name": (str, type(None)),
    "object_id": str, "origin": dict, "payload_available": str,
    "payload_not_available": str, "qos": int, "unique_id": str,
}
PLATFORMS = {
    "sensor": ({"state_topic"}, {
        "device_class": (str, type(None)), "expire_after": int, "force_update": bool,
        "last_reset_value_template": str, "options": list, "suggested_display_precision": int,
        "state_class": str, "state_topic": str, "unit_of_measurement": (str, type(None)),
        "value_template": str}),
    "number": ({"command_topic"}, {
        "command_template": str, "command_topic": str, "device_class": (str, type(None)),
        "max": (int, float), "min": (int, float), "mode": str, "optimistic": bool,
        "payload_reset": str, "retain": bool, "state_topic": str, "step": (int, float),
        "unit_of_measurement": (str, type(None)), "value_template": str}),
    "fan": ({"command_topic"}, {
        "command_template": str, "command_topic": str, "direction_command_template": str,
        "direction_command_topic": str, "direction_state_topic": str,
        "direction_value_template": str, "optimistic": bool,
        "oscillation_command_template": str, "oscillation_command_topic": str,
        "oscillation_state_topic": str, "oscillation_value_template": str,
        "payload_off": str, "payload_on": str, "payload_oscillation_off": str,
        "payload_oscillation_on": str, "payload_reset_percentage": str,
        "payload_reset_preset_mode": str, "percentage_command_template": str,
        "percentage_command_topic": str, "percentage_state_topic": str,
        "percentage_value_template": str, "preset_mode_command_template": str,
        "preset_mode_command_topic": str, "preset_mode_state_topic": str,
        "preset_mode_value_template": str, "preset_modes": list, "retain": bool,
        "speed_range_max": int, "speed_range_min": int, "state_topic": str,
        "state_value_template": str}),
    "event": ({"state_topic", "event_types"}, {
        "device_class": (str, type(None)), "event_types": list, "state_topic": str,
        "value_template": str}),
}
DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer",
               "model", "model_id", "name", "serial_number", "suggested_area", "sw_version",
               "via_device"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
#: A few of the documented abbreviations (a payload may use either spelling, never both).
ABBREVIATIONS = {"avty": "availability", "avty_t": "availability_topic",
                 "avty_tpl": "availability_template", "cmd_t": "command_topic",
                 "dev": "device", "dev_cla": "device_class", "evt_typ": "event_types",
                 "exp_aft": "expire_after", "ic": "icon", "o": "origin",
                 "pct_cmd_t": "percentage_command_topic", "stat_cla": "state_class",
                 "stat_t": "state_topic", "uniq_id": "unique_id",
                 "unit_of_meas": "unit_of_measurement", "val_tpl": "value_template",
                 "ret": "retain", "pl_on": "payload_on", "pl_off": "payload_off"}
#: Sensor device classes and the units the sensor page allows for them.
SENSOR_UNITS = {"speed": {"ft/s", "in/d", "in/h", "in/s", "km/h", "kn", "m/s", "mph", "mm/d",
                          "mm/s"},
                "power": {"mW", "W", "kW", "MW", "GW", "TW"}, "enum": {None}}
STATE_CLASSES = {"measurement", "total", "total_increasing", "measurement_angle"}
TOPIC = re.compile(r"^(?P<prefix>.+)/(?P<platform>[a-z_]+)/(?:[A-Za-z0-9_-]+/)?"
                   r"(?P<object>[A-Za-z0-9_-]+)/config$")


def schema_problems(topic: str, payload: dict) -> list[str]:
    """Why ``payload`` on ``topic`` is not a valid single-component discovery message."""
    found = []
    match = TOPIC.match(topic)
    if not match:
        return [f"{topic}: not <prefix>/<platform>/[<node>/]<object>/config"]
    platform = match["platform"]
    if platform not in PLATFORMS:
        return [f"{topic}: platform {platform} not covered"]
    required, specific = PLATFORMS[platform]
    allowed = {**COMMON, **specific}
    keys = {}
    for key, value in payload.items():
        full = ABBREVIATIONS.get(key, key)
        if full in keys:
            found.append(f"{key}: given twice (abbreviated and not)")
        keys[full] = value
    for key, value in keys.items():
        if key == "platform":
            found.append("platform: only for device-based discovery")
        elif key not in allowed:
            found.append(f"{key}: not a documented {platform} key")
        elif not isinstance(value, allowed[key]) or (
                allowed[key] in (int, (int, float)) and isinstance(value, bool)):
            found.append(f"{key}: {type(value).__name__} is not {allowed[key]}")
    found += [f"{key}: required" for key in required - keys.keys()]
    device = keys.get("device", {})
    if not set(device) <= DEVICE_KEYS or not device.get("identifiers"):
        found.append(f"device: {sorted(device)} (identifiers required, documented keys only)")
    origin = keys.get("origin", {})
    if not set(origin) <= ORIGIN_KEYS or "name" not in origin:
        found.append(f"origin: {sorted(origin)}")
    if "availability" in keys and "availability_topic" in keys:
        found.append("availability and availability_topic are exclusive")
    for entry in keys.get("availability", []):
        if not set(entry) <= AVAILABILITY_KEYS or "topic" not in entry:
            found.append(f"availability entry {sorted(entry)}")
    if "unique_id" not in keys:
        found.append("unique_id: needed for the device registry")
    if platform == "sensor":
        if keys.get("options") is not None and (keys.get("device_class") != "enum" or {
                "state_class", "unit_of_measurement"} & keys.keys()):
            found.append("options: only with device_class enum, no state_class or unit")
        if "device_class" in keys and keys.get("unit_of_measurement") not in SENSOR_UNITS.get(
                keys["device_class"], {keys.get("unit_of_measurement")}):
            found.append(f"unit {keys.get('unit_of_measurement')} not for {keys['device_class']}")
        if "state_class" in keys and keys["state_class"] not in STATE_CLASSES:
            found.append(f"state_class {keys['state_class']}")
        if isinstance(keys.get("expire_after"), int) and keys["expire_after"] <= 0:
            found.append("expire_after must be positive")
    if platform == "number":
        if keys.get("mode", "auto") not in ("auto", "box", "slider"):
            found.append(f"mode {keys['mode']}")
        if isinstance(keys.get("step"), (int, float)) and keys["step"] < 0.001:
            found.append("step below 0.001")
    return found


# -- rendering as Home Assistant does ----------------------------------------------------------

ENV = jinja2.Environment(undefined=jinja2.StrictUndefined)


def render(template: str, payload: str | bytes) -> str:
    """A state template applied to one MQTT payload (``value`` and ``value_json``)."""
    text = payload.decode() if isinstance(payload, bytes) else payload
    try:
        value_json = json.loads(text)
    except ValueError:
        value_json = None
    return ENV.from_string(template).render(value=text, value_json=value_json)


# -- a bike with everything ---------------------------------------------------------------------

EVERYTHING = """
[homeassistant]
enabled = true
[trainer]
enabled = true
max_power = 1000
[serial.board]
url = "loop://"
[speed]
driver = "gpio_pulse"
pin = 5
interval = 2.0
[cadence]
driver = "gpio_pulse"
pin = 6
[power]
driver = "serial_sensor"
port = "board"
[heartrate]
driver = "serial_sensor"
port = "board"
interval = 0.5
[fan]
driver = "gpio_pwm"
pin = 12
[resistance]
driver = "gpio_pwm"
pin = 13
max = 80
[incline]
driver = "serial_actuator"
port = "board"
[button]
driver = "gpio_buttons"
pins = { LEFT = 17, RIGHT = 27 }
"""


def load(tmp_path, body: str, bike: str = 'id = "000001"') -> configuration.Config:
    path = tmp_path / "bike.toml"
    path.write_text(f"[bike]\n{bike}\n" + textwrap.dedent(body))
    return configuration.load(path, environ={})


@pytest.fixture
def everything(tmp_path) -> configuration.Config:
    return load(tmp_path, EVERYTHING)


def by_object(messages: list) -> dict[str, dict]:
    return {TOPIC.match(t)["object"].removeprefix("smartbike_000001_"): p for t, p in messages}


def test_every_payload_follows_the_documented_schema(everything):
    messages = discovery(everything)
    assert messages
    for topic, payload in messages:
        assert schema_problems(topic, payload) == [], topic
        json.dumps(payload)  # it must go on the wire
    ids = [p["unique_id"] for _, p in messages]
    assert len(set(ids)) == len(ids)
    # One device for all of them.
    assert len({json.dumps(p["device"], sort_keys=True) for _, p in messages}) == 1


def test_the_schema_check_itself_catches_mistakes():
    good = {"state_topic": "a", "unique_id": "u", "device": {"identifiers": ["x"]},
            "origin": {"name": "o"}}
    assert schema_problems("homeassistant/sensor/x/config", good) == []
    assert schema_problems("homeassistant/sensor/x/config", {**good, "stat_t": "b"})
    assert schema_problems("homeassistant/sensor/x/config", {**good, "colour": "red"})
    assert schema_problems("homeassistant/number/x/config", good)            # no command_topic
    assert schema_problems("homeassistant/sensor/x y/config", good)
    assert schema_problems("homeassistant/sensor/x/config", {**good, "expire_after": "5"})
    assert schema_problems("homeassistant/sensor/x/config",
                           {**good, "device_class": "speed", "unit_of_measurement": "rpm"})
    assert schema_problems("homeassistant/event/x/config", {**good})         # no event_types


def test_the_entities_are_the_bikes(everything):
    entities = by_object(discovery(everything))
    assert set(entities) == {"speed", "cadence", "power", "heartrate", "incline", "resistance",
                             "targetpower", "grade", "mode", "fan", "button"}
    assert entities["speed"]["device_class"] == "speed"
    assert entities["speed"]["unit_of_measurement"] == "m/s"
    assert entities["power"]["device_class"] == "power"
    assert entities["cadence"]["unit_of_measurement"] == "rpm"
    assert all(entities[s]["state_class"] == "measurement"
               for s in ("speed", "cadence", "power", "heartrate"))
    # Stale after three missed reports (interval 2 s and 0.5 s; never under 5 s).
    assert entities["speed"]["expire_after"] == 6
    assert entities["heartrate"]["expire_after"] == 5
    assert (entities["resistance"]["min"], entities["resistance"]["max"]) == (0, 80)
    assert (entities["incline"]["min"], entities["incline"]["max"],
            entities["incline"]["step"]) == (-10, 19, 0.5)
    assert (entities["targetpower"]["min"], entities["targetpower"]["max"]) == (0, 1000)
    assert entities["button"]["event_types"] == ["left_press", "left_release",
                                                 "right_press", "right_release"]
    # The fan's commands would be retained by default; the bike ignores retained commands.
    assert entities["fan"]["retain"] is False
    assert all(p.get("retain", False) is False for p in entities.values())


def test_only_what_the_bike_has_is_discovered(tmp_path):
    cfg = load(tmp_path, """
        [homeassistant]
        enabled = true
        name = "Lab bike"
        [fan]
        driver = "gpio_pwm"
        pin = 12
        """, bike='id = "lab.7"\nid_pattern = "lab[.][0-9]+"')
    messages = discovery(cfg)
    assert [TOPIC.match(t)["platform"] for t, _ in messages] == ["fan"]
    topic, payload = messages[0]
    assert topic == "homeassistant/fan/smartbike_lab_7_fan/config"  # a safe object id
    assert payload["device"]["name"] == "Lab bike"
    assert payload["command_topic"] == "bike/lab.7/fan/control"
    assert len(stale_topics(cfg)) == 10 and topic not in stale_topics(cfg)


def test_nothing_is_published_when_disabled(tmp_path):
    cfg = load(tmp_path, EVERYTHING.replace("[homeassistant]\nenabled = true",
                                            "[homeassistant]\nprefix = \"ha\""))
    assert discovery(cfg) == []
    assert all(t.startswith("ha/") for t in stale_topics(cfg))
    assert status_topic(cfg.homeassistant) == "ha/status"
    assert status_topic(HomeAssistantSettings()) == "homeassistant/status"


@pytest.mark.parametrize(("payload", "available"), [
    ("online", True), ("offline", False), ("lost", False), ("", False)])
def test_availability_treats_offline_and_lost_alike(everything, payload, available):
    for _, body in discovery(everything):
        (entry,) = body["availability"]
        assert entry["topic"] == "bike/000001/status"
        assert render(entry["value_template"], payload) == ("online" if available
                                                            else "offline")
    assert AVAILABILITY_TEMPLATE in json.dumps(discovery(everything)[0][1])


def test_state_templates_read_the_bikes_own_payloads(everything):
    entities = by_object(discovery(everything))
    report = json.dumps(report_payload(87.5, "RPM", 1.0, "bike"))
    assert render(entities["cadence"]["value_template"], report) == "87.5"
    assert render(entities["resistance"]["value_template"], report) == "87.5"
    erg = json.dumps(mode_payload({"mode": "erg", "target": 210.0}, 1.0, "bike"))
    sim = json.dumps(mode_payload({"mode": "sim", "target": 4.5, "params": {"wind": 2}},
                                  1.0, "bike"))
    manual = json.dumps(mode_payload({"mode": "resistance", "target": 30.0}, 1.0, "bike"))
    assert render(entities["targetpower"]["value_template"], erg) == "210.0"
    assert render(entities["targetpower"]["value_template"], sim) == "None"  # unknown there
    assert render(entities["grade"]["value_template"], sim) == "4.5"
    assert render(entities["grade"]["value_template"], manual) == "None"
    assert render(entities["mode"]["value_template"], manual) == "resistance"
    assert set(entities["mode"]["options"]) == {"erg", "sim", "resistance"}
    fan = json.dumps(report_payload(60.0, "percentage", 1.0, "bike"))
    off = json.dumps(report_payload(0.0, "percentage", 1.0, "bike"))
    assert render(entities["fan"]["percentage_value_template"], fan) == "60"
    assert render(entities["fan"]["state_value_template"], fan) == entities["fan"]["payload_on"]
    assert render(entities["fan"]["state_value_template"], off) == entities["fan"]["payload_off"]
    events = entities["button"]
    for button, pressed in (("LEFT", True), ("RIGHT", False)):
        rendered = json.loads(render(events["value_template"],
                                     json.dumps(button_payload(button, pressed, 1.0))))
        assert rendered["event_type"] in events["event_types"]
        assert rendered["event_type"] == f"{button.lower()}_{'press' if pressed else 'release'}"


def ha_number_payload(value: float) -> bytes:
    """What Home Assistant's MQTT number publishes: an int when whole, else the float."""
    return str(int(value) if float(value).is_integer() else value).encode()


def test_every_command_home_assistant_sends_is_accepted(everything):
    entities = by_object(discovery(everything))
    limits = everything.control_limits()
    for name in ("incline", "resistance", "targetpower", "grade"):
        number = entities[name]
        for value in (number["min"], number["max"], number["min"] + number["step"]):
            result = parse_command(number["command_topic"], ha_number_payload(value),
                                   everything.bike_id, limits)
            assert result == Command(name, float(value)), (name, value, result)
        beyond = parse_command(number["command_topic"], ha_number_payload(number["max"] + 1),
                               everything.bike_id, limits)
        assert isinstance(beyond, Refusal)
    fan = entities["fan"]
    for payload in (fan["payload_on"], fan["payload_off"], "1", "100"):
        assert isinstance(parse_command(fan["command_topic"], payload.encode(),
                                        everything.bike_id, limits), Command)


# -- end to end: a running daemon, commands as Home Assistant sends them ------------------------

def test_home_assistants_commands_move_the_bike_and_its_state_comes_back(
        tmp_path, broker, probe, run_daemon):
    from smartbiked.fakeboard import FakeBoard
    from tests.test_daemon import send

    with FakeBoard(tmp_path, "usb-motors", responder=lambda line: f"OK {line}") as motors:
        text = bike_config(broker, textwrap.dedent("""
            [homeassistant]
            enabled = true
            [fan]
            driver = "gpio_pwm"
            pin = 12
            """) + MOTORS.format(url=motors.path, min_interval=0))
        daemon = run_daemon(text)
        cfg = configuration.load(daemon.config, environ={})
        probe.wait_for("bike/000001/status", lambda m: m.payload == b"online", timeout=20)
        entities = by_object(discovery(cfg))
        assert {"incline", "resistance", "fan"} <= entities.keys()

        def drive(command_topic: str, payload: bytes, state_topic: str, template: str,
                  expected: str) -> None:
            mark = len(probe.messages)
            send(broker, command_topic, payload)  # not retained, as Home Assistant sends
            probe.wait_for(state_topic, lambda m: render(template, m.payload) == expected,
                           after=mark)

        for name, value in (("incline", 5.5), ("resistance", 40), ("incline", -2)):
            number = entities[name]
            drive(number["command_topic"], ha_number_payload(value), number["state_topic"],
                  number["value_template"], str(float(value)))
        fan = entities["fan"]
        drive(fan["percentage_command_topic"], b"60", fan["percentage_state_topic"],
              fan["percentage_value_template"], "60")
        drive(fan["command_topic"], fan["payload_off"].encode(), fan["state_topic"],
              fan["state_value_template"], fan["payload_off"])
        drive(fan["command_topic"], fan["payload_on"].encode(), fan["state_topic"],
              fan["state_value_template"], fan["payload_on"])
