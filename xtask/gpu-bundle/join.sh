#!/bin/sh
# join.sh: puts the GPU check bundle back together from its parts (written
# by `cargo xtask gpu-bundle --split-mib N` for media with size limits),
# checks each part's SHA-256, unpacks it beside the parts, and runs its
# check.sh with the arguments given here.
#
#   sh join.sh [OUT_DIR]        (MEC_JOIN_ONLY=1: join and unpack only)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
if ! sha256sum -c --quiet PARTS.sha256; then
    echo "join.sh: a part is missing or damaged (see above): copy it again" >&2
    exit 65 # EX_DATAERR
fi
name=$(head -n 1 PARTS.sha256 | awk '{ print $2 }' | sed 's/\.part-[0-9]*$//')
cat $(awk '{ print $2 }' PARTS.sha256) >"$name"
tar -xf "$name"
rm -f "$name"
echo "join.sh: unpacked $here/mec-gpu-check"
[ "${MEC_JOIN_ONLY:-}" = 1 ] && exit 0
exec sh "$here/mec-gpu-check/check.sh" "$@"
