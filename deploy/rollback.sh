#!/bin/bash
# Go back to the release that ran before the last upgrade (and, run again, forward).
#
#   sudo deploy/rollback.sh
#
# Swaps /opt/smartbiked/current and /opt/smartbiked/previous after checking
# /etc/smartbiked/smartbike.toml with the previous release's code: a config that the
# older version would refuse leaves everything as it is. Puts back that release's
# unit file, and restarts the service only if it was running.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/common.sh
source "$HERE/common.sh"

case ${1:-} in
    "") ;;
    -h|--help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (try --help)" ;;
esac
need_root
take_install_lock

current=$(release_of current)
previous=$(release_of previous)
release_ok "$current" || die "no current release in $PREFIX: install first (deploy/install.sh)"
release_ok "$previous" || die "no previous release to go back to (only $(basename "$current") is installed)"

# The previous release's Bluetooth packages (if [ble] is enabled and they are missing,
# from PyPI) and, with the switch, its drop-in.
ble_prepare "$previous"
say "checking $CONFIG with $(basename "$previous")"
check_config_with "$previous" \
    || die "$CONFIG is invalid for $(basename "$previous") (see above): nothing was changed"

say "rolling back from $(basename "$current") to $(basename "$previous")"
switch_to "$previous"
# switch_to made the old current the new previous: running this again goes forward.
if systemd_running; then
    systemctl --no-pager --lines=5 status "$NAME" || true
fi
say "now running $(basename "$(release_of current)"); $(basename "$(release_of previous)") is kept"
