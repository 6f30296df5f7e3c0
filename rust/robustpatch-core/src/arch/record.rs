//! The undo record as the SIMD apply kernels append to it: a step writes a
//! whole register of slots past the record's end and keeps the flagged ones.

use crate::apply::Undo;

/// Slots a step may write past the record's end: the widest register's lanes.
pub(crate) const STEP_SLOTS: usize = 16;

/// The undo record opened for appending a SIMD step's lanes at a time. Its end
/// pointers and length live in registers here (through `Undo` they would be
/// reloaded after every record store, which the compiler must assume may
/// alias them) and the length is written back when the appender is dropped.
///
/// Room is made per tile ([`Appender::room`]), so a step appends without a
/// capacity check or a branch: it always writes [`STEP_SLOTS`] slots past the
/// end and advances by the number of flagged lanes (often zero). A branch on
/// "any lane flagged" would be mispredicted on a quarter of the steps at a
/// typical 8% of flagged elements.
pub(crate) struct Appender<'a, B> {
    undo: &'a mut Undo<B>,
    pos: *mut u32,
    val: *mut B,
    len: usize,
    cap: usize,
}

impl<'a, B> Appender<'a, B> {
    pub(crate) fn new(undo: &'a mut Undo<B>) -> Self {
        debug_assert_eq!(undo.positions.len(), undo.values.len());
        let mut rec = Appender {
            len: undo.positions.len(),
            pos: std::ptr::null_mut(),
            val: std::ptr::null_mut(),
            cap: 0,
            undo,
        };
        rec.refresh();
        rec
    }

    /// Make sure `elements` more lanes can be pushed (each step writes
    /// [`STEP_SLOTS`] slots, of which only the flagged ones are kept).
    #[inline(always)]
    pub(crate) fn room(&mut self, elements: usize) {
        if self.cap - self.len < elements + STEP_SLOTS {
            self.grow(elements + STEP_SLOTS);
        }
    }

    /// The first free position and value slots; [`STEP_SLOTS`] of each may be
    /// written when the caller made [`Appender::room`] for the step.
    #[inline(always)]
    pub(crate) fn free_slots(&self) -> (*mut u32, *mut B) {
        debug_assert!(self.cap - self.len >= STEP_SLOTS);
        // SAFETY: `len` never exceeds the capacity both pointers come from.
        unsafe { (self.pos.add(self.len), self.val.add(self.len)) }
    }

    /// Keep the first `kept` slots written through [`Appender::free_slots`].
    #[inline(always)]
    pub(crate) fn advance(&mut self, kept: usize) {
        self.len += kept;
    }

    /// Make room for at least `more` records (doubling, so it is rare).
    #[cold]
    fn grow(&mut self, more: usize) {
        self.sync();
        let more = more.max(self.len);
        self.undo.positions.reserve(more);
        self.undo.values.reserve(more);
        self.refresh();
    }

    fn refresh(&mut self) {
        self.pos = self.undo.positions.as_mut_ptr();
        self.val = self.undo.values.as_mut_ptr();
        self.cap = self
            .undo
            .positions
            .capacity()
            .min(self.undo.values.capacity());
    }

    fn sync(&mut self) {
        // SAFETY: the first `len` slots of both vectors were written by `push`
        // (or were there before), and `len` never exceeds the capacity.
        unsafe {
            self.undo.positions.set_len(self.len);
            self.undo.values.set_len(self.len);
        }
    }
}

impl<B> Drop for Appender<'_, B> {
    fn drop(&mut self) {
        self.sync();
    }
}
