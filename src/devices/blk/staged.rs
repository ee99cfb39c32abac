//! `rpc` with a `direct=on` disk on its io_uring: a posted batch's reads and
//! writes start on the ring and the batch waits for them without holding
//! the device, so the batches posted behind it start meanwhile and a
//! guest's queue depth reaches the host disk across batches (served one
//! after another, the disk drained between them). A batch with anything
//! else (a flush, an overlap with a transfer running, a lone request with
//! nothing running, which is cheapest waited for in the kernel) is served
//! in order on the device's thread after every transfer running has ended.
//!
//! A quarter of a deep queue is held back ([`Reserve`]): a batch that would
//! take the transfers running past the limit waits for room. The VMM posts
//! a `direct=on` disk's requests in small batches, so the rest of a queue
//! runs while one batch waits, and answered batches go round the guest
//! (and the VMM, twice) while the disk works on it.
use super::{BlockDevice, DiskIo, Transfer, S_IOERR, S_OK};
use crate::devices::aligned::AlignedBuffer;
use crate::devices::disk_ring::{DiskRing, Owner};
use crate::devices::request::{Reply, Request};
use crate::devices::reserve::Reserve;
use crate::devices::staging::Lease;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Transfers of started batches, across batches.
#[derive(Default)]
pub(super) struct Staged {
    last_batch: u32,
    running: Vec<Running>,
    /// Ring completions taken, not yet collected by their batch: (tag, result).
    ended: Vec<(u64, i32)>,
    reserve: Reserve,
    /// Requests of batches waiting for room (see [`Waiting`]).
    waiting: Arc<AtomicUsize>,
}

/// A batch waiting for room on the disk: its requests count toward the
/// guest's depth until it starts or is dropped (a batch whose caller went
/// away never leaves its count behind).
pub struct Waiting {
    count: Arc<AtomicUsize>,
    requests: usize,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.count.fetch_sub(self.requests, Ordering::SeqCst);
    }
}

struct Running {
    /// The batch (high 32 bits) and the request's index in it.
    tag: u64,
    /// Where the status byte goes in the request's writable stream.
    status_at: u64,
    t: Transfer,
    buffer: AlignedBuffer,
    /// The iovec the kernel reads, at a fixed address until the completion is taken.
    iovec: Box<[libc::iovec; 1]>,
}

// SAFETY: the iovec names the transfer's own buffer, which moves with it,
// and only the kernel uses it (never through a shared reference).
unsafe impl Send for Running {}
unsafe impl Sync for Running {}

/// A batch whose transfers run: what is answered already, by request index.
pub struct StartedBatch {
    id: u32,
    replies: Vec<Option<Reply>>,
}

pub enum Started {
    /// Served here, in order.
    Served(Vec<Reply>),
    /// Its transfers run: answer it with [`BlockDevice::finish`] once
    /// [`BlockDevice::has_ended`] says so.
    Running(StartedBatch),
}

/// Whether `requests` more transfers may start beside `live` running,
/// under `limit`: a batch never waits with nothing running.
fn fits(live: usize, requests: usize, limit: usize) -> bool {
    live == 0 || live + requests <= limit
}

fn batch_of(tag: u64) -> u32 {
    (tag >> 32) as u32
}

impl BlockDevice {
    fn ring(&self) -> Option<Arc<Mutex<DiskRing>>> {
        match self.disk_io()? {
            DiskIo::Ring(ring) => Some(ring.clone()),
            DiskIo::Threads(_) => None,
        }
    }

    /// Starts a posted batch (see the module's doc); what is served here
    /// reads into `lease`, the batch's answer slot.
    pub fn start(&mut self, requests: &[Request], mut lease: Option<&mut Lease>) -> Started {
        let Some(ring) = self.ring() else { return Started::Served(self.serve(requests, lease)) };
        let transfers: Option<Vec<Transfer>> = requests.iter().map(|r| self.threaded_transfer(r)).collect();
        let lone = requests.len() < 2 && self.staged.running.is_empty();
        let Some(transfers) = transfers.filter(|t| !lone && !self.overlaps(t)) else {
            self.wait_where(|_| true);
            return Started::Served(self.serve(requests, lease));
        };
        self.staged.last_batch = self.staged.last_batch.wrapping_add(1).max(1);
        let id = self.staged.last_batch;
        let mut replies: Vec<Option<Reply>> = requests.iter().map(|_| None).collect();
        for (index, (request, t)) in requests.iter().zip(transfers).enumerate() {
            let tag = (id as u64) << 32 | index as u64;
            if self.launch(&ring, tag, request, t).is_none() {
                // No buffer or no room on the ring: it overlaps nothing, so it runs here.
                replies[index] = Some(self.serve_one(request, lease.as_deref_mut()));
            }
        }
        if let Err(e) = ring.lock().unwrap_or_else(|e| e.into_inner()).submit() {
            // They stay queued: the next look at the ring submits them.
            tracing::warn!("disk ring: submitting failed ({e}); will retry");
        }
        Started::Running(StartedBatch { id, replies })
    }

    /// A posted batch of `requests` arrives: it waits, counted, until
    /// [`Self::has_room`] lets it start. None where nothing waits (no ring).
    pub fn arrive(&mut self, requests: usize) -> Option<Waiting> {
        self.ring()?;
        let count = self.staged.waiting.clone();
        let outstanding = self.live() + count.fetch_add(requests, Ordering::SeqCst) + requests;
        self.staged.reserve.seen(outstanding);
        Some(Waiting { count, requests })
    }

    /// Whether the waiting batch may start: nothing runs, or it fits within
    /// the reserve's limit beside what does (takes the ring's completions).
    pub fn has_room(&mut self, batch: &Waiting) -> bool {
        self.take_completions();
        fits(self.live(), batch.requests, self.staged.reserve.limit())
    }

    /// Transfers running whose completion has not been taken.
    fn live(&self) -> usize {
        self.staged.running.iter().filter(|r| !self.completed(r.tag)).count()
    }

    /// Whether the completion of the transfer tagged `tag` has been taken.
    fn completed(&self, tag: u64) -> bool {
        self.staged.ended.iter().any(|e| e.0 == tag)
    }

    /// Takes the ring's completions (and submits what a failed submit left queued).
    fn take_completions(&mut self) {
        let Some(ring) = self.ring() else { return };
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        let _ = ring.submit();
        let taken = ring.completions(Owner::Batch);
        self.staged.reserve.ended(taken.len());
        self.staged.ended.extend(taken);
    }

    /// Whether `batch`'s transfers have all ended (takes the ring's completions).
    pub fn has_ended(&mut self, batch: &StartedBatch) -> bool {
        self.ended_where(|tag| batch_of(tag) == batch.id)
    }

    /// Waits in the kernel for `batch`'s transfers (where its end cannot be watched).
    pub fn wait_for(&mut self, batch: &StartedBatch) {
        self.wait_where(|tag| batch_of(tag) == batch.id);
    }

    /// Whether the running transfers `which` picks (by tag) have all ended,
    /// after taking the ring's completions (and submitting what a failed
    /// submit left queued).
    fn ended_where(&mut self, which: impl Fn(u64) -> bool) -> bool {
        self.take_completions();
        self.staged.running.iter().filter(|r| which(r.tag)).all(|r| self.completed(r.tag))
    }

    /// Waits in the kernel until the transfers `which` picks have ended.
    fn wait_where(&mut self, which: impl Fn(u64) -> bool) {
        let Some(ring) = self.ring() else { return };
        while !self.ended_where(&which) {
            if ring.lock().unwrap_or_else(|e| e.into_inner()).wait(Owner::Batch, 1).is_err() {
                return;
            }
        }
    }

    /// The replies of a batch whose transfers have ended (reads copied
    /// into `lease`, the batch's answer slot, where it has room).
    pub fn finish(&mut self, batch: StartedBatch, requests: &[Request], mut lease: Option<&mut Lease>) -> Vec<Reply> {
        let mut replies = batch.replies;
        let (mine, others) =
            std::mem::take(&mut self.staged.running).into_iter().partition(|r| batch_of(r.tag) == batch.id);
        self.staged.running = others;
        for Running { tag, status_at, t, mut buffer, iovec } in mine {
            let Some(at) = self.staged.ended.iter().position(|e| e.0 == tag) else {
                // Never reported: the kernel may still use the buffer, so it
                // is never reused or freed; the request fails.
                std::mem::forget((buffer, iovec));
                continue;
            };
            let moved = self.staged.ended.swap_remove(at).1;
            let ok = self.rest_of(t, moved, &mut buffer);
            let data = (ok && !t.write).then(|| Self::landed(&mut buffer, t.len, lease.as_deref_mut())).flatten();
            replies[tag as u32 as usize] = Some(Self::reply(if ok { S_OK } else { S_IOERR }, data, status_at));
            if let Some(direct) = self.direct.as_mut() {
                direct.spare.push(buffer);
            }
        }
        let unanswered =
            |(reply, request): (Option<Reply>, &Request)| reply.unwrap_or_else(|| Self::refuse(request.writable_len));
        replies.into_iter().zip(requests).map(unanswered).collect()
    }

    /// Whether a batch's transfers overlap each other, or one running, where one writes.
    fn overlaps(&self, transfers: &[Transfer]) -> bool {
        let extent = |t: &Transfer| (t.offset, t.len, t.write);
        let running = self.staged.running.iter().map(|r| extent(&r.t));
        transfers.iter().enumerate().any(|(i, t)| {
            let others = transfers[..i].iter().map(extent).chain(running.clone());
            others.into_iter().any(|o| super::clash(extent(t), o))
        })
    }

    /// Puts a transfer on the ring (submitted with its batch), kept in
    /// `running` until `finish` has taken its completion.
    fn launch(&mut self, ring: &Mutex<DiskRing>, tag: u64, request: &Request, t: Transfer) -> Option<()> {
        let buffer = self.transfer_buffer(request, t)?;
        let (buffer, iovec) = self.push_on_ring(ring, tag, t, buffer)?;
        let status_at = request.writable_len - 1;
        self.staged.running.push(Running { tag, status_at, t, buffer, iovec });
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{request, status, threaded_disk};
    use super::super::{Aio, T_FLUSH, T_IN, T_OUT};
    use super::*;

    fn running(started: Started) -> StartedBatch {
        match started {
            Started::Running(batch) => batch,
            Started::Served(_) => panic!("served in order, not started"),
        }
    }

    fn served(started: Started) -> Vec<Reply> {
        match started {
            Started::Served(replies) => replies,
            Started::Running(_) => panic!("started, not served in order"),
        }
    }

    fn finished(disk: &mut BlockDevice, batch: StartedBatch, requests: &[Request]) -> Vec<Reply> {
        disk.wait_for(&batch);
        assert!(disk.has_ended(&batch));
        disk.finish(batch, requests, None)
    }

    #[test]
    fn batches_run_together_and_what_must_wait_waits() {
        let Some(mut disk) = threaded_disk(1 << 20, Aio::IoUring) else { return };
        // Two batches of writes at once: the second starts while the first runs.
        let first: Vec<Request> = (0..8u64).map(|b| request(T_OUT, b * 8, &[b as u8 + 1; 4096], 0)).collect();
        let second: Vec<Request> = (8..16u64).map(|b| request(T_OUT, b * 8, &[b as u8 + 1; 4096], 0)).collect();
        let a = running(disk.start(&first, None));
        let b = running(disk.start(&second, None));
        assert_eq!(disk.staged.running.len(), 16, "both batches on the disk at once");
        // Answered in either order, each with its own replies.
        assert!(finished(&mut disk, b, &second).iter().all(|r| status(r) == S_OK));
        // A read over a write still running waits for it, and sees it whole.
        let over = [request(T_IN, 0, &[], 4096), request(T_IN, 8, &[], 4096)];
        let reads = served(disk.start(&over, None));
        assert!(disk.has_ended(&a), "the first batch ended first");
        assert_eq!(&reads[0].writes[0].1[..], &[1u8; 4096][..]);
        assert_eq!(&reads[1].writes[0].1[..], &[2u8; 4096][..]);
        // Its replies were kept for it.
        assert!(finished(&mut disk, a, &first).iter().all(|r| status(r) == S_OK));
        assert!(disk.staged.ended.is_empty());
        // A flush waits for every write running before it.
        let writes: Vec<Request> = (0..4u64).map(|b| request(T_OUT, b * 8, &[0xee; 4096], 0)).collect();
        let c = running(disk.start(&writes, None));
        let flush = served(disk.start(&[request(T_FLUSH, 0, &[], 0)], None));
        assert_eq!(status(&flush[0]), S_OK);
        assert!(disk.has_ended(&c), "the flush came after the writes ended");
        assert!(finished(&mut disk, c, &writes).iter().all(|r| status(r) == S_OK));
        // Reads of many batches, finished out of order, each get their own bytes.
        let batches: Vec<Vec<Request>> =
            (0..4u64).map(|k| (0..4u64).map(|b| request(T_IN, (k * 4 + b) * 8, &[], 4096)).collect()).collect();
        let started: Vec<StartedBatch> = batches.iter().map(|r| running(disk.start(r, None))).collect();
        for (k, batch) in started.into_iter().enumerate().rev() {
            for (b, reply) in finished(&mut disk, batch, &batches[k]).iter().enumerate() {
                let block = k * 4 + b;
                let want = if block < 4 { 0xee } else { block as u8 + 1 };
                assert_eq!((status(reply), reply.writes[0].1[0]), (S_OK, want), "block {block}");
            }
        }
        // A lone request with nothing running is served here.
        assert_eq!(status(&served(disk.start(&[request(T_IN, 0, &[], 4096)], None))[0]), S_OK);
    }

    #[test]
    fn a_batchs_reads_are_answered_from_its_slot() {
        use std::os::unix::fs::FileExt;
        let Some(mut disk) = threaded_disk(1 << 20, Aio::IoUring) else { return };
        let (area, vmm_view) = crate::devices::staging::tests::area_for_test();
        let writes: Vec<Request> = (0..4u64).map(|b| request(T_OUT, b * 8, &[b as u8 + 1; 4096], 0)).collect();
        let written = running(disk.start(&writes, None));
        assert!(finished(&mut disk, written, &writes).iter().all(|r| status(r) == S_OK));
        let reads: Vec<Request> = (0..4u64).map(|b| request(T_IN, b * 8, &[], 4096)).collect();
        let mut lease = area.lease().unwrap();
        let batch = running(disk.start(&reads, Some(&mut lease)));
        disk.wait_for(&batch);
        let replies = disk.finish(batch, &reads, Some(&mut lease));
        for (b, reply) in replies.iter().enumerate() {
            let [(0, at, 4096)] = reply.staged[..] else { panic!("read {b}: {:?}", reply.staged) };
            let mut seen = vec![0u8; 4096];
            vmm_view.read_exact_at(&mut seen, at as u64).unwrap();
            assert_eq!((status(reply), seen), (S_OK, vec![b as u8 + 1; 4096]), "read {b}");
        }
    }

    #[test]
    fn a_batch_that_would_run_past_the_reserve_waits_until_transfers_end() {
        let Some(mut disk) = threaded_disk(1 << 20, Aio::IoUring) else { return };
        let reads = |k: u64| -> Vec<Request> { (0..8u64).map(|b| request(T_IN, (k * 8 + b) * 8, &[], 4096)).collect() };
        let batches: Vec<Vec<Request>> = (0..4).map(reads).collect();
        // Four batches of 8 arrive at once: the guest's queue is 32 deep, so 24 run.
        let waiting: Vec<Waiting> = batches.iter().map(|b| disk.arrive(b.len()).expect("a disk on a ring")).collect();
        assert_eq!(disk.staged.reserve.limit(), 24);
        assert!(fits(16, 8, 24) && !fits(24, 8, 24), "the fourth batch waits while three run");
        assert!(fits(0, 64, 24), "with nothing running, a batch deeper than the limit starts whole");
        // On the disk (whose transfers may end at once), each starts once
        // there is room, and every read is answered.
        let mut started = Vec::new();
        for (batch, waits) in batches.iter().zip(&waiting) {
            while !disk.has_room(waits) {
                disk.wait_for(&started[0]);
            }
            started.push(running(disk.start(batch, None)));
        }
        for (batch, requests) in started.into_iter().zip(&batches) {
            assert!(finished(&mut disk, batch, requests).iter().all(|r| status(r) == S_OK));
        }
        drop(waiting);
        assert_eq!(disk.staged.waiting.load(Ordering::SeqCst), 0, "a batch counts as waiting until dropped");
    }
}
