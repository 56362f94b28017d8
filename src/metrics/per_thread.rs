//! Counters kept per thread, for figures counted on every call.
//!
//! A shared atomic counter makes its cache line travel between cores on
//! every increment. Here each thread adds to its own cells with a plain load
//! and store (no locked instruction, nothing shared with another core), and
//! a reader sums every thread's cells. Counts only grow: a reader that wants
//! "since last time" keeps its own snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use thread_local::ThreadLocal;

/// One thread's cells, on cache lines of their own.
#[repr(align(128))]
struct Cells<const N: usize>([AtomicU64; N]);

pub struct PerThreadCounters<const N: usize> {
    threads: ThreadLocal<Cells<N>>,
}

impl<const N: usize> Default for PerThreadCounters<N> {
    fn default() -> Self {
        Self {
            threads: ThreadLocal::new(),
        }
    }
}

impl<const N: usize> PerThreadCounters<N> {
    /// Adds `n` to cell `index` for the calling thread (an index out of range is ignored).
    #[inline]
    pub fn add(&self, index: usize, n: u64) {
        let cells = self
            .threads
            .get_or(|| Cells(std::array::from_fn(|_| AtomicU64::new(0))));
        if let Some(cell) = cells.0.get(index) {
            // Only the owning thread writes its cells (a slot passes to a new
            // thread only after its thread has exited), so nothing is lost
            // between the load and the store.
            cell.store(cell.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        }
    }

    /// Every cell, summed over all threads.
    pub fn sum(&self) -> [u64; N] {
        let mut total = [0u64; N];
        for cells in self.threads.iter() {
            for (sum, cell) in total.iter_mut().zip(&cells.0) {
                *sum = sum.wrapping_add(cell.load(Ordering::Relaxed));
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn sums_every_thread_including_exited_ones() {
        let counters = Arc::new(PerThreadCounters::<3>::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let counters = counters.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        counters.add(0, 1);
                        counters.add(2, 3);
                    }
                    counters.add(7, 1); // out of range: ignored
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        counters.add(1, 5);
        assert_eq!(counters.sum(), [80_000, 5, 240_000]);
    }
}
