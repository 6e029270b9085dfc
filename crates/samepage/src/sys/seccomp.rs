//! seccomp user notification: seeing the mapping changes a program makes
//! without going through an interposed symbol.
//!
//! `LD_PRELOAD` interposes only calls made through the PLT. glibc's own
//! `__munmap`, `__mremap`, `__mprotect`, `__madvise`, `__brk` (malloc arenas,
//! `shrink_heap`'s `MADV_DONTNEED`, `realloc`'s `mremap`, thread stacks,
//! ld.so) bypass it. Registered memory must be taken back from the engine
//! *before* such a call runs (afterwards the engine could map a pool page
//! over whatever the program put there).
//!
//! A seccomp filter with `SECCOMP_RET_USER_NOTIF` stops the calling thread
//! at system-call entry and hands its arguments to whoever holds the
//! listener fd; the thread goes on only when the listener answers
//! (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`: the call runs as asked; or an
//! error). Filters are inherited by every thread and child and survive
//! `exec`; the listener fd is `O_CLOEXEC`, so it must live in a process
//! that outlives the program's `exec`s: `samepage run`'s supervisor, the
//! program's parent. (Documentation/userspace-api/seccomp_filter.rst,
//! "Userspace Notification".)
//!
//! The filter notifies only the calls that can change registered memory:
//! `munmap`, `mremap`, `mprotect`, `brk`, `mmap` with `MAP_FIXED`, and
//! `madvise` with `MADV_DONTNEED`, `MADV_DONTNEED_LOCKED`, `MADV_FREE` or
//! `MADV_REMOVE`. Everything else (and every call of another architecture
//! or ABI) is allowed without a round trip.
//!
//! ## The engine's own calls
//!
//! The engine changes the program's mappings itself: every merge maps a pool
//! page over a program page (`mmap(MAP_FIXED)`), every copy-on-write break
//! moves a fresh copy over a merged page (`mremap(MREMAP_FIXED)`), unmerging
//! and discarding `madvise` and `munmap`. Stopping those too costs a round
//! trip to the supervisor each (measured: 494,809 of 504,155 stopped calls
//! in three prefork Python workers rebuilding a 16 MiB buffer five times a
//! second were the copy-on-write breaker's `mremap`s, and cost 30 s of
//! system CPU in 31 s). So the filter lets a call through at once when it
//! carries the run's [`OwnTag`], a random 64-bit value chosen by the
//! supervisor, compiled into the filter, and given to the preload library
//! in [`OWN_TAG_ENV`]:
//! * `munmap`, `mremap`, `mprotect`, `madvise` and `brk` take at most five
//!   arguments; the kernel never reads the sixth register (`r9`), which
//!   seccomp still shows as `args[5]`. The tag goes there.
//! * `mmap` reads all six, but only the low 32 bits of its `flags`: the
//!   kernel passes them through `calc_vm_flag_bits()`, masks `MAP_SHARED`'s
//!   with `LEGACY_MAP_MASK`, and validates the rest only for
//!   `MAP_SHARED_VALIDATE` (which the engine never uses). The tag's low half
//!   goes in `flags`' high 32 bits. (Checked on this 6.18 kernel: anonymous,
//!   private-file and shared-file `MAP_FIXED` mappings made so are the
//!   plain mappings `/proc/PID/maps` shows without the bits.)
//!
//! A program would have to find the tag in its environment and pass it on
//! purpose to get a call of its own through unstopped, and then only its own
//! memory would be at stake, as with any wrong `munmap`.

use super::{Op, SysError};
use linux_raw_sys::ptrace as p;
use rustix::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use rustix::ioctl::{self, opcode};

// Classic BPF opcodes (<linux/bpf_common.h>).
const LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

// Offsets into `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
fn arg_low(i: u32) -> u32 {
    16 + 8 * i
}

/// The `madvise` advice that discards memory (its pages read zeros
/// afterwards, or may): the filter stops it, and the preload library
/// discards registered memory through the engine.
pub const DISCARDING_ADVICE: [i32; 4] =
    [libc::MADV_DONTNEED, libc::MADV_FREE, libc::MADV_REMOVE, libc::MADV_DONTNEED_LOCKED];

/// The system calls the filter notifies, by number (x86-64).
pub mod nr {
    /// `mmap` (notified with `MAP_FIXED` only).
    pub const MMAP: i32 = 9;
    /// `mprotect`.
    pub const MPROTECT: i32 = 10;
    /// `munmap`.
    pub const MUNMAP: i32 = 11;
    /// `brk`.
    pub const BRK: i32 = 12;
    /// `mremap`.
    pub const MREMAP: i32 = 25;
    /// `madvise` (notified for discarding advice only).
    pub const MADVISE: i32 = 28;
}

/// The environment variable carrying the run's [`OwnTag`] (hex) to the
/// preload library.
pub const OWN_TAG_ENV: &str = "SAMEPAGE_OWN_TAG";

/// The value that marks the engine's own calls to the filter (see the
/// module documentation). Both halves are non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnTag(u64);

impl OwnTag {
    /// A fresh random tag (std's hasher keys come from the OS's randomness).
    pub fn random() -> OwnTag {
        use std::hash::BuildHasher;
        loop {
            let t = std::collections::hash_map::RandomState::new().hash_one(0u64);
            if let Some(tag) = OwnTag::new(t) {
                return tag;
            }
        }
    }

    /// `t` as a tag, if both its halves are non-zero.
    pub fn new(t: u64) -> Option<OwnTag> {
        (t as u32 != 0 && (t >> 32) as u32 != 0).then_some(OwnTag(t))
    }

    /// The value.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The environment's form (hex).
    pub fn to_env(self) -> String {
        format!("{:016x}", self.0)
    }

    /// Reads the environment's form.
    pub fn from_env(s: &str) -> Option<OwnTag> {
        u64::from_str_radix(s.trim(), 16).ok().and_then(OwnTag::new)
    }
}

/// This process's tag (0: none, the calls go unmarked).
static OWN_TAG: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Marks this process's engine calls with `tag` from now on (the preload
/// library does this at load, from [`OWN_TAG_ENV`]).
pub fn set_own_tag(tag: OwnTag) {
    OWN_TAG.store(tag.0, std::sync::atomic::Ordering::Relaxed);
}

/// `args` with this process's tag where the filter looks for it for call
/// `nr` (unchanged for calls the filter never stops, or without a tag).
pub fn tag_args(nr: i64, mut args: [usize; 6]) -> [usize; 6] {
    let tag = OWN_TAG.load(std::sync::atomic::Ordering::Relaxed) as usize;
    match nr as i32 {
        _ if tag == 0 => {}
        nr::MMAP => args[3] = (args[3] & 0xffff_ffff) | (tag << 32),
        nr::MUNMAP | nr::MREMAP | nr::MPROTECT | nr::BRK | nr::MADVISE => args[5] = tag,
        _ => {}
    }
    args
}

/// Makes system call `nr` as the engine's own (tagged, see [`tag_args`]):
/// the kernel's return value, or the errno.
///
/// # Safety
/// As the system call made with these arguments.
pub unsafe fn own_syscall(nr: i64, args: [usize; 6]) -> Result<usize, rustix::io::Errno> {
    let a = tag_args(nr, args);
    // SAFETY: guaranteed by the caller; the tag only occupies a register or
    // bits the kernel ignores for this call (module documentation).
    let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if r == -1 {
        Err(super::last_errno())
    } else {
        Ok(r as usize)
    }
}

/// A classic BPF program with symbolic jump targets, resolved at the end.
struct Asm {
    code: Vec<(p::sock_filter, Option<(To, To)>)>,
    at: Vec<Option<usize>>,
}

/// A jump target: a label placed later, or the next instruction.
#[derive(Clone, Copy)]
enum To {
    Label(usize),
    Next,
}

impl Asm {
    fn label(&mut self) -> To {
        self.at.push(None);
        To::Label(self.at.len() - 1)
    }
    fn here(&mut self, l: To) {
        if let To::Label(i) = l {
            self.at[i] = Some(self.code.len());
        }
    }
    fn stmt(&mut self, code: u16, k: u32) {
        self.code.push((p::sock_filter { code, jt: 0, jf: 0, k }, None));
    }
    /// A conditional jump: to `t` if true, else to `f`.
    fn jump(&mut self, code: u16, k: u32, t: To, f: To) {
        self.code.push((p::sock_filter { code, jt: 0, jf: 0, k }, Some((t, f))));
    }
    /// To `t` if the accumulator equals any of `ks`, else to `f`.
    fn jeq_any(&mut self, ks: &[u32], t: To, f: To) {
        for (i, &k) in ks.iter().enumerate() {
            self.jump(JEQ_K, k, t, if i + 1 == ks.len() { f } else { To::Next });
        }
    }
    fn finish(self) -> Vec<p::sock_filter> {
        let at = self.at;
        self.code
            .into_iter()
            .enumerate()
            .map(|(i, (mut ins, j))| {
                if let Some((t, f)) = j {
                    let off = |l: To| match l {
                        To::Next => 0,
                        To::Label(l) => {
                            let to = at[l].expect("every label is placed");
                            u8::try_from(to - i - 1).expect("forward jumps within 255")
                        }
                    };
                    ins.jt = off(t);
                    ins.jf = off(f);
                }
                ins
            })
            .collect()
    }
}

/// The filter program (see the module documentation).
fn program(tag: OwnTag) -> Vec<p::sock_filter> {
    let mut a = Asm { code: Vec::new(), at: Vec::new() };
    let (allow, notify, tagged, mmap, madvise) = (a.label(), a.label(), a.label(), a.label(), a.label());
    let (lo, hi) = (tag.0 as u32, (tag.0 >> 32) as u32);
    let next = To::Next;

    a.stmt(LD_W_ABS, ARCH);
    a.jump(JEQ_K, p::AUDIT_ARCH_X86_64, next, allow);
    a.stmt(LD_W_ABS, NR);
    a.jump(JEQ_K, nr::MMAP as u32, mmap, next);
    a.jump(JEQ_K, nr::MADVISE as u32, madvise, next);
    a.jeq_any(&[nr::MUNMAP, nr::MREMAP, nr::MPROTECT, nr::BRK].map(|n| n as u32), tagged, allow);

    a.here(madvise);
    a.stmt(LD_W_ABS, arg_low(2));
    a.jeq_any(&DISCARDING_ADVICE.map(|m| m as u32), tagged, allow);

    // At most five arguments: the tag is the sixth.
    a.here(tagged);
    a.stmt(LD_W_ABS, arg_low(5));
    a.jump(JEQ_K, lo, next, notify);
    a.stmt(LD_W_ABS, arg_low(5) + 4);
    a.jump(JEQ_K, hi, allow, notify);

    // mmap: only MAP_FIXED replaces memory; the tag is flags' high half.
    a.here(mmap);
    a.stmt(LD_W_ABS, arg_low(3));
    a.jump(JSET_K, rustix::mm::MapFlags::FIXED.bits(), next, allow);
    a.stmt(LD_W_ABS, arg_low(3) + 4);
    a.jump(JEQ_K, lo, allow, notify);

    a.here(allow);
    a.stmt(RET_K, p::SECCOMP_RET_ALLOW);
    a.here(notify);
    a.stmt(RET_K, p::SECCOMP_RET_USER_NOTIF);
    a.finish()
}

/// The supervisor's filter, letting calls tagged with one [`OwnTag`]
/// through: built beforehand ([`Filter::new`] allocates), installed in the
/// child about to `exec` the program ([`Filter::install`] does not: after
/// `fork()` in a process with other threads, only async-signal-safe work
/// is allowed, and `malloc` is not).
#[derive(Debug, Clone)]
pub struct Filter {
    program: Vec<p::sock_filter>,
}

impl Filter {
    /// The filter letting calls tagged with `tag` through.
    pub fn new(tag: OwnTag) -> Filter {
        Filter { program: program(tag) }
    }

    /// Installs the filter on the calling thread (and so on everything it
    /// `exec`s and forks afterwards) and returns the listener. Allocates
    /// nothing.
    ///
    /// Without `CAP_SYS_ADMIN` the kernel requires `no_new_privs`, which is
    /// set then (a set-user-ID program run afterwards gets no new
    /// privileges).
    pub fn install(&self) -> Result<OwnedFd, SysError> {
        install(&self.program)
    }
}

fn install(filter: &[p::sock_filter]) -> Result<OwnedFd, SysError> {
    // The kernel only reads the instructions (`struct sock_fprog` names
    // them through a non-const pointer).
    let prog = p::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    let flags = p::SECCOMP_FILTER_FLAG_NEW_LISTENER as usize;
    let call = |prog: &p::sock_fprog| {
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog): `prog`
        // points to `len` valid instructions that live across the call; the
        // kernel copies them. The return value is a new fd (the listener) or
        // -1 with errno.
        let r = unsafe { libc::syscall(libc::SYS_seccomp, p::SECCOMP_SET_MODE_FILTER as usize, flags, prog) };
        if r < 0 {
            Err(super::last_errno())
        } else {
            // SAFETY: the kernel just returned this fd to us; we own it.
            Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
        }
    };
    match call(&prog) {
        Err(rustix::io::Errno::ACCESS) => {
            rustix::thread::set_no_new_privs(true).op("prctl(PR_SET_NO_NEW_PRIVS)")?;
            call(&prog).op("seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)")
        }
        r => r.op("seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)"),
    }
}

/// One stopped system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// The kernel's cookie for the answer.
    pub id: u64,
    /// The calling thread (its id in the listener's pid namespace).
    pub tid: u32,
    /// The system call number ([`nr`]).
    pub nr: i32,
    /// Where the call was made from (the instruction after `syscall`).
    pub ip: u64,
    /// Its six arguments.
    pub args: [u64; 6],
}

/// The listener side of the filter.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

type Recv<'a> = ioctl::Updater<'a, { opcode::read_write::<p::seccomp_notif>(b'!', 0) }, p::seccomp_notif>;
type Send<'a> = ioctl::Updater<'a, { opcode::read_write::<p::seccomp_notif_resp>(b'!', 1) }, p::seccomp_notif_resp>;
type SetFlags = ioctl::Setter<{ opcode::write::<u64>(b'!', 4) }, u64>;

impl Listener {
    /// Wraps the fd [`Filter::install`] returned (possibly received from
    /// another process). Asks for synchronous wake-ups
    /// (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, 6.6+: the answered thread runs
    /// on the listener's CPU, saving a migration); older kernels go without.
    pub fn new(fd: OwnedFd) -> Listener {
        // SAFETY: the opcode is SECCOMP_IOCTL_NOTIF_SET_FLAGS, which takes a
        // u64 by pointer: right for the Setter's u64.
        let req = unsafe { SetFlags::new(1) };
        // SAFETY: an ioctl on the listener fd; the request owns its value
        // for the call.
        let _ = unsafe { ioctl::ioctl(&fd, req) };
        Listener { fd }
    }

    /// The fd, to poll for readiness (`POLLIN`: a call waits; `POLLHUP`: no
    /// task is left under the filter).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Receives one stopped call (blocks until one comes). `ENOENT` when the
    /// caller died meanwhile.
    pub fn recv(&self) -> Result<Notification, SysError> {
        // SAFETY: all-zero is a valid `seccomp_notif` (integers only); the
        // kernel requires it zeroed.
        let mut n: p::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: SECCOMP_IOCTL_NOTIF_RECV = _IOWR('!', 0, struct
        // seccomp_notif); the Updater points to our live, exclusively
        // borrowed struct for the call.
        let req = unsafe { Recv::new(&mut n) };
        // SAFETY: as above.
        unsafe { ioctl::ioctl(&self.fd, req) }.op("ioctl(SECCOMP_IOCTL_NOTIF_RECV)")?;
        Ok(Notification { id: n.id, tid: n.pid, nr: n.data.nr, ip: n.data.instruction_pointer, args: n.data.args })
    }

    fn answer(&self, id: u64, val: i64, error: i32, flags: u32) -> Result<(), SysError> {
        let mut r = p::seccomp_notif_resp { id, val, error, flags };
        // SAFETY: SECCOMP_IOCTL_NOTIF_SEND = _IOWR('!', 1, struct
        // seccomp_notif_resp); the Updater points to our live struct.
        let req = unsafe { Send::new(&mut r) };
        // SAFETY: as above.
        unsafe { ioctl::ioctl(&self.fd, req) }.op("ioctl(SECCOMP_IOCTL_NOTIF_SEND)")
    }

    /// Lets the call run as the program made it. `ENOENT` when the caller
    /// died (or was interrupted by a signal) meanwhile.
    pub fn allow(&self, id: u64) -> Result<(), SysError> {
        self.answer(id, 0, 0, p::SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    }

    /// Fails the call with `errno` without running it.
    pub fn fail(&self, id: u64, errno: i32) -> Result<(), SysError> {
        self.answer(id, 0, -errno.abs(), 0)
    }

    /// Returns `val` from the call without running it (as `brk` returns
    /// the break it leaves unchanged when it refuses).
    pub fn skip(&self, id: u64, val: u64) -> Result<(), SysError> {
        self.answer(id, val as i64, 0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let f = program(OwnTag::random());
        for (i, ins) in f.iter().enumerate() {
            if ins.code & 0x07 == 0x05 {
                assert!(i + 1 + (ins.jt as usize) < f.len() && i + 1 + (ins.jf as usize) < f.len(), "{i}");
            }
        }
        assert_eq!(f.last().unwrap().k, p::SECCOMP_RET_USER_NOTIF);
    }

    /// The filter on a thread of this test: untagged (or wrongly tagged)
    /// calls wait for the listener; tagged ones run at once.
    #[test]
    fn the_filter_stops_the_programs_calls_and_lets_tagged_ones_through() {
        const PAGE: usize = 4096;
        let tag = OwnTag::random();
        let (tx, rx) = std::sync::mpsc::channel();
        let filtered = std::thread::spawn(move || {
            let listener = Filter::new(tag).install().expect("seccomp filter");
            let prot = (libc::PROT_READ | libc::PROT_WRITE) as usize;
            let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as usize;
            // SAFETY: a fresh mapping where the kernel picks.
            let a = unsafe { libc::syscall(libc::SYS_mmap, 0, 5 * PAGE, prot, anon, -1i64, 0) } as usize;
            tx.send((listener, a)).expect("send");
            let call = |nr: i64, args: [usize; 6]| {
                // SAFETY: every call acts on the five pages mapped above only.
                unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) }
            };
            let fixed = anon | libc::MAP_FIXED as usize;
            let lo = tag.get() & 0xffff_ffff;
            [
                call(libc::SYS_munmap, [a, PAGE, 0, 0, 0, 0]), // stopped
                call(libc::SYS_munmap, [a + PAGE, PAGE, 0, 0, 0, tag.get() as usize]),
                call(libc::SYS_munmap, [a + 2 * PAGE, PAGE, 0, 0, 0, (tag.get() ^ 1 << 40) as usize]), // stopped
                call(libc::SYS_mmap, [a + 3 * PAGE, PAGE, prot, fixed | (lo << 32) as usize, usize::MAX, 0]),
                call(libc::SYS_mmap, [a + 4 * PAGE, PAGE, prot, fixed, usize::MAX, 0]), // stopped
                call(libc::SYS_madvise, [a + 4 * PAGE, PAGE, libc::MADV_DONTNEED as usize, 0, 0, tag.get() as usize]),
                call(libc::SYS_madvise, [a + 3 * PAGE, PAGE, libc::MADV_WILLNEED as usize, 0, 0, 0]),
            ]
        });
        let (fd, a) = rx.recv().expect("listener");
        let listener = Listener::new(fd);
        // Serve every stopped call until the listener hangs up (the thread's
        // exit makes calls of its own: glibc's madvise of the dead stack).
        let mut ours = Vec::new();
        loop {
            let mut fds = [rustix::event::PollFd::new(&listener.fd, rustix::event::PollFlags::IN)];
            rustix::event::poll(&mut fds, None).expect("poll");
            if !fds[0].revents().contains(rustix::event::PollFlags::IN) {
                break;
            }
            let Ok(n) = listener.recv() else { continue };
            if (a..a + 5 * PAGE).contains(&(n.args[0] as usize)) {
                ours.push((n.nr, n.args[0] as usize));
            }
            let _ = listener.allow(n.id);
        }
        assert_eq!(ours, [(nr::MUNMAP, a), (nr::MUNMAP, a + 2 * PAGE), (nr::MMAP, a + 4 * PAGE)]);
        let results = filtered.join().expect("the filtered thread");
        let a = a as i64;
        assert_eq!(results, [0, 0, 0, a + 3 * PAGE as i64, a + 4 * PAGE as i64, 0, 0]);
        // SAFETY: the two pages mapped over our own above, no longer used.
        // (Not the first three: they were unmapped, and another test's
        // thread may have been given that range since.)
        unsafe { libc::munmap((a + 3 * PAGE as i64) as *mut libc::c_void, 2 * PAGE) };
    }
}
