//! Sizes as admins write them in `[cache] max_size` and `berth prune --max-size`.

use crate::{Error, Result};

const UNITS: [(&str, u32); 5] = [("", 0), ("K", 1), ("M", 2), ("G", 3), ("T", 4)];

/// Parses `500M`, `20G`, `1.5T`, `4096` (bytes). Units are binary (K = 1024); `KiB`, `KB`
/// and `k` spell the same unit.
pub fn parse_size(text: &str) -> Result<u64> {
    let invalid = |message: &str| Error::InvalidSize {
        value: text.to_string(),
        message: message.to_string(),
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let power = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, p)| *p)
        .ok_or_else(|| invalid("unknown unit; use K, M, G or T"))?;
    let value: f64 = number
        .parse()
        .map_err(|_| invalid("expected a number followed by an optional unit"))?;
    let bytes = value * 1024f64.powi(power as i32);
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(invalid("too large"));
    }
    Ok(bytes as u64)
}

/// `1.2G`-style size for tables.
pub fn format_size(bytes: u64) -> String {
    let (unit, power) = UNITS
        .iter()
        .rev()
        .find(|(_, p)| bytes >= 1u64 << (10 * p))
        .copied()
        .unwrap_or(("", 0));
    if power == 0 {
        format!("{bytes}B")
    } else {
        format!("{:.1}{unit}", bytes as f64 / (1u64 << (10 * power)) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in ["", "G", "10X", "-1G", "1e9", "99999999999T"] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(err.contains("examples"), "{bad}: {err}");
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(512), "512B");
        assert_eq!(format_size(1536), "1.5K");
        assert_eq!(format_size(3 << 30), "3.0G");
    }
}
