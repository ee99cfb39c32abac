//! Errors that stop skvm before or while it runs a guest.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm (is KVM loaded and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which skvm needs")]
    MissingCapability(&'static str),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{requested} MiB of guest memory is more than this host's {available} MiB of RAM")]
    MemoryTooLarge { requested: u64, available: u64 },
    #[error("cannot allocate {0} MiB of guest memory")]
    AllocateMemory(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error("cannot read {what} {path}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is {reason}")]
    BadImage { what: &'static str, path: String, reason: String },
    #[error("{0}")]
    Boot(String),
    #[error("cannot open serial output {path}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {what} {path}")]
    OutputFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Device(String),
    #[error("host setup failed: {0}")]
    Host(String, #[source] std::io::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Host("creating an eventfd or socket".into(), e)
    }
}

impl Error {
    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}
