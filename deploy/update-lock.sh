#!/bin/bash
# Rewrite deploy/requirements.lock (or, with --ble, deploy/requirements-ble.lock): the
# pinned runtime packages with their hashes.
#
#   deploy/update-lock.sh                        # re-download the current pins, recheck hashes
#   deploy/update-lock.sh paho-mqtt==2.3.0       # move one pin (others stay)
#   deploy/update-lock.sh --ble [NAME==VERSION]  # the same for the Bluetooth lock
#
# Run by a developer on purpose, never by the installer. Needs pip and the package
# index; takes wheels only, since the bike has no compiler. The main lock takes
# pure-Python wheels only (one hash fits every machine). The Bluetooth lock may take
# compiled wheels: each pin then gets the hash of its wheel for every machine in
# TARGETS (Debian 12's CPython 3.11 on x86_64 and on a 64-bit Pi), and a pin without
# a wheel for one of them is refused. Review the diff, run scripts/test and
# scripts/system-test, then commit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOCK=$HERE/requirements.lock
die() { printf 'update-lock.sh: %s\n' "$*" >&2; exit 1; }

# The machines the Bluetooth lock serves: the platform tags pip would accept there for
# bookworm (glibc 2.36, CPython 3.11). armv7l (32-bit Pi OS) is not among them: PyPI
# has no armv7l wheel of dbus-fast.
TARGETS=(x86_64 aarch64)
GLIBC_MINOR=36
PYTHON_VERSION=3.11

ble=
if [[ ${1:-} == --ble ]]; then
    ble=yes
    LOCK=$HERE/requirements-ble.lock
    shift
fi

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
download=("$work/venv/bin/python" -m pip download --quiet --disable-pip-version-check
          --no-deps --only-binary=:all:)
if [[ -z $ble ]]; then
    dirs=("$work/wheels/any")
    "${download[@]}" --dest "${dirs[0]}" "${specs[@]}"
else
    dirs=()
    for arch in "${TARGETS[@]}"; do
        tags=()
        for ((minor = GLIBC_MINOR; minor >= 17; minor--)); do
            tags+=(--platform "manylinux_2_${minor}_$arch")
        done
        tags+=(--platform "manylinux2014_$arch" --platform "linux_$arch")
        dirs+=("$work/wheels/$arch")
        "${download[@]}" --dest "$work/wheels/$arch" "${tags[@]}" \
            --python-version "$PYTHON_VERSION" --implementation cp \
            --abi "cp${PYTHON_VERSION/./}" --abi abi3 --abi none "${specs[@]}"
    done
fi

{
    sed -n '/^[^#]/q;p' "$LOCK"   # the comment block at the top, unchanged
    mapfile -t sorted < <(printf '%s\n' "${order[@]}" | LC_ALL=C sort)
    for name in "${sorted[@]}"; do
        # Wheel file names use underscores for dashes and keep the project's case.
        pattern=$(printf '%s' "$name" | sed 's/[-_.]/[-_.]/g')
        hashes=()
        for dir in "${dirs[@]}"; do
            wheels=()
            while IFS= read -r w; do wheels+=("$w"); done < <(
                find "$dir" -maxdepth 1 -iregex ".*/${pattern}-${pins[$name]//./\\.}-.*\\.whl")
            ((${#wheels[@]} == 1)) \
                || die "expected one wheel for $name==${pins[$name]} in ${dir##*/}, got ${#wheels[@]}"
            [[ -n $ble || ${wheels[0]} == *-none-any.whl ]] \
                || die "${wheels[0]##*/} is not a pure-Python wheel"
            hashes+=("$(sha256sum "${wheels[0]}" | cut -d' ' -f1)")
        done
        mapfile -t hashes < <(printf '%s\n' "${hashes[@]}" | LC_ALL=C sort -u)
        printf '%s==%s' "$name" "${pins[$name]}"
        printf ' \\\n    --hash=sha256:%s' "${hashes[@]}"
        printf '\n'
    done
} >"$work/lock"
mv "$work/lock" "$LOCK"
echo "wrote $LOCK"
