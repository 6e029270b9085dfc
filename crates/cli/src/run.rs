//! `samepage run -- CMD ARGS`: runs a program that knows nothing of
//! samepage with `libsamepage_preload.so` preloaded, so its
//! `madvise(MADV_MERGEABLE)` memory merges: through the daemon when one
//! answers at the socket, else by an engine inside the program with the
//! tunables given here.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `samepage run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The daemon's socket [default: as `samepage daemon`]; without a daemon
    /// there, the program merges its own memory.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Never use a daemon: an engine inside the program.
    #[arg(long)]
    own: bool,
    /// Trust domain (a number) at the daemon: processes of different
    /// domains never share a page.
    #[arg(long, default_value_t = 0)]
    domain: u32,
    /// The program's own engine's tunables (a daemon's are the daemon's).
    #[command(flatten)]
    tunables: crate::args::KsmTunables,
    /// prctl(PR_SET_MEMORY_MERGE, 1) for the program from the start (as
    /// systemd's MemoryKSM=yes): every private anonymous mapping merges,
    /// present and future, in the program and its children. Runs the
    /// program under the seccomp supervisor.
    #[arg(long)]
    merge_any: bool,
    /// Run the program under the seccomp supervisor (implied by
    /// --merge-any), so that it may call prctl(PR_SET_MEMORY_MERGE) itself:
    /// the mapping changes glibc makes internally are then seen before they
    /// run.
    #[arg(long)]
    supervise: bool,
    /// Print what the supervisor did when the program ends.
    #[arg(long)]
    verbose: bool,
    /// The program and its arguments.
    #[arg(required = true, last = true)]
    cmd: Vec<String>,
}

/// Where `libsamepage_preload.so` is: `$SAMEPAGE_PRELOAD`, or beside this
/// binary (cargo puts both in `target/<profile>`, tests in its `deps`).
fn preload_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SAMEPAGE_PRELOAD") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the binary's directory")?;
    for d in [dir.to_path_buf(), dir.join("deps"), dir.join("../lib")] {
        let p = d.join("libsamepage_preload.so");
        if p.exists() {
            return Ok(p.canonicalize()?);
        }
    }
    bail!(
        "libsamepage_preload.so is not beside {} (build it: cargo build --release -p samepage-preload, \
         or say where it is in SAMEPAGE_PRELOAD)",
        exe.display()
    )
}

/// The program file `cmd` names (through `$PATH` when it has no `/`).
fn program_file(cmd: &str) -> Option<PathBuf> {
    let cmd = Path::new(cmd);
    if cmd.components().count() > 1 {
        return Some(cmd.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(cmd)).find(|p| p.is_file())
}

/// Whether `path` is a statically linked ELF program: no `PT_INTERP`
/// program header, so the dynamic loader never runs and `LD_PRELOAD` is
/// never read. (A script or anything unreadable: `false`.)
fn statically_linked(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let mut h = [0u8; 64];
    // 64-bit little-endian ELF only (this machine's kind).
    if f.read_exact(&mut h).is_err() || h[..4] != *b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return false;
    }
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let (phoff, phentsize, phnum) =
        (u64::from_le_bytes(h[0x20..0x28].try_into().unwrap_or_default()), u16_at(&h, 0x36), u16_at(&h, 0x38));
    if phentsize < 4 || f.seek(SeekFrom::Start(phoff)).is_err() {
        return false;
    }
    let mut ph = vec![0u8; phentsize as usize];
    for _ in 0..phnum {
        if f.read_exact(&mut ph).is_err() {
            return false;
        }
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == libc::PT_INTERP {
            return false;
        }
    }
    phnum > 0
}

/// Runs the program (replacing this process, or, supervised, as its
/// parent).
pub fn run(a: RunArgs) -> Result<ExitCode> {
    // Validated here, so a bad value is refused before the program runs.
    a.tunables.apply(&mut samepage::Tunables::default())?;
    if let Some(file) = program_file(&a.cmd[0]).filter(|f| statically_linked(f)) {
        eprintln!(
            "samepage run: {} is statically linked: LD_PRELOAD cannot load samepage into it, so nothing in it \
             merges{} (it runs all the same)",
            file.display(),
            if a.merge_any || a.supervise { " and its mapping changes only pass through the supervisor" } else { "" }
        );
    }
    let lib = preload_library()?;
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(old) if !old.is_empty() => format!("{} {old}", lib.display()),
        _ => lib.display().to_string(),
    };
    let mut c = std::process::Command::new(&a.cmd[0]);
    let spec: Vec<String> = a.tunables.named().iter().map(|(name, value)| format!("{name}={value}")).collect();
    c.args(&a.cmd[1..])
        .env("LD_PRELOAD", preload)
        .env("SAMEPAGE_DOMAIN", a.domain.to_string())
        .env("SAMEPAGE_TUNABLES", spec.join(","));
    if let Some(s) = &a.socket {
        c.env("SAMEPAGE_SOCKET", s);
    }
    if a.own {
        c.env("SAMEPAGE_MODE", "process");
    }
    if a.merge_any {
        c.env(samepage::supervise::MERGE_ANY_ENV, "1");
    }
    if !(a.merge_any || a.supervise) {
        let err = c.exec();
        bail!("cannot run {}: {err}", a.cmd[0])
    }
    supervised(c, &a)
}

/// The program, for [`forward`].
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: std::ffi::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; `pid` is our child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The supervisor must outlive the program: a program under the filter
/// whose listener is gone fails every stopped call with ENOSYS. So (after
/// the spawn, which would have handed ignored signals on to the program)
/// the terminal's ^C and ^\, which reach the program too, are ignored
/// here, and SIGTERM and SIGHUP are passed on to the program; the
/// supervisor ends when the program has. (This replaces the command's
/// restore-and-exit handler, which has nothing to restore here.)
fn stay_for(child: u32) {
    CHILD.store(child as i32, std::sync::atomic::Ordering::Relaxed);
    for (sig, handler) in [
        (libc::SIGINT, libc::SIG_IGN),
        (libc::SIGQUIT, libc::SIG_IGN),
        (libc::SIGTERM, forward as extern "C" fn(std::ffi::c_int) as libc::sighandler_t),
        (libc::SIGHUP, forward as extern "C" fn(std::ffi::c_int) as libc::sighandler_t),
    ] {
        // SAFETY: all-zero is a valid `sigaction` (empty mask, no flags);
        // the handler is SIG_IGN or `forward`, which only calls kill(2).
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = handler;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: a valid action for a catchable signal; the old one is not
        // wanted.
        unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
    }
}

/// Starts the program under the seccomp filter and serves its listener
/// until no process under the filter is left; returns the program's status.
fn supervised(mut c: std::process::Command, a: &RunArgs) -> Result<ExitCode> {
    use std::os::unix::net::{UnixDatagram, UnixListener};
    let dir = std::env::temp_dir().join(format!("samepage-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sock = dir.join("agents.sock");
    let agents = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let (ours, theirs) = UnixDatagram::pair().context("socketpair")?;
    c.env(samepage::supervise::AGENT_SOCKET_ENV, &sock);
    let theirs_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let tag = samepage::supervise::OwnTag::random();
    c.env(samepage::supervise::OWN_TAG_ENV, tag.to_env());
    let filter = samepage::supervise::Filter::new(tag);
    let hook = move || {
        let listener = filter.install().map_err(|e| std::io::Error::from(e.errno))?;
        // SAFETY: the fd is the socketpair end the parent created and keeps
        // open until after the spawn.
        let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(theirs_fd) };
        let fds = [std::os::fd::AsFd::as_fd(&listener)];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = rustix::net::SendAncillaryBuffer::new(&mut space);
        anc.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg(sock, &[std::io::IoSlice::new(b"L")], &mut anc, rustix::net::SendFlags::empty())?;
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe work is allowed (this process has another thread:
    // ctrlc's handler). It allocates nothing: the filter was built above,
    // and the ancillary buffer is on the stack; it makes plain system calls
    // (prctl, seccomp, sendmsg) on the child's only thread and sends the
    // listener to the parent over the socketpair.
    let c = unsafe { c.pre_exec(hook) };
    let mut child = c.spawn().with_context(|| format!("cannot run {}", a.cmd[0]))?;
    drop(theirs);
    let listener = {
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        rustix::net::recvmsg(
            &ours,
            &mut [std::io::IoSliceMut::new(&mut byte)],
            &mut anc,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        )
        .context("receiving the seccomp listener")?;
        let mut fd = None;
        for m in anc.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(mut fds) = m {
                fd = fds.next();
            }
        }
        fd.context("the program's child sent no seccomp listener")?
    };
    stay_for(child.id());
    let tally = crate::supervisor::serve(samepage::supervise::Listener::new(listener), agents)?;
    let status = child.wait().context("waiting for the program")?;
    let _ = std::fs::remove_dir_all(&dir);
    if a.verbose {
        eprintln!(
            "samepage run: {} calls stopped, {} passed to an agent first, {} failed by it, {} the engine's own, {} of processes without an agent",
            tally.notified(), tally.forwarded, tally.failed, tally.engine, tally.unattended
        );
        let [munmap, mremap, mprotect, brk, mmap, madvise] = tally.by_call;
        eprintln!(
            "samepage run: stopped calls: munmap {munmap}, mremap {mremap}, mprotect {mprotect}, brk {brk}, mmap(MAP_FIXED) {mmap}, madvise {madvise}"
        );
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(s)) => ExitCode::from(128 + s as u8),
        _ => ExitCode::FAILURE,
    })
}
