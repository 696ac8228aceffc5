//! Transparent huge pages for the daemon's large tables.
//!
//! A standby backup receiving a full copy writes a million mappings into hash tables
//! of some hundreds of MiB at random places: with 4 KiB pages nearly every insert
//! misses the TLB and a fifth of the time goes to page faults. Backing the big
//! allocations by 2 MiB pages made a standby backup's bulk copy ≈ 1.4× faster per
//! CPU-second (`docs/BENCHMARKS.md`, "Resync work per record"). Kernels in the
//! common `madvise` THP mode give huge pages only to memory that asks for them, so
//! this allocator asks (`MADV_HUGEPAGE`) for every allocation of at least
//! [`MIN_SIZE`]; everything else is the system allocator unchanged.
//!
//! The price, and why it is off by default (`[pcpd] huge_pages = true` turns it on):
//! the first write into each 2 MiB of a table faults in (and zeroes) a whole huge
//! page, and where free huge pages are scarce the kernel compacts memory first, both
//! inside the writing thread. On the shared test VM, pairs with huge pages answered
//! about 1 % of the requests of a million-mapping fill without option 192 (the
//! backup's acknowledgement came after `ack_timeout_ms`), pairs without none
//! (`docs/BENCHMARKS.md`, "Cheaper mirroring and huge pages"). A table's memory also
//! becomes resident in 2 MiB steps, so a table sized far beyond what it holds becomes
//! resident at its full size early.

// The global allocator interface is `unsafe` by definition; the only other unsafe
// operation is `madvise`, which changes how the kernel backs memory, never its
// contents or validity. The measured gain is in the module doc.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// A huge page on x86-64 and (with 4 KiB base pages) arm64.
const HUGE_PAGE: usize = 2 << 20;
/// Allocations from this size on ask for huge pages (smaller ones would waste most of
/// a huge page, and are not where the TLB misses are).
pub const MIN_SIZE: usize = 4 * HUGE_PAGE;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether allocations made from now on ask for huge pages (default: no).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The system allocator, asking for transparent huge pages for large allocations.
pub struct HugeTables;

/// Asks the kernel to back the whole huge pages inside `[p, p + size)` with huge
/// pages.
fn advise(p: *mut u8, size: usize) {
    if p.is_null() || size < MIN_SIZE || !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let start = (p as usize).next_multiple_of(HUGE_PAGE);
    let end = (p as usize).saturating_add(size) & !(HUGE_PAGE - 1);
    if end > start {
        // SAFETY: the range lies inside an allocation the system allocator just
        // returned; MADV_HUGEPAGE only changes how its pages are backed (a failure,
        // e.g. THP disabled, leaves it as it was and is ignored).
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every allocation is the system allocator's; `advise` does not change what
// an allocation holds.
unsafe impl GlobalAlloc for HugeTables {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed through.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large allocation made through the allocator is asked to be backed by huge
    /// pages: its mapping says so in /proc/self/smaps (`hg` in VmFlags). Skips where
    /// the kernel has no THP at all.
    #[test]
    fn large_allocations_ask_for_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            eprintln!("SKIP: no transparent huge pages in this kernel");
            return;
        }
        enable(true);
        let big: Vec<u8> = Vec::with_capacity(3 * MIN_SIZE);
        enable(false);
        let flags = |p: usize| -> Option<String> {
            let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
            let mut inside = false;
            for line in smaps.lines() {
                if let Some((range, _)) = line.split_once(' ')
                    && let Some((a, b)) = range.split_once('-')
                    && let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&p);
                } else if inside && let Some(f) = line.strip_prefix("VmFlags:") {
                    return Some(f.to_string());
                }
            }
            None
        };
        // The middle of the big one lies in a whole huge page that was advised.
        let mid = big.as_ptr() as usize + big.capacity() / 2;
        let f = flags(mid).expect("the big allocation is mapped");
        assert!(f.split_whitespace().any(|x| x == "hg"), "VmFlags: {f}");
    }
}
