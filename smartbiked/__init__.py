"""smartbiked: one daemon connecting a Smartbike's sensors and actuators to MQTT."""

__version__ = "0.2.0"
