//! The grant table of one request-level device: every chain the VMM has
//! posted to it and not yet seen completed. A device can touch guest memory
//! only through an entry here, only in the direction and within the bounds
//! of the buffer it names, and only until its completion arrives.
//!
//! An entry keeps the chain's head and buffers, which is all it takes to
//! post the request again (to a restarted device process, say).
use rpc_schema::MemoryError;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// One buffer of a granted chain, where the guest put it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedBuffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A posted chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The virtqueue the chain came from.
    pub queue: u16,
    pub head: u16,
    pub buffers: Vec<GrantedBuffer>,
}

impl Grant {
    /// Device-writable bytes in the chain: the most a used length may say.
    pub fn writable_len(&self) -> u64 {
        self.buffers.iter().filter(|b| b.writable).map(|b| b.len as u64).sum()
    }

    /// The guest range for `len` bytes at `offset` in buffer `buffer`, which
    /// must go the `writable` way; checked against the grant, not yet
    /// against the RAM map.
    pub fn resolve(&self, id: u64, buffer: u16, offset: u32, len: u64, writable: bool) -> Result<u64, MemoryError> {
        let granted = self.buffers.get(buffer as usize).ok_or(MemoryError::NoSuchBuffer { grant: id, buffer })?;
        if granted.writable != writable {
            return Err(MemoryError::WrongDirection { grant: id, buffer });
        }
        if offset as u64 + len > granted.len as u64 {
            return Err(MemoryError::OutsideBuffer { grant: id, buffer, offset, len });
        }
        granted.addr.checked_add(offset as u64).ok_or(MemoryError::Overflow { addr: granted.addr, len })
    }
}

#[derive(Debug, Default)]
pub struct GrantTable {
    next: u64,
    outstanding: HashMap<u64, Grant, BuildHasherDefault<IdHasher>>,
    /// Outstanding grants by queue.
    per_queue: HashMap<u16, usize>,
    /// Grants the last reset took back: a device may still be working on
    /// them, which is no fault of its own.
    reset: HashSet<u64>,
}

/// Hashes a grant id with one multiplication. Ids are the table's own
/// counter, not chosen by the guest or a device, so nothing can aim at a
/// bucket; SipHash's cost showed in profiles at 100k grants a second.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.write_u64(u64::from(b)));
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing: the high bits, which the table's control bytes use, vary.
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl GrantTable {
    /// Records a posted chain; returns its grant id (never reused) and the entry.
    pub fn issue(&mut self, grant: Grant) -> (u64, &Grant) {
        self.next += 1;
        *self.per_queue.entry(grant.queue).or_default() += 1;
        (self.next, self.outstanding.entry(self.next).insert_entry(grant).into_mut())
    }

    pub fn get(&self, id: u64) -> Result<&Grant, MemoryError> {
        match self.outstanding.get(&id) {
            Some(grant) => Ok(grant),
            None if self.reset.contains(&id) => Err(MemoryError::GrantReset(id)),
            None => Err(MemoryError::UnknownGrant(id)),
        }
    }

    /// Revokes a grant as its completion arrives.
    pub fn complete(&mut self, id: u64) -> Result<Grant, MemoryError> {
        match self.outstanding.remove(&id) {
            Some(grant) => {
                if let Some(count) = self.per_queue.get_mut(&grant.queue) {
                    *count -= 1;
                }
                Ok(grant)
            }
            None if self.reset.contains(&id) => Err(MemoryError::GrantReset(id)),
            None => Err(MemoryError::UnknownGrant(id)),
        }
    }

    /// Revokes every grant (a reset), returning them by id.
    pub fn revoke_all(&mut self) -> Vec<(u64, Grant)> {
        self.reset = self.outstanding.keys().copied().collect();
        self.per_queue.clear();
        self.outstanding.drain().collect()
    }

    /// Every outstanding grant, oldest first (to post again after a restart).
    pub fn snapshot(&self) -> Vec<(u64, Grant)> {
        let mut held: Vec<(u64, Grant)> = self.outstanding.iter().map(|(id, g)| (*id, g.clone())).collect();
        held.sort_unstable_by_key(|(id, _)| *id);
        held
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Outstanding grants of one queue.
    pub fn outstanding_on(&self, queue: u16) -> usize {
        self.per_queue.get(&queue).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Grant {
        Grant {
            queue: 0,
            head: 3,
            buffers: vec![
                GrantedBuffer { addr: 0x1000, len: 16, writable: false },
                GrantedBuffer { addr: 0x2000, len: 512, writable: true },
                GrantedBuffer { addr: 0x3000, len: 1, writable: true },
            ],
        }
    }

    #[test]
    fn a_grant_allows_only_its_buffers_their_bounds_and_their_direction() {
        let mut table = GrantTable::default();
        let (id, _) = table.issue(chain());
        let grant = table.get(id).unwrap();
        assert_eq!(grant.writable_len(), 513);
        assert_eq!(grant.resolve(id, 0, 4, 12, false), Ok(0x1004));
        assert_eq!(grant.resolve(id, 1, 0, 512, true), Ok(0x2000));
        assert_eq!(grant.resolve(id, 3, 0, 1, true), Err(MemoryError::NoSuchBuffer { grant: id, buffer: 3 }));
        assert_eq!(grant.resolve(id, 0, 0, 1, true), Err(MemoryError::WrongDirection { grant: id, buffer: 0 }));
        assert_eq!(grant.resolve(id, 1, 0, 1, false), Err(MemoryError::WrongDirection { grant: id, buffer: 1 }));
        assert!(matches!(grant.resolve(id, 1, 512, 1, true), Err(MemoryError::OutsideBuffer { .. })));
        assert!(matches!(
            grant.resolve(id, 1, u32::MAX, u32::MAX as u64, true),
            Err(MemoryError::OutsideBuffer { .. })
        ));
        // Completed: gone for good, and ids are not reused.
        assert!(table.complete(id).is_ok());
        assert_eq!(table.complete(id), Err(MemoryError::UnknownGrant(id)));
        assert_eq!(table.get(id).err(), Some(MemoryError::UnknownGrant(id)));
        let (held, _) = table.issue(chain());
        assert_ne!(held, id);
        let (other, _) = table.issue(Grant { queue: 1, ..chain() });
        assert_eq!((table.outstanding_on(0), table.outstanding_on(1), table.outstanding_on(2)), (1, 1, 0));
        assert!(table.complete(other).is_ok());
        assert_eq!((table.outstanding_on(0), table.outstanding_on(1)), (1, 0));
        assert_eq!(table.revoke_all().len(), 1);
        assert_eq!((table.outstanding(), table.outstanding_on(0)), (0, 0));
        // Taken back by a reset: refused, but not the device's fault.
        assert_eq!(table.get(held).err(), Some(MemoryError::GrantReset(held)));
        assert!(!MemoryError::GrantReset(held).is_violation() && MemoryError::UnknownGrant(id).is_violation());
    }
}
