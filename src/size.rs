//! Sizes on the command line: digits with an optional K, M, G or T suffix,
//! which may be followed by "B" or "iB" (powers of 1024 either way).

/// What a number without a suffix means where it is given.
#[derive(Debug, Clone, Copy)]
pub enum BareUnit {
    Bytes,
    Mebibytes,
}

pub fn parse(text: &str, bare: BareUnit) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("`{text}` is not a size; try 512M or 2G"));
    }
    let shift = match suffix.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" if suffix.is_empty() => match bare {
            BareUnit::Bytes => 0,
            BareUnit::Mebibytes => 20,
        },
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown size suffix in `{text}`; use K, M, G or T")),
    };
    digits.parse::<u64>().ok().and_then(|n| n.checked_mul(1 << shift)).ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_and_bare_numbers() {
        assert_eq!(parse("512", BareUnit::Mebibytes), Ok(512 << 20));
        assert_eq!(parse("512", BareUnit::Bytes), Ok(512));
        assert_eq!(parse("4096B", BareUnit::Mebibytes), Ok(4096));
        assert_eq!(parse("2G", BareUnit::Bytes), Ok(2 << 30));
        assert_eq!(parse("256MiB", BareUnit::Bytes), Ok(256 << 20));
        assert_eq!(parse("64kb", BareUnit::Bytes), Ok(64 << 10));
        assert_eq!(parse(" 1T ", BareUnit::Bytes), Ok(1 << 40));
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        assert!(parse("", BareUnit::Bytes).unwrap_err().contains("not a size"));
        assert!(parse("M", BareUnit::Bytes).unwrap_err().contains("not a size"));
        assert!(parse("-1", BareUnit::Bytes).unwrap_err().contains("not a size"));
        assert!(parse("12Q", BareUnit::Bytes).unwrap_err().contains("unknown size suffix"));
        assert!(parse("1.5G", BareUnit::Bytes).unwrap_err().contains("unknown size suffix"));
        assert!(parse("99999999999T", BareUnit::Bytes).unwrap_err().contains("too large"));
    }
}
