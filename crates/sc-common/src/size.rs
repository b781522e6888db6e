//! Byte sizes in the configuration: `"1MiB"`, `"64KiB"`, `"512"` or a bare integer.
//!
//! Used with `#[serde(with = "crate::size")]` on `u64` fields. Units are binary (KiB, MiB, GiB)
//! or decimal (kB, MB, GB); printing uses the largest binary unit that divides exactly.

use serde::{Deserialize, Deserializer, Serializer};

const UNITS: [(&str, u64); 7] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("kB", 1_000),
    ("B", 1),
];

/// Parses "1MiB" and the like into bytes.
pub fn parse(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| format!("bad size {text:?}: expected like \"1MiB\""))?;
    let unit = unit.trim();
    let factor = if unit.is_empty() {
        1
    } else {
        UNITS.iter().find(|(name, _)| *name == unit).map(|(_, factor)| *factor).ok_or_else(|| {
            format!("bad size unit {unit:?} in {text:?}: use B, KiB, MiB, GiB, kB, MB or GB")
        })?
    };
    number.checked_mul(factor).ok_or_else(|| format!("size {text:?} is too large"))
}

/// Formats bytes with the largest binary unit that divides them.
pub fn format(bytes: u64) -> String {
    for (name, factor) in &UNITS[..3] {
        if bytes >= *factor && bytes.is_multiple_of(*factor) {
            return format!("{}{name}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

/// Serde: serializes as text.
pub fn serialize<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*bytes))
}

/// Serde: accepts text with a unit or a bare integer.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Number(n) => Ok(n),
        Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("1MiB"), Ok(1 << 20));
        assert_eq!(parse("64 KiB"), Ok(64 << 10));
        assert_eq!(parse("512"), Ok(512));
        assert_eq!(parse("3kB"), Ok(3000));
        assert!(parse("1 parsec").is_err());
        assert!(parse("MiB").is_err());
        assert!(parse("99999999999GiB").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for n in [1u64 << 20, 1536, 1000, 7, 3 << 30] {
            assert_eq!(parse(&format(n)), Ok(n));
        }
        assert_eq!(format(1 << 20), "1MiB");
        assert_eq!(format(1536), "1536B");
    }
}
