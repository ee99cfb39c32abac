//! A polling virtio-console driver (virtio 1.x, 5.3), one port: receive
//! queue 0, transmit queue 1.
use crate::blk::Arena;
use crate::platform::rdtsc;
use crate::virtio::{Device, Queue, DESC_F_WRITE, F_VERSION_1};

pub const DEVICE_ID: u32 = 3;
const QUEUE_SIZE: u16 = 16;
const BUFFER: u64 = 256;

pub struct Console {
    device: Device,
    rx: Queue,
    tx: Queue,
    rx_buffers: u64,
    tx_buffer: u64,
}

impl Console {
    pub fn init(mut device: Device, arena: &mut Arena) -> Result<Console, &'static str> {
        device.negotiate(F_VERSION_1)?;
        let footprint = Queue::footprint(QUEUE_SIZE);
        let rx = Queue::new(arena.take(footprint).ok_or("out of memory")?, QUEUE_SIZE);
        let tx = Queue::new(arena.take(footprint).ok_or("out of memory")?, QUEUE_SIZE);
        let rx_buffers = arena.take(BUFFER * QUEUE_SIZE as u64).ok_or("out of memory")?;
        let tx_buffer = arena.take(4096).ok_or("out of memory")?;
        device.setup_queue(0, &rx)?;
        device.setup_queue(1, &tx)?;
        let mut console = Console { device, rx, tx, rx_buffers, tx_buffer };
        for slot in 0..QUEUE_SIZE {
            console.rx.set_desc(slot, rx_buffers + slot as u64 * BUFFER, BUFFER as u32, DESC_F_WRITE, 0);
            console.rx.push(slot);
        }
        device.driver_ok();
        device.notify(0);
        Ok(console)
    }

    /// Writes `text` to the host and waits until the device took it.
    pub fn write(&mut self, text: &[u8]) -> Result<(), &'static str> {
        let len = text.len().min(4096);
        // SAFETY: our own transmit buffer, 4096 bytes long.
        unsafe { core::ptr::copy_nonoverlapping(text.as_ptr(), self.tx_buffer as *mut u8, len) };
        self.tx.set_desc(0, self.tx_buffer, len as u32, 0, 0);
        self.tx.push(0);
        self.device.notify(1);
        self.tx.wait_used(&self.device).map(drop).ok_or("the console never took our output")
    }

    /// Bytes the host sent, if any, copied into `out`; the buffer is posted again.
    pub fn read(&mut self, out: &mut [u8]) -> Option<usize> {
        let (head, len) = self.rx.pop_used()?;
        let slot = head % QUEUE_SIZE;
        let at = self.rx_buffers + slot as u64 * BUFFER;
        let len = (len as usize).min(BUFFER as usize).min(out.len());
        // SAFETY: our own receive buffer, `len` bytes of which the device wrote.
        unsafe { core::ptr::copy_nonoverlapping(at as *const u8, out.as_mut_ptr(), len) };
        self.rx.set_desc(slot, at, BUFFER as u32, DESC_F_WRITE, 0);
        self.rx.push(slot);
        self.device.notify(0);
        Some(len)
    }
}

/// `console-echo`: say hello on hvc0, then echo each line the host types
/// back as `hvc0 echo: LINE`, until the line `quit`.
pub fn run_echo(info: &crate::pvh::StartInfo) -> Result<(), &'static str> {
    let cmdline = info.cmdline();
    let device = crate::virtio::devices(cmdline)
        .find(|d| d.is_virtio() && d.device_id() == DEVICE_ID)
        .ok_or("no virtio-console device")?;
    let mut arena = crate::blk_scenarios::arena(info).ok_or("not enough RAM")?;
    let mut console = Console::init(device, &mut arena)?;
    console.write(b"hvc0: hello from the test guest\n")?;
    crate::println!("console: ready");
    let (mut line, mut len) = ([0u8; 256], 0usize);
    let start = rdtsc();
    loop {
        let mut chunk = [0u8; 256];
        match console.read(&mut chunk) {
            Some(got) => {
                for &byte in &chunk[..got] {
                    if byte != b'\n' {
                        if len < line.len() {
                            line[len] = byte;
                            len += 1;
                        }
                        continue;
                    }
                    if &line[..len] == b"quit" {
                        console.write(b"hvc0: bye\n")?;
                        return Ok(());
                    }
                    let mut reply = [0u8; 300];
                    let prefix = b"hvc0 echo: ";
                    reply[..prefix.len()].copy_from_slice(prefix);
                    reply[prefix.len()..prefix.len() + len].copy_from_slice(&line[..len]);
                    reply[prefix.len() + len] = b'\n';
                    console.write(&reply[..prefix.len() + len + 1])?;
                    len = 0;
                }
            }
            None if rdtsc() - start > 1 << 38 => return Err("no quit from the host"),
            None => core::hint::spin_loop(),
        }
    }
}
