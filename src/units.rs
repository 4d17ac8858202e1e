//! Sizes as Docker users write them (`10G`, `512MB`, `1.5g`, `1073741824`).
//!
//! Same rules as Docker's `units.RAMInBytes`, which dockerd's built-in drivers
//! use for `--storage-opt size=`: binary multiples (k = 1024), an optional
//! trailing `b`/`ib`, case-insensitive.

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason}")]
pub struct InvalidSize {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a size in bytes.
pub fn parse_size(input: &str) -> Result<u64, InvalidSize> {
    let err = |reason| InvalidSize {
        input: input.chars().take(64).collect(),
        reason,
    };
    let s = input.trim().to_ascii_lowercase();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(err("no number"));
    }
    let value: f64 = number.parse().map_err(|_| err("not a number"))?;
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    let multiplier: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(err("unknown unit (use k, m, g, t or p)")),
    };
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(bytes as u64)
}

/// Formats bytes for humans the way `rbd ls -l` does (`10 GiB`, `512 MiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("1024", 1024),
            ("1k", 1024),
            ("10G", 10 << 30),
            ("10g", 10 << 30),
            ("10GB", 10 << 30),
            ("10GiB", 10 << 30),
            ("512M", 512 << 20),
            ("1.5g", 3 << 29),
            (" 2t ", 2 << 40),
        ] {
            assert_eq!(parse_size(text).unwrap(), bytes, "{text}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in [
            "",
            "G",
            "-1G",
            "10X",
            "1..2G",
            "10 GG",
            "1e3",
            "99999999999p",
        ] {
            let err = parse_size(text).unwrap_err();
            assert!(err.to_string().starts_with("invalid size"), "{text}: {err}");
        }
    }

    #[test]
    fn formats_like_rbd() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(1000), "1000 B");
    }
}
