//! An io_uring for a `direct=on` disk's transfers: one system call submits
//! a batch, completions arrive in shared memory, and no thread hands work
//! to another (on nested hosts each such hand-off is a context switch that
//! costs more than the transfer's own CPU).
//!
//! The ring is made before confinement and locked down there: the disk is
//! its only (registered) file, every submission must name it by index, and
//! only reads and writes are allowed; after that not even its owner may
//! change it. A submission can do no more than `preadv`/`pwritev` on the
//! disk could, and seccomp then adds just `io_uring_enter`.
use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::EventFd;

pub struct DiskRing {
    ring: IoUring,
    /// The eventfd the kernel signals when completions arrive, until the
    /// event loop that watches it takes it.
    completed: Option<EventFd>,
    /// Completions taken from the kernel that their owner has not asked for yet.
    unclaimed: Vec<Completion>,
}

/// A completion: the submission's tag, and bytes moved or -errno.
pub type Completion = (u64, i32);

/// Who submitted a transfer. Where guest RAM is mapped, one ring serves
/// both the transfers in flight across batches and a batch's copied
/// ones, and each takes only its own completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    InFlight,
    Batch,
}

const BATCH_TAG: u64 = 1 << 63;

impl Owner {
    fn tag(self, tag: u64) -> u64 {
        match self {
            Owner::InFlight => tag & !BATCH_TAG,
            Owner::Batch => tag | BATCH_TAG,
        }
    }

    fn owns(self, tag: u64) -> bool {
        (tag & BATCH_TAG != 0) == (self == Owner::Batch)
    }
}

impl DiskRing {
    /// A ring for `entries` transfers in flight on `disk`.
    pub fn new(disk: &File, entries: u32) -> io::Result<DiskRing> {
        // Completions are finished at the device's next system call (a
        // polling device makes one at every look) instead of interrupting
        // it with an IPI each, which on a nested host cost host-disk QD32 a
        // fifth of its IOPS. Kernels before 5.19 get a plain ring.
        let cooperative =
            IoUring::builder().setup_r_disabled().setup_coop_taskrun().setup_taskrun_flag().build(entries);
        let ring = match cooperative {
            Ok(ring) => ring,
            Err(_) => IoUring::builder().setup_r_disabled().build(entries)?,
        };
        let completed = EventFd::new(libc::EFD_NONBLOCK)?;
        let submitter = ring.submitter();
        submitter.register_files(&[disk.as_raw_fd()])?;
        submitter.register_eventfd(completed.as_raw_fd())?;
        let mut only = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ];
        submitter.register_restrictions(&mut only)?;
        submitter.register_enable_rings()?;
        Ok(DiskRing { ring, completed: Some(completed), unclaimed: Vec::new() })
    }

    /// The eventfd the kernel signals on completions, for one watcher to own.
    pub fn take_completed(&mut self) -> Option<EventFd> {
        self.completed.take()
    }

    /// Queues a vectored read or write at `offset`, tagged `tag`; it starts
    /// at the next [`DiskRing::submit`].
    ///
    /// # Safety
    /// The `iovecs` array and the memory it names must stay valid (and the
    /// memory unused by anything that cares about its bytes) until the
    /// tag's completion has been taken.
    pub unsafe fn push(
        &mut self,
        owner: Owner,
        tag: u64,
        write: bool,
        iovecs: &[libc::iovec],
        offset: u64,
    ) -> io::Result<()> {
        let (ptr, len) = (iovecs.as_ptr(), iovecs.len() as u32);
        let entry = if write {
            opcode::Writev::new(types::Fixed(0), ptr, len).offset(offset).build()
        } else {
            opcode::Readv::new(types::Fixed(0), ptr, len).offset(offset).build()
        };
        let entry = entry.user_data(owner.tag(tag));
        // SAFETY: the caller keeps the iovecs and their memory valid.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        // Full: hand what is queued to the kernel, then there is room.
        self.submit()?;
        // SAFETY: as above.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| io::Error::other("disk ring full"))
    }

    /// Starts every transfer queued.
    pub fn submit(&mut self) -> io::Result<()> {
        let idle = {
            let queue = self.ring.submission();
            queue.is_empty() && !queue.cq_overflow() && !queue.taskrun()
        };
        if idle {
            // No system call: a polling device submits at every look.
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: completions must be taken first; they are, by the caller.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                other => return other.map(|_| ()),
            }
        }
    }

    /// Starts what is queued and waits until at least `want` of `owner`'s
    /// completions are ready.
    pub fn wait(&mut self, owner: Owner, want: usize) -> io::Result<()> {
        loop {
            self.take_from_kernel();
            if self.unclaimed.iter().filter(|c| owner.owns(c.0)).count() >= want {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
    }

    /// `owner`'s completions that have arrived (no system call), with the
    /// tags it gave.
    pub fn completions(&mut self, owner: Owner) -> Vec<Completion> {
        self.take_from_kernel();
        let (mine, others) = self.unclaimed.drain(..).partition(|c| owner.owns(c.0));
        self.unclaimed = others;
        mine.into_iter().map(|(tag, result): Completion| (tag & !BATCH_TAG, result)).collect()
    }

    fn take_from_kernel(&mut self) {
        self.unclaimed.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn iovec(bytes: &mut [u8]) -> libc::iovec {
        libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() }
    }

    fn file(name: &str) -> File {
        let path = std::env::temp_dir().join(format!("skvm-disk-ring-{name}-{}.img", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all_at(&(0..8192u32).map(|i| i as u8).collect::<Vec<_>>(), 0).unwrap();
        file
    }

    /// A disk file and a ring on it; None (said on stderr) without io_uring.
    fn ring_on(name: &str) -> Option<(File, DiskRing)> {
        let disk = file(name);
        match DiskRing::new(&disk, 8) {
            Ok(ring) => Some((disk, ring)),
            Err(e) => {
                eprintln!("disk_ring: NOT RUN: this kernel offers no io_uring ({e})");
                None
            }
        }
    }

    #[test]
    fn reads_and_writes_the_disk_in_pieces() {
        let Some((disk, mut ring)) = ring_on("rw") else { return };
        let (mut a, mut b) = (vec![0u8; 100], vec![0u8; 412]);
        let read = [iovec(&mut a), iovec(&mut b)];
        let mut c = vec![0xabu8; 512];
        let write = [iovec(&mut c)];
        // SAFETY: the buffers and arrays outlive the wait below.
        unsafe {
            ring.push(Owner::InFlight, 1, false, &read, 1000).unwrap();
            ring.push(Owner::Batch, 1, true, &write, 4096).unwrap();
        }
        // Each owner gets its own completion, under the tag it gave.
        ring.wait(Owner::Batch, 1).unwrap();
        ring.wait(Owner::InFlight, 1).unwrap();
        assert_eq!(ring.completions(Owner::Batch), vec![(1, 512)]);
        assert_eq!(ring.completions(Owner::InFlight), vec![(1, 512)]);
        assert_eq!(ring.completions(Owner::Batch), vec![]);
        assert!(a.iter().chain(&b).enumerate().all(|(i, &x)| x == (1000 + i) as u8));
        let mut back = vec![0u8; 512];
        disk.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, c);
        assert!(ring.take_completed().unwrap().read().unwrap() >= 1, "the eventfd is signalled");
    }

    #[test]
    fn a_submit_with_nothing_queued_makes_no_system_call() {
        use crate::sandbox::{under_filter, DeviceFilter};
        let Some((_disk, mut ring)) = ring_on("idle") else { return };
        // A child under a filter without io_uring_enter dies if it enters the ring.
        let idle = under_filter(DeviceFilter::Block { io_uring: false }, || {
            let _ = ring.submit();
        });
        assert!(libc::WIFEXITED(idle) && libc::WEXITSTATUS(idle) == 0, "an idle submit entered the kernel ({idle})");
        let mut bytes = vec![0u8; 512];
        let read = [iovec(&mut bytes)];
        // SAFETY: the buffer and array outlive the wait below.
        unsafe { ring.push(Owner::InFlight, 1, false, &read, 0).unwrap() };
        let queued = under_filter(DeviceFilter::Block { io_uring: false }, || {
            let _ = ring.submit();
        });
        assert!(libc::WIFSIGNALED(queued) && libc::WTERMSIG(queued) == libc::SIGSYS, "a queued read must be submitted");
        ring.wait(Owner::InFlight, 1).unwrap();
        assert_eq!(ring.completions(Owner::InFlight), vec![(1, 512)]);
    }

    #[test]
    fn only_reads_and_writes_of_the_disk_are_allowed() {
        let Some((disk, mut ring)) = ring_on("only") else { return };
        // Another operation, and a plain descriptor instead of the disk's index.
        let fsync = opcode::Fsync::new(types::Fixed(0)).build().user_data(1);
        let other = opcode::Readv::new(types::Fd(disk.as_raw_fd()), std::ptr::null(), 0).build().user_data(2);
        for (tag, entry) in [(1, fsync), (2, other)] {
            // SAFETY: neither names any memory.
            unsafe { ring.ring.submission().push(&entry).unwrap() };
            ring.wait(Owner::InFlight, 1).unwrap();
            assert_eq!(ring.completions(Owner::InFlight), vec![(tag, -libc::EACCES)]);
        }
        // Nor can the ring be changed any more.
        assert!(ring.ring.submitter().register_files_update(0, &[disk.as_raw_fd()]).is_err());
    }
}
