//! COM1 output. Writes go straight to the transmit register: every virtual
//! 16550 we target has an always-empty transmitter, and polling the line
//! status register would double the VM exits per byte.
use crate::platform::{inb, outb};
use core::fmt;

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;

pub fn write_str(s: &str) {
    for b in s.bytes() {
        if b == b'\n' {
            outb(COM1, b'\r');
        }
        outb(COM1, b);
    }
}

/// A received byte, if the UART has one.
pub fn try_read() -> Option<u8> {
    if inb(LSR) & LSR_DATA_READY != 0 {
        Some(inb(COM1))
    } else {
        None
    }
}

pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_str(s);
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}
