"""smartbiked: one daemon connecting a Smartbike's sensors and actuators to MQTT."""

__version__ = "0.1.0"
