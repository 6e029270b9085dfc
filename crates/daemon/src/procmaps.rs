//! Who maps a pool memfd, from `/proc`: a pool page may be freed only when
//! no process maps it, and a process that maps the pool without having
//! touched a page (a forked child) has no page-table entry that the page's
//! mapcount would show.

/// Whether a process other than this one and those in `allowed` maps a
/// file whose `/proc/PID/maps` lines contain `identity` (a pool's inode
/// between spaces) and the name `samepage-pool`.
///
/// A process whose maps cannot be read counts as mapping it, unless it
/// started before this process: the pool's memfd did not exist then, so it
/// cannot have inherited a mapping of it (some processes, such as a
/// container's init, keep their maps from root too).
pub fn others_map_pool(identity: &str, allowed: &[u32]) -> bool {
    let me = std::process::id();
    let my_start = start_ticks(me);
    let Some(pids) = numbered_entries("/proc") else { return true };
    for pid in pids {
        if pid == me || allowed.contains(&pid) {
            continue;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            Ok(maps) => {
                if maps.lines().any(|l| l.contains(identity) && l.contains("samepage-pool")) {
                    return true;
                }
            }
            // Gone meanwhile (ENOENT, ESRCH).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(3) => {}
            Err(_) => {
                let older = matches!((start_ticks(pid), my_start), (Some(t), Some(m)) if t < m);
                if !older {
                    return true;
                }
            }
        }
    }
    false
}

/// When process `pid` started (clock ticks after boot: `/proc/PID/stat`
/// field 22).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The numbered entries of directory `dir` (`/proc`'s processes, a
/// process's `task` threads); `None` if it cannot be read.
///
/// Not `std::fs::read_dir`: its `opendir` allocates from the C library's
/// malloc, and an engine calls this while it holds its page space and the
/// fork guard. A program thread of a supervised process (`samepage run`)
/// that holds a malloc arena's lock may be stopped in a trimming system
/// call waiting for the engine, so the engine must not wait for that lock.
/// rustix's `Dir` reads with `getdents` into a buffer of its own (from the
/// Rust allocator).
pub fn numbered_entries(dir: &str) -> Option<Vec<u32>> {
    use rustix::fs::{Dir, Mode, OFlags};
    let fd = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let mut entries = Dir::read_from(fd).ok()?;
    let mut out = Vec::new();
    // An entry that cannot be read is skipped, as `read_dir(..).flatten()`
    // skips it; the listing goes on.
    while let Some(entry) = entries.read() {
        let Ok(entry) = entry else { continue };
        if let Some(n) = std::str::from_utf8(entry.file_name().to_bytes()).ok().and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_nobody_maps_is_not_mapped_and_start_times_read() {
        assert!(!others_map_pool(" 0 no-such-inode ", &[]));
        assert!(start_ticks(std::process::id()).is_some());
        assert!(start_ticks(1).is_some_and(|t| t <= start_ticks(std::process::id()).unwrap()));
    }

    #[test]
    fn numbered_entries_are_the_processes_and_threads() {
        let me = std::process::id();
        let procs = numbered_entries("/proc").unwrap();
        assert!(procs.contains(&me) && procs.contains(&1), "{procs:?}");
        // A thread of ours shows in our task directory, beside the main one.
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(rustix::thread::gettid().as_raw_nonzero().get() as u32).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let tasks = numbered_entries(&format!("/proc/{me}/task")).unwrap();
        drop(stop_tx);
        t.join().unwrap();
        assert!(tasks.contains(&me) && tasks.contains(&tid), "{tasks:?}");
        assert!(numbered_entries("/proc/no-such-directory").is_none());
    }
}
