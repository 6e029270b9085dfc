#!/usr/bin/env bash
# Build the samepage QEMU guest kit: a Debian kernel (extracted from its .deb,
# never installed on the host), an initramfs with busybox, the virtio modules
# and the static workload, and a deterministic raw disk image.
#
#   scripts/guests/build.sh [OUTDIR]          (default: target/guests)
#
# Idempotent: every step is skipped when its output is already there and up to
# date. Environment:
#   KERNEL_PKG=linux-image-6.1.0-NN-amd64  pick the kernel package (default:
#                                          what linux-image-amd64 depends on)
#   DISK_MB=64                             size of the disk image
#   NO_APT=1                               never call apt-get (fail instead)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/target/guests}
mkdir -p "$out"
out=$(cd "$out" && pwd)
DISK_MB=${DISK_MB:-64}
t_start=$(date +%s.%N)

log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- host tools
need=()
have_pkg() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
have_pkg busybox-static || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v gcc >/dev/null || need+=(gcc)
have_pkg libc6-dev || need+=(libc6-dev)
command -v gzip >/dev/null || need+=(gzip)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
	[ "${NO_APT:-0}" = 1 ] && die "missing packages: ${need[*]}"
	log "installing: ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
		apt-get update >/dev/null
		apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
	}
fi
busybox_bin=/bin/busybox
file -L "$busybox_bin" 2>/dev/null | grep -q 'statically linked' ||
	ldd "$busybox_bin" 2>&1 | grep -q 'not a dynamic' || die "$busybox_bin is not static (install busybox-static)"

# -------------------------------------------------------------------- kernel
kpkg=${KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
	kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n 1)
	if [ -z "$kpkg" ]; then
		[ "${NO_APT:-0}" = 1 ] && die "cannot resolve linux-image-amd64 (run apt-get update)"
		apt-get update >/dev/null
		kpkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n 1)
	fi
fi
[ -n "$kpkg" ] || die "cannot find the kernel package"
kver_pkg=$(apt-cache policy "$kpkg" 2>/dev/null | sed -n 's/^ *Candidate: //p')
want_id="$kpkg $kver_pkg"
kdir=$out/kernel
if [ -f "$kdir/ID" ] && [ "$(cat "$kdir/ID")" = "$want_id" ] && [ -f "$out/vmlinuz" ]; then
	log "kernel: $want_id (cached)"
else
	log "kernel: downloading $want_id"
	rm -rf "$kdir"
	mkdir -p "$kdir/deb" "$kdir/x"
	# apt-get download runs as _apt when it can write the directory.
	chown _apt "$kdir/deb" 2>/dev/null || true
	(cd "$kdir/deb" && apt-get download "$kpkg" >/dev/null 2>&1) || die "apt-get download $kpkg failed"
	deb=$(ls "$kdir"/deb/*.deb | head -n 1)
	dpkg-deb -x "$deb" "$kdir/x"
	modroot=$(ls -d "$kdir"/x/lib/modules/* | head -n 1)
	kuname=$(basename "$modroot")
	cp "$kdir/x/boot/vmlinuz-$kuname" "$out/vmlinuz"
	cp "$kdir/x/boot/config-$kuname" "$out/kernel.config"
	# Keep only the modules the guest needs (and their dependencies).
	declare -A seen=()
	order=()
	modpath() { find "$modroot/kernel" \( -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" \) | head -n 1; }
	visit() {
		local m=$1 f d
		[ -n "${seen[$m]:-}" ] && return
		seen[$m]=1
		f=$(modpath "$m")
		[ -n "$f" ] || die "module $m not found in $kpkg"
		for d in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | tr ',' ' '); do visit "$d"; done
		order+=("$m")
	}
	for m in virtio_pci virtio_blk; do
		if grep -q "^CONFIG_$(echo "$m" | tr a-z A-Z)=y" "$out/kernel.config"; then continue; fi
		visit "$m"
	done
	mkdir -p "$kdir/modules"
	for m in "${order[@]}"; do cp "$(modpath "$m")" "$kdir/modules/$m.ko"; done
	printf '%s\n' "${order[@]}" >"$kdir/modules.load"
	echo "$kuname" >"$kdir/uname"
	rm -rf "$kdir/x" # the .deb stays in $kdir/deb as the cache
	echo "$want_id" >"$kdir/ID"
fi
log "modules: $(tr '\n' ' ' <"$kdir/modules.load")"

# ------------------------------------------------------------------ workload
wl_src=$here/workload.c
if [ ! -x "$out/workload" ] || [ "$wl_src" -nt "$out/workload" ]; then
	log "workload: gcc -static -O2"
	gcc -static -O2 -Wall -Wextra -o "$out/workload.tmp" "$wl_src"
	mv "$out/workload.tmp" "$out/workload"
	"$out/workload" --selftest >/dev/null || die "workload self-test failed"
	"$out/workload" --selftest corrupt=5 >/dev/null 2>&1 && die "workload self-test: corruption not detected"
else
	log "workload: up to date"
fi

# ----------------------------------------------------------------- initramfs
initrd=$out/initramfs.cpio.gz
if [ ! -f "$initrd" ] || [ "$here/init" -nt "$initrd" ] || [ "$out/workload" -nt "$initrd" ] ||
	[ "$kdir/ID" -nt "$initrd" ] || [ "$busybox_bin" -nt "$initrd" ]; then
	log "initramfs: assembling"
	root=$(mktemp -d "$out/initramfs.XXXXXX")
	trap 'rm -rf "$root"' EXIT
	mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,usr/bin,usr/sbin}
	cp "$busybox_bin" "$root/bin/busybox"
	ln -s busybox "$root/bin/sh"
	install -m 0755 "$here/init" "$root/init"
	install -m 0755 "$out/workload" "$root/workload"
	cp "$kdir"/modules/*.ko "$root/lib/modules/"
	cp "$kdir/modules.load" "$root/etc/modules.load"
	# The kernel opens /dev/console before running /init; init remounts /dev.
	mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || log "warning: mknod /dev/console failed (init reopens it)"
	# Reproducible archive: sorted names, fixed mtimes, no gzip timestamp.
	find "$root" -exec touch -h -d @0 {} +
	(cd "$root" && find . -print0 | LC_ALL=C sort -z |
		cpio --null -o -H newc --reproducible --owner=0:0 --quiet) | gzip -9 -n >"$initrd.tmp"
	mv "$initrd.tmp" "$initrd"
	rm -rf "$root"
	trap - EXIT
else
	log "initramfs: up to date"
fi

# ---------------------------------------------------------------------- disk
disk=$out/disk.img
if [ -f "$disk" ] && [ -f "$disk.sha256" ] && [ "$(cat "$disk.mb" 2>/dev/null)" = "$DISK_MB" ] &&
	[ ! "$out/workload" -nt "$disk" ] &&
	[ "$(sha256sum "$disk" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$disk.sha256")" ]; then
	log "disk: up to date ($DISK_MB MiB)"
else
	log "disk: writing $DISK_MB MiB"
	"$out/workload" --gen-disk "$disk.tmp" "$DISK_MB"
	mv "$disk.tmp" "$disk"
	(cd "$out" && sha256sum disk.img >disk.img.sha256)
	echo "$DISK_MB" >"$disk.mb"
fi

# ------------------------------------------------------------------ manifest
qemu_version=$(qemu-system-x86_64 --version | head -n 1)
python3 - "$out" "$kpkg" "$kver_pkg" "$(cat "$kdir/uname")" "$qemu_version" "$DISK_MB" <<'EOF'
import hashlib, json, os, sys
out, kpkg, kver, uname, qemu, disk_mb = sys.argv[1:]
def sha(p):
    h = hashlib.sha256()
    with open(os.path.join(out, p), "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
m = {
    "kernel_package": kpkg, "kernel_package_version": kver, "kernel_release": uname,
    "qemu": qemu, "disk_mb": int(disk_mb),
    "modules": open(os.path.join(out, "kernel", "modules.load")).read().split(),
    "files": {p: {"bytes": os.path.getsize(os.path.join(out, p)), "sha256": sha(p)}
              for p in ("vmlinuz", "initramfs.cpio.gz", "workload", "disk.img")},
}
json.dump(m, open(os.path.join(out, "manifest.json"), "w"), indent=1)
EOF
t_end=$(date +%s.%N)
log "done in $(python3 -c "print(f'{$t_end-$t_start:.1f}')") s: $out/{vmlinuz,initramfs.cpio.gz,disk.img} (manifest.json)"
