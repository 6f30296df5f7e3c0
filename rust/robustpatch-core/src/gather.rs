//! Undo records gathered in tensor order while chunks are applied in parallel.
//!
//! Each worker claims the next chunk from a shared counter (so chunks finish
//! roughly in order), applies it with its record going to a reused scratch
//! buffer (hot in cache), and appends that part to the one output record as
//! soon as every earlier chunk is in; a part that finishes early waits in a
//! small reorder buffer. The record is thus written once, with no per-chunk
//! allocation and no gathering pass after the apply: both used to cost as
//! much as the apply itself on a fresh process (page faults of fresh memory).
//! What the output record costs on first touch depends on the allocator: the
//! Python module uses one that reuses freed memory (see its `lib.rs`).

use crate::apply::Undo;
use crate::par::CHUNK;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The output record and the parts that finished ahead of their turn.
struct Output<B> {
    undo: Undo<B>,
    next: usize,
    early: BTreeMap<usize, Undo<B>>,
    /// Buffers of committed early parts, for workers whose scratch left.
    spare: Vec<Undo<B>>,
}

impl<B: Copy> Output<B> {
    fn append(&mut self, part: &Undo<B>) {
        self.undo.positions.extend_from_slice(&part.positions);
        self.undo.values.extend_from_slice(&part.values);
        self.next += 1;
    }

    /// Chunk `c`'s part is done: append it and every early part it unblocks,
    /// or keep it for later (then `part` comes back empty, from the spares).
    fn commit(&mut self, c: usize, part: &mut Undo<B>) {
        if c != self.next {
            let spare = self.spare.pop().unwrap_or_default();
            self.early.insert(c, std::mem::replace(part, spare));
            return;
        }
        self.append(part);
        while let Some(mut p) = self.early.remove(&self.next) {
            self.append(&p);
            p.positions.clear();
            p.values.clear();
            self.spare.push(p);
        }
    }
}

/// A slice shared by workers that each take disjoint chunks of it.
struct Shared<T>(*mut T, usize);
// SAFETY: workers only build disjoint sub-slices (each chunk index is claimed
// once), so sharing the pointer across threads is sound for `T: Send`.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Chunk `c`. Safety: each `c` must be taken by one caller only, and the
    /// slice must not outlive the `&mut [T]` this was made from.
    unsafe fn chunk<'a>(&self, c: usize) -> &'a mut [T] {
        let start = c * CHUNK;
        let len = CHUNK.min(self.1 - start);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Run `work(base, chunk, part)` over the CHUNK-sized pieces of `target` on
/// every rayon thread; `work` appends the chunk's records to `part` (empty on
/// entry) and returns its overflow count. Returns the whole record, in
/// position order, and the summed counts.
pub(crate) fn in_order<T: Send, B: Copy + Send>(
    target: &mut [T],
    expected: usize,
    work: impl Fn(usize, &mut [T], &mut Undo<B>) -> usize + Sync,
) -> (Undo<B>, usize) {
    let chunks = target.len().div_ceil(CHUNK);
    let output = Mutex::new(Output {
        undo: Undo {
            positions: Vec::with_capacity(expected),
            values: Vec::with_capacity(expected),
        },
        next: 0,
        early: BTreeMap::new(),
        spare: Vec::new(),
    });
    let (claimed, overflowed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let shared = Shared(target.as_mut_ptr(), target.len());
    let worker = || {
        let mut part = Undo::default();
        loop {
            let c = claimed.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            // SAFETY: `c` was claimed by this worker alone.
            let chunk = unsafe { shared.chunk(c) };
            overflowed.fetch_add(work(c * CHUNK, chunk, &mut part), Ordering::Relaxed);
            output.lock().unwrap().commit(c, &mut part);
            part.positions.clear();
            part.values.clear();
        }
    };
    rayon::scope(|s| {
        for _ in 1..rayon::current_num_threads() {
            s.spawn(|_| worker());
        }
        worker();
    });
    let out = output.into_inner().unwrap();
    debug_assert!(out.early.is_empty() && out.next == chunks);
    (out.undo, overflowed.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks finish out of order (uneven work), yet the record comes back
    /// whole and in position order, and the counts add up.
    #[test]
    fn parts_are_gathered_in_chunk_order() {
        let mut target = vec![0u8; CHUNK * 37 + 123];
        let (undo, total) = in_order(&mut target, 0, |base, chunk, part: &mut Undo<u16>| {
            let c = base / CHUNK;
            // Busy work that varies per chunk, so later chunks often finish first.
            let spin = (c * 7919) % 13;
            let mut x = 0u64;
            for i in 0..spin * 20_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i as u64);
            }
            chunk[0] = x as u8;
            for i in (0..chunk.len()).step_by(97 + c) {
                part.positions.push((base + i) as u32);
                part.values.push((base + i) as u16);
            }
            c
        });
        assert_eq!(total, (0..38).sum::<usize>());
        assert!(undo.positions.windows(2).all(|w| w[0] < w[1]));
        let expected: usize = (0..38)
            .map(|c| CHUNK.min(target.len() - c * CHUNK).div_ceil(97 + c))
            .sum();
        assert_eq!(undo.positions.len(), expected);
        assert!(undo
            .positions
            .iter()
            .zip(&undo.values)
            .all(|(&p, &v)| v == p as u16));
    }
}
