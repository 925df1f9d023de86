#!/bin/bash
# Install or upgrade smartbiked on a Raspberry Pi OS / Debian machine, from a checkout.
#
#   sudo deploy/install.sh
#
# Safe to run again: it upgrades the daemon, keeps /etc/smartbiked/smartbike.toml,
# /etc/smartbiked/env and /etc/smartbiked/mqtt-password as they are (only tightening
# the secret files' modes) and restarts the service if it was running.
set -euo pipefail

NAME=smartbiked
PREFIX=/opt/smartbiked
VENV=$PREFIX/venv
ETC=/etc/smartbiked
CONFIG=$ETC/smartbike.toml
UNIT_DIR=/etc/systemd/system
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (sudo $0)"
[[ -f $SRC/pyproject.toml && -d $SRC/smartbiked ]] || die "$SRC is not a smartbiked checkout"
[[ -f $SRC/deploy/$NAME.service ]] || die "missing $SRC/deploy/$NAME.service"
[[ -f $SRC/config/smartbike.toml ]] || die "missing $SRC/config/smartbike.toml"
command -v apt-get >/dev/null || die "needs a Debian-based system (apt-get)"

# ---- packages ---------------------------------------------------------------------
# python3-systemd from apt (pip would have to compile it against libsystemd-dev);
# the venv sees it through --system-site-packages. mosquitto-clients for testing the
# broker by hand (mosquitto_sub / mosquitto_pub).
packages=(python3 python3-venv python3-systemd mosquitto-clients)
apt_updated=
apt_update_once() {
    if [[ -z $apt_updated ]]; then
        apt-get update -q
        apt_updated=yes
    fi
}
# lgpio is gpiozero's pin back end on Pi OS (the only one on a Pi 5); plain Debian
# has no package for it, and there is no GPIO to drive there anyway.
if ! apt-cache show python3-lgpio >/dev/null 2>&1; then
    apt_update_once
fi
if apt-cache show python3-lgpio >/dev/null 2>&1; then
    packages+=(python3-lgpio)
else
    say "python3-lgpio is not packaged here: GPIO drivers will find no pin back end"
fi
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "smartbiked needs Python 3.11 or newer (Debian 12 / Pi OS bookworm)"

# ---- account ----------------------------------------------------------------------
# Pi OS has both groups; plain Debian has dialout only. The unit's
# SupplementaryGroups= fails the start (216/GROUP) if either is missing.
for group in gpio dialout; do
    if ! getent group "$group" >/dev/null; then
        say "creating group $group"
        groupadd --system "$group"
    fi
done
if ! getent passwd "$NAME" >/dev/null; then
    say "creating system user $NAME"
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "Smartbike daemon" "$NAME"
fi
# The unit adds these groups itself; membership also lets an operator test by hand
# (sudo -u smartbiked ...) with the same access.
usermod --append --groups gpio,dialout "$NAME"

# ---- the daemon in its own venv ---------------------------------------------------
venv_ok() {
    "$VENV/bin/python" -c 'import sys' 2>/dev/null \
        && grep -qi '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"
}
if ! venv_ok; then
    # Missing, broken by a Python upgrade, or made without the system packages.
    say "creating $VENV"
    rm -rf "$VENV"
    install -d -m 0755 "$PREFIX"
    python3 -m venv --system-site-packages "$VENV"
fi
# Build from a clean copy, so the checkout gets no root-owned build/ or *.egg-info.
work=$(mktemp -d)
rundir=$(mktemp -d)
trap 'rm -rf "$work" "$rundir"' EXIT
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude=.hypothesis -cf - . | tar -C "$work" -xf -
say "installing smartbiked into $VENV"
# --upgrade reinstalls smartbiked itself; its dependencies are only installed or
# upgraded when the installed ones do not fit (apt's python3-systemd satisfies
# systemd-python, so nothing is compiled).
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir --upgrade "$work"
"$VENV/bin/python" -c 'import systemd.daemon' \
    || die "the venv cannot import systemd.daemon (python3-systemd)"

# ---- configuration ----------------------------------------------------------------
install -d -m 0755 "$ETC"
if [[ -e $CONFIG ]]; then
    say "keeping $CONFIG"
else
    say "installing the example config as $CONFIG: set the bike id and broker there"
    install -m 0644 "$SRC/config/smartbike.toml" "$CONFIG"
fi
# Secrets are read by systemd (as root) and handed to the daemon: root-only on disk.
for secret in "$ETC/env" "$ETC/mqtt-password"; do
    if [[ -e $secret ]]; then
        chown root:root "$secret"
        chmod 0600 "$secret"
    fi
done

# ---- systemd unit -----------------------------------------------------------------
install -m 0644 "$SRC/deploy/$NAME.service" "$UNIT_DIR/$NAME.service"

# Validate as the service would: same user, same environment file.
env_vars=()
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
# A writable working directory for lgpio's FIFO, as RuntimeDirectory= gives the service.
chown "$NAME:$NAME" "$rundir"
say "checking $CONFIG"
if ! (cd "$rundir" && runuser -u "$NAME" -- env LG_WD="$rundir" "${env_vars[@]}" \
        "$VENV/bin/smartbiked" --check-config --config "$CONFIG"); then
    die "$CONFIG is invalid (see above): fix it and run $0 again"
fi

if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl reset-failed "$NAME" 2>/dev/null || true
    if systemctl is-active --quiet "$NAME"; then
        systemctl enable "$NAME"
        say "restarting $NAME with the new version"
        systemctl restart "$NAME"
    else
        systemctl enable --now "$NAME"
    fi
    systemctl --no-pager --lines=5 status "$NAME" || true
else
    say "systemd is not running as PID 1 here: nothing was enabled or started."
    say "On the bike: systemctl daemon-reload && systemctl enable --now $NAME"
fi

cat <<EOF

Installed. Next steps, if not done yet:
  - edit $CONFIG, then: systemctl reload $NAME
  - broker password:      install -m 0600 /dev/stdin $ETC/mqtt-password  (type it, Ctrl-D),
                          then: systemctl restart $NAME
  - moving from the old scripts: install -m 0600 ~/.env $ETC/env
  - watch it:             journalctl -u $NAME -f
EOF
