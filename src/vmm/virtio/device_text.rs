//! Text a device sends the VMM (error reasons, its stderr) goes into the
//! VMM's log and API replies only through here: control characters escaped,
//! so a device cannot forge log lines or drive the terminal, and length
//! capped, so it cannot flood them.

/// `text` with control characters escaped, cut after `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_cannot_forge_log_lines_or_flood_them() {
        assert_eq!(printable("bad queue\nskvm: guest exited", 100), "bad queue\\nskvm: guest exited");
        assert_eq!(printable("\u{1b}[2J", 100), "\\u{1b}[2J");
        assert_eq!(printable(&"x".repeat(10_000), 200).len(), 203);
        assert_eq!(printable("fine", 4), "fine");
    }
}
