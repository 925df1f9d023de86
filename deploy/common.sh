# shellcheck shell=bash disable=SC2034  # constants used by the scripts that source this
# Shared by install.sh, rollback.sh and uninstall.sh (sourced, not run).
#
# Layout of an installed bike:
#   /opt/smartbiked/releases/VERSION-TIME-DIGEST/   one venv per release, complete or absent
#       .complete                                    written last: the release is usable
#       .source-digest                               what it was built from
#       share/smartbiked/                            its unit file and these scripts
#   /opt/smartbiked/current  -> releases/...        what the unit runs (renamed atomically)
#   /opt/smartbiked/previous -> releases/...        what rollback.sh goes back to
#   /usr/local/bin/smartbiked, smartbike            -> /opt/smartbiked/current/bin/...
#   /etc/smartbiked/                                config and secrets (never touched here)
#   /etc/systemd/system/smartbiked.service          copy of the current release's unit
#   /etc/systemd/system/smartbiked.service.d/bluetooth.conf
#                                                   only with [ble] enabled: what its
#                                                   backend needs (deploy/bluetooth-*.conf)
#   /etc/udev/rules.d/70-smartbiked-bluetooth.rules only with bumble on usb:N

NAME=smartbiked
PREFIX=/opt/smartbiked
RELEASES=$PREFIX/releases
ETC=/etc/smartbiked
CONFIG=$ETC/smartbike.toml
UNIT_DIR=/etc/systemd/system
UNIT=$UNIT_DIR/$NAME.service
BIN_DIR=/usr/local/bin
COMMANDS=(smartbiked smartbike)
# Written and removed by these scripts only (operators' drop-ins sit beside it).
BLE_DROPIN=$UNIT_DIR/$NAME.service.d/bluetooth.conf
BLE_UDEV_RULE=/etc/udev/rules.d/70-$NAME-bluetooth.rules
# Made root-only by install.sh: systemd reads them and hands them over. (A TLS client
# key is left as the operator set it: the daemon reads its `keyfile` itself.)
SECRETS=("$ETC/env" "$ETC/mqtt-password")

# A root shell with umask 077 (some sudo setups) would make the venv unreadable for
# the service's own user.
umask 022

say() { printf '==> %s\n' "$*"; }
die() { printf '%s: %s\n' "${0##*/}" "$*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "run as root (sudo $0)"; }

systemd_running() { [[ -d /run/systemd/system ]]; }

# Two installs (or an install and a rollback) at once would fight over releases/ and
# the symlinks. Held until the script exits.
take_install_lock() {
    mkdir -p /run/lock
    exec 9>"/run/lock/$NAME-install.lock"
    flock -n 9 || die "another install, rollback or uninstall is running"
}

# The release a symlink (current, previous) points to, as a full path; empty if none.
release_of() {
    local link=$PREFIX/$1
    [[ -L $link ]] || return 0
    local target
    target=$(readlink "$link")
    [[ $target == /* ]] || target=$PREFIX/$target
    printf '%s\n' "$target"
}

release_ok() { [[ -n ${1:-} && -f $1/.complete && -x $1/bin/smartbiked ]]; }

# Point $PREFIX/$1 at release $2 with one rename(2): a reader sees the old or the new
# target, never a missing link.
point() {
    local link=$PREFIX/$1 rel=${2#"$PREFIX"/}
    ln -sfn "$rel" "$link.new"
    mv -T "$link.new" "$link"
}

# Validate $CONFIG with release $1's code as the service would: same user, same
# environment file, the same credentials in a private $CREDENTIALS_DIRECTORY, a
# writable working directory (lgpio's FIFO).
check_config_with() {
    local release=$1 rundir line value id path
    local -a env_vars=()
    if [[ -f $ETC/env ]]; then
        while IFS= read -r line || [[ -n $line ]]; do
            line=${line#export }
            [[ $line =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || continue
            # The check needs no password, and a command line is readable by every user (ps).
            [[ $line == MQTT_PASSWORD=* ]] && continue
            value=${line#*=}
            if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
                value=${BASH_REMATCH[1]}
            fi
            env_vars+=("${line%%=*}=$value")
        done <"$ETC/env"
    fi
    # Under /run (tmpfs) like systemd's own credentials, never on disk.
    rundir=$(mktemp -d -p /run "$NAME-check.XXXXXX")
    install -d -m 0700 -o "$NAME" -g "$NAME" "$rundir/credentials"
    # The credentials the release's unit loads, or its newline default, as systemd would.
    while IFS= read -r line; do
        id=${line%%:*} path=${line#*:}
        if [[ -f $path ]]; then
            install -m 0400 -o "$NAME" -g "$NAME" "$path" "$rundir/credentials/$id"
        else
            printf '\n' | install -m 0400 -o "$NAME" -g "$NAME" /dev/stdin "$rundir/credentials/$id"
        fi
    done < <(sed -n 's/^LoadCredential=//p' "$release/share/$NAME/$NAME.service")
    chown "$NAME:$NAME" "$rundir"
    local status=0
    (cd "$rundir" && runuser -u "$NAME" -- env LG_WD="$rundir" \
        CREDENTIALS_DIRECTORY="$rundir/credentials" "${env_vars[@]}" \
        "$release/bin/smartbiked" --check-config --config "$CONFIG") || status=$?
    rm -rf "$rundir"
    return "$status"
}

# ---- Bluetooth ([ble]) ---------------------------------------------------------------
# What release $1's own loader makes of $CONFIG's [ble] table: "off", "bluez",
# "bumble-usb", "bumble-hci-socket" or "bumble" (another transport: nothing beyond the
# unit). "off" for a release that knows no Bluetooth (no requirements-ble.lock).
ble_variant() {
    local release=$1
    [[ -f $release/share/$NAME/requirements-ble.lock ]] || { echo off; return 0; }
    "$release/bin/python" - "$CONFIG" <<'EOF'
import sys
import tomllib

from smartbiked.ble.settings import BleSettings
from smartbiked.config import ConfigError, load

path = sys.argv[1]
try:
    ble = load(path, environ={}).ble
except ConfigError:
    # An enabled [ble] is an error as long as its packages are missing, and they are
    # installed only once this says so: then the table as written, with the loader's
    # defaults. Anything else wrong is the config check's to report, right after.
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file).get("ble", {})
    except (OSError, tomllib.TOMLDecodeError):
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    default = BleSettings()
    ble = BleSettings(enabled=raw.get("enabled") is True,
                      backend=str(raw.get("backend", default.backend)),
                      transport=str(raw.get("transport", default.transport)))
if not ble.enabled:
    print("off")
elif ble.backend == "bluez":
    print("bluez")
elif ble.transport.startswith(("usb:", "hci-socket:")):
    print("bumble-" + ble.transport.split(":", 1)[0])
else:
    print("bumble")
EOF
}

# Set BLE_VARIANT for release $1 and, when [ble] is enabled, give that release the
# packages of its requirements-ble.lock (hash-checked, like the main lock) and make
# sure group bluetooth exists (the drop-ins name it). Packages go into the release
# once (marker .ble-lock); BLE_INSTALLED=yes when they went in now. ${PIP_INDEX[@]}:
# where pip takes them from (install.sh's --wheelhouse), PyPI by default.
BLE_VARIANT=off
BLE_INSTALLED=
PIP_INDEX=()
ble_prepare() {
    local release=$1 lock sum
    BLE_VARIANT=$(ble_variant "$release") || die "cannot read [ble] from $CONFIG with $(basename "$release")"
    BLE_INSTALLED=
    [[ $BLE_VARIANT != off ]] || return 0
    say "Bluetooth is enabled ($BLE_VARIANT)"
    # bumble's USB transport loads the libusb that libusb-package bundles, which is
    # linked against libatomic.so.1 (minimal Debian systems lack it).
    if [[ $BLE_VARIANT == bumble* ]] && ! dpkg-query -W -f='${Status}' libatomic1 2>/dev/null \
            | grep -q "install ok installed"; then
        say "installing libatomic1 (for bumble's libusb)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libatomic1 \
            || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
                     apt-get install -y --no-install-recommends libatomic1; } \
            || die "cannot install libatomic1 (bumble's libusb needs it)"
    fi
    if ! getent group bluetooth >/dev/null; then
        say "creating group bluetooth"
        groupadd --system bluetooth
    fi
    lock=$release/share/$NAME/requirements-ble.lock
    sum=$(sha256sum "$lock" | cut -d' ' -f1)
    [[ $(cat "$release/.ble-lock" 2>/dev/null) == "$sum" ]] && return 0
    say "installing the Bluetooth packages (requirements-ble.lock) into $(basename "$release")"
    "$release/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
        "${PIP_INDEX[@]}" --require-hashes --no-deps --only-binary=:all: -r "$lock" \
        || die "cannot install the Bluetooth packages for $(uname -m) (locked for x86_64" \
               "and aarch64 only); nothing was switched"
    "$release/bin/pip" check --disable-pip-version-check >/dev/null \
        || { "$release/bin/pip" check --disable-pip-version-check || true
             die "requirements-ble.lock does not cover the Bluetooth packages' dependencies"; }
    printf '%s\n' "$sum" >"$release/.ble-lock"
    BLE_INSTALLED=yes
}

# Put file $1 at $2 (an empty $1: remove $2); succeed only if that changed anything.
place() {
    local want=$1 at=$2
    if [[ -n $want ]]; then
        cmp -s "$want" "$at" && return 1
        install -d -m 0755 "$(dirname "$at")"
        install -m 0644 "$want" "$at.new"
        mv -T "$at.new" "$at"
    else
        [[ -e $at ]] || return 1
        rm -f "$at"
    fi
}

# The drop-in and udev rule release $1 needs for BLE_VARIANT, and no others; succeed
# only if the drop-in changed (the unit must be reloaded and restarted).
ble_apply() {
    local share=$1/share/$NAME dropin= rule=
    case $BLE_VARIANT in
        bluez|bumble-usb|bumble-hci-socket) dropin=$share/bluetooth-$BLE_VARIANT.conf ;;
    esac
    [[ $BLE_VARIANT == bumble-usb ]] && rule=$share/bluetooth-usb.rules
    if place "$rule" "$BLE_UDEV_RULE" && command -v udevadm >/dev/null; then
        # Only where udevd runs (not in a container); a dongle plugged in later gets it anyway.
        udevadm control --reload 2>/dev/null \
            && udevadm trigger --subsystem-match=usb --action=change 2>/dev/null || true
    fi
    place "$dropin" "$BLE_DROPIN"
}

# Make release $1 the one that runs: its unit file and Bluetooth drop-in (ble_prepare
# ran for it), `current` (and `previous` = the old current), the commands on PATH; then
# restart the service only if it was running.
# With $2 = first (no unit was installed before), enable and start it instead: a
# re-run never enables or starts a service that the operator disabled or stopped.
switch_to() {
    local release=$1 first=${2:-} old unit_changed=
    old=$(release_of current)
    local new_unit=$release/share/$NAME/$NAME.service
    if ! cmp -s "$new_unit" "$UNIT"; then
        install -m 0644 "$new_unit" "$UNIT.new"
        mv -T "$UNIT.new" "$UNIT"
        unit_changed=yes
    fi
    if ble_apply "$release"; then
        if [[ -e $BLE_DROPIN ]]; then
            say "installed $BLE_DROPIN (Bluetooth: $BLE_VARIANT)"
        else
            say "removed $BLE_DROPIN (Bluetooth: $BLE_VARIANT)"
        fi
        unit_changed=yes
    fi
    if [[ $old != "$release" ]]; then
        if release_ok "$old"; then
            point previous "$old"
        fi
        point current "$release"
    fi
    for cmd in "${COMMANDS[@]}"; do
        ln -sfn "$PREFIX/current/bin/$cmd" "$BIN_DIR/$cmd.new"
        mv -T "$BIN_DIR/$cmd.new" "$BIN_DIR/$cmd"
    done
    if ! systemd_running; then
        say "systemd is not running as PID 1 here: nothing was reloaded or started."
        say "On the bike: systemctl daemon-reload && systemctl enable --now $NAME"
        return 0
    fi
    if [[ -n $unit_changed ]]; then
        systemctl daemon-reload
    fi
    if [[ $first == first ]]; then
        say "enabling and starting $NAME"
        systemctl enable --now "$NAME"
    elif [[ $old == "$release" && -z $unit_changed && -z $BLE_INSTALLED ]]; then
        say "$(basename "$release") is already the current release: nothing to restart"
    elif systemctl is-active --quiet "$NAME"; then
        say "restarting $NAME with $(basename "$release")"
        systemctl reset-failed "$NAME" 2>/dev/null || true
        if ! systemctl restart "$NAME"; then
            systemctl --no-pager --lines=20 status "$NAME" || true
            die "$NAME did not start with $(basename "$release"); go back with: sudo deploy/rollback.sh"
        fi
    else
        say "$NAME is not running: left stopped (start it with: systemctl start $NAME)"
    fi
}

# Keep current and previous; anything else under releases/ (older or half-built) goes.
prune_releases() {
    local keep_current keep_previous dir
    keep_current=$(release_of current)
    keep_previous=$(release_of previous)
    [[ -d $RELEASES ]] || return 0
    for dir in "$RELEASES"/*; do
        [[ -e $dir ]] || continue
        [[ $dir == "$keep_current" || $dir == "$keep_previous" ]] && continue
        rm -rf "$dir"
    done
}
