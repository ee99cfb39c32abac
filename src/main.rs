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
mod size;
mod test_guest;
mod vmm;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
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
