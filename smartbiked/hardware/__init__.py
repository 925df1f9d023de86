"""Hardware drivers, one module per bus; :data:`DRIVERS` maps config names to classes."""

from __future__ import annotations

from smartbiked.hardware.base import Actuator, Driver, EventSource, Hardware, Option, Sensor
from smartbiked.hardware.gpio import (
    GpioButtons,
    GpioPulseSensor,
    GpioPWM,
    GpioRelay,
    GpioServo,
)
from smartbiked.hardware.serial import SerialActuator, SerialBoard, SerialSensor

#: Every driver kind, by the name a config file gives in ``driver = "..."``.
DRIVERS: dict[str, type[Driver]] = {
    cls.KIND: cls
    for cls in (GpioButtons, GpioPWM, GpioRelay, GpioServo, GpioPulseSensor,
                SerialSensor, SerialActuator)
}

__all__ = ["DRIVERS", "Actuator", "Driver", "EventSource", "Hardware", "Option", "Sensor",
           "SerialBoard"]
