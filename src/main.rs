//! skvm: a KVM hypervisor built for isolation.
//!
//! The tree follows the trust model: `vmm/` is the trusted VMM process
//! (KVM, vCPUs, guest memory, boot, legacy devices, virtio transport and
//! memory service); `devices/` is device code, which runs untrusted in
//! sandboxed processes; `sandbox/` confines those processes;
//! `guest_access.rs` is the one implementation of guest-memory checks;
//! `bench/` is the isolation-cost study (`skvm bench`).
mod bench;
mod cli;
mod ctl;
mod devices;
mod guest_access;
mod rpc_bench;
mod sandbox;
mod scheduling;
mod size;
mod test_guest;
mod vmm;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = cli::Cli::parse();
    cli::init_logging(cli.log_level);
    match cli::dispatch(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("skvm: error: {}", cli::error_chain(err.as_ref()));
            ExitCode::from(cli::EXIT_SKVM_ERROR)
        }
    }
}

/// The VMM and the devices take and free buffers of up to a batch's size
/// (1 MiB) with every request. By default glibc maps the largest afresh and
/// hands freed memory back to the kernel, so each buffer costs a page fault
/// per 4 KiB when it is taken again: keep freed memory for the next one.
/// (`rpc` 128 KiB writes in tmpfs: 466 MiB/s before, 1,230-1,460 after.)
fn keep_freed_memory() {
    const KEEP: i32 = 32 << 20;
    // SAFETY: mallopt only sets the allocator's tunables, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, KEEP);
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP);
    }
}
