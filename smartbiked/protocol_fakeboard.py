"""pyserial's URL handler for ``fakeboard://``: in-process fake boards.

pyserial's ``serial_for_url`` looks for a module ``protocol_<scheme>`` with a
``Serial`` class in every package of ``serial.protocol_handler_packages``;
:mod:`smartbiked.fakeboard` adds this package there when imported.
"""

from smartbiked.fakeboard import InProcessPort as Serial

__all__ = ["Serial"]
