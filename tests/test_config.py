"""The config loader: the example passes; every mistake is named, all at once, exit 78."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smartbiked import config
from smartbiked.errors import EX_CONFIG, ConfigError
from tests.conftest import ROOT

EXAMPLE = ROOT / "config" / "smartbike.toml"
MINIMAL = """
[bike]
id = "000001"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bike.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text), environ=env or {})
    return [str(p) for p in info.value.problems]


def test_example_config_is_complete_and_valid():
    cfg = config.load(EXAMPLE, environ={})
    assert cfg.bike_id == "000001"
    assert {d.topic for d in cfg.drivers} == {
        "button", "cadence", "speed", "fan", "heartrate", "power", "resistance", "incline"}
    assert set(cfg.serial) == {"sensors", "motors"}
    assert cfg.actuator_limits()["incline"].step == 0.5
    incline = next(d for d in cfg.drivers if d.topic == "incline")
    assert incline.options["safe"] == "hold"


def test_defaults_fill_a_minimal_file(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL), environ={})
    assert cfg.broker.host == "localhost" and cfg.broker.port == 1883  # MQTT's default
    assert cfg.broker.client_id == "smartbiked-000001"
    assert cfg.device_name  # the host name
    assert cfg.drivers == ()


def test_every_problem_is_reported_at_once_with_file_table_key_and_value(tmp_path):
    found = problems(tmp_path, """
        [bike]
        id = "12 34"
        [broker]
        port = 70000
        keepalive = "often"
        colour = "red"
        [fan]
        driver = "gpio_pwm"
        pin = 12
        max = 120
        [gear]
        driver = "x"
        """)
    path = str(tmp_path / "bike.toml")
    assert all(p.startswith(path + ": ") for p in found)
    text = "\n".join(found)
    assert "[bike] id: must be non-empty, without +, #, / or white space (found '12 34')" in text
    assert "[broker] port: must be a port number from 1 to 65535 (found 70000)" in text
    assert "[broker] keepalive: must be an integer (found 'often')" in text
    assert "[broker] colour: unknown key" in text
    assert "[fan] min: min and max must satisfy 0 <= min < max <= 100 (found (0.0, 120.0))" in text
    assert "[gear]" in text and "unknown table" in text
    assert len(found) == 6


@pytest.mark.parametrize(("bike", "expected"), [
    ("id = 1", 'must be a quoted string such as "000001"'),
    ('id = ""', "must be non-empty"),
    ('id = "000/01"', "without +, #, /"),
    ('id = "00000+"', "without +, #, /"),
    ('id = "1234"', "does not match id_pattern"),
    ("", "[bike] id: missing (required)"),
])
def test_bike_ids_that_would_break_topics_are_refused(tmp_path, bike, expected):
    found = problems(tmp_path, f"[bike]\n{bike}\n")
    assert any(expected in p for p in found), found


def test_id_pattern_allows_lab_names(tmp_path):
    cfg = config.load(write(tmp_path, '[bike]\nid = "lab-a"\nid_pattern = "[a-z-]+"\n'),
                      environ={})
    assert cfg.bike_id == "lab-a"


def test_old_environment_variables_override_the_file(tmp_path):
    env = {"MQTT_HOSTNAME": "broker.lab", "MQTT_PORT": "8883", "MQTT_USERNAME": "bike7",
           "MQTT_PASSWORD": "s3cret", "DEVICE_ID": "000007"}
    cfg = config.load(write(tmp_path, MINIMAL), environ=env)
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.username) == ("broker.lab", 8883,
                                                                       "bike7")
    assert cfg.broker.password == "s3cret" and cfg.bike_id == "000007"
    assert "s3cret" not in repr(cfg)


def test_bad_environment_value_is_named(tmp_path):
    found = problems(tmp_path, MINIMAL, env={"MQTT_PORT": "eighty"})
    assert found == [f"{tmp_path / 'bike.toml'}: [environment] MQTT_PORT: "
                     "must be a whole number (found 'eighty')"]


def test_password_from_file_and_from_systemd_credentials(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    cfg = config.load(write(tmp_path, MINIMAL + f'[broker]\npassword_file = "{secret}"\n'),
                      environ={})
    assert cfg.broker.password == "hunter2"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd")
    cfg = config.load(write(tmp_path, MINIMAL), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.broker.password == "from-systemd"


def test_secrets_never_appear_in_errors(tmp_path):
    found = problems(tmp_path, MINIMAL + '[broker]\npassword_file = "/nonexistent/pw"\n'
                     'password = "inline-secret"\n', env={})
    text = "\n".join(found)
    assert "cannot read the password file" in text and "/nonexistent/pw" in text
    assert "inline-secret" not in text
    assert any(p.endswith("[broker] password: unknown key; known keys: ca_file, certfile, "
                          "client_id, host, keepalive, keyfile, max_packet_size, "
                          "password_credential, password_file, port, reconnect_max, "
                          "reply_topics, tls, username") for p in found)


def test_driver_must_exist_and_fit_its_topic(tmp_path):
    found = problems(tmp_path, MINIMAL + '[fan]\ndriver = "gpio_pulse"\npin = 3\n'
                     '[speed]\npin = 4\n')
    assert any("[fan] driver: not a driver for this topic; choose one of: gpio_pwm, "
               "gpio_relay, serial_actuator (found 'gpio_pulse')" in p for p in found)
    assert any("[speed] driver: missing (required)" in p for p in found)


def test_serial_port_must_name_a_board(tmp_path):
    found = problems(tmp_path, MINIMAL + '[power]\ndriver = "serial_sensor"\nport = "usb0"\n')
    assert any("[power] port: no [serial.NAME] table by this name" in p for p in found)


@pytest.mark.parametrize(("body", "expected"), [
    ("min = -12", "min and max must satisfy -10 <= min < max <= 19"),
    ("safe = 30", "[incline] safe: out of range (found 30.0)"),
    ("safe = 2.25", "[incline] safe: not on a step"),
    ('safe = "park"', '[incline] safe: must be a number or "hold"'),
    ("step = 0.3", "[incline] step: must be a multiple of 0.5"),
    ("step = 0", "[incline] step: must be a multiple of 0.5"),
    ("min_interval = -1", "[incline] min_interval: must be at least 0"),
])
def test_actuator_range_may_narrow_but_never_widen(tmp_path, body, expected):
    text = MINIMAL + ('[serial.m]\nurl = "loop://"\n[incline]\ndriver = "serial_actuator"\n'
                      f'port = "m"\n{body}\n')
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found


def test_cross_key_problems_are_config_errors(tmp_path):
    found = problems(tmp_path, MINIMAL + '[resistance]\ndriver = "gpio_servo"\npin = 18\n'
                     "min_pulse_width = 0.002\nmax_pulse_width = 0.001\n")
    assert any("[resistance] min_pulse_width: must be below max_pulse_width" in p for p in found)


def test_booleans_are_not_numbers(tmp_path):
    found = problems(tmp_path, MINIMAL + "[broker]\nport = true\n")
    assert any("[broker] port: must be an integer (found True)" in p for p in found)


def test_unreadable_and_invalid_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        config.load(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[bike\n"), environ={})


def _smartbiked(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smartbiked", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_check_config_exits_0_for_the_example_and_78_for_a_bad_file(tmp_path):
    ok = _smartbiked("--check-config", "--config", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    assert "OK: bike 000001, 8 drivers" in ok.stdout
    bad = write(tmp_path, '[bike]\nid = "x"\n[broker]\nport = 0\n')
    result = _smartbiked("--check-config", "--config", str(bad))
    assert result.returncode == EX_CONFIG
    assert f"{bad}: [bike] id: does not match id_pattern" in result.stderr
    assert f"{bad}: [broker] port: must be a port number" in result.stderr


def test_invalid_config_exits_78_before_touching_hardware_or_network(tmp_path):
    # No --check-config: the daemon itself must refuse to start, quickly and cleanly.
    bad = write(tmp_path, '[bike]\nid = "000001"\n[fan]\ndriver = "gpio_pwm"\n')
    result = _smartbiked("--config", str(bad))
    assert result.returncode == EX_CONFIG
    assert "[fan] pin: missing (required)" in result.stderr
    assert "connect" not in result.stderr.lower()


@pytest.mark.parametrize(("body", "expected"), [
    ("[broker]\npassword_file = 5\n", "[broker] password_file: must be a string"),
    ('[broker]\npassword_credential = true\n', "[broker] password_credential: must be a string"),
    ('[bike]\nid_pattern = "([0-9"\n', "[bike] id_pattern: not a regular expression"),
    ('[broker]\nhost = "bad..host"\n', "[broker] host: not a valid host name"),
    ('[broker]\nhost = "a b"\n', "[broker] host: not a valid host name"),
])
def test_values_that_would_crash_at_start_are_config_errors(tmp_path, body, expected):
    text = MINIMAL.replace("[bike]\n", "") if body.startswith("[bike]") else MINIMAL
    if body.startswith("[bike]"):
        body = '[bike]\nid = "000001"\n' + body.split("\n", 1)[1]
    found = problems(tmp_path, text + body)
    assert any(expected in p for p in found), found


def test_tls_files_are_loaded_at_check_time(tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    found = problems(tmp_path, MINIMAL + f'[broker]\ntls = true\nca_file = "{bogus}"\n')
    assert any("[broker] ca_file: not a CA certificate file" in p for p in found), found
    cfg = config.load(write(tmp_path, MINIMAL + "[broker]\ntls = true\n"), environ={})
    assert cfg.broker.tls  # the system's CAs load fine


def test_errors_from_environment_variables_name_the_variable(tmp_path):
    found = problems(tmp_path, MINIMAL, env={"MQTT_PORT": "99999", "DEVICE_ID": "12/4"})
    text = "\n".join(found)
    assert "[environment] MQTT_PORT: must be a port number from 1 to 65535 (found 99999)" in text
    assert "[environment] DEVICE_ID: must be non-empty, without +, #, / or white space" in text
