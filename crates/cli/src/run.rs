//! `samepage run -- CMD ARGS`: runs a program that knows nothing of
//! samepage with `libsamepage_preload.so` preloaded, so its
//! `madvise(MADV_MERGEABLE)` memory merges: through the daemon when one
//! answers at the socket, else by an engine inside the program with the
//! tunables given here.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
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
    /// prctl(PR_SET_MEMORY_MERGE) for the program from the start: not
    /// supported yet.
    #[arg(long)]
    merge_any: bool,
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

/// Runs the program (replacing this process).
pub fn run(a: RunArgs) -> Result<ExitCode> {
    if a.merge_any {
        bail!(crate::args::UsageError(
            "--merge-any (prctl(PR_SET_MEMORY_MERGE) for every mapping) is not supported yet: only memory the \
             program marks with madvise(MADV_MERGEABLE) merges"
                .into()
        ));
    }
    // Validated here, so a bad value is refused before the program runs.
    a.tunables.apply(&mut samepage::Tunables::default())?;
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
    let err = c.exec();
    bail!("cannot run {}: {err}", a.cmd[0])
}
