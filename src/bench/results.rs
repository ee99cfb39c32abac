//! The study's results: one row per run, with the machine and the peers,
//! saved as JSON (which `--render` reads back) and as CSV.
use super::machine::Machine;
use rpc_schema::DeviceCounters;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub preset: String,
    pub repeats: usize,
    pub machine: Machine,
    pub peers: Vec<PeerInfo>,
    pub rows: Vec<Row>,
}

/// Another VMM the study tried to run, and how that went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    pub path: Option<String>,
    pub version: Option<String>,
    /// Whether it ran, and anything a reader must know (e.g. the MSR shim).
    pub status: String,
}

/// One run of one workload on one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// skvm, qemu, firecracker or cloud-hypervisor.
    pub system: String,
    /// The memory mode for skvm; the system's name for a peer.
    pub mode: String,
    pub workload: String,
    pub vcpus: u8,
    pub repeat: usize,
    /// False when the run failed or was not possible; `note` says why.
    pub ok: bool,
    pub note: Option<String>,
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    /// The workload's time as the guest measured it (TSC).
    pub guest_seconds: f64,
    /// From starting the VMM to its exit, as the host saw it.
    pub wall_seconds: f64,
    /// Host CPU time (user + system) of the VMM and its device processes
    /// over the whole run, boot and exit included.
    #[serde(default)]
    pub host_cpu_seconds: Option<f64>,
    /// Of that, the vCPU threads' (the guest's own work and exit handling;
    /// skvm only). The test guest polls for completions, so its vCPU is busy
    /// for the whole run; what lies outside the vCPUs is the cost of the I/O path.
    #[serde(default)]
    pub vcpu_cpu_seconds: Option<f64>,
    /// Sum of per-request latencies and their log2 histogram, in TSC ticks.
    pub latency_sum_tsc: u64,
    pub latency_log2_tsc: Vec<u64>,
    /// vCPU exits to the VMM for port and MMIO I/O (skvm only).
    pub exits_pio: Option<u64>,
    pub exits_mmio: Option<u64>,
    /// The VMM memory service's view: RPCs served, bytes and time (0 outside
    /// the rpc modes; in rpc mode the bytes and time include what moved
    /// inline with posted requests and completions).
    pub memory_rpcs: Option<u64>,
    pub memory_rpc_bytes: Option<u64>,
    pub memory_service_ns: Option<u64>,
    /// rpc mode: batches of requests the VMM posted (each one message out
    /// and one back).
    #[serde(default)]
    pub batches: Option<u64>,
    /// The disk device's own counters (skvm only).
    pub device: Option<DeviceCounters>,
}

impl Row {
    pub fn iops(&self) -> f64 {
        if self.guest_seconds > 0.0 {
            self.ops as f64 / self.guest_seconds
        } else {
            0.0
        }
    }

    pub fn mib_per_s(&self) -> f64 {
        if self.guest_seconds > 0.0 {
            self.bytes as f64 / self.guest_seconds / (1 << 20) as f64
        } else {
            0.0
        }
    }

    /// Host CPU outside the vCPU threads: the VMM's other threads and the devices.
    pub fn io_path_cpu_seconds(&self) -> Option<f64> {
        Some((self.host_cpu_seconds? - self.vcpu_cpu_seconds?).max(0.0))
    }

    pub fn mean_latency_us(&self, tsc_hz: f64) -> f64 {
        if self.ops == 0 {
            return 0.0;
        }
        self.latency_sum_tsc as f64 / self.ops as f64 / tsc_hz * 1e6
    }
}

impl Results {
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let json = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let path = dir.join("results.json");
        std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let path = dir.join("results.csv");
        std::fs::write(&path, self.csv()).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Results, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not a skvm bench results file: {e}", path.display()))
    }

    /// One line per run, the machine repeated on each so a row stands alone.
    fn csv(&self) -> String {
        let mut out = String::from(
            "system,mode,workload,vcpus,repeat,ok,ops,bytes,errors,guest_seconds,wall_seconds,host_cpu_seconds,vcpu_cpu_seconds,iops,mib_per_s,\
             mean_latency_us,exits_pio,exits_mmio,memory_rpcs,memory_rpc_bytes,memory_service_ns,batches,device_requests,\
             device_memory_calls,device_memory_wait_ns,device_busy_ns,cpu_model,kernel,kvm,note\n",
        );
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let seconds = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "'"));
        let m = &self.machine;
        for r in &self.rows {
            let d = r.device.as_ref();
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{:.6},{:.6},{},{},{:.1},{:.2},{:.2},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                r.system,
                r.mode,
                quote(&r.workload),
                r.vcpus,
                r.repeat,
                r.ok,
                r.ops,
                r.bytes,
                r.errors,
                r.guest_seconds,
                r.wall_seconds,
                seconds(r.host_cpu_seconds),
                seconds(r.vcpu_cpu_seconds),
                r.iops(),
                r.mib_per_s(),
                r.mean_latency_us(m.tsc_hz),
                opt(r.exits_pio),
                opt(r.exits_mmio),
                opt(r.memory_rpcs),
                opt(r.memory_rpc_bytes),
                opt(r.memory_service_ns),
                opt(r.batches),
                opt(d.map(|d| d.requests)),
                opt(d.map(|d| d.memory_calls)),
                opt(d.map(|d| d.memory_wait_ns)),
                opt(d.map(|d| d.busy_ns)),
                quote(&m.cpu_model),
                quote(&m.kernel),
                quote(&m.kvm),
                quote(r.note.as_deref().unwrap_or("")),
            ));
        }
        out
    }

    /// The successful runs of one cell.
    pub fn cell<'a>(&'a self, mode: &'a str, workload: &'a str, vcpus: u8) -> impl Iterator<Item = &'a Row> + 'a {
        self.rows.iter().filter(move |r| r.ok && r.mode == mode && r.workload == workload && r.vcpus == vcpus)
    }

    /// Every system column in the order runs were made: skvm's modes, then peers.
    pub fn columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = Vec::new();
        for r in &self.rows {
            if !columns.contains(&r.mode) {
                columns.push(r.mode.clone());
            }
        }
        columns
    }
}

/// The median of the values `f` gives for the runs, if there are any.
pub fn median<'a>(rows: impl Iterator<Item = &'a Row>, f: impl Fn(&Row) -> f64) -> Option<f64> {
    median_of(rows.map(f).collect())
}

/// The median of `values` (the upper one of an even count), if there are any.
pub fn median_of(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    Some(values[values.len() / 2])
}
