//! What the subcommands share on their command lines: the usage error (exit
//! status 2), the kernel's tunables, and sizes with K/M/G/T suffixes.

use crate::workload::PAGE;

/// A bad value on the command line or in its inputs: exit status 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

/// The kernel's tunables that `samepage daemon` and `samepage run` take on
/// their command lines, with the kernel's defaults.
#[derive(clap::Args, Debug)]
pub struct KsmTunables {
    /// pages_to_scan: pages scanned per batch (the daemon's is machine-wide,
    /// shared out across the processes in proportion to their mergeable
    /// memory).
    #[arg(long, default_value_t = 100)]
    pub pages_to_scan: u32,
    /// sleep_millisecs: sleep between batches.
    #[arg(long, default_value_t = 20)]
    pub sleep_ms: u32,
    /// max_page_sharing: most mappings of one stable page (2 to 2147483647).
    #[arg(long, default_value_t = 256)]
    pub max_page_sharing: u32,
    /// use_zero_pages: merge empty pages with the kernel's zero page.
    #[arg(long)]
    pub use_zero_pages: bool,
}

impl KsmTunables {
    /// The values by their sysfs names.
    pub fn named(&self) -> [(&'static str, String); 4] {
        [
            ("pages_to_scan", self.pages_to_scan.to_string()),
            ("sleep_millisecs", self.sleep_ms.to_string()),
            ("max_page_sharing", self.max_page_sharing.to_string()),
            ("use_zero_pages", u32::from(self.use_zero_pages).to_string()),
        ]
    }

    /// Sets them in `t`, validated as the kernel does (the error names the
    /// bad value and the allowed range).
    pub fn apply(&self, t: &mut samepage::Tunables) -> Result<(), UsageError> {
        for (name, value) in self.named() {
            t.set(name, &value).map_err(|e| UsageError(e.to_string()))?;
        }
        Ok(())
    }
}

/// A size in bytes: a number with an optional K, M, G or T suffix (powers of
/// 1024, `B`/`iB` accepted), from one page to 1 TiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let m = match t[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => return Err(format!("unknown size suffix {other:?} in {s:?}: use K, M, G or T")),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size: expected e.g. 4096, 64M, 1G"))?;
    let bytes = n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < PAGE as u64 || bytes > 1 << 40 {
        return Err(format!("size {s} is out of range: 4096 bytes to 1T"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("8kb"), Ok(8192));
        assert!(parse_size("12Q").unwrap_err().contains("12Q"));
        assert!(parse_size("100").is_err(), "less than a page");
        assert!(parse_size("2T").is_err(), "more than 1T");
    }
}
