//! samepage's daemon: what several processes share when they merge with
//! each other, served over a unix socket.
//!
//! No system call lets one process map pages into another's anonymous
//! memory, so every process runs its own scanner over its own memory; the
//! daemon owns what they share: per partition (one user's processes in one
//! trust domain) a stable tree, an unstable tree and a pool of slots
//! ([`samepage_core::shared::Shared`]). [`server::Daemon`] serves it,
//! [`client`] plugs it into a process's scanner: [`client::RemoteStableTree`],
//! [`client::RemoteUnstableTree`] and [`client::RemotePool`] implement the
//! core's traits with one request per batch ([`protocol`]).
//!
//! The socket is `/run/samepage/samepage.sock` for root and
//! `$XDG_RUNTIME_DIR/samepage.sock` otherwise ([`default_socket`]).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod procmaps;
pub mod protocol;
pub mod server;
pub mod view;

use std::path::PathBuf;

/// Where the daemon listens by default: `/run/samepage/samepage.sock` for
/// root, `$XDG_RUNTIME_DIR/samepage.sock` (or `/tmp/samepage-UID.sock`)
/// otherwise.
pub fn default_socket() -> PathBuf {
    let uid = rustix::process::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/samepage/samepage.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("samepage.sock"),
        _ => PathBuf::from(format!("/tmp/samepage-{}.sock", uid.as_raw())),
    }
}
