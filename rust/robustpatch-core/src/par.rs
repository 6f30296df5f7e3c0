//! Work sizes shared by the parallel kernels.

/// Elements per parallel task: large enough that rayon's overhead is noise,
/// small enough that 2–64 threads get balanced work. A multiple of 8 so packed
/// codes of any width start on a byte boundary.
pub const CHUNK: usize = 1 << 16;

/// Elements per inner tile: the f32 accumulator and the unpacked codes of one
/// tile stay in L1 while the target streams through.
pub const TILE: usize = 2048;

/// Below this many elements the kernels run on the calling thread.
pub const PARALLEL_MIN: usize = 1 << 17;
