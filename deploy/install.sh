#!/bin/bash
# Install or upgrade smartbiked on a Raspberry Pi OS / Debian machine, from a checkout.
#
#   sudo deploy/install.sh                      # packages from PyPI (pinned, hash-checked)
#   sudo deploy/install.sh --wheelhouse DIR     # no network: the wheels are in DIR
#
# An upgrade cannot half-happen: the new version is built beside the running one in
# /opt/smartbiked/releases/, the existing /etc/smartbiked/smartbike.toml is checked
# with the new code, and only then does /opt/smartbiked/current switch over (one
# rename). The previous release stays for `sudo deploy/rollback.sh`. Config and
# secrets in /etc/smartbiked are kept as they are (only the secrets' modes are
# tightened). The service is restarted only if it was running, and enabled only on
# the first install: a re-run never starts or enables a service the operator
# stopped or disabled. A re-run with unchanged code changes nothing.
#
# With [ble] enabled in the config, the release also gets deploy/requirements-ble.lock
# and the unit the backend's drop-in (deploy/bluetooth-*.conf, as
# /etc/systemd/system/smartbiked.service.d/bluetooth.conf); without it, neither.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=deploy/common.sh
source "$SRC/deploy/common.sh"

usage() { sed -n '2,6s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }
wheelhouse=
while (($#)); do
    case $1 in
        --wheelhouse) [[ $# -ge 2 ]] || usage 2; wheelhouse=$(realpath "$2"); shift 2 ;;
        --wheelhouse=*) wheelhouse=$(realpath "${1#*=}"); shift ;;
        -h|--help) usage 0 ;;
        *) printf 'install.sh: unknown argument %s\n' "$1" >&2; usage 2 ;;
    esac
done

need_root
[[ -f $SRC/pyproject.toml && -d $SRC/smartbiked ]] || die "$SRC is not a smartbiked checkout"
for f in deploy/$NAME.service deploy/requirements.lock config/smartbike.toml; do
    [[ -f $SRC/$f ]] || die "missing $SRC/$f"
done
[[ -z $wheelhouse || -d $wheelhouse ]] || die "no such directory: $wheelhouse"
command -v apt-get >/dev/null || die "needs a Debian-based system (apt-get)"

take_install_lock
# Where pip takes the locked wheels from (here and in ble_prepare): PyPI by default.
[[ -n $wheelhouse ]] && PIP_INDEX=(--no-index --find-links "$wheelhouse")

# ---- packages ---------------------------------------------------------------------
# python3-systemd from apt (pip would have to compile it against libsystemd-dev);
# the venv sees it through --system-site-packages. mosquitto-clients for testing the
# broker by hand (mosquitto_sub / mosquitto_pub).
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
packages=(python3 python3-venv python3-systemd mosquitto-clients)
missing=()
for pkg in "${packages[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
# lgpio is gpiozero's pin back end on Pi OS (the only one on a Pi 5). Plain Debian
# has no package for it (and no GPIO to drive). Only asked about in the package
# lists already on the machine: no `apt-get update` just to look for it.
want_lgpio() { ! installed python3-lgpio && apt-cache show python3-lgpio >/dev/null 2>&1; }
if want_lgpio; then
    missing+=(python3-lgpio)
fi
if ((${#missing[@]})); then
    say "apt-get update (missing: ${missing[*]})"
    apt-get update -q
    if [[ " ${missing[*]} " != *" python3-lgpio "* ]] && want_lgpio; then
        missing+=(python3-lgpio)
    fi
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
installed python3-lgpio \
    || say "python3-lgpio is not installed: GPIO drivers will find no pin back end here"
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

# ---- build the release beside the running one -------------------------------------
# Build from a clean copy, so the checkout gets no root-owned build/ or *.egg-info.
work=$(mktemp -d)
new=
cleanup() {
    rm -rf "$work"
    # A release that was not switched to is never left half-made.
    if [[ -n $new && $new != "$(release_of current)" ]]; then rm -rf "$new"; fi
}
trap cleanup EXIT
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude=.hypothesis -cf - pyproject.toml README.md LICENSE smartbiked deploy \
    | tar -C "$work" -xf -
# What a release is built from; an unchanged checkout gives the same digest.
digest=$(cd "$work" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum \
    | sha256sum | cut -c1-12)
version=$(python3 -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$work/pyproject.toml")

built_from() { release_ok "$1" && [[ $(cat "$1/.source-digest" 2>/dev/null) == "$digest" ]]; }
current=$(release_of current)
previous=$(release_of previous)
if built_from "$current"; then
    release=$current
    say "smartbiked $version is installed already ($(basename "$release"))"
elif built_from "$previous"; then
    # After a rollback: the same code as the release rolled back from, no rebuild.
    release=$previous
    say "smartbiked $version is built already ($(basename "$release")): switching back to it"
else
    release=$RELEASES/$version-$(date -u +%Y%m%dT%H%M%SZ)-$digest
    new=$release
    say "building $(basename "$release")"
    install -d -m 0755 "$PREFIX" "$RELEASES"
    python3 -m venv --system-site-packages "$release"
    pip=("$release/bin/pip" --quiet --disable-pip-version-check --no-cache-dir)
    # Exactly the locked files (hash-checked), no resolver: the dependencies of a bike
    # change only when deploy/requirements.lock does.
    "${pip[@]}" install "${PIP_INDEX[@]}" --require-hashes --no-deps --only-binary=:all: \
        -r "$work/deploy/requirements.lock"
    # smartbiked itself, built with the locked setuptools, nothing downloaded.
    "${pip[@]}" install --no-index --no-deps --no-build-isolation "$work"
    "$release/bin/pip" check --disable-pip-version-check >/dev/null \
        || { "$release/bin/pip" check --disable-pip-version-check || true
             die "deploy/requirements.lock does not cover smartbiked's dependencies"; }
    "$release/bin/python" -c 'import systemd.daemon' \
        || die "the venv cannot import systemd.daemon (python3-systemd)"
    install -d "$release/share/$NAME"
    install -m 0644 "$work/deploy/$NAME.service" "$release/share/$NAME/"
    # What a bike with Bluetooth gets on top (ble_prepare, ble_apply): kept with the
    # release, so that a rollback brings back its own.
    install -m 0644 "$work/deploy/requirements-ble.lock" "$work"/deploy/bluetooth-*.conf \
        "$work/deploy/bluetooth-usb.rules" "$release/share/$NAME/"
    install -m 0755 "$work/deploy/common.sh" "$work/deploy/rollback.sh" \
        "$work/deploy/uninstall.sh" "$release/share/$NAME/"
    printf '%s\n' "$digest" >"$release/.source-digest"
    sync -f "$release/bin/smartbiked"
    touch "$release/.complete"
fi

# ---- configuration ----------------------------------------------------------------
install -d -m 0755 "$ETC"
if [[ -e $CONFIG ]]; then
    say "keeping $CONFIG"
else
    say "installing the example config as $CONFIG: set the bike id and broker there"
    install -m 0644 "$SRC/config/smartbike.toml" "$CONFIG"
fi
# Secrets are read by systemd (as root) and handed to the daemon: root-only on disk.
for secret in "${SECRETS[@]}"; do
    if [[ -e $secret ]]; then
        chown root:root "$secret"
        chmod 0600 "$secret"
    fi
done

# Bluetooth ([ble] enabled): its packages into the release before the check (which
# refuses an enabled [ble] without them); its drop-in goes in with the switch.
ble_prepare "$release"

say "checking $CONFIG with $(basename "$release")"
if ! check_config_with "$release"; then
    die "$CONFIG is invalid for $(basename "$release") (see above); nothing was switched:" \
        "the running version is untouched. Fix the file and run $0 again"
fi

# ---- switch -----------------------------------------------------------------------
# 0.1.0 had one venv in place at $PREFIX/venv. Its path stays valid (a drop-in may
# name it) as a link to the current release; the old files go once switched.
old_venv=
if [[ -d $PREFIX/venv && ! -L $PREFIX/venv ]]; then
    old_venv=$PREFIX/venv.0.1-old
    rm -rf "$old_venv"
    mv -T "$PREFIX/venv" "$old_venv"
fi
if [[ ! -e $PREFIX/venv ]]; then
    ln -sfn current "$PREFIX/venv"
fi
first=
[[ -e $UNIT ]] || first=first
switch_to "$release" "$first"
new=
if [[ -n $old_venv ]]; then
    say "removed the in-place venv of 0.1.0 ($PREFIX/venv is now a link to current)"
    rm -rf "$old_venv"
fi
prune_releases
if systemd_running; then
    systemctl --no-pager --lines=5 status "$NAME" || true
fi

cat <<EOF

Installed $(basename "$release"). The commands smartbiked and smartbike are in $BIN_DIR.
Next steps, if not done yet:
  - edit $CONFIG, then: systemctl reload $NAME
  - broker password:      install -m 0600 /dev/stdin $ETC/mqtt-password  (type it, Ctrl-D),
                          then: systemctl restart $NAME
  - moving from the old scripts: install -m 0600 ~/.env $ETC/env
  - watch it:             journalctl -u $NAME -f
  - back to the previous release: sudo deploy/rollback.sh
EOF
