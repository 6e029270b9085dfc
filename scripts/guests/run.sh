#!/usr/bin/env bash
# Boot N samepage guests under QEMU TCG and measure host-side merging.
#
#   scripts/guests/run.sh --guests N --mem MB --seconds S --mode kernel|none [options]
#
# --mode kernel  guest RAM is MADV_MERGEABLE (-machine mem-merge=on) and the
#                host's ksmd is driven with --pages-to-scan/--sleep-ms until the
#                KSM counters stop changing (or --seconds pass).
# --mode samepage  guest RAM is MADV_MERGEABLE (-machine mem-merge=on), every QEMU
#                runs under `samepage run` as a client of a samepage daemon started
#                here with the same settings as ksmd gets (run=0 until the first
#                snapshot, then run=1), sampled until its counters stop changing.
#                vm.max_map_count is raised to --map-count [1048576; 0 leaves it]
#                for the run and restored. $SAMEPAGE names the binary
#                [target/release/samepage],
#                $SAMEPAGE_DAEMON_ARGS adds daemon options (e.g. "--smart-scan false").
# --mode none    no merging (mem-merge=off unless --mem-merge on); the guests run
#                for --seconds. With --qemu-prefix this is the mode for an
#                external merger (e.g. --qemu-prefix "samepage run --").
#
# Options (defaults in brackets):
#   --guests N [2]           --mem MB [192] (workload memory per guest, sp.mem)
#   --guest-ram MB [2*mem, at least mem+192]  --seconds S [180]
#   --pages-to-scan N [1000] --sleep-ms MS [20]
#   --max-page-sharing N [current]  --use-zero-pages 0|1 [current]
#   --tol F [0.01]           convergence tolerance (relative)
#   --full                   keep measuring for all --seconds, even after converging
#   --seed-base N [1]        guest i gets sp.seed=N+i
#   --unique PCT [10] --churn PCT [0.1] --interval S [5] --verify PCT [100] --diskmb MB [8]
#   --append "ARGS"          extra kernel command-line words (e.g. "sp.zero=40")
#   --qemu-prefix "CMD"      prefix every QEMU command with CMD (shell words)
#   --qemu-arg ARG           extra QEMU argument (repeatable)
#   --mem-merge on|off       override the mode's -machine mem-merge setting
#   --tb-size MB [256]       TCG translation-cache size per guest
#   --build DIR [target/guests]   --out DIR [BUILD/runs/MODE-DATE]
#   --boot-timeout S [300]   --keep  (leave the guests running; ksmd is still restored)
#   --no-census              skip the content census of guest RAM (before and after):
#                            it reads every present guest page (pagemap + /proc/PID/mem)
#                            to count what an ideal merge reaches and what is merged
#
# Output: guest serial logs, before/after snapshots, a KSM timeline and
# summary.json in the run directory; the summary is also the last stdout line.
# Exit: 0 all guests verified ok, 1 a guest failed a check or died, 2 bad usage or setup.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
mon=$here/guestmon.py
KSM=/sys/kernel/mm/ksm

guests=2 mem=192 guest_ram="" seconds=180 mode="" pts=1000 sleep_ms=20 mps="" uzp=""
tol=0.01 full=0 seed_base=1 unique=10 churn=0.1 interval=5 verify=100 diskmb=8
census=1 map_count=1048576 append="" qemu_prefix="" mem_merge="" tb_size=256 build=$repo/target/guests out="" boot_timeout=300 keep=0
qemu_extra=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
	case $1 in
	--guests) guests=$2; shift 2 ;;
	--mem) mem=$2; shift 2 ;;
	--guest-ram) guest_ram=$2; shift 2 ;;
	--seconds) seconds=$2; shift 2 ;;
	--mode) mode=$2; shift 2 ;;
	--pages-to-scan) pts=$2; shift 2 ;;
	--sleep-ms) sleep_ms=$2; shift 2 ;;
	--max-page-sharing) mps=$2; shift 2 ;;
	--use-zero-pages) uzp=$2; shift 2 ;;
	--tol) tol=$2; shift 2 ;;
	--full) full=1; shift ;;
	--seed-base) seed_base=$2; shift 2 ;;
	--unique) unique=$2; shift 2 ;;
	--churn) churn=$2; shift 2 ;;
	--interval) interval=$2; shift 2 ;;
	--verify) verify=$2; shift 2 ;;
	--diskmb) diskmb=$2; shift 2 ;;
	--append) append=$2; shift 2 ;;
	--qemu-prefix) qemu_prefix=$2; shift 2 ;;
	--qemu-arg) qemu_extra+=("$2"); shift 2 ;;
	--mem-merge) mem_merge=$2; shift 2 ;;
	--tb-size) tb_size=$2; shift 2 ;;
	--build) build=$2; shift 2 ;;
	--out) out=$2; shift 2 ;;
	--boot-timeout) boot_timeout=$2; shift 2 ;;
	--keep) keep=1; shift ;;
	--no-census) census=0; shift ;;
	--map-count) map_count=$2; shift 2 ;;
	-h | --help) usage ;;
	*) echo "run.sh: unknown argument: $1" >&2; usage ;;
	esac
done
case $mode in kernel | none | samepage) ;; *) echo "run.sh: --mode kernel|samepage|none is required" >&2; usage ;; esac
[ -n "$mem_merge" ] || { [ "$mode" = none ] && mem_merge=off || mem_merge=on; }
if [ -z "$guest_ram" ]; then
	guest_ram=$((mem * 2))
	[ "$guest_ram" -ge $((mem + 192)) ] || guest_ram=$((mem + 192))
fi
for f in vmlinuz initramfs.cpio.gz disk.img; do
	[ -f "$build/$f" ] || { echo "run.sh: $build/$f missing: run scripts/guests/build.sh first" >&2; exit 2; }
done
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 missing: run build.sh" >&2; exit 2; }
build=$(cd "$build" && pwd)
[ -n "$out" ] || out=$build/runs/$mode-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
out=$(cd "$out" && pwd)
prefix=()
[ -z "$qemu_prefix" ] || eval "prefix=($qemu_prefix)"

t_start=$EPOCHREALTIME
usec() { local t=${1:-$EPOCHREALTIME}; echo "${t/./}"; }
elapsed() { # seconds since $1 (an $EPOCHREALTIME value), 2 decimals
	local d=$(($(usec) - $(usec "$1")))
	printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000))
}
log() { printf '[run.sh %7ss] %s\n' "$(elapsed "$t_start")" "$*" >&2; }
bg_pid=""
interruptible() { "$@" & bg_pid=$!; wait "$bg_pid"; local rc=$?; bg_pid=""; return $rc; } # a signal interrupts it
nap() { interruptible sleep "$1"; }

# ------------------------------------------------------------ ksmd handling
declare -A ksm_saved=()
ksm_touched=0
ksm_restored=null
ksm_write() { # ksm_write NAME VALUE
	if ! echo "$2" >"$KSM/$1" 2>/dev/null; then
		log "warning: cannot write $2 to $KSM/$1"
		return 1
	fi
}
ksm_restore() {
	[ "$ksm_touched" = 1 ] || return 0
	ksm_touched=0
	log "restoring ksmd settings: $(for k in run pages_to_scan sleep_millisecs max_page_sharing use_zero_pages; do printf '%s=%s ' "$k" "${ksm_saved[$k]}"; done)"
	local ok=true
	ksm_write run 2 || ok=false # unmerge everything first (max_page_sharing needs it)
	for k in max_page_sharing use_zero_pages pages_to_scan sleep_millisecs run; do
		if [ "$(cat "$KSM/$k")" != "${ksm_saved[$k]}" ]; then ksm_write "$k" "${ksm_saved[$k]}" || ok=false; fi
	done
	for k in run pages_to_scan sleep_millisecs max_page_sharing use_zero_pages; do
		[ "$(cat "$KSM/$k")" = "${ksm_saved[$k]}" ] || ok=false
	done
	ksm_restored=$ok
}

# ---------------------------------------------------------- samepage daemon
daemon_pid=""
saved_map_count=""
stop_daemon() {
	if [ -n "$daemon_pid" ]; then
		kill -TERM "$daemon_pid" 2>/dev/null || true
		wait "$daemon_pid" 2>/dev/null || true
		daemon_pid=""
	fi
	if [ -n "$saved_map_count" ]; then
		echo "$saved_map_count" >/proc/sys/vm/max_map_count || log "warning: cannot restore vm.max_map_count=$saved_map_count"
		saved_map_count=""
	fi
}

# ------------------------------------------------------------------ guests
launcher_pids=()
qemu_pids=()
stop_guests() {
	local p i
	[ ${#launcher_pids[@]} -gt 0 ] || return 0
	for i in "${!launcher_pids[@]}"; do
		p=$(cat "$out/guest$i.pid" 2>/dev/null || true)
		[ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
		kill -TERM "${launcher_pids[$i]}" 2>/dev/null || true
	done
	for _ in $(seq 50); do
		local alive=0
		for i in "${!launcher_pids[@]}"; do
			p=$(cat "$out/guest$i.pid" 2>/dev/null || true)
			{ [ -n "$p" ] && kill -0 "$p" 2>/dev/null; } && alive=1
			kill -0 "${launcher_pids[$i]}" 2>/dev/null && alive=1
		done
		[ $alive = 0 ] && break
		sleep 0.1
	done
	for i in "${!launcher_pids[@]}"; do
		p=$(cat "$out/guest$i.pid" 2>/dev/null || true)
		[ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
		kill -KILL "${launcher_pids[$i]}" 2>/dev/null || true
		wait "${launcher_pids[$i]}" 2>/dev/null || true
	done
	launcher_pids=()
}
leftover_qemu() { # pids of this run's QEMUs that are still alive
	local i p
	for i in $(seq 0 $((guests - 1))); do
		p=$(cat "$out/guest$i.pid" 2>/dev/null || true)
		[ -n "$p" ] && kill -0 "$p" 2>/dev/null && printf '%s ' "$p"
	done
	return 0
}
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	[ -z "$bg_pid" ] || kill -TERM "$bg_pid" 2>/dev/null || true
	if [ "$keep" = 1 ]; then
		log "--keep: guests left running (pids $(leftover_qemu))"
	else
		stop_guests
	fi
	ksm_restore
	stop_daemon
	exit $rc
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------ start
if [ "$mode" = kernel ]; then
	[ -w "$KSM/run" ] || { echo "run.sh: --mode kernel needs root and $KSM" >&2; exit 2; }
	if [ "$(cat $KSM/run)" != 0 ]; then
		echo "run.sh: ksmd is already running (run=$(cat $KSM/run)); refusing to take it over" >&2
		exit 2
	fi
fi
for k in run pages_to_scan sleep_millisecs max_page_sharing use_zero_pages; do
	ksm_saved[$k]=$(cat "$KSM/$k" 2>/dev/null || echo "")
done
[ -n "$mps" ] || mps=${ksm_saved[max_page_sharing]:-256}
[ -n "$uzp" ] || uzp=${ksm_saved[use_zero_pages]:-0}

if [ "$mode" = samepage ]; then
	sp_bin=${SAMEPAGE:-$repo/target/release/samepage}
	[ -x "$sp_bin" ] || { echo "run.sh: $sp_bin missing: cargo build --release" >&2; exit 2; }
	sock=$out/samepage.sock
	rm -f "$sock"
	# Scattered merged pages are a mapping each: with the default
	# vm.max_map_count (65530) the engine's VMA budget stops merging a guest
	# at ~32k mappings (README, "vm.max_map_count"). Raised for the run
	# (--map-count), restored at the end.
	if [ "$map_count" != 0 ] && [ -w /proc/sys/vm/max_map_count ] && [ "$(cat /proc/sys/vm/max_map_count)" -lt "$map_count" ]; then
		saved_map_count=$(cat /proc/sys/vm/max_map_count)
		echo "$map_count" >/proc/sys/vm/max_map_count
	fi
	uzp_arg=()
	[ "$uzp" = 1 ] && uzp_arg=(--use-zero-pages)
	"$sp_bin" daemon --socket "$sock" --run 0 --pages-to-scan "$pts" --sleep-ms "$sleep_ms" \
		--max-page-sharing "$mps" "${uzp_arg[@]}" ${SAMEPAGE_DAEMON_ARGS:-} >"$out/daemon.log" 2>&1 &
	daemon_pid=$!
	for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
	[ -S "$sock" ] || { echo "run.sh: the samepage daemon did not start: $(cat "$out/daemon.log")" >&2; exit 2; }
	export SAMEPAGE_BIN=$sp_bin SAMEPAGE_SOCKET=$sock SAMEPAGE_DAEMON_PID=$daemon_pid
	prefix=("$sp_bin" run --socket "$sock" -- "${prefix[@]}")
fi
disk_sha=$(cut -d' ' -f1 "$build/disk.img.sha256" 2>/dev/null || true)
log "mode=$mode guests=$guests mem=${mem}MiB guest_ram=${guest_ram}MiB mem-merge=$mem_merge out=$out"
declare -A ready_s=()
for i in $(seq 0 $((guests - 1))); do
	seed=$((seed_base + i))
	kargs="console=ttyS0 panic=-1 quiet sp.mem=$mem sp.seed=$seed sp.unique=$unique sp.churn=$churn"
	kargs+=" sp.interval=$interval sp.verify=$verify sp.diskmb=$diskmb $append"
	cmd=(qemu-system-x86_64 -name "sp-guest$i" -accel "tcg,tb-size=$tb_size" -machine "pc,mem-merge=$mem_merge"
		-m "$guest_ram" -smp 1 -nodefaults -no-user-config -nographic -monitor none
		-serial "file:$out/guest$i.log" -qmp "unix:$out/guest$i.qmp,server=on,wait=off"
		-no-reboot -pidfile "$out/guest$i.pid"
		-kernel "$build/vmlinuz" -initrd "$build/initramfs.cpio.gz" -append "$kargs"
		-drive "file=$build/disk.img,if=virtio,cache=none,format=raw,readonly=on"
		"${qemu_extra[@]}")
	printf '%q ' "${prefix[@]}" "${cmd[@]}" >"$out/guest$i.cmd"
	echo >>"$out/guest$i.cmd"
	rm -f "$out/guest$i.pid" "$out/guest$i.log"
	"${prefix[@]}" "${cmd[@]}" </dev/null >"$out/guest$i.stdout" 2>&1 &
	launcher_pids[$i]=$!
done
t_launch=$EPOCHREALTIME

# Wait until every guest printed "ready" (and a first complete round).
wait_rounds() { # wait_rounds MIN_ROUND TIMEOUT: every guest has check ok and disk ok >= MIN_ROUND
	local want=$1 deadline=$(($(date +%s) + $2)) i ok g
	while :; do
		ok=1
		for i in $(seq 0 $((guests - 1))); do
			kill -0 "${launcher_pids[$i]}" 2>/dev/null || { log "guest $i exited: $(tail -n 3 "$out/guest$i.log" "$out/guest$i.stdout" 2>/dev/null | tr '\n' ' ')"; return 1; }
			if [ -z "${ready_s[$i]:-}" ] && grep -aq 'SAMEPAGE-GUEST ready' "$out/guest$i.log" 2>/dev/null; then
				ready_s[$i]=$(elapsed "$t_launch")
				log "guest $i ready after ${ready_s[$i]} s"
			fi
			[ "$want" -gt 0 ] || { [ -n "${ready_s[$i]:-}" ] || ok=0; continue; }
			g=$(python3 "$mon" guestlog "$out/guest$i.log")
			python3 -c 'import json,sys; g=json.loads(sys.argv[1]); sys.exit(0 if min(g["check_ok_rounds"], g["disk_ok_rounds"]) >= int(sys.argv[2]) or g["failure_count"] else 1)' "$g" "$want" || ok=0
		done
		[ $ok = 1 ] && return 0
		[ "$(date +%s)" -lt "$deadline" ] || { log "timeout waiting for guests (round >= $want)"; return 1; }
		sleep 0.3
	done
}
max_round() { # the smallest, over guests, of min(check ok round, disk ok round)
	local i r m=""
	for i in $(seq 0 $((guests - 1))); do
		r=$(python3 "$mon" guestlog "$out/guest$i.log" | python3 -c 'import json,sys; g=json.load(sys.stdin); print(min(g["check_ok_rounds"], g["disk_ok_rounds"]))')
		{ [ -z "$m" ] || [ "$r" -lt "$m" ]; } && m=$r
	done
	echo "${m:-0}"
}

boot_ok=1
wait_rounds 0 "$boot_timeout" || boot_ok=0
[ $boot_ok = 1 ] && { wait_rounds 1 $((boot_timeout)) || boot_ok=0; }
for i in $(seq 0 $((guests - 1))); do qemu_pids[$i]=$(cat "$out/guest$i.pid" 2>/dev/null || echo 0); done

# (python gets the free-form strings as arguments)
write_meta() {
	local restored=${1:-None} left=${2:-}
	python3 - "$out/meta.json" "$qemu_prefix" "$append" "$left" "$restored" "${verified_after:-None}" <<EOF
import json, sys
path, prefix, append, left, restored, verified = sys.argv[1:7]
conv = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}
ready = {$(for i in "${!ready_s[@]}"; do printf '"%s": %s, ' "$i" "${ready_s[$i]}"; done)}
m = {"mode": "$mode", "guests": $guests, "mem": $mem, "guest_ram": $guest_ram, "seed_base": $seed_base,
     "mem_merge": "$mem_merge", "qemu_prefix": prefix, "ready_s": ready,
     "ksm_settings": $( [ "$mode" != none ] && echo "{\"pages_to_scan\": $pts, \"sleep_millisecs\": $sleep_ms, \"max_page_sharing\": $mps, \"use_zero_pages\": $uzp}" || echo None),
     "host_thp": open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip(),
     "workload": {"unique": $unique, "churn": $churn, "interval": $interval, "verify": $verify, "diskmb": $diskmb, "append": append},
     "verified_after": conv[verified], "ksm_restored": conv[restored], "leftover_qemu": [int(p) for p in left.split()]}
json.dump(m, open(path, "w"), indent=1)
EOF
}

verified_after=False
if [ $boot_ok = 1 ]; then
	log "all $guests guests ready (max $(printf '%s\n' "${ready_s[@]}" | sort -n | tail -n 1) s); first round done"
	python3 "$mon" snapshot "${qemu_pids[@]}" >"$out/before.json"
	if [ $census = 1 ]; then
		python3 "$mon" census --mps "$mps" "${qemu_pids[@]}" >"$out/census_before.json"
		log "census before: $(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print("present", c["present_pages"], "zero", c["zero_pages"], "mergeable", c["mergeable_pages"], "ideal", c["ideal"])' "$out/census_before.json")"
	fi
	# What `samepage estimate` says merging will save, read before anything
	# merges (guest RAM is what QEMU marks MADV_MERGEABLE). Not under
	# samepage run: there the preload library takes QEMU's madvise, so the
	# kernel never marks the VMAs (no `mg` in smaps) and the estimate would
	# read nothing; the guests are the same as the kernel mode's.
	est_bin=${SAMEPAGE:-$repo/target/release/samepage}
	if [ -x "$est_bin" ] && [ "$mode" != samepage ]; then
		est_args=(estimate --json --mergeable-only --max-page-sharing "$mps")
		[ "$uzp" = 1 ] && est_args+=(--use-zero-pages)
		if "$est_bin" "${est_args[@]}" --pid "${qemu_pids[@]}" >"$out/estimate_before.json"; then
			log "estimate before merging: $(python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); c=e["counters"]; print("pages_shared", c["pages_shared"], "pages_sharing", c["pages_sharing"], "ksm_zero_pages", c["ksm_zero_pages"], "saved", round(e["saved_bytes"] / 2**20, 1), "MiB in", round(e["read_seconds"], 2), "s")' "$out/estimate_before.json")"
		fi
	fi
	if [ "$mode" != none ]; then
		if [ "$mode" = kernel ]; then
			ksm_touched=1
			if [ "$(cat $KSM/pages_shared)" != 0 ] && [ "$(cat $KSM/max_page_sharing)" != "$mps" ]; then ksm_write run 2; fi
			[ "$(cat $KSM/max_page_sharing)" = "$mps" ] || ksm_write max_page_sharing "$mps"
			ksm_write use_zero_pages "$uzp"
			ksm_write pages_to_scan "$pts"
			ksm_write sleep_millisecs "$sleep_ms"
			ksm_write run 1
		else
			"$sp_bin" set --socket "$sock" run=1 >/dev/null
		fi
		log "$mode merging: pages_to_scan=$pts sleep_millisecs=$sleep_ms max_page_sharing=$mps use_zero_pages=$uzp"
		interruptible python3 "$mon" converge --seconds "$seconds" --tol "$tol" --timeline "$out/timeline.jsonl" "${qemu_pids[@]}" >"$out/converge.json"
		log "converge: $(cat "$out/converge.json")"
		if [ "$full" = 1 ]; then
			rest=$(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(max(0, int(float(sys.argv[2]) - c['detected_after_s'])))" "$out/converge.json" "$seconds")
			log "--full: measuring $rest s more"
			nap "$rest"
		fi
	else
		log "no merging by run.sh; holding for $seconds s"
		nap "$seconds"
	fi
	python3 "$mon" snapshot "${qemu_pids[@]}" >"$out/after.json"
	if [ $census = 1 ]; then
		python3 "$mon" census --mps "$mps" "${qemu_pids[@]}" >"$out/census_after.json"
		log "census after: $(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print("present", c["present_pages"], "ideal", c["ideal"], "now", c["ksm_now"])' "$out/census_after.json")"
	fi
	# Every guest must complete a whole round (memory check + O_DIRECT disk read)
	# after the measurement, i.e. on merged memory.
	r=$(max_round)
	log "waiting for every guest to finish round $((r + 1)) (a whole round after the measurement)"
	if wait_rounds $((r + 1)) $((${interval%.*} * 3 + 60)); then verified_after=True; fi
fi

if [ "$keep" != 1 ]; then stop_guests; fi
ksm_restore
stop_daemon
write_meta "$ksm_restored" "$(leftover_qemu)"
python3 "$mon" summary --out "$out" >"$out/summary.json"
trap - EXIT
python3 - "$out/summary.json" >&2 <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"guests_ok={s['guests_ok']} ready_s_max={s['ready_s_max']} ksm_restored={s['ksm_restored']}")
c = s.get("converge")
if c:
    f = c["final"]
    print(f"converged={c['converged']} in {c['time_to_converge_s']} s (detected {c['detected_after_s']} s), merger cpu {c['merger_cpu_s']} s; "
          f"pages_shared={f['pages_shared']} pages_sharing={f['pages_sharing']} ksm_zero_pages={f['ksm_zero_pages']}")
for k, v in (s.get("memory") or {}).items():
    if v['before'] is not None:
        print(f"  {k:22} before {v['before']:>9} after {v['after']:>9} delta {v['delta']:>9}")
e = s.get("estimate_before")
if e and e["off_percent"] is not None:
    print(f"estimate before merging: saved {e['saved_mib']} MiB (pages_sharing {e['pages_sharing']}); "
          f"guest RAM memory (Pss, pool in full) fell {e['guest_ram_memory_fell_mib']} MiB ({e['off_percent']:+.1f}% from the estimate)")
for g in s["guest_results"]:
    print(f"  seed {g['seed']}: check ok rounds {g['check_ok_rounds']}, disk ok rounds {g['disk_ok_rounds']}, failures {g['failure_count']} {g['failures'][:2]}")
EOF
cat "$out/summary.json"
python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["guests_ok"] else 1)' "$out/summary.json"
