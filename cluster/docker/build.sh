#!/usr/bin/env bash
# Build the idemkv container image from scratch: no base image is pulled.
#
#   cluster/docker/build.sh [PATH_TO_IDEMKV_BINARY]
#
# Without an argument the release binary is built (`cargo build --release`).
# The binary is glibc-linked, so the image's root filesystem holds it, the
# shared libraries `ldd` lists, the dynamic loader, and the few files the
# process needs at runtime (/etc/nsswitch.conf, /etc/passwd, /tmp, /data).
# It is assembled in target/docker-rootfs (the build context) and built with
# cluster/docker/Dockerfile.
#
# Environment: IDEMKV_IMAGE (default idemkv:dev) names the image;
# IDEMKV_STRIP=0 keeps the debug info (the image is then ~4x larger).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=${IDEMKV_IMAGE:-idemkv:dev}
strip=${IDEMKV_STRIP:-1}

die() { echo "build.sh: $*" >&2; exit 1; }
command -v docker >/dev/null || die "docker is not installed"
command -v ldd >/dev/null || die "ldd is not installed"

if [ $# -ge 1 ] && [ -n "$1" ]; then
    bin=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
else
    (cd "$repo" && cargo build --release --bin idemkv)
    bin=$repo/target/release/idemkv
fi
[ -x "$bin" ] || die "$bin is not an executable"

ctx=$repo/target/docker-rootfs
mkdir -p "$repo/target"
# One build at a time: concurrent runs (two test processes) share the context.
exec 9>"$repo/target/docker-rootfs.lock"
if command -v flock >/dev/null; then flock 9; fi

rm -rf "$ctx"
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$ctx/data"
chmod 1777 "$root/tmp"
# /data is copied on its own (see the Dockerfile) so it belongs to the
# unprivileged user the node runs as.
chmod 0755 "$ctx/data"

if [ "$strip" = 1 ] && command -v objcopy >/dev/null; then
    objcopy --strip-debug "$bin" "$root/usr/local/bin/idemkv"
else
    cp "$bin" "$root/usr/local/bin/idemkv"
fi
chmod 0755 "$root/usr/local/bin/idemkv"

# Copy a host file to the same path in the rootfs, following symlinks (on a
# merged-/usr host /lib is a link; in the image it is a plain directory).
copy_lib() {
    local src=$1
    [ -e "$src" ] || die "library $src not found"
    mkdir -p "$root$(dirname "$src")"
    cp -L "$src" "$root$src"
}

# Every library ldd lists ("name => /path (addr)") and the loader
# ("/lib64/ld-linux-x86-64.so.2 (addr)"); linux-vdso has no file.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
[ -n "$libs" ] || die "ldd lists no libraries for $bin (a static binary needs none; remove this check)"
libdir=
for lib in $libs; do
    copy_lib "$lib"
    case $lib in */libc.so.*) libdir=$(dirname "$lib") ;; esac
done

# Name resolution (getaddrinfo for the peers' service names). glibc >= 2.34
# has the files and dns NSS modules inside libc.so.6; older ones load them
# with dlopen, so ship them too.
glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{ print $2 }')
major=${glibc%%.*}
minor=${glibc#*.}; minor=${minor%%.*}
if [ -n "$libdir" ] && [ -n "$glibc" ] && { [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 34 ]; }; }; then
    for lib in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
        [ -e "$libdir/$lib" ] && copy_lib "$libdir/$lib"
    done
fi

# Docker bind-mounts /etc/hosts, /etc/resolv.conf and /etc/hostname into
# every container; nsswitch.conf tells glibc to consult them.
cat > "$root/etc/nsswitch.conf" <<'NSS'
hosts:      files dns
networks:   files
passwd:     files
group:      files
NSS
cat > "$root/etc/passwd" <<'PW'
root:x:0:0:root:/:/sbin/nologin
idemkv:x:65532:65532:idemkv:/data:/sbin/nologin
PW
cat > "$root/etc/group" <<'GR'
root:x:0:
idemkv:x:65532:
GR

cp "$here/Dockerfile" "$ctx/Dockerfile"

# Smoke-test the rootfs before Docker sees it: the binary must start with
# only the copied loader and libraries.
if command -v chroot >/dev/null && [ "$(id -u)" = 0 ]; then
    chroot "$root" /usr/local/bin/idemkv --version >/dev/null \
        || die "the binary does not start inside the assembled rootfs"
fi

echo "build.sh: rootfs $(du -sh "$root" | cut -f1) in $ctx; building $image"
previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
# The classic builder: it needs neither buildx nor a frontend image to pull
# (it prints a deprecation notice, hence the captured output).
if ! out=$(DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" 2>&1); then
    echo "$out" >&2
    die "docker build failed"
fi
# Drop the image this tag named before, now untagged (it stays if a
# container still uses it or another tag names it).
current=$(docker image inspect -f '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    docker image rm "$previous" >/dev/null 2>&1 || true
fi
docker image ls "$image" --format 'build.sh: {{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}'
