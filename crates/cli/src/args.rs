//! What the subcommands share on their command lines: the usage error (exit
//! status 2) and sizes with K/M/G/T suffixes.

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
