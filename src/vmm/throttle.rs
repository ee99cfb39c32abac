//! Rate limits for log lines a guest (or a device) can trigger at will: a
//! few lines, then at most one per window saying how many were held back.
//! Counters in the API say how often it really happened.
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through before the first window closes.
const BURST: u32 = 5;
/// After the burst, at most one line per window, so a guest that keeps on
/// for minutes still adds only a line every ten seconds.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Throttle {
    state: Mutex<Option<Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// Lines still allowed in this window.
    allowance: u32,
    held_back: u64,
}

impl Throttle {
    /// Whether to log this occurrence; Some(n) says n were held back before it.
    pub fn allow(&self) -> Option<u64> {
        let mut state = super::lock(&self.state);
        let now = Instant::now();
        let window = state.get_or_insert(Window { started: now, allowance: BURST, held_back: 0 });
        if now.duration_since(window.started) >= WINDOW {
            window.started = now;
            window.allowance = 1;
        }
        if window.allowance == 0 {
            window.held_back += 1;
            return None;
        }
        window.allowance -= 1;
        Some(std::mem::take(&mut window.held_back))
    }
}

/// " (N more like it not logged)" when some were held back.
pub fn held_back(count: u64) -> String {
    if count == 0 {
        String::new()
    } else {
        format!(" ({count} more like it not logged)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_per_window_with_a_count() {
        let throttle = Throttle::default();
        let next_window = || super::super::lock(&throttle.state).as_mut().unwrap().started -= WINDOW;
        assert!((0..BURST).all(|_| throttle.allow() == Some(0)));
        assert!((0..1000).all(|_| throttle.allow().is_none()));
        next_window();
        assert_eq!(throttle.allow(), Some(1000));
        assert_eq!(throttle.allow(), None, "one line per window after the burst");
        next_window();
        assert_eq!(throttle.allow(), Some(1));
        assert_eq!(held_back(1000), " (1000 more like it not logged)");
    }
}
