"""The bike as a Bluetooth smart trainer (FTMS, Cycling Power, Heart Rate).

:mod:`smartbiked.ftms` holds the byte layer, :mod:`smartbiked.ble.control` the Control
Point state machine and :mod:`smartbiked.ble.peripheral` what the bike shows; both are
pure. A backend (``bumble_backend``: bumble, an optional extra) puts them on a radio.
Nothing here imports a Bluetooth stack until a backend is chosen.
"""
