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

/// A `/proc/meminfo` field (such as `AnonPages`, `Shmem`, `MemAvailable`) in bytes.
pub fn meminfo(name: &str) -> Option<u64> {
    field(&fs::read_to_string("/proc/meminfo").ok()?, name)
}

/// `/proc/self/smaps_rollup` fields (such as `Anonymous`, `Pss_Anon`,
/// `AnonHugePages`) in bytes, read at one moment; `None` for a field that is
/// missing (or all of them if the file cannot be read).
pub fn smaps_rollup<const N: usize>(names: &[&str; N]) -> [Option<u64>; N] {
    let text = fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    names.map(|n| field(&text, n))
}

/// Mappings of this process (lines of `/proc/self/maps`).
pub fn mappings() -> u64 {
    fs::read("/proc/self/maps").map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64).unwrap_or(0)
}

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
        assert!(super::meminfo("MemTotal").is_some_and(|b| b > 0));
    }
}
