//! How many of a `direct=on` disk's transfers run at once: all but a
//! quarter of the guest's queue depth. A host disk that completes its queue
//! together would otherwise sit idle while the guest turns the completions
//! around (an interrupt, its wake-up, its next requests, and in `rpc` the
//! VMM's hops between); the requests held back start the moment it
//! finishes. Used where guest RAM is mapped ([`super::in_flight`]) and for
//! `rpc`'s posted batches ([`super::blk`]).

/// How many transfers may run at once: all but a quarter of the guest's
/// queue depth, as the most requests outstanding at once recently shows it.
/// Held back, that quarter keeps a disk that completes together busy while
/// the guest answers (docs/performance.md, "A quarter held back", has
/// what it measured).
#[derive(Default)]
pub struct Reserve {
    /// The most outstanding at once in this window and the last.
    peak: usize,
    last_peak: usize,
    /// Transfers ended in this window.
    ended: usize,
}

impl Reserve {
    /// Completions per window: a guest that goes shallower is believed
    /// after one or two.
    const WINDOW: usize = 1024;

    pub fn seen(&mut self, outstanding: usize) {
        self.peak = self.peak.max(outstanding);
    }

    pub fn ended(&mut self, count: usize) {
        self.ended += count;
        if self.ended >= Self::WINDOW {
            (self.last_peak, self.peak, self.ended) = (self.peak, 0, 0);
        }
    }

    pub fn limit(&self) -> usize {
        let depth = self.peak.max(self.last_peak);
        (depth - depth / 4).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarter_of_a_deep_queue_is_held_back_until_the_guest_goes_shallower() {
        let mut reserve = Reserve::default();
        assert_eq!(reserve.limit(), 1);
        let limit_at = |reserve: &mut Reserve, depth| {
            reserve.seen(depth);
            reserve.limit()
        };
        assert_eq!([1, 2, 3].map(|d| limit_at(&mut reserve, d)), [1, 2, 3], "shallow queues run whole");
        assert_eq!(limit_at(&mut reserve, 8), 6);
        assert_eq!(limit_at(&mut reserve, 32), 24);
        assert_eq!(limit_at(&mut reserve, 4), 24, "the deepest recently counts");
        reserve.ended(Reserve::WINDOW);
        assert_eq!(limit_at(&mut reserve, 4), 24, "still the last window's depth");
        reserve.ended(Reserve::WINDOW);
        assert_eq!(reserve.limit(), 3, "two windows at depth 4");
    }
}
