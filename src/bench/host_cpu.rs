//! The host CPU a VMM spends: every thread of its process and of the
//! processes it started (skvm's device processes), less its vCPU threads.
//! A polling test guest keeps its vCPU busy whatever the VMM does, so what
//! tells the systems apart is the rest: device threads, the event loop and,
//! in `rpc`, the VMM's memory service. Read from each thread's
//! `/proc/PID/task/TID/schedstat` (nanoseconds on a CPU), so a phase of a
//! tenth of a second is measured to well within a percent.
use std::collections::HashMap;
use std::fs;

/// Nanoseconds on a CPU of `root` and its descendants, vCPU threads left
/// out; and of those, the descendants' (skvm's device processes; the peers
/// run their devices as threads of their own process).
pub fn vmm_cpu_ns(root: u32) -> VmmCpu {
    let mut processes = tree(root).into_iter();
    let own = processes.next().map_or(0, process_cpu_ns);
    let started: u64 = processes.map(process_cpu_ns).sum();
    VmmCpu { all: own + started, started }
}

/// What [`vmm_cpu_ns`] reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmmCpu {
    pub all: u64,
    /// Of `all`, the processes the VMM started.
    pub started: u64,
}

/// Nanoseconds on a CPU of the calling thread.
pub fn this_thread_cpu_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes the one timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// `root` and every process under it, by parent pid.
fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let pids = fs::read_dir("/proc").into_iter().flatten().flatten();
    for pid in pids.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        if let Some(parent) = fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(parent_of) {
            children.entry(parent).or_default().push(pid);
        }
    }
    let (mut all, mut next) = (Vec::new(), vec![root]);
    while let Some(pid) = next.pop() {
        all.push(pid);
        next.extend(children.remove(&pid).unwrap_or_default());
    }
    all
}

/// The parent pid in a `/proc/PID/stat` line (after the name, which may hold spaces).
fn parent_of(stat: &str) -> Option<u32> {
    stat.get(stat.rfind(')')? + 2..)?.split_whitespace().nth(1)?.parse().ok()
}

/// One process's threads' CPU time, but its vCPUs'.
fn process_cpu_ns(pid: u32) -> u64 {
    threads(pid).filter(|(name, _)| !is_vcpu(name)).map(|(_, ns)| ns).sum()
}

/// Each thread of a process: its name and nanoseconds on a CPU. A thread
/// that ends meanwhile is left out (its time leaves /proc with it).
fn threads(pid: u32) -> impl Iterator<Item = (String, u64)> {
    let threads = fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    threads.filter_map(|thread| {
        let dir = thread.path();
        let name = fs::read_to_string(dir.join("comm")).ok()?.trim_end().to_string();
        let ns = fs::read_to_string(dir.join("schedstat")).ok()?.split_whitespace().next()?.parse().ok()?;
        Some((name, ns))
    })
}

/// Whether a thread runs a vCPU, by the names the VMMs give them: skvm's
/// and Cloud Hypervisor's `vcpuN`, Firecracker's `fc_vcpu N`, QEMU's
/// `CPU N/KVM`.
fn is_vcpu(name: &str) -> bool {
    name.starts_with("vcpu") || name.starts_with("fc_vcpu") || (name.starts_with("CPU ") && name.ends_with("/KVM"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn each_vmms_vcpu_threads_are_known_by_name() {
        for vcpu in ["vcpu0", "vcpu12", "fc_vcpu 0", "CPU 0/KVM", "CPU 3/KVM"] {
            assert!(is_vcpu(vcpu), "{vcpu}");
        }
        for other in ["skvm", "rpc", "skvm-net0", "firecracker", "fc_api", "qemu-system-x86", "CPU", "worker"] {
            assert!(!is_vcpu(other), "{other}");
        }
    }

    #[test]
    fn a_parent_pid_is_read_past_a_name_with_spaces_and_parentheses() {
        assert_eq!(parent_of("42 (a b) c) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_of("42 (skvm) R 1 42"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }

    /// Spins on a thread named `name` until `stop`.
    fn spinner(name: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
            .unwrap()
    }

    /// A spinning thread's time is there by its name, and counts unless
    /// the name is a vCPU's.
    #[test]
    fn a_threads_time_is_read_by_name_and_a_vcpus_is_left_out() {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = [spinner("hc-worker", stop.clone()), spinner("vcpu7", stop.clone())];
        std::thread::sleep(Duration::from_millis(300));
        let seen: Vec<(String, u64)> = threads(std::process::id()).collect();
        let total = process_cpu_ns(std::process::id());
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().for_each(|w| w.join().unwrap());
        let of = |name: &str| seen.iter().find(|(n, _)| n == name).map(|t| t.1).expect(name);
        // Each had the CPU for a good part of 300 ms (other tests share the host).
        assert!(of("hc-worker") > 50_000_000, "{seen:?}");
        assert!(of("vcpu7") > 50_000_000, "{seen:?}");
        let counted: u64 = seen.iter().filter(|(n, _)| n != "vcpu7").map(|t| t.1).sum();
        // Read a moment later, while the worker still ran, so at least its
        // time (other tests' threads may have ended meanwhile, taking theirs
        // out); never the vCPU's share on top.
        assert!(total >= of("hc-worker") && total < counted + of("vcpu7"), "{total} against {counted} ({seen:?})");
    }

    /// A child process (as skvm's device processes are) counts toward its
    /// parent, as a process it started.
    #[test]
    fn a_child_process_counts_toward_its_parent() {
        let mut child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh runs");
        std::thread::sleep(Duration::from_millis(300));
        let child_ns = process_cpu_ns(child.id());
        let tree_cpu = vmm_cpu_ns(std::process::id());
        let under = tree(std::process::id()).contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(child_ns > 50_000_000, "the spinning child counted {child_ns} ns");
        assert!(under, "the child is not under its parent");
        assert!(tree_cpu.started >= child_ns, "the started processes counted {tree_cpu:?}, the child alone {child_ns}");
        // This process's own time (the test harness's) is in `all`, not in `started`.
        assert!(tree_cpu.all > tree_cpu.started, "{tree_cpu:?}");
    }

    /// The calling thread's time grows while it works, not while it sleeps.
    #[test]
    fn this_threads_time_is_its_work() {
        let start = this_thread_cpu_ns();
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(200) {
            std::hint::spin_loop();
        }
        let worked = this_thread_cpu_ns() - start;
        std::thread::sleep(Duration::from_millis(200));
        let slept = this_thread_cpu_ns() - start - worked;
        // A good part of the 200 ms spin (other tests share the host); next to nothing asleep.
        assert!(worked > 50_000_000, "spinning 200 ms counted {worked} ns");
        assert!(slept < 20_000_000, "sleeping 200 ms counted {slept} ns");
    }
}
