#!/bin/bash
# Remove smartbiked: stop and disable the service, remove its unit file, the
# releases in /opt/smartbiked and the commands in /usr/local/bin.
#
#   sudo deploy/uninstall.sh            # keeps /etc/smartbiked (config, secrets), the
#                                       # operator's drop-ins and the smartbiked user, for a
#                                       # later reinstall (install.sh's Bluetooth drop-in
#                                       # and udev rule go)
#   sudo deploy/uninstall.sh --purge    # removes those too
#
# Packages installed with apt (python3, python3-venv, python3-systemd,
# mosquitto-clients, python3-lgpio) and the gpio/dialout/bluetooth groups stay: other
# software may use them.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/common.sh
source "$HERE/common.sh"

purge=
case ${1:-} in
    "") ;;
    --purge) purge=yes ;;
    -h|--help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (try --help)" ;;
esac
need_root
take_install_lock

if systemd_running && systemctl cat "$NAME" >/dev/null 2>&1; then
    say "stopping and disabling $NAME"
    systemctl disable --now "$NAME" 2>/dev/null || systemctl stop "$NAME" || true
fi
for cmd in "${COMMANDS[@]}"; do
    # Only our own links: never a command of the same name that someone else put there.
    if [[ -L $BIN_DIR/$cmd && $(readlink "$BIN_DIR/$cmd") == "$PREFIX"/* ]]; then
        rm -f "$BIN_DIR/$cmd"
    fi
done
rm -f "$UNIT"
# The Bluetooth drop-in and udev rule are the installer's, not the operator's: they go
# even without --purge (and the drop-in directory too if nothing else is in it).
rm -f "$BLE_DROPIN" "$BLE_UDEV_RULE"
if [[ -n $purge ]]; then
    rm -rf "$UNIT_DIR/$NAME.service.d"
else
    rmdir "$UNIT_DIR/$NAME.service.d" 2>/dev/null || true
fi
if systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed "$NAME" 2>/dev/null || true
fi
say "removing $PREFIX"
# This script may be the copy inside a release: bash has read it already up to here.
rm -rf "$PREFIX"

if [[ -n $purge ]]; then
    say "removing $ETC and the $NAME user"
    rm -rf "$ETC"
    if getent passwd "$NAME" >/dev/null; then userdel "$NAME"; fi
    if getent group "$NAME" >/dev/null; then groupdel "$NAME"; fi
    say "uninstalled and purged"
else
    kept=()
    [[ -e $ETC ]] && kept+=("$ETC")
    [[ -e $UNIT_DIR/$NAME.service.d ]] && kept+=("$UNIT_DIR/$NAME.service.d")
    say "uninstalled; kept ${kept[*]:-nothing} and the $NAME user (remove them with --purge)"
fi
