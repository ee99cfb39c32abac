//! A buffer aligned for O_DIRECT transfers (`direct=on` disks): guest
//! buffers have any alignment, so data goes through this one. It is reused
//! and only grows, so its pages stay faulted in across requests.
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Memory alignment that satisfies O_DIRECT on every Linux filesystem.
pub const ALIGN: usize = 4096;

pub struct AlignedBuffer {
    ptr: NonNull<u8>,
    capacity: usize,
}

// SAFETY: the buffer owns its allocation; nothing else points into it, and
// only `&mut self` reaches its bytes.
unsafe impl Send for AlignedBuffer {}
// SAFETY: as above: a shared reference gives no access to the bytes.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    pub fn new() -> Self {
        AlignedBuffer { ptr: NonNull::dangling(), capacity: 0 }
    }

    /// The first `len` bytes, growing the buffer if needed (None if the
    /// allocation fails: the request fails, not the device).
    pub fn get(&mut self, len: usize) -> Option<&mut [u8]> {
        if len > self.capacity {
            let capacity = len.checked_next_multiple_of(ALIGN)?;
            let layout = Layout::from_size_align(capacity, ALIGN).ok()?;
            // SAFETY: a non-zero size with a valid alignment.
            let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
            self.release();
            (self.ptr, self.capacity) = (ptr, capacity);
        }
        // SAFETY: `len` bytes inside our allocation (or an empty slice).
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) })
    }

    fn release(&mut self) {
        if self.capacity > 0 {
            // SAFETY: allocated in `get` with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.capacity, ALIGN)) };
            self.capacity = 0;
        }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_aligned_and_keeps_its_memory() {
        let mut buffer = AlignedBuffer::new();
        assert_eq!(buffer.get(0).unwrap().len(), 0);
        let first = buffer.get(100).unwrap();
        assert_eq!(first.as_ptr() as usize % ALIGN, 0);
        first[99] = 7;
        let again = buffer.get(4096).unwrap();
        assert_eq!(again[99], 7, "a request within the capacity reuses the buffer");
        let grown = buffer.get(3 * 4096 + 1).unwrap();
        assert_eq!((grown.len(), grown.as_ptr() as usize % ALIGN), (3 * 4096 + 1, 0));
    }
}
