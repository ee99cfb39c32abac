//! Checked access to guest memory: the one implementation of the checks every
//! device memory request passes, whichever memory mode serves it.
//!
//! A request is refused whole when any segment overflows the address space,
//! leaves guest RAM, or when the request is larger than the protocol allows.
//! Nothing is read or written before every segment has passed.
use rpc_schema::{MemoryError, Segment, WriteSegment, MAX_SEGMENTS, MAX_TRANSFER};
use serde_bytes::ByteBuf;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

fn check(mem: &GuestMemoryMmap, count: usize, ranges: impl Iterator<Item = (u64, u64)>) -> Result<(), MemoryError> {
    if count > MAX_SEGMENTS {
        return Err(MemoryError::TooManySegments { count, max: MAX_SEGMENTS });
    }
    let mut total = 0u64;
    for (addr, len) in ranges {
        if addr.checked_add(len).is_none() {
            return Err(MemoryError::Overflow { addr, len });
        }
        total = total.saturating_add(len);
        if total > MAX_TRANSFER {
            return Err(MemoryError::TooLarge { len: total, max: MAX_TRANSFER });
        }
        if len > 0 && !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(MemoryError::OutOfRange { addr, len });
        }
    }
    Ok(())
}

/// Reads every segment, after checking them all.
pub fn read(mem: &GuestMemoryMmap, segments: &[Segment]) -> Result<Vec<ByteBuf>, MemoryError> {
    check(mem, segments.len(), segments.iter().map(|s| (s.addr, s.len as u64)))?;
    segments
        .iter()
        .map(|s| {
            let mut buf = vec![0u8; s.len as usize];
            mem.read_slice(&mut buf, GuestAddress(s.addr))
                .map_err(|_| MemoryError::OutOfRange { addr: s.addr, len: s.len as u64 })?;
            Ok(ByteBuf::from(buf))
        })
        .collect()
}

/// Writes every segment in order, after checking them all.
pub fn write(mem: &GuestMemoryMmap, segments: &[WriteSegment]) -> Result<(), MemoryError> {
    check(mem, segments.len(), segments.iter().map(|s| (s.addr, s.data.len() as u64)))?;
    for s in segments {
        mem.write_slice(&s.data, GuestAddress(s.addr))
            .map_err(|_| MemoryError::OutOfRange { addr: s.addr, len: s.data.len() as u64 })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        // Two regions with a hole, like skvm's layout in miniature.
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)]).unwrap()
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, len }
    }

    #[test]
    fn round_trip_inside_ram() {
        let mem = mem();
        write(&mem, &[WriteSegment { addr: 0x20010, data: ByteBuf::from(vec![1, 2, 3]) }]).unwrap();
        let got = read(&mem, &[seg(0x20010, 3), seg(0, 0)]).unwrap();
        assert_eq!(got[0].as_slice(), &[1, 2, 3]);
        assert!(got[1].is_empty());
    }

    #[test]
    fn refuses_holes_overflow_size_and_count() {
        let mem = mem();
        assert!(matches!(read(&mem, &[seg(0xfff0, 0x20)]), Err(MemoryError::OutOfRange { .. })));
        assert!(matches!(read(&mem, &[seg(0x18000, 1)]), Err(MemoryError::OutOfRange { .. })));
        assert!(matches!(read(&mem, &[seg(u64::MAX - 1, 4)]), Err(MemoryError::Overflow { .. })));
        let big = vec![seg(0, 0x10000); 17];
        assert!(matches!(read(&mem, &big), Err(MemoryError::TooLarge { .. })));
        let many = vec![seg(0, 1); MAX_SEGMENTS + 1];
        assert!(matches!(read(&mem, &many), Err(MemoryError::TooManySegments { .. })));
    }

    #[test]
    fn a_bad_segment_stops_the_whole_write() {
        let mem = mem();
        let writes = [
            WriteSegment { addr: 0x100, data: ByteBuf::from(vec![9]) },
            WriteSegment { addr: 0x18000, data: ByteBuf::from(vec![9]) },
        ];
        assert!(write(&mem, &writes).is_err());
        assert_eq!(read(&mem, &[seg(0x100, 1)]).unwrap()[0].as_slice(), &[0]);
    }
}
