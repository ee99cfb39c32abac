//! The wire contract between the skvm VMM and its sandboxed device processes.
//!
//! Nothing else in skvm defines messages that cross the process boundary.
//! The services (device -> VMM guest-memory access, VMM -> device control)
//! arrive with the sandboxed devices; this crate fixes the version they are
//! negotiated under.

/// Version of the protocol. A device and a VMM talk only when theirs match;
/// any change to a message's meaning or encoding bumps it.
pub const PROTOCOL_VERSION: u32 = 1;
