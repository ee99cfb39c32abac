//! virtio-console (virtio 1.x, 5.3), one port and no optional features:
//! what the guest writes to its transmit queue (1) goes to the output the
//! VMM opened; host input fills the buffers the guest posts on its receive
//! queue (0), held here until bytes come.
use super::features;
use super::net::Held;
use super::request::{Reply, Request};
use rpc_schema::DeviceInfo;
use serde_bytes::ByteBuf;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;

pub const DEVICE_ID: u32 = 3;
pub const QUEUE_SIZE: u16 = 64;
/// Most output bytes one transmit request may carry; the rest is dropped.
const MAX_WRITE: u64 = 64 * 1024;

pub struct ConsoleDevice {
    output: File,
    input: Option<File>,
    watcher: Option<File>,
    /// The input reached its end: nothing more to wait for.
    input_done: bool,
}

impl ConsoleDevice {
    /// Takes the output and (if any) the input the VMM opened.
    pub fn new(output: File, input: Option<File>) -> std::io::Result<Self> {
        let watcher = match &input {
            Some(input) => {
                // SAFETY: fcntl on a descriptor we own.
                let flags = unsafe { libc::fcntl(input.as_raw_fd(), libc::F_GETFL) };
                // SAFETY: as above.
                if flags < 0 || unsafe { libc::fcntl(input.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Some(input.try_clone()?)
            }
            None => None,
        };
        let input_done = input.is_none();
        Ok(ConsoleDevice { output, input, watcher, input_done })
    }

    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            device_id: DEVICE_ID,
            features: features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC,
            queue_count: 2,
            max_queue_size: QUEUE_SIZE,
            config: ByteBuf::from(vec![0u8; 8]),
        }
    }

    /// A descriptor of the input for the event loop to watch (made before
    /// the sandbox forbids duplicating descriptors).
    pub fn take_watcher(&mut self) -> Option<File> {
        self.watcher.take()
    }

    pub fn input_open(&self) -> bool {
        !self.input_done
    }

    pub fn wanted(readable_len: u64) -> u64 {
        readable_len.min(MAX_WRITE)
    }

    /// Writes each transmit request's bytes to the output.
    pub fn transmit(&mut self, requests: &[Request]) -> Vec<Reply> {
        requests
            .iter()
            .map(|r| {
                let written = r.readable.as_ref().is_some_and(|bytes| self.output.write_all(bytes).is_ok());
                Reply { failed: !written, ..Reply::default() }
            })
            .collect()
    }

    /// Fills held receive buffers, front first, with whatever input is
    /// waiting: each buffer takes what is there, up to its size.
    pub fn receive<T>(&mut self, held: &mut VecDeque<Held<T>>, budget: u64) -> Vec<(T, Reply)> {
        let mut done = Vec::new();
        let mut delivered = 0u64;
        while let (Some(front), Some(input)) = (held.front(), self.input.as_ref()) {
            let room = front.capacity.min(budget.saturating_sub(delivered)).min(MAX_WRITE) as usize;
            if room == 0 {
                if front.capacity == 0 {
                    // A buffer it cannot write: back, unused.
                    done.push((held.pop_front().unwrap().buffer, Reply::default()));
                    continue;
                }
                break;
            }
            let mut bytes = vec![0u8; room];
            // SAFETY: reads into our own buffer, within its length.
            let got = unsafe { libc::read(input.as_raw_fd(), bytes.as_mut_ptr() as *mut libc::c_void, room) };
            if got == 0 {
                self.input_done = true;
                self.input = None;
                break;
            }
            if got < 0 {
                break;
            }
            bytes.truncate(got as usize);
            delivered += got as u64;
            let buffer = held.pop_front().unwrap().buffer;
            done.push((
                buffer,
                Reply { used_len: got as u32, writes: vec![(0, bytes)], failed: false, ..Reply::default() },
            ));
        }
        done
    }
}
