//! Memory as the OS reports it: `/proc/meminfo`, `/proc/self/smaps_rollup`
//! and `/proc/self/maps`.

use std::fs;

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix(':')?;
        let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// `/proc/meminfo` fields (such as `AnonPages`, `Shmem`, `MemAvailable`) in
/// bytes, read at one moment; `None` for a field that is missing (or all of
/// them if the file cannot be read).
pub fn meminfo<const N: usize>(names: &[&str; N]) -> [Option<u64>; N] {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    names.map(|n| field(&text, n))
}

/// `/proc/self/smaps_rollup` fields (such as `Anonymous`, `Pss_Anon`,
/// `AnonHugePages`) in bytes, read at one moment; `None` for a field that is
/// missing (or all of them if the file cannot be read).
pub fn smaps_rollup<const N: usize>(names: &[&str; N]) -> [Option<u64>; N] {
    let text = fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    names.map(|n| field(&text, n))
}

/// The command name of process `pid` (`/proc/PID/comm`, without its
/// newline); `None` once it is gone.
pub fn comm(pid: impl std::fmt::Display) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// CPU time process `pid` has used (utime + stime from `/proc/PID/stat`);
/// zero if it cannot be read.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    stat_cpu_time(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// utime + stime of a process's or thread's `stat` file
/// (`/proc/PID/stat`, `/proc/PID/task/TID/stat`); zero if it cannot be read.
pub fn stat_cpu_time(path: &std::path::Path) -> std::time::Duration {
    let Ok(stat) = fs::read_to_string(path) else { return std::time::Duration::ZERO };
    // Fields 14 and 15, counted after the command name (field 2, which may
    // hold spaces and parentheses): indexes 11 and 12.
    let f: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    std::time::Duration::from_nanos(ticks * 1_000_000_000 / rustix::param::clock_ticks_per_second().max(1))
}

/// Mappings of this process (lines of `/proc/self/maps`).
pub use samepage::testing::count_mappings as mappings;

#[cfg(test)]
mod tests {
    #[test]
    fn fields_in_bytes() {
        let text = "Rss:                1234 kB\nPss_Anon:             8 kB\nAnonymous:            0 kB\n";
        assert_eq!(super::field(text, "Rss"), Some(1234 * 1024));
        assert_eq!(super::field(text, "Pss_Anon"), Some(8192));
        assert_eq!(super::field(text, "Pss"), None, "a prefix of another name is not that field");
        assert!(super::mappings() > 0);
        let [rss, anon] = super::smaps_rollup(&["Rss", "Pss_Anon"]);
        assert!(rss.is_some_and(|r| r > 0) && anon.is_some());
        assert!(super::meminfo(&["MemTotal"])[0].is_some_and(|b| b > 0));
    }
}
