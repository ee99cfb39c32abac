//! Devices the VMM emulates itself on the port I/O bus: COM1, the i8042
//! reset line, skvm's debug-exit port and the ACPI sleep/reset register.
//! Other ports read as all-ones and ignore writes.
mod power;
mod serial;

use super::control::VmControl;
use super::exit::VmExit;
use super::{lock, Result, SerialOutput};
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex};
use tracing::debug;
use vm_superio::{I8042Device, Trigger};

pub use power::{ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, DEBUG_EXIT_PORT};
pub use serial::{COM1_BASE, COM1_GSI};

const I8042_DATA_PORT: u16 = 0x60;
const I8042_CMD_PORT: u16 = 0x64;

/// The i8042's reset line ends the VM.
struct ResetLine(Arc<VmControl>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> std::result::Result<(), Self::E> {
        self.0.request_exit(VmExit::Reset { source: "i8042 reset line" });
        Ok(())
    }
}

pub struct LegacyDevices {
    serial: serial::Com1,
    i8042: Mutex<I8042Device<ResetLine>>,
    control: Arc<VmControl>,
}

impl LegacyDevices {
    pub fn new(vm: &VmFd, output: &SerialOutput, control: Arc<VmControl>) -> Result<Self> {
        Ok(LegacyDevices {
            serial: serial::Com1::new(vm, output)?,
            i8042: Mutex::new(I8042Device::new(ResetLine(control.clone()))),
            control,
        })
    }

    pub fn forward_stdin_if_terminal(self: &Arc<Self>) {
        if self.serial.reads_stdin() {
            let devices = self.clone();
            if let Err(e) =
                std::thread::Builder::new().name("stdin".into()).spawn(move || serial::forward_stdin(&devices.serial))
            {
                tracing::warn!("no serial input: cannot start the stdin thread: {e}");
            }
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if serial::owns(p) => data[0] = self.serial.read(p),
            I8042_DATA_PORT | I8042_CMD_PORT => {
                data[0] = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
            }
            ACPI_SLEEP_STATUS_PORT | ACPI_SLEEP_CONTROL_PORT => data.fill(0),
            _ => {
                debug!("unclaimed port read {port:#x} ({} bytes)", data.len());
                data.fill(0xff);
            }
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            p if serial::owns(p) => self.serial.write(p, data[0]),
            I8042_DATA_PORT | I8042_CMD_PORT => {
                let _ = lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, data[0]);
            }
            DEBUG_EXIT_PORT => self.control.request_exit(VmExit::DebugExit(data[0])),
            ACPI_SLEEP_CONTROL_PORT => {
                if let Some(exit) = power::sleep_control_write(data[0]) {
                    self.control.request_exit(exit);
                }
            }
            _ => debug!("unclaimed port write {port:#x} = {data:02x?}"),
        }
    }
}
