"""Home Assistant MQTT discovery: the bike as one device with its sensors and controls.

:func:`discovery` lists the retained discovery messages for a bike's config (one per
entity, Home Assistant's "single component discovery"); the service publishes them
on connect and again whenever ``{prefix}/status`` says ``online`` (Home Assistant
restarted). Every entity points at the bike's existing topics: sensors read the
report JSON, numbers and the fan command the existing control topics (so every
command goes through the same checks and refusals as an app's), the buttons are an
event entity. Availability reads ``bike/{id}/status`` through a template, so both
``offline`` (a clean stop) and ``lost`` (the Last Will) show as unavailable.

The key names and their meaning follow Home Assistant's MQTT documentation (sensor,
number, fan, event and the discovery page); tests check every payload against a
table of those documented keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smartbiked import __version__
from smartbiked.topics import availability_topic, topic_path

if TYPE_CHECKING:
    from smartbiked.config import Config

#: Availability: Home Assistant compares the rendered template with "online"/"offline";
#: the bike's own payloads are online, offline and lost.
AVAILABILITY_TEMPLATE = "{{ 'online' if value == 'online' else 'offline' }}"
#: Sensors: (topic, name, device_class, unit, icon). Home Assistant has no device class
#: for cadence or heart rate; their units are its usual spellings.
SENSORS = (
    ("speed", "Speed", "speed", "m/s", None),
    ("cadence", "Cadence", None, "rpm", "mdi:rotate-right"),
    ("power", "Power", "power", "W", None),
    ("heartrate", "Heart rate", None, "bpm", "mdi:heart-pulse"),
)


@dataclass(frozen=True)
class HomeAssistantSettings:
    """The ``[homeassistant]`` table."""

    enabled: bool = False
    prefix: str = "homeassistant"
    name: str = ""


def status_topic(settings: HomeAssistantSettings) -> str:
    """Where Home Assistant says ``online`` when it (re)starts: republish discovery then."""
    return f"{settings.prefix}/status"


def _node(config: Config) -> str:
    # [a-zA-Z0-9_-] only, as discovery topics require; bike ids may hold other characters.
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in config.bike_id)
    return f"smartbike_{safe}"


def _base(config: Config, key: str, name: str) -> dict[str, Any]:
    """What every entity carries: name, unique id, the device, origin, availability."""
    ha = config.homeassistant
    node = _node(config)
    return {
        "name": name,
        "unique_id": f"{node}_{key}",
        "device": {
            "identifiers": [node],
            "name": ha.name or f"Smartbike {config.bike_id}",
            "manufacturer": "Smartbike",
            "model": "Smartbike",
            "sw_version": __version__,
        },
        "origin": {"name": "smartbiked", "sw_version": __version__},
        "availability": [{"topic": availability_topic(config.bike_id),
                          "value_template": AVAILABILITY_TEMPLATE}],
    }


def _topic(config: Config, component: str, key: str) -> str:
    node = _node(config)
    return f"{config.homeassistant.prefix}/{component}/{node}_{key}/config"


def _interval(options: Any) -> float:
    return float(options.get("interval", 1.0)) if hasattr(options, "get") else 1.0


def discovery(config: Config) -> list[tuple[str, dict[str, Any]]]:
    """Every discovery message (topic, payload) for this bike; empty when disabled."""
    if not config.homeassistant.enabled:
        return []
    bike = config.bike_id
    drivers = {d.topic: d for d in config.drivers}
    limits = config.control_limits()
    out: list[tuple[str, dict[str, Any]]] = []

    for topic, name, device_class, unit, icon in SENSORS:
        if topic not in drivers:
            continue
        body = _base(config, topic, name)
        body.update({
            "state_topic": topic_path(bike, topic, "report"),
            "value_template": "{{ value_json.value }}",
            "unit_of_measurement": unit,
            "state_class": "measurement",
            # Three missed reports and Home Assistant shows the value as unavailable.
            "expire_after": max(5, math.ceil(3 * _interval(drivers[topic].options))),
        })
        if device_class:
            body["device_class"] = device_class
        if icon:
            body["icon"] = icon
        out.append((_topic(config, "sensor", topic), body))

    numbers = (
        # topic, name, unit, device class, icon, the trainer mode it is the target of
        ("incline", "Incline", "°", None, "mdi:slope-uphill", None),
        ("resistance", "Resistance", "%", None, "mdi:weight", None),
        ("targetpower", "Target power", "W", "power", "mdi:target", "erg"),
        ("grade", "Grade", "%", None, "mdi:terrain", "sim"),
    )
    for topic, name, unit, device_class, icon, mode in numbers:
        if topic not in limits:
            continue
        lim = limits[topic]
        body = _base(config, topic, name)
        body.update({
            # Home Assistant publishes the bare number (not retained, the default):
            # a shape every control topic accepts.
            "command_topic": topic_path(bike, topic, "control"),
            "min": lim.low,
            "max": lim.high,
            "step": lim.step or (1 if topic in ("resistance", "targetpower") else 0.1),
            "unit_of_measurement": unit,
            "mode": "box" if topic == "targetpower" else "slider",
            "icon": icon,
        })
        if device_class:
            body["device_class"] = device_class
        if mode is None:
            body["state_topic"] = topic_path(bike, topic, "report")
            body["value_template"] = "{{ value_json.value }}"
        else:
            # The mode report carries the target; outside that mode the number is
            # "None", which a number treats as unknown (payload_reset).
            body["state_topic"] = topic_path(bike, "mode", "report")
            body["value_template"] = (
                f"{{{{ value_json.target if value_json.mode == '{mode}' else 'None' }}}}")
        out.append((_topic(config, "number", topic), body))

    if "targetpower" in limits or "grade" in limits:
        body = _base(config, "mode", "Trainer mode")
        body.update({
            "state_topic": topic_path(bike, "mode", "report"),
            "value_template": "{{ value_json.mode }}",
            "device_class": "enum",
            "options": ["resistance", "erg", "sim"],
            "icon": "mdi:bike",
        })
        out.append((_topic(config, "sensor", "mode"), body))

    if "fan" in limits:
        body = _base(config, "fan", "Fan")
        fan = topic_path(bike, "fan", "control")
        report = topic_path(bike, "fan", "report")
        body.update({
            # On and off are plain numbers too, so no template has to run in between.
            "command_topic": fan,
            "payload_on": "100",
            "payload_off": "0",
            "state_topic": report,
            "state_value_template": "{{ '100' if value_json.value > 0 else '0' }}",
            "percentage_command_topic": fan,
            "percentage_state_topic": report,
            "percentage_value_template": "{{ value_json.value | round(0) | int }}",
            "speed_range_min": 1,
            "speed_range_max": 100,
            # A fan's commands are retained by default; the bike ignores retained
            # commands (a stale one must never move a motor at boot).
            "retain": False,
        })
        out.append((_topic(config, "fan", "fan"), body))

    if "button" in drivers:
        buttons = sorted(drivers["button"].options.get("pins", {}))
        body = _base(config, "button", "Handlebar")
        body.update({
            "state_topic": topic_path(bike, "button", "report"),
            # {"button": "LEFT", "state": 1} -> {"event_type": "left_press"}
            "value_template": (
                '{"event_type": "{{ value_json.button | lower }}_'
                "{{ 'press' if value_json.state == 1 else 'release' }}\"}"),
            "event_types": [f"{b.lower()}_{what}" for b in buttons
                            for what in ("press", "release")],
            "device_class": "button",
        })
        out.append((_topic(config, "event", "button"), body))
    return out


def stale_topics(config: Config) -> list[str]:
    """Discovery topics this bike may have published before but does not now.

    Publishing an empty retained payload to each removes an entity a reload (or
    ``enabled = false``) took away; Home Assistant ignores removals of unknown ones.
    """
    current = {topic for topic, _ in discovery(config)}
    candidates = [_topic(config, "sensor", t) for t, *_ in SENSORS]
    candidates += [_topic(config, "number", t)
                   for t in ("incline", "resistance", "targetpower", "grade")]
    candidates += [_topic(config, "sensor", "mode"), _topic(config, "fan", "fan"),
                   _topic(config, "event", "button")]
    return [t for t in candidates if t not in current]

