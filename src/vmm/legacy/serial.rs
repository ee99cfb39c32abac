//! COM1: a 16550A from vm-superio, wired to GSI 4 through an irqfd.
use super::super::{Error, Result, SerialOutput};
use super::lock;
use kvm_ioctls::VmFd;
use std::io::{IsTerminal, Read, Write};
use std::sync::Mutex;
use std::time::Duration;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
const COM1_PORTS: u16 = 8;

pub fn owns(port: u16) -> bool {
    (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
}

/// Raises the UART's interrupt line through KVM's irqfd.
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct Com1 {
    uart: Mutex<Uart>,
    reads_stdin: bool,
}

impl Com1 {
    pub fn new(vm: &VmFd, output: &SerialOutput) -> Result<Self> {
        let (sink, reads_stdin): (Box<dyn Write + Send>, bool) = match output {
            SerialOutput::Stdio => (Box::new(std::io::stdout()), std::io::stdin().is_terminal()),
            SerialOutput::File(path) => {
                let file = crate::vmm::host_files::create_output(path)
                    .map_err(|source| Error::SerialFile { path: path.clone(), source })?;
                (Box::new(file), false)
            }
            SerialOutput::None => (Box::new(std::io::sink()), false),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&irq, COM1_GSI).map_err(Error::kvm("KVM_IRQFD (COM1)"))?;
        Ok(Com1 { uart: Mutex::new(Serial::new(IrqLine(irq), sink)), reads_stdin })
    }

    pub fn reads_stdin(&self) -> bool {
        self.reads_stdin
    }

    pub fn read(&self, port: u16) -> u8 {
        lock(&self.uart).read((port - COM1_BASE) as u8)
    }

    pub fn write(&self, port: u16, value: u8) {
        let mut uart = lock(&self.uart);
        if let Err(e) = uart.write((port - COM1_BASE) as u8, value) {
            // Say it once (a closed pipe would fail every byte from now on),
            // then let the guest write into nothing.
            tracing::warn!("serial output failed ({e:?}); the guest's console output is dropped from here on");
            *uart.writer_mut() = Box::new(std::io::sink());
        }
        // Guest output is often the user's only view; push it out per byte.
        if port == COM1_BASE {
            let _ = uart.writer_mut().flush();
        }
    }
}

/// Copies the terminal's input into the UART's receive FIFO, waiting while it is full.
pub fn forward_stdin(com1: &Com1) {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        let count = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pending = &buf[..count];
        while !pending.is_empty() {
            let taken = lock(&com1.uart).enqueue_raw_bytes(pending).unwrap_or(0);
            pending = &pending[taken..];
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
