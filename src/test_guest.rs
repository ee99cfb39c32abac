//! The test guest (tests/guest), built by build.rs and embedded so that
//! `skvm run` boots something useful with no arguments at all.

/// The PVH ELF image of the test guest.
pub const IMAGE: &[u8] = include_bytes!(env!("SKVM_TEST_GUEST"));

/// Command line used for the embedded guest when none is given.
pub const DEFAULT_CMDLINE: &str = "scenario=hello";
