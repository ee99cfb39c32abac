//! Whether polling a device's rings after a turn is worth its CPU, learned
//! from how polling went, as KVM's halt polling learns: a window that ends
//! with nothing found turns polling off, and a notification that comes
//! within a window's length of the device going to sleep turns it back on
//! (polling would have caught that request without the driver's exit).
//!
//! A driver that keeps the device busy (a disk at any queue depth, a guest
//! sending a stream) keeps polling on. One that sends now and then (a
//! guest acknowledging a host's stream every 64 frames) turns it off, and
//! the CPU a window would have spun on goes to whoever feeds the stream:
//! on a 2-CPU host that doubled host-to-guest throughput.
use std::time::{Duration, Instant};

pub struct PollWindow {
    /// The longest a window lasts (`--device-poll-us`); zero: never poll.
    max: Duration,
    on: bool,
    /// When the device last stopped watching its rings for the driver.
    asleep_since: Option<Instant>,
}

impl PollWindow {
    pub fn new(max: Duration) -> Self {
        PollWindow { max, on: !max.is_zero(), asleep_since: None }
    }

    /// The longest window (`--device-poll-us`).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// How long to poll after this turn: zero while polling is off.
    pub fn window(&self) -> Duration {
        if self.on {
            self.max
        } else {
            Duration::ZERO
        }
    }

    /// The device goes back to waiting for notifications at `now`; with
    /// `found_nothing`, a whole window passed without a request.
    pub fn asleep(&mut self, now: Instant, found_nothing: bool) {
        self.asleep_since = Some(now);
        if found_nothing {
            self.on = false;
        }
    }

    /// The driver notified the device at `now`.
    pub fn notified(&mut self, now: Instant) {
        if let Some(since) = self.asleep_since.take() {
            if now.saturating_duration_since(since) < self.max {
                self.on = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_stops_when_it_finds_nothing_and_starts_when_it_would_have_helped() {
        let max = Duration::from_micros(50);
        let mut window = PollWindow::new(max);
        let t0 = Instant::now();
        assert_eq!(window.window(), max);
        // A notification long after the device slept: polling stays on.
        window.asleep(t0, false);
        window.notified(t0 + Duration::from_millis(5));
        assert_eq!(window.window(), max);
        // A window that found nothing turns it off, and a late notification leaves it off.
        window.asleep(t0, true);
        assert_eq!(window.window(), Duration::ZERO);
        window.notified(t0 + Duration::from_micros(640));
        assert_eq!(window.window(), Duration::ZERO);
        window.asleep(t0, false);
        window.notified(t0 + max);
        assert_eq!(window.window(), Duration::ZERO);
        // A notification that a window would have caught turns it on again.
        window.asleep(t0, false);
        window.notified(t0 + Duration::from_micros(49));
        assert_eq!(window.window(), max);
        // A notification counts only against the sleep that preceded it.
        window.asleep(t0, true);
        window.notified(t0 + Duration::from_millis(1));
        window.notified(t0 + Duration::from_millis(1));
        assert_eq!(window.window(), Duration::ZERO);
        // Without a window (`--device-poll-us 0`) nothing turns polling on.
        let mut never = PollWindow::new(Duration::ZERO);
        never.asleep(t0, false);
        never.notified(t0);
        assert_eq!(never.window(), Duration::ZERO);
    }
}
