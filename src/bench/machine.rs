//! The machine a study ran on, recorded with its results.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: u64,
    pub kernel: String,
    /// "hardware (kvm_intel)", "hardware (kvm_amd)" or "PVM (kvm_pvm, ...)".
    pub kvm: String,
    pub skvm_version: String,
    /// The TSC rate the guest timings were converted with.
    pub tsc_hz: f64,
}

fn first_line_with(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// The host TSC rate; under KVM the guest's TSC runs at the same rate.
pub fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let (t0, start) = (unsafe { core::arch::x86_64::_rdtsc() }, std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / start.elapsed().as_secs_f64()
}

fn loaded(module: &str) -> bool {
    std::path::Path::new(&format!("/sys/module/{module}")).exists()
}

/// Whether /dev/kvm is PVM, where a Linux guest does not reach userspace.
pub fn is_pvm() -> bool {
    loaded("kvm_pvm")
}

fn kvm_kind() -> String {
    if is_pvm() {
        "PVM (kvm_pvm: software nested virtualisation; guest ring 0 emulated)".into()
    } else if loaded("kvm_intel") {
        "hardware (kvm_intel)".into()
    } else if loaded("kvm_amd") {
        "hardware (kvm_amd)".into()
    } else {
        "unknown".into()
    }
}

pub fn describe() -> Machine {
    let kib: u64 = first_line_with("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Machine {
        cpu_model: first_line_with("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into()),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        memory_gib: (kib + (1 << 19)) >> 20,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        kvm: kvm_kind(),
        skvm_version: env!("CARGO_PKG_VERSION").to_string(),
        tsc_hz: tsc_hz(),
    }
}
