"""The bike as a Bluetooth smart trainer (FTMS, Cycling Power, Heart Rate).

:mod:`smartbiked.ftms` holds the byte layer, :mod:`smartbiked.ble.control` the Control
Point state machine and :mod:`smartbiked.ble.peripheral` what the bike shows; both are
pure. A backend puts them on a radio: ``bluez_backend`` (BlueZ over D-Bus with
dbus-fast) or ``bumble_backend`` (bumble's own host stack), both in the ``ble`` extra.
Nothing here imports a Bluetooth stack until a backend is chosen.
"""
