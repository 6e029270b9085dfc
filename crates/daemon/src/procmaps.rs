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
    let Ok(procs) = std::fs::read_dir("/proc") else { return true };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me || allowed.contains(&pid) {
            continue;
        }
        match std::fs::read_to_string(p.path().join("maps")) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_nobody_maps_is_not_mapped_and_start_times_read() {
        assert!(!others_map_pool(" 0 no-such-inode ", &[]));
        assert!(start_ticks(std::process::id()).is_some());
        assert!(start_ticks(1).is_some_and(|t| t <= start_ticks(std::process::id()).unwrap()));
    }
}
