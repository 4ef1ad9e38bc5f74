//! The fixed-seed generator of the hostile-input tests, shared by path (`#[path]`) between the
//! crates that have them, so every run tries the same inputs.

/// xorshift64*: small, fast, and the same on every run.
pub(crate) struct Random(pub(crate) u64);

impl Random {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }

    /// `input` with a few elements replaced, inserted, removed or the end cut off; new elements
    /// come from `pick`.
    pub(crate) fn mutate<T>(
        &mut self,
        mut out: Vec<T>,
        mut pick: impl FnMut(&mut Self) -> T,
    ) -> Vec<T> {
        for _ in 0..=self.below(4) {
            match self.below(4) {
                0 if !out.is_empty() => {
                    let at = self.below(out.len());
                    out[at] = pick(self);
                }
                1 => {
                    let at = self.below(out.len() + 1);
                    let element = pick(self);
                    out.insert(at, element);
                }
                2 if !out.is_empty() => {
                    let at = self.below(out.len());
                    out.remove(at);
                }
                _ => {
                    let keep = self.below(out.len() + 1);
                    out.truncate(keep);
                }
            }
        }
        out
    }
}
