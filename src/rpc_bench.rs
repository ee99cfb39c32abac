//! `skvm bench-memory-rpc`: latency and throughput of the guest-memory RPC
//! service itself, between two real processes, without a VM. The VMM side is
//! the real memory service over a 64 MiB region; the client is a re-executed
//! skvm (`bench-memory-rpc-client`) on a current-thread runtime, as devices are.
use crate::vmm::memory_service;
use futures::future::join_all;
use rpc_schema::{GuestMemoryClient, Segment, WriteSegment, PROTOCOL_VERSION};
use serde_bytes::ByteBuf;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};
use tarpc::context;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const REGION: usize = 64 << 20;
const SIZES: [u32; 5] = [64, 4096, 65536, 262144, 1 << 20];

/// Runs the server here and the client in a child process; prints the client's table.
pub fn run(quick: bool) -> Result<u8, String> {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION)]).map_err(|e| e.to_string())?;
    let runtime = crate::vmm::start_rpc_runtime().map_err(|e| e.to_string())?;
    let (server_end, client_end) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let health = memory_service::DeviceHealth::new(Some(memory_service::DeviceAccess::new("bench", false)));
    memory_service::serve(&runtime, server_end, GuestMemoryAtomic::new(memory), health).map_err(|e| e.to_string())?;
    let fd = client_end.as_raw_fd();
    let mut child = std::process::Command::new("/proc/self/exe");
    child.arg("bench-memory-rpc-client").arg(format!("--fd={fd}"));
    if quick {
        child.arg("--quick");
    }
    // SAFETY: only fcntl in the child before exec.
    unsafe {
        child.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = child.status().map_err(|e| format!("cannot start the client: {e}"))?;
    Ok(if status.success() { 0 } else { 1 })
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// The client: measures every size, for reads and writes, 1 and 32 in flight.
pub fn client(fd: RawFd, quick: bool) -> Result<u8, String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        // SAFETY: the parent handed this descriptor to us.
        let socket = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        let transport = rpc_schema::transport(socket).map_err(|e| e.to_string())?;
        let client = GuestMemoryClient::new(Default::default(), transport).spawn();
        client
            .hello(context::current(), PROTOCOL_VERSION, "bench".into())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        println!("memory RPC benchmark: tarpc + bincode over a unix socket, two processes, current-thread runtimes");
        println!("{:<6} {:>9} {:>13} {:>13} {:>14}", "op", "size", "latency p50", "1 in flight", "32 in flight");
        for write in [false, true] {
            for size in SIZES {
                let budget = if quick { 20 << 20 } else { 256u64 << 20 };
                let ops = (budget / size as u64).clamp(200, if quick { 2000 } else { 20000 }) as usize;
                let one = |i: usize| {
                    let client = client.clone();
                    let addr = (i as u64 * size as u64) % (REGION as u64 - size as u64);
                    async move {
                        let started = Instant::now();
                        if write {
                            let data = ByteBuf::from(vec![0xa5u8; size as usize]);
                            client
                                .write(context::current(), vec![WriteSegment { addr, data }])
                                .await
                                .map(|r| r.map(drop))
                        } else {
                            client
                                .read(context::current(), vec![Segment { addr, len: size }])
                                .await
                                .map(|r| r.map(drop))
                        }
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                        Ok::<Duration, String>(started.elapsed())
                    }
                };
                // One in flight: per-request latency.
                let start = Instant::now();
                let mut latencies = Vec::with_capacity(ops);
                for i in 0..ops {
                    latencies.push(one(i).await?);
                }
                let serial = start.elapsed();
                // 32 in flight.
                let start = Instant::now();
                for batch in (0..ops).collect::<Vec<_>>().chunks(32) {
                    for result in join_all(batch.iter().map(|&i| one(i))).await {
                        result?;
                    }
                }
                let parallel = start.elapsed();
                let rate = |elapsed: Duration| {
                    let bytes = ops as f64 * size as f64 / elapsed.as_secs_f64();
                    if size >= 65536 {
                        format!("{:.0} MiB/s", bytes / (1 << 20) as f64)
                    } else {
                        format!("{:.0} k/s", ops as f64 / elapsed.as_secs_f64() / 1e3)
                    }
                };
                println!(
                    "{:<6} {:>9} {:>10.1} µs {:>13} {:>14}",
                    if write { "write" } else { "read" },
                    size,
                    median(latencies).as_secs_f64() * 1e6,
                    rate(serial),
                    rate(parallel)
                );
            }
        }
        Ok(0)
    })
}
