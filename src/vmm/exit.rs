//! Why a VM stopped, and the exit status skvm turns that into.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote a status byte to the debug-exit port.
    DebugExit(u8),
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// A reset request; `source` names the mechanism. skvm does not reboot.
    Reset { source: &'static str },
    /// KVM reported a shutdown: the CPU triple-faulted.
    TripleFault { vcpu: u8 },
    /// KVM could not continue running the guest.
    Crash { vcpu: u8, reason: String },
    /// A client asked for it through the control API.
    ApiShutdown,
    /// skvm received SIGINT or SIGTERM.
    Signal(i32),
}

pub const EXIT_RESET: u8 = 3;
pub const EXIT_CRASH: u8 = 4;

impl VmExit {
    pub fn status(&self) -> u8 {
        match self {
            VmExit::DebugExit(status) => *status,
            VmExit::PowerOff | VmExit::ApiShutdown => 0,
            VmExit::Reset { .. } => EXIT_RESET,
            VmExit::TripleFault { .. } | VmExit::Crash { .. } => EXIT_CRASH,
            VmExit::Signal(signal) => 128u8.wrapping_add(*signal as u8),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            VmExit::DebugExit(status) => {
                format!("guest exited through the debug port with status {status}")
            }
            VmExit::PowerOff => "guest powered off (ACPI S5)".into(),
            VmExit::ApiShutdown => "shut down through the control API".into(),
            VmExit::Reset { source } => format!("guest requested a reset ({source}); stopping"),
            VmExit::TripleFault { vcpu } => format!("guest crashed: triple fault on vCPU {vcpu}"),
            VmExit::Crash { vcpu, reason } => format!("guest crashed on vCPU {vcpu}: {reason}"),
            VmExit::Signal(signal) => format!("stopped by {}", signal_name(*signal)),
        }
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(VmExit::DebugExit(7).status(), 7);
        assert_eq!(VmExit::PowerOff.status(), 0);
        assert_eq!(VmExit::Reset { source: "i8042" }.status(), 3);
        assert_eq!(VmExit::TripleFault { vcpu: 0 }.status(), 4);
        assert_eq!(VmExit::Signal(libc::SIGINT).status(), 130);
        assert_eq!(VmExit::Signal(libc::SIGTERM).status(), 143);
    }
}
