//! What the study runs: workloads, memory modes, vCPU counts and how much
//! of each, for the quick and the full preset.

/// One guest workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub name: &'static str,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The guest's `blk-bench`: `rw` is randread, randwrite, read, write or mixed.
    /// `host_disk`: on a file of the host's own filesystem with `direct=on`
    /// (the host-disk group, beside the host's fio), not in tmpfs.
    /// `sleeps`: the guest sleeps until the device interrupts (`halt=1`)
    /// rather than polling on its vCPU, as an OS kernel idles.
    Disk { rw: &'static str, block_size: u64, depth: u16, quick_ops: u64, full_ops: u64, host_disk: bool, sleeps: bool },
    /// The guest does nothing for a while: what the VMM and devices cost at rest.
    Idle { quick_ms: u64, full_ms: u64 },
}

const fn disk(name: &'static str, rw: &'static str, block_size: u64, depth: u16, quick: u64, full: u64) -> Workload {
    Workload {
        name,
        kind: Kind::Disk { rw, block_size, depth, quick_ops: quick, full_ops: full, host_disk: false, sleeps: false },
    }
}

const fn host_disk(
    name: &'static str,
    rw: &'static str,
    block_size: u64,
    depth: u16,
    quick: u64,
    full: u64,
) -> Workload {
    Workload {
        name,
        kind: Kind::Disk { rw, block_size, depth, quick_ops: quick, full_ops: full, host_disk: true, sleeps: false },
    }
}

pub const WORKLOADS: [Workload; 15] = [
    disk("4K randread QD1", "randread", 4096, 1, 300, 3000),
    disk("4K randread QD8", "randread", 4096, 8, 1000, 10000),
    disk("4K randread QD32", "randread", 4096, 32, 2000, 20000),
    disk("4K randwrite QD1", "randwrite", 4096, 1, 300, 3000),
    disk("4K randwrite QD8", "randwrite", 4096, 8, 1000, 10000),
    disk("4K randwrite QD32", "randwrite", 4096, 32, 2000, 20000),
    disk("128K seq read QD4", "read", 128 << 10, 4, 150, 1500),
    disk("128K seq write QD4", "write", 128 << 10, 4, 150, 1500),
    disk("4K mixed 70/30 QD8", "mixed", 4096, 8, 1000, 10000),
    Workload { name: "idle", kind: Kind::Idle { quick_ms: 100, full_ms: 1000 } },
    host_disk("host disk 4K randread QD1", "randread", 4096, 1, 300, 3000),
    host_disk("host disk 4K randread QD32", "randread", 4096, 32, 2000, 20000),
    host_disk("host disk 4K randread QD32, guest sleeps", "randread", 4096, 32, 2000, 20000).sleeping(),
    host_disk("host disk 128K seq read QD4", "read", 128 << 10, 4, 150, 1500),
    host_disk("host disk 128K seq write QD4", "write", 128 << 10, 4, 150, 1500),
];

pub const MODES: [&str; 4] = ["rpc", "rpc-dma", "shared", "inprocess"];
pub const VCPUS: [u8; 2] = [1, 2];

pub fn repeats(quick: bool) -> usize {
    if quick {
        1
    } else {
        5
    }
}

impl Workload {
    /// The same disk workload with a guest that sleeps between completions:
    /// a polling vCPU holds one of a small host's CPUs, which the disk's own
    /// completion work needs.
    const fn sleeping(mut self) -> Workload {
        if let Kind::Disk { sleeps, .. } = &mut self.kind {
            *sleeps = true;
        }
        self
    }

    /// The test guest's command line for this workload; `seed` picks its
    /// random blocks.
    pub fn cmdline(&self, quick: bool, tsc_hz: f64, seed: u64) -> String {
        match self.kind {
            Kind::Disk { rw, block_size, depth, quick_ops, full_ops, sleeps, .. } => {
                let ops = if quick { quick_ops } else { full_ops };
                let sleeps = if sleeps { " halt=1" } else { "" };
                format!("scenario=blk-bench rw={rw} bs={block_size} qd={depth} ops={ops} seed={seed}{sleeps}")
            }
            Kind::Idle { quick_ms, full_ms } => {
                let ms = if quick { quick_ms } else { full_ms };
                format!("scenario=idle tsc={}", (tsc_hz * ms as f64 / 1e3) as u64)
            }
        }
    }

    /// Large transfers are reported as MiB/s, small ones as IOPS.
    pub fn reports_throughput(&self) -> bool {
        matches!(self.kind, Kind::Disk { block_size, .. } if block_size >= 64 << 10)
    }

    pub fn is_disk(&self) -> bool {
        matches!(self.kind, Kind::Disk { .. })
    }

    pub fn on_host_disk(&self) -> bool {
        matches!(self.kind, Kind::Disk { host_disk: true, .. })
    }

    /// The host's fio job for the same work on the same file: (rw, block
    /// size, queue depth, I/Os). Only the host-disk group has one.
    pub fn fio_job(&self, quick: bool) -> Option<(&'static str, u64, u16, u64)> {
        match self.kind {
            Kind::Disk { rw, block_size, depth, quick_ops, full_ops, host_disk: true, .. } => {
                Some((rw, block_size, depth, if quick { quick_ops } else { full_ops }))
            }
            _ => None,
        }
    }
}
