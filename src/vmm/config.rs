//! What to run: the validated settings `skvm run` hands to the VMM.
use std::path::PathBuf;

#[derive(Debug)]
pub struct VmConfig {
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub serial: SerialOutput,
    pub boot_protocol: BootProtocol,
}

#[derive(Debug)]
pub enum KernelSource {
    File(PathBuf),
    /// An image compiled into skvm (the test guest).
    Embedded(&'static [u8]),
}

#[derive(Debug, Clone)]
pub enum SerialOutput {
    Stdio,
    File(PathBuf),
    None,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    Auto,
    Pvh,
    Linux,
}
