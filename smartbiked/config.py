"""One TOML file per bike -> typed, validated settings.

Every problem names the file, the table, the key, what is wrong and the value found
(never a secret), and all problems are reported together in one :class:`ConfigError`.
The old drivers' environment variables (``MQTT_HOSTNAME``, ``MQTT_PORT``,
``MQTT_USERNAME``, ``MQTT_PASSWORD``, ``DEVICE_ID``) override the file.

A value is echoed in an error only when its key is a known, non-secret key: a
misspelt ``pasword = "..."`` is named, its value never shown. Risky but working
settings (a password sent in clear, a secret file others can read) are not errors:
they are listed in :attr:`Config.warnings`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smartbiked.ble.settings import BACKENDS, BleSettings
from smartbiked.errors import ConfigError, ConfigProblem
from smartbiked.hardware import DRIVERS, Actuator, Option, SerialBoard
from smartbiked.hardware.base import REQUIRED, at_least, between, regex
from smartbiked.hardware.gpio import GpioDriver, PinPlace, resolve_pin
from smartbiked.homeassistant import HomeAssistantSettings
from smartbiked.topics import TOPICS, Limits
from smartbiked.trainer import DEFAULT_CALIBRATION, TrainerSettings

DEFAULT_PATH = Path("/etc/smartbiked/smartbike.toml")
#: The file name looked up in systemd's $CREDENTIALS_DIRECTORY (LoadCredential=).
DEFAULT_CREDENTIAL = "mqtt-password"
#: The unit's EnvironmentFile=: bikes moved from the old scripts keep MQTT_PASSWORD
#: there, so its mode is checked at load (a parameter of :func:`load` for tests).
ENV_FILE = Path("/etc/smartbiked/env")

_FORBIDDEN_IN_ID = re.compile(r"[+#/\s]")


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the MQTT broker. ``password`` never appears in a repr."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    tls: bool
    ca_file: str
    certfile: str
    keyfile: str
    keepalive: int
    reconnect_max: float
    client_id: str
    reply_topics: tuple[str, ...] = ("bike/{id}/reply/#",)
    #: Every broker this bike may use, the first being host:port.
    addresses: tuple[tuple[str, int], ...] = ()
    max_packet_size: int = 4096


@dataclass(frozen=True)
class DriverSettings:
    """One topic's table: the driver kind serving it and its options, defaults filled in."""

    topic: str
    kind: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    """A bike's whole configuration, validated."""

    path: Path
    bike_id: str
    device_name: str
    broker: BrokerSettings
    offline_safe_after: float
    serial: Mapping[str, Mapping[str, Any]]
    drivers: tuple[DriverSettings, ...]
    #: Risky settings that still work (never a secret in the text): printed by
    #: --check-config and logged at start-up.
    warnings: tuple[str, ...] = ()
    #: ``[trainer]``: target power (ERG) and grade simulation.
    trainer: TrainerSettings = TrainerSettings()
    #: ``[homeassistant]``: MQTT discovery.
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()
    #: ``[ble]``: the bike as a Bluetooth smart trainer.
    ble: BleSettings = BleSettings()

    @property
    def ble_name(self) -> str:
        """The name the bike advertises over Bluetooth."""
        return self.ble.name or f"Smartbike {self.bike_id}"

    def actuator_limits(self) -> dict[str, Limits]:
        """The limits of every actuator this bike has, by topic."""
        return {
            d.topic: Limits(d.options["min"], d.options["max"], d.options["step"])
            for d in self.drivers
            if issubclass(DRIVERS[d.kind], Actuator)
        }

    def control_limits(self) -> dict[str, Limits]:
        """Every topic this bike takes commands on, with its limits (parse_command's map).

        The actuators, plus ``targetpower`` (with a power sensor) and ``grade`` (with a
        speed sensor) when ``[trainer]`` is enabled.
        """
        limits = self.actuator_limits()
        if self.trainer.enabled and "resistance" in limits:
            sensors = {d.topic for d in self.drivers}
            if "power" in sensors:
                limits["targetpower"] = Limits(0.0, self.trainer.max_power)
            if "speed" in sensors:
                limits["grade"] = Limits(TOPICS["grade"].low, TOPICS["grade"].high)
        return limits


def _looks_secret(key: str) -> bool:
    """Keys whose values are never echoed back, even when misspelt or misplaced."""
    return re.search(r"pass|secret|token|credential", key, re.IGNORECASE) is not None


def _type_name(value: Any) -> str:
    """What a TOML value is, for errors about a value that is not echoed."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), "a date or time")


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a table nested thousands deep (TOML dotted keys)
        return "a value nested too deeply to show"
    return text if len(text) <= 60 else text[:57] + "..."


def _port_check(v: int) -> str | None:
    return None if 1 <= v <= 65535 else "must be a port number from 1 to 65535"


def _reply_patterns_check(v: list[Any]) -> str | None:
    from smartbiked.topics import reply_pattern_problem

    for pattern in v:
        if not isinstance(pattern, str):
            return "must be a list of topic patterns (strings)"
        problem = reply_pattern_problem(pattern)
        if problem:
            return f"{pattern!r}: {problem}"
    return None


def parse_address(text: str, default_port: int) -> tuple[str, int] | None:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); None if it is not one."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        if not number.isdigit():
            return None
        port = int(number)
    if _host_check(host) or _port_check(port):
        return None
    return host, port


def _hosts_check(v: list[Any]) -> str | None:
    for item in v:
        if not isinstance(item, str) or parse_address(item, 1883) is None:
            return f"{item!r} is not host, host:port or [address]:port"
    return None


def _host_check(v: str) -> str | None:
    try:
        v.encode("idna")
    except UnicodeError:
        return "not a valid host name"
    return None if v and not any(c.isspace() for c in v) else "not a valid host name"


_BIKE = (
    Option("id", (str,), REQUIRED, 'the bike id in topics, six digits: "000001"'),
    Option("id_pattern", (str,), r"[0-9]{6}", "regular expression the id must match",
           regex),
    Option("device_name", (str,), "", "metadata.deviceName in reports (default: host name)"),
)
_BROKER = (
    Option("host", (str,), "localhost", "broker host name or address", _host_check),
    Option("port", (int,), 1883, "broker port", _port_check),
    Option("failover_hosts", (list,), [],
           'more brokers for this bike ("host" or "host:port"; the port defaults to port): '
           "the bike uses one of host and these, tried in an order shuffled per bike, and "
           "moves on when one fails", _hosts_check),
    Option("username", (str,), "", "account name; empty for an anonymous broker"),
    Option("password_file", (str,), "", "file holding the password (mode 0600)"),
    Option("password_credential", (str,), DEFAULT_CREDENTIAL,
           "file name in $CREDENTIALS_DIRECTORY (systemd LoadCredential=)"),
    Option("tls", (bool,), False, "connect with TLS"),
    Option("ca_file", (str,), "", "CA certificates for TLS (default: the system's)"),
    Option("certfile", (str,), "", "client certificate for TLS, if the broker wants one"),
    Option("keyfile", (str,), "", "client key for TLS"),
    Option("keyfile_credential", (str,), "mqtt-client-key",
           "file name in $CREDENTIALS_DIRECTORY holding the client key, used when certfile "
           "is set and keyfile is empty (systemd LoadCredential=)"),
    Option("keepalive", (int,), 30, "seconds between keep-alive pings", between(5, 3600)),
    Option("reconnect_max", (float,), 1.0,
           "longest wait between reconnect tries, seconds (each wait is 50-100 % of it)",
           between(0.5, 60)),
    Option("client_id", (str,), "", "MQTT client id (default: smartbiked-<bike id>)"),
    Option("reply_topics", (list,), ["bike/{id}/reply/#"],
           "where MQTT v5 answers may go: topic patterns ({id} is this bike's id, "
           "+ and # as in MQTT); a ResponseTopic outside them refuses the command",
           _reply_patterns_check),
    Option("max_packet_size", (int,), 4096,
           "largest MQTT packet the broker may send us, bytes (MQTT v5 Maximum Packet "
           "Size); bigger commands never reach the bike", between(512, 1048576)),
)
_SERVICE = (
    Option("offline_safe_after", (float,), 60.0,
           "seconds without the broker before actuators go to their safe values", at_least(0)),
)



def _calibration_check(v: list[Any]) -> str | None:
    rule = ("must be a list of [resistance %, watts] pairs, both rising, e.g. "
            "[[0, 25], [50, 250], [100, 650]]")
    if len(v) < 2:
        return rule
    for pair in v:
        if (not isinstance(pair, list) or len(pair) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float))
                       or not math.isfinite(x) for x in pair)):
            return rule
    if any(not 0 <= p <= 100 for p, _ in v) or any(w <= 0 for _, w in v):
        return "resistance must lie in 0..100 and watts above 0"
    if any(b[0] <= a[0] or b[1] <= a[1] for a, b in zip(v, v[1:], strict=False)):
        return "resistance and watts must both rise from one pair to the next"
    return None


def _one_of(*choices: str) -> Any:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of: {', '.join(choices)}"
    return check


def _prefix_check(v: str) -> str | None:
    if not v or v.startswith("/") or v.endswith("/") or any(c in v for c in "+#\0"):
        return "must be a topic prefix without + or #, not starting or ending with /"
    return None if v.isprintable() else "must be printable"


_TRAINER = (
    Option("enabled", (bool,), False,
           "offer target power (ERG, with a [power] sensor) and grade simulation (with a "
           "[speed] sensor) on targetpower/control and grade/control; needs [resistance]"),
    Option("calibration", (list,), [[round(p), round(w)] for p, w in DEFAULT_CALIBRATION],
           "resistance % -> braking watts at calibration_at, as rising pairs "
           "(see Calibrating resistance)", _calibration_check),
    Option("calibration_sensor", (str,), "cadence",
           "what the brake's speed follows: cadence (brake turned by the cranks) or speed "
           "(brake on the wheel, after the gears)", _one_of("cadence", "speed")),
    Option("calibration_at", (float,), 90.0,
           "the cadence (RPM) or speed (m/s) the calibration was ridden at",
           at_least(0, strict=True)),
    Option("calibration_exponent", (float,), 1.6,
           "braking power grows as (reading / calibration_at) ** this: about 1 for a "
           "friction pad, 1.2 to 2 for magnets", between(0, 3)),
    Option("max_power", (float,), 1500.0, "highest target power accepted, W",
           between(50, TOPICS["targetpower"].high)),
    Option("erg_gain", (float,), 0.15,
           "how fast ERG corrects the calibration, per second (higher: faster and "
           "more restless)", between(0, 2)),
    Option("power_filter", (float,), 1.5, "seconds of power smoothing ERG corrects on",
           between(0, 10)),
    Option("resistance_rate", (float,), 10.0,
           "most resistance % per second ERG and grade simulation move",
           between(0.5, 100)),
    Option("min_change", (float,), 0.5, "smallest resistance change worth a motor move, %",
           between(0, 10)),
    Option("min_cadence", (float,), 30.0,
           "below this cadence (RPM) the rider has stopped: resistance holds",
           between(0, 100)),
    Option("settle", (float,), 2.0,
           "seconds after a move or a restart before ERG trusts the power reading again",
           between(0, 30)),
    Option("sensor_timeout", (float,), 5.0,
           "seconds without a power (ERG) or speed (grade) reading before the mode is "
           "left; resistance holds", between(1, 60)),
    Option("mass", (float,), 85.0, "rider and bike in kg, for grade simulation",
           between(20, 250)),
    Option("crr", (float,), 0.004, "rolling resistance when a grade command gives none",
           between(0, 0.05)),
    Option("cda", (float,), 0.32, "drag area CdA in m^2 when a grade command gives none",
           between(0, 2)),
    Option("air_density", (float,), 1.225, "air density in kg/m^3, for grade simulation",
           between(0.5, 1.5)),
    Option("grade_gain", (float,), 1.0,
           "the simulated grade is grade * grade_gain + grade_offset (0.5: climbs feel "
           "half as steep)", between(0, 2)),
    Option("grade_offset", (float,), 0.0, "percent added to every grade", between(-10, 10)),
    Option("incline_follows_grade", (bool,), False,
           "grade also tilts the incline actuator (a frame moving under a rider: the "
           "operator's decision); needs [incline]"),
    Option("incline_min", (float,), -5.0, "lowest tilt grade may set, degrees",
           between(TOPICS["incline"].low, TOPICS["incline"].high)),
    Option("incline_max", (float,), 10.0, "highest tilt grade may set, degrees",
           between(TOPICS["incline"].low, TOPICS["incline"].high)),
    Option("incline_rate", (float,), 0.5, "most degrees per second grade tilts the frame",
           between(0.05, 5)),
)
_HOMEASSISTANT = (
    Option("enabled", (bool,), False,
           "publish Home Assistant MQTT discovery for this bike (retained)"),
    Option("prefix", (str,), "homeassistant", "discovery prefix (Home Assistant's MQTT "
           "settings); {prefix}/status online republishes", _prefix_check),
    Option("name", (str,), "", "the device's name in Home Assistant (default: Smartbike <id>)"),
)


def _ble_name_check(v: str) -> str | None:
    if not v.isprintable():
        return "must be printable"
    # The scan response holds 29 bytes of name; the advert itself carries less.
    return None if len(v.encode("utf-8")) <= 29 else "must be at most 29 bytes in UTF-8"


def _adapter_check(v: str) -> str | None:
    return None if re.fullmatch(r"hci[0-9]{1,2}", v) else 'must name an adapter: "hci0"'


def _transport_check(v: str) -> str | None:
    return None if v and v.isprintable() and ":" in v else (
        'must be a bumble transport such as "usb:0" or "hci-socket:0"')


_BLE = (
    Option("enabled", (bool,), False,
           "advertise the bike as a Bluetooth smart trainer (FTMS, Cycling Power, Heart "
           "Rate) beside MQTT; needs the ble extra (see Bluetooth smart trainer)"),
    Option("backend", (str,), "bluez",
           "bluez: through BlueZ over D-Bus, sharing the Pi's adapter; bumble: our own "
           "stack on an adapter nothing else uses (transport)", _one_of(*BACKENDS)),
    Option("adapter", (str,), "hci0", "BlueZ adapter (bluez)", _adapter_check),
    Option("transport", (str,), "usb:0",
           "bumble HCI transport: usb:0 (a dongle), hci-socket:0 (an adapter BlueZ "
           "let go of)", _transport_check),
    Option("name", (str,), "", "advertised name, at most 29 bytes (default: Smartbike <id>)",
           _ble_name_check),
    Option("notify_period", (float,), 1.0,
           "seconds between notifications of the readings", between(0.25, 5)),
    Option("resistance_levels", (float,), 20.0,
           "FTMS resistance levels the 0-100 % resistance range is shown as (0.1 steps; "
           "at most 25.5, what the 1-byte Set Target Resistance form reaches)",
           between(1, 25.5)),
    Option("stale_after", (float,), 5.0,
           "seconds after which a reading is left out of the notifications (an app "
           "shows nothing rather than a stuck value)", between(1, 60)),
    Option("mqtt_hold", (float,), 30.0,
           "seconds after an MQTT app's last resistance, incline, targetpower or grade "
           "command during which no Bluetooth app may take control (an MQTT app's ERG or "
           "simulation holds it as long as it runs)", between(0, 3600)),
    Option("incline", (bool,), False,
           "let Bluetooth apps tilt the [incline] actuator (Set Target Inclination): "
           "any app in range could move the frame under a rider, so off by default"),
)
#: The fixed tables in the order the configuration reference shows them.
TABLES = (("[bike]", _BIKE), ("[broker]", _BROKER), ("[service]", _SERVICE),
          ("[trainer]", _TRAINER), ("[homeassistant]", _HOMEASSISTANT), ("[ble]", _BLE))
#: Topics served by a driver table of their own ([fan], [cadence]...).
DRIVER_TOPICS = tuple(t for t, spec in TOPICS.items()
                      if spec.kind in ("actuator", "sensor", "event"))

#: Old drivers' variables -> (table, key, type) they override.
ENV_OVERRIDES = {
    "MQTT_HOSTNAME": ("broker", "host", str),
    "MQTT_PORT": ("broker", "port", int),
    "MQTT_USERNAME": ("broker", "username", str),
    "DEVICE_ID": ("bike", "id", str),
}


class _Checker:
    """Collects problems while reading one file, so every one is reported at once."""

    def __init__(self, path: Path) -> None:
        self.file = str(path)
        self.problems: list[ConfigProblem] = []
        #: (table, key) -> the environment variable that set it, so errors blame the variable.
        self.from_env: dict[tuple[str, str], str] = {}

    def add(self, table: str, key: str, problem: str, found: Any = None,
            secret: bool = False) -> None:
        shown = None if secret or found is None else _show(found)
        if (table, key) in self.from_env:
            table, key = "environment", self.from_env[table, key]
        self.problems.append(ConfigProblem(self.file, table, key, problem, shown))

    def table(self, name: str, raw: Any, options: tuple[Option, ...] | dict[str, Option],
              allow: tuple[str, ...] = ()) -> dict[str, Any]:
        """Validate one table against its options; return the values with defaults filled."""
        opts = options if isinstance(options, dict) else {o.name: o for o in options}
        if not isinstance(raw, dict):
            self.add(name, "", f"must be a table, not {_type_name(raw)}")
            return {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key in allow:
                continue
            opt = opts.get(key)
            if opt is None:
                # Never echo it: a misspelt secret (pasword, pw) looks like any other key.
                self.add(name, key, f"unknown key; known keys: {', '.join(sorted(opts))}",
                         secret=True)
                continue
            problem = opt.validate(value)
            if problem:
                self.add(name, key, problem, value, secret=_looks_secret(key))
            else:
                out[key] = float(value) if float in opt.kinds and type(value) is int else value
        for key, opt in opts.items():
            if key not in raw:
                if opt.default is REQUIRED:
                    self.add(name, key, "missing (required)")
                else:
                    out[key] = opt.default
        return out


def load(path: Path | str = DEFAULT_PATH, environ: Mapping[str, str] | None = None,
         env_file: Path | None = None) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` listing every problem.

    ``env_file`` is the unit's EnvironmentFile, checked for its mode only (default
    :data:`ENV_FILE`); systemd, not this loader, puts its variables in ``environ``.
    """
    path = Path(path)
    env = os.environ if environ is None else environ
    check = _Checker(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        check.add("", "", "missing: there is no config file here; name the bike's file with "
                  "--config FILE, or run a virtual bike with --simulate --config "
                  "config/smartbike.toml")
        raise ConfigError(check.problems) from None
    except OSError as exc:
        check.add("", "", f"cannot read the file: {exc.strerror or exc}")
        raise ConfigError(check.problems) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        check.add("", "", f"not valid TOML: {exc}")
        raise ConfigError(check.problems) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: a = [[[[...
        check.add("", "", "not valid TOML: arrays or tables nested too deeply")
        raise ConfigError(check.problems) from None

    _apply_env(raw, env, check)
    known = {"bike", "broker", "service", "serial", "trainer", "homeassistant", "ble",
             *DRIVER_TOPICS}
    for name in raw:
        if name not in known:
            check.add(name, "", "unknown table; known tables: bike, broker, service, serial, "
                      "trainer, homeassistant, ble, and one per topic: "
                      + ", ".join(DRIVER_TOPICS))

    raw_bike = raw.get("bike", {})
    if isinstance(raw_bike, dict) and isinstance(raw_bike.get("id"), int):
        # An unquoted 000001 is the likeliest mistake: say how to fix it.
        check.add("bike", "id", 'must be a quoted string such as "000001" '
                  "(leading zeros matter)", raw_bike.pop("id"))
        raw_bike["id"] = ""
    bike = check.table("bike", raw_bike, _BIKE)
    bike_id = bike.get("id", "")
    if "id" in bike:
        if any(p.key == "id" for p in check.problems):
            pass
        elif not bike_id or _FORBIDDEN_IN_ID.search(bike_id):
            check.add("bike", "id", "must be non-empty, without +, #, / or white space", bike_id)
        elif "id_pattern" in bike and not _fullmatch(bike["id_pattern"], bike_id):
            check.add("bike", "id", f"does not match id_pattern {bike['id_pattern']!r}", bike_id)

    broker = check.table("broker", raw.get("broker", {}), _BROKER)
    service = check.table("service", raw.get("service", {}), _SERVICE)
    password, password_from = _password(broker, env, check) if broker else ("", None)
    _client_key(broker, env)
    _check_tls(broker, check)

    serial = _serial_tables(raw.get("serial", {}), check)
    drivers = tuple(
        d for name in DRIVER_TOPICS if name in raw
        if (d := _driver_table(name, raw[name], serial, check)) is not None
    )
    _shared_pins(sorted(drivers, key=lambda d: list(raw).index(d.topic)), check)
    trainer = check.table("trainer", raw.get("trainer", {}), _TRAINER)
    _check_trainer(trainer, drivers, check)
    homeassistant = check.table("homeassistant", raw.get("homeassistant", {}), _HOMEASSISTANT)
    ble = check.table("ble", raw.get("ble", {}), _BLE)
    _check_ble(ble, check)
    if check.problems:
        raise ConfigError(check.problems)
    warnings = _warnings(broker, password, password_from,
                         ENV_FILE if env_file is None else env_file)
    return Config(
        path=path,
        bike_id=bike_id,
        device_name=bike["device_name"] or socket.gethostname(),
        broker=BrokerSettings(
            host=broker["host"], port=broker["port"], username=broker["username"],
            password=password, tls=broker["tls"], ca_file=broker["ca_file"],
            certfile=broker["certfile"], keyfile=broker["keyfile"],
            keepalive=broker["keepalive"], reconnect_max=broker["reconnect_max"],
            client_id=broker["client_id"] or f"smartbiked-{bike_id}",
            reply_topics=tuple(p.replace("{id}", bike_id) for p in broker["reply_topics"]),
            max_packet_size=broker["max_packet_size"],
            addresses=_addresses(broker),
        ),
        offline_safe_after=service["offline_safe_after"],
        serial=serial,
        drivers=drivers,
        warnings=tuple(warnings),
        trainer=TrainerSettings.from_options(trainer),
        homeassistant=HomeAssistantSettings(**homeassistant),
        ble=BleSettings(**ble),
    )


def _check_ble(ble: dict[str, Any], check: _Checker) -> None:
    """An enabled [ble] needs its backend's package (the ble extra) installed."""
    if any(p.table == "ble" for p in check.problems) or not ble["enabled"]:
        return
    package = BACKENDS[ble["backend"]]
    if importlib.util.find_spec(package) is None:
        check.add("ble", "backend", f"needs the Python package {package}, which is not "
                  "installed: pip install 'smartbiked[ble]'", ble["backend"])


def _check_trainer(trainer: dict[str, Any], drivers: tuple[DriverSettings, ...],
                   check: _Checker) -> None:
    """What [trainer] needs from the rest of the bike, named against its own keys."""
    if any(p.table == "trainer" for p in check.problems):
        return
    topics = {d.topic: d for d in drivers}
    if trainer["enabled"]:
        if "resistance" not in topics:
            check.add("trainer", "enabled", "needs a [resistance] actuator", True)
        if "power" not in topics and "speed" not in topics:
            check.add("trainer", "enabled", "needs a [power] sensor (target power) or a "
                      "[speed] sensor (grade simulation)", True)
        sensor = trainer["calibration_sensor"]
        if sensor not in topics:
            check.add("trainer", "calibration_sensor", f"this bike has no [{sensor}] sensor",
                      sensor)
    if trainer["incline_min"] >= trainer["incline_max"]:
        check.add("trainer", "incline_max", "must be above incline_min",
                  trainer["incline_max"])
    if trainer["incline_follows_grade"]:
        incline = topics.get("incline")
        if incline is None:
            check.add("trainer", "incline_follows_grade", "needs an [incline] actuator", True)
            return
        low, high = incline.options["min"], incline.options["max"]
        for key in ("incline_min", "incline_max"):
            if not low <= trainer[key] <= high:
                check.add("trainer", key, f"must lie within [incline] min..max "
                          f"({low:g}..{high:g})", trainer[key])


def _shared_pins(drivers: list[DriverSettings], check: _Checker) -> None:
    """One physical pin for one device: a second one on it fails to open at start-up.

    ``drivers`` come in file order, so the later table is the one blamed.
    """
    used: dict[PinPlace, tuple[str, str]] = {}
    for driver in drivers:
        cls = DRIVERS[driver.kind]
        if not issubclass(cls, GpioDriver):
            continue
        for key, spec in cls.pins(driver.options):
            try:
                place = resolve_pin(spec)
            except ValueError:
                continue  # already reported against the key itself
            if place not in used:
                used[place] = (driver.topic, key)
            elif used[place][0] != driver.topic:  # within one table the driver's check said so
                topic, first = used[place]
                check.add(driver.topic, key, f"{place} is already used by [{topic}] {first}",
                          spec)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine without asking DNS (a name may resolve anywhere)."""
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def _readable_by_others(path: Path) -> str | None:
    """"group", "others" or "group and others" when they may read ``path``; None otherwise."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    who = [name for bit, name in ((stat.S_IRGRP, "group"), (stat.S_IROTH, "others"))
           if mode & bit]
    return " and ".join(who) or None


def _warnings(broker: Mapping[str, Any], password: str, password_from: Path | None,
              env_file: Path) -> list[str]:
    """Settings that work but put the broker password at risk. Never contains the secret."""
    out = []
    if password and not broker["tls"] and not _is_loopback(broker["host"]):
        out.append(f"[broker] the password goes to {broker['host']}:{broker['port']} "
                   "without TLS, readable on the network: set tls = true (and a TLS port)")
    if password_from is not None and (who := _readable_by_others(password_from)):
        out.append(f"the password file {password_from} is readable by {who} "
                   f"(mode {stat.S_IMODE(password_from.stat().st_mode):04o}): "
                   f"chmod 600 {password_from}")
    if (who := _readable_by_others(env_file)) and _may_hold_password(env_file):
        out.append(f"{env_file} is readable by {who} "
                   f"(mode {stat.S_IMODE(env_file.stat().st_mode):04o}) and may hold "
                   f"MQTT_PASSWORD: chmod 600 {env_file}")
    return out


def _may_hold_password(env_file: Path) -> bool:
    # Only the variable's name is looked for; the file's values are never kept.
    try:
        text = env_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # group-readable but not by us: it may
    return re.search(r"^\s*(export\s+)?MQTT_PASSWORD\s*=", text, re.MULTILINE) is not None


def _addresses(broker: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """host:port first, then each failover host once (already validated)."""
    found = [(broker["host"], broker["port"])]
    for text in broker["failover_hosts"]:
        address = parse_address(text, broker["port"])
        if address is not None and address not in found:
            found.append(address)
    return tuple(found)


def _fullmatch(pattern: str, text: str) -> bool:
    try:
        return re.fullmatch(pattern, text) is not None
    except re.error:
        return True  # already reported against id_pattern itself


def _check_tls(broker: dict[str, Any], check: _Checker) -> None:
    """Load the TLS files now, so a bad one is a config error and not a crash loop."""
    unreadable = False
    for key in ("ca_file", "certfile", "keyfile"):
        if broker.get(key) and not os.access(broker[key], os.R_OK):
            check.add("broker", key, "file not readable", broker[key])
            unreadable = True
    if not broker.get("tls") or unreadable:
        return
    try:
        context = ssl.create_default_context(cafile=broker.get("ca_file") or None)
    except (ssl.SSLError, OSError) as exc:
        check.add("broker", "ca_file", f"not a CA certificate file: {exc}", broker["ca_file"])
        return
    if broker.get("certfile"):
        try:
            context.load_cert_chain(broker["certfile"], broker.get("keyfile") or None)
        except (ssl.SSLError, OSError) as exc:
            check.add("broker", "certfile", f"certificate and key do not load: {exc}",
                      broker["certfile"])


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], check: _Checker) -> None:
    """Let the old drivers' variables override the file, as those bikes expect."""
    for var, (table, key, kind) in ENV_OVERRIDES.items():
        if var not in env:
            continue
        text = env[var].strip()
        value: Any = text
        if kind is int:
            try:
                value = int(text)
            except ValueError:
                check.add("environment", var, "must be a whole number", text)
                continue
        section = raw.setdefault(table, {})
        if isinstance(section, dict):
            section[key] = value
            check.from_env[table, key] = var


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; an unreadable directory (systemd 252 hides credentials
    from ExecReload) counts as absent, not as a crash."""
    try:
        return path.exists()
    except OSError:
        return False


def _client_key(broker: dict[str, Any], env: Mapping[str, str]) -> None:
    """The TLS client key from $CREDENTIALS_DIRECTORY (LoadCredential=), when certfile is
    set and keyfile is not; a missing or blank credential means no separate key."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not broker.get("certfile") or broker.get("keyfile") or not directory:
        return
    cred = Path(directory) / broker.get("keyfile_credential", "")
    try:
        if cred.name and cred.is_file() and cred.read_bytes().strip():
            broker["keyfile"] = str(cred)
    except OSError:
        pass  # unreadable: as if absent; the certificate check says what is missing


def _password(broker: dict[str, Any], env: Mapping[str, str],
              check: _Checker) -> tuple[str, Path | None]:
    """The password from MQTT_PASSWORD, password_file or $CREDENTIALS_DIRECTORY, in that
    order, and the file it came from (None for the variable or no password)."""
    if "MQTT_PASSWORD" in env:
        return env["MQTT_PASSWORD"], None
    candidates: list[tuple[str, str]] = []
    if broker.get("password_file"):
        candidates.append(("password_file", broker["password_file"]))
    elif env.get("CREDENTIALS_DIRECTORY") and broker.get("password_credential"):
        cred = Path(env["CREDENTIALS_DIRECTORY"]) / broker["password_credential"]
        if _exists(cred):
            candidates.append(("password_credential", str(cred)))
    for key, file in candidates:
        try:
            return Path(file).read_text(encoding="utf-8").rstrip("\r\n"), Path(file)
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            check.add("broker", key, f"cannot read the password file: {reason}", file)
    return "", None


def _serial_tables(raw: Any, check: _Checker) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        check.add("serial", "", f"must be a table of boards: [serial.NAME], not {_type_name(raw)}")
        return {}
    return {name: check.table(f"serial.{name}", table, SerialBoard.OPTIONS)
            for name, table in raw.items()}


def _driver_table(topic: str, raw: Any, serial: Mapping[str, Any],
                  check: _Checker) -> DriverSettings | None:
    if not isinstance(raw, dict):
        check.add(topic, "", f"must be a table, not {_type_name(raw)}")
        return None
    kind = raw.get("driver")
    cls = DRIVERS.get(kind) if isinstance(kind, str) else None
    if cls is None or topic not in cls.TOPICS:
        fitting = sorted(k for k, c in DRIVERS.items() if topic in c.TOPICS)
        problem = "missing (required)" if kind is None else "not a driver for this topic"
        check.add(topic, "driver", f"{problem}; choose one of: {', '.join(fitting)}", kind)
        return None
    options = check.table(topic, raw, cls.options(), allow=("driver",))
    if "port" in cls.options() and options.get("port") and options["port"] not in serial:
        check.add(topic, "port", "no [serial.NAME] table by this name; boards: "
                  + (", ".join(serial) or "none"), options["port"])
    if not any(p.table == topic for p in check.problems):
        for key, problem in cls.check_settings(options):
            check.add(topic, key, problem, options.get(key))
    if issubclass(cls, Actuator):
        _actuator_limits(topic, options, check)
    return DriverSettings(topic, cls.KIND, options)


def _actuator_limits(topic: str, options: dict[str, Any], check: _Checker) -> None:
    """Fill min/max/step/safe from the topic's documented values; allow narrowing only."""
    spec = TOPICS[topic]
    given = {key for key in ("min", "max") if options.get(key) is not None}
    for key, default in (("min", spec.low), ("max", spec.high), ("step", spec.step)):
        if options.get(key) is None:
            options[key] = float(default)
    rule = f"min and max must satisfy {spec.low:g} <= min < max <= {spec.high:g}"
    # Each bound outside the topic's range is reported under its own key.
    outside = [key for key in ("min", "max") if not spec.low <= options[key] <= spec.high]
    for key in outside:
        check.add(topic, key, rule, options[key])
    if not outside and options["min"] >= options["max"]:
        # Blame the bound the file set; with both set, max (it is the one below min).
        key = "min" if given == {"min"} else "max"
        check.add(topic, key, rule, options[key])
    safe = options.get("safe")
    if safe is None:
        options["safe"] = "hold" if spec.safe is None else float(spec.safe)
    elif isinstance(safe, str):
        if safe != "hold":
            check.add(topic, "safe", 'must be a number or "hold"', safe)
    elif (problem := Limits(options["min"], options["max"], options["step"]).problem(safe)):
        check.add(topic, "safe", problem, safe)
    steps = options["step"] / spec.step if spec.step else 1.0
    if spec.step and (steps < 1 or not math.isclose(steps, round(steps))):
        check.add(topic, "step", f"must be a multiple of {spec.step:g}", options["step"])
