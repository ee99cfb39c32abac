//! Text a device sends the VMM (error reasons, its stderr) goes into the
//! VMM's log and API replies only through here: control characters escaped,
//! so a device cannot forge log lines or drive the terminal, and length
//! capped, so it cannot flood them.

/// Invisible characters that change how a line reads: bidirectional
/// embeddings, overrides and isolates (which can make a forged line look
/// like skvm's own, or reorder one), zero-width and other format characters.
fn is_format(c: char) -> bool {
    matches!(c as u32,
        0x00ad | 0x061c | 0x180e | 0x200b..=0x200f | 0x202a..=0x202e | 0x2060..=0x2064 | 0x2066..=0x206f | 0xfeff | 0xfff9..=0xfffb)
}

/// `text` with control and format characters escaped, cut after `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(|c| if c.is_control() || is_format(c) { c.escape_default().collect() } else { vec![c] })
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
        // A right-to-left override would make "exe.txt" read as "txt.exe".
        assert_eq!(printable("a\u{202e}b\u{2066}c\u{200b}d", 100), "a\\u{202e}b\\u{2066}c\\u{200b}d");
        assert_eq!(printable("blk0: ok é ü", 100), "blk0: ok é ü");
    }
}
