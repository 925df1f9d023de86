#!/bin/bash
# Rewrite deploy/requirements.lock: the pinned runtime packages with their hashes.
#
#   deploy/update-lock.sh                      # re-download the current pins, recheck hashes
#   deploy/update-lock.sh paho-mqtt==2.3.0     # move one pin (others stay)
#
# Run by a developer on purpose, never by the installer. Needs pip and the package
# index; takes wheels only (a pin without a pure-Python wheel is refused, since the
# bike has no compiler). Review the diff, run scripts/test and scripts/system-test,
# then commit.
set -euo pipefail

LOCK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/requirements.lock
die() { printf 'update-lock.sh: %s\n' "$*" >&2; exit 1; }

declare -A pins=()
order=()
while IFS= read -r line; do
    [[ $line =~ ^([A-Za-z0-9._-]+)==([^[:space:]\\]+) ]] || continue
    name=${BASH_REMATCH[1],,}
    pins[$name]=${BASH_REMATCH[2]}
    order+=("$name")
done <"$LOCK"
for arg in "$@"; do
    [[ $arg =~ ^([A-Za-z0-9._-]+)==([^[:space:]]+)$ ]] || die "not NAME==VERSION: $arg"
    name=${BASH_REMATCH[1],,}
    [[ -v pins[$name] ]] || order+=("$name")
    pins[$name]=${BASH_REMATCH[2]}
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
specs=()
for name in "${order[@]}"; do specs+=("$name==${pins[$name]}"); done
# A throw-away venv: Debian's python3 may have no pip of its own.
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --dest "$work/wheels" "${specs[@]}"

{
    sed -n '/^[^#]/q;p' "$LOCK"   # the comment block at the top, unchanged
    mapfile -t sorted < <(printf '%s\n' "${order[@]}" | LC_ALL=C sort)
    for name in "${sorted[@]}"; do
        # Wheel file names use underscores for dashes and keep the project's case.
        pattern=$(printf '%s' "$name" | sed 's/[-_.]/[-_.]/g')
        wheels=()
        while IFS= read -r w; do wheels+=("$w"); done < <(
            find "$work/wheels" -maxdepth 1 -iregex ".*/${pattern}-${pins[$name]//./\\.}-.*\\.whl")
        ((${#wheels[@]} == 1)) || die "expected one wheel for $name==${pins[$name]}, got ${#wheels[@]}"
        [[ ${wheels[0]} == *-none-any.whl ]] || die "${wheels[0]##*/} is not a pure-Python wheel"
        hash=$(sha256sum "${wheels[0]}" | cut -d' ' -f1)
        printf '%s==%s \\\n    --hash=sha256:%s\n' "$name" "${pins[$name]}" "$hash"
    done
} >"$work/lock"
mv "$work/lock" "$LOCK"
echo "wrote $LOCK"
