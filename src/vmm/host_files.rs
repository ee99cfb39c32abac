//! Opening the host files a user names (kernel, initrd, disks, console and
//! stats output) so that a wrong kind of file is a clear error, never a
//! hang or a runaway read: a FIFO with no peer would block `open` (while
//! SIGINT is blocked), `/dev/zero` or a huge file would be read without end.
use super::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device (skvm takes disk image files)"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` without waiting on a FIFO's peer and insists on a regular
/// file; returns it with its size.
fn open_regular(what: &'static str, path: &Path, options: &mut OpenOptions) -> Result<(File, u64)> {
    open_regular_with(what, path, options, 0)
}

fn open_regular_with(what: &'static str, path: &Path, options: &mut OpenOptions, flags: i32) -> Result<(File, u64)> {
    let file = options.custom_flags(libc::O_NONBLOCK | flags).open(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| Error::ReadFile { what, path: path.to_path_buf(), source })?;
    if !meta.is_file() {
        return Err(Error::BadImage { what, path: path.display().to_string(), reason: kind(&meta).into() });
    }
    Ok((file, meta.len()))
}

/// Reads a whole image file of at most `limit` bytes.
pub fn read_image(what: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>> {
    let (file, size) = open_regular(what, path, OpenOptions::new().read(true))?;
    if size > limit {
        return Err(Error::BadImage {
            what,
            path: path.display().to_string(),
            reason: format!("{} MiB, more than the {} MiB that can be loaded", size >> 20, limit >> 20),
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|source| Error::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}

/// Opens a disk image (a regular file) for reading, and writing unless
/// `readonly`; with `direct`, bypassing the page cache (O_DIRECT).
pub fn open_disk(path: &Path, readonly: bool, direct: bool) -> Result<File> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    let opened = open_regular_with("disk", path, OpenOptions::new().read(true).write(!readonly), flags);
    match opened {
        Err(Error::ReadFile { source, .. }) if direct && source.raw_os_error() == Some(libc::EINVAL) => {
            Err(Error::BadImage {
                what: "disk",
                path: path.display().to_string(),
                reason: "direct=on, but its filesystem does not support O_DIRECT".into(),
            })
        }
        other => Ok(other?.0),
    }
}

/// Creates (or truncates) an output file. A FIFO is accepted only when a
/// reader already has it open; anything else that is not a regular file is
/// refused.
pub fn create_output(path: &Path) -> std::io::Result<File> {
    check_output(path)?;
    let file =
        OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ENXIO) => std::io::Error::other("it is a FIFO that nobody reads"),
                _ => e,
            },
        )?;
    // Writes may wait for a FIFO's reader from here on, as for a terminal.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) & !libc::O_NONBLOCK) };
    Ok(file)
}

/// Refuses an output path that exists and is neither a regular file nor a
/// FIFO; check it before the VM starts, so a bad path is not found at exit.
pub fn check_output(path: &Path) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.file_type().is_fifo() => {
            Err(std::io::Error::other(format!("it is {}", kind(&meta))))
        }
        _ => Ok(()),
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// TUNSETOFFLOAD flags: what the tap may hand the guest unfinished.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Attaches to the existing tap `name` with virtio-net headers of
/// `header` bytes and no offloads yet; also says whether the tap takes
/// checksum and TSO offloads. A name that is not a tap, or a tap another
/// process holds, is a clear error (attaching never creates one).
pub fn open_tap(name: &str, header: usize) -> Result<(File, bool)> {
    let fail = |reason: String| Error::Device(format!("--net tap={name}: {reason}"));
    let sys = Path::new("/sys/class/net").join(name);
    if !sys.exists() {
        return Err(fail("no such network interface (create it first: ip tuntap add NAME mode tap)".into()));
    }
    let flags = std::fs::read_to_string(sys.join("tun_flags")).map_err(|_| fail("not a tap device".into()))?;
    let flags = i64::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    if flags & IFF_TAP as i64 == 0 {
        return Err(fail("a tun (layer 3) device, not a tap".into()));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| fail(format!("cannot open /dev/net/tun: {e}")))?;
    // struct ifreq: the name, then the flags.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads (and may update) the ifreq we pass, of the size it expects.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(fail(match e.raw_os_error() {
            Some(libc::EBUSY) => "the tap is in use by another process".into(),
            Some(libc::EINVAL) => format!("cannot attach ({e}); was it created with multi_queue?"),
            _ => format!("cannot attach: {e}"),
        }));
    }
    let size = header as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    let sized = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETVNETHDRSZ, &size as *const libc::c_int) };
    let offloads = set_tap_offload(&tun, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6).is_ok();
    if sized != 0 || set_tap_offload(&tun, 0).is_err() {
        return Err(fail(format!("cannot set up headers: {}", std::io::Error::last_os_error())));
    }
    Ok((tun, offloads))
}

/// Tells the tap which unfinished frames (partial checksums, TSO) the guest takes.
pub fn set_tap_offload(tap: &File, flags: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    match unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A console's output and input: stdout and (when it is a terminal, pipe
/// or socket, which an event loop can wait on) stdin, opened afresh so the
/// device's non-blocking reads leave skvm's own stdin alone; or an output
/// file and no input.
pub fn open_console(output: &super::SerialOutput) -> Result<(File, Option<File>)> {
    use std::os::fd::AsFd;
    match output {
        super::SerialOutput::File(path) => {
            let file = create_output(path)
                .map_err(|e| Error::Device(format!("--console file:{}: cannot create it: {e}", path.display())))?;
            Ok((file, None))
        }
        _ => {
            let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
            let waitable = std::fs::metadata("/proc/self/fd/0").is_ok_and(|m| {
                let t = m.file_type();
                let terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
                t.is_fifo() || t.is_socket() || (t.is_char_device() && terminal)
            });
            let input = if waitable { Some(File::open("/proc/self/fd/0")?) } else { None };
            Ok((File::from(stdout), input))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("skvm-host-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn fifo(name: &str) -> std::path::PathBuf {
        let path = temp(name);
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        path
    }

    #[test]
    fn the_wrong_kind_of_file_is_an_error_not_a_hang() {
        let pipe = fifo("pipe");
        let err = |e: Error| e.to_string();
        assert!(err(open_disk(&pipe, true, false).unwrap_err()).contains("a FIFO"));
        assert!(err(read_image("initrd", &pipe, 1 << 20).unwrap_err()).contains("a FIFO"));
        assert!(create_output(&pipe).unwrap_err().to_string().contains("nobody reads"));
        assert!(err(read_image("kernel", Path::new("/dev/zero"), 1 << 20).unwrap_err()).contains("character device"));
        assert!(err(open_disk(&std::env::temp_dir(), true, false).unwrap_err()).contains("a directory"));
        assert!(check_output(Path::new("/dev/null")).is_err());
    }

    #[test]
    fn an_image_larger_than_the_limit_is_refused_unread() {
        let path = temp("big");
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        let e = read_image("initrd", &path, 8 << 20).unwrap_err().to_string();
        assert!(e.contains("64 MiB, more than the 8 MiB"), "{e}");
        assert_eq!(read_image("initrd", &path, 64 << 20).unwrap().len(), 64 << 20);
    }
}
