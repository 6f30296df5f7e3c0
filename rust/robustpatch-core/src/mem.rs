//! Fresh output buffers that the kernel fills quickly.
//!
//! A large `Vec` the kernels write once (an undo record gathered from its
//! parts) lands in freshly mapped memory, where every 4 KiB page costs a page
//! fault on first touch: for a 10 MB record that is 2,600 faults, about as
//! long as copying the whole 64 MB tensor the record belongs to. On Linux the
//! buffer's 2 MiB-aligned interior is marked for transparent huge pages
//! (`madvise(MADV_HUGEPAGE)`, honoured when the system's THP mode is
//! `madvise` or `always`), so it faults in 2 MiB at a time instead.

/// Below this size the advice is not worth a system call.
const HUGE_MIN: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// An empty `Vec` with room for `n` elements, its large interior advised to
/// use huge pages.
pub fn with_capacity<T>(n: usize) -> Vec<T> {
    let v = Vec::with_capacity(n);
    advise_huge(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v
}

#[cfg(target_os = "linux")]
fn advise_huge(addr: usize, len: usize) {
    if len < HUGE_MIN {
        return;
    }
    let start = addr.next_multiple_of(HUGE_PAGE);
    let end = (addr + len) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside the allocation just made; the advice
        // changes how its pages are backed, never their contents. A failure
        // (e.g. THP disabled) only leaves the default 4 KiB pages.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_addr: usize, _len: usize) {}
