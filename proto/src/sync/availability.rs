//! Chunks in rarest-first order, with O(1) updates.
//!
//! The chunks still needed are kept in one array sorted by availability (how many peers announced them), with the
//! start of every availability level recorded. Raising or lowering a chunk's availability by one swaps it with the
//! first or last chunk of its level and moves the level boundary: constant time, whatever the number of chunks
//! (the arrangement BitTorrent piece pickers use). Within a level, chunks keep a per-node pseudo-random order, so
//! different nodes start on different chunks. Chunks no longer needed are retired to a region past every level.

/// Availability order over chunk indices `0..n`.
pub struct Availability {
    /// Chunk indices: needed ones by availability, then retired ones.
    order: Vec<u32>,
    /// Position of each chunk in `order`.
    pos: Vec<u32>,
    /// Availability of each chunk.
    level: Vec<u32>,
    /// `start[a]`: first position whose chunk has availability >= a. `start[0] == 0`; the last entry is the first
    /// retired position.
    start: Vec<u32>,
}

impl Availability {
    /// All chunks needed, availability 0, in the given initial order (a permutation of `0..n`).
    pub fn new(initial: Vec<u32>) -> Self {
        let n = initial.len();
        let mut pos = vec![0u32; n];
        for (p, &c) in initial.iter().enumerate() {
            pos[c as usize] = p as u32;
        }
        Self { order: initial, pos, level: vec![0; n], start: vec![0, n as u32] }
    }

    /// Where the retired region begins (= number of needed chunks).
    pub fn needed(&self) -> usize {
        *self.start.last().unwrap_or(&0) as usize
    }

    pub fn level(&self, chunk: u32) -> u32 {
        self.level[chunk as usize]
    }

    pub fn is_retired(&self, chunk: u32) -> bool {
        self.pos[chunk as usize] as usize >= self.needed()
    }

    /// Position in rarest-first order (lower is rarer).
    pub fn position(&self, chunk: u32) -> u32 {
        self.pos[chunk as usize]
    }

    /// Needed chunks, rarest first.
    pub fn rarest_first(&self) -> impl Iterator<Item = u32> + '_ {
        self.order[..self.needed()].iter().copied()
    }

    /// Needed chunks nobody announced (availability 0), in order.
    pub fn unannounced(&self) -> impl Iterator<Item = u32> + '_ {
        let end = self.start.get(1).copied().unwrap_or(0).min(self.needed() as u32) as usize;
        self.order[..end].iter().copied()
    }

    fn swap(&mut self, a: u32, b: u32) {
        let (ca, cb) = (self.order[a as usize], self.order[b as usize]);
        self.order.swap(a as usize, b as usize);
        self.pos[ca as usize] = b;
        self.pos[cb as usize] = a;
    }

    /// Raises a needed chunk's availability by one.
    pub fn raise(&mut self, chunk: u32) {
        if self.is_retired(chunk) {
            return;
        }
        let a = self.level[chunk as usize] as usize;
        if self.start.len() < a + 3 {
            // A new top level, empty: it starts where the retired region does.
            let retired = self.needed() as u32;
            self.start.insert(a + 1, retired);
        }
        // The last chunk of level a sits just before start[a + 1].
        let last = self.start[a + 1] - 1;
        self.swap(self.pos[chunk as usize], last);
        self.start[a + 1] -= 1;
        self.level[chunk as usize] += 1;
    }

    /// Lowers a needed chunk's availability by one.
    pub fn lower(&mut self, chunk: u32) {
        if self.is_retired(chunk) || self.level[chunk as usize] == 0 {
            return;
        }
        let a = self.level[chunk as usize] as usize;
        let first = self.start[a];
        self.swap(self.pos[chunk as usize], first);
        self.start[a] += 1;
        self.level[chunk as usize] -= 1;
    }

    /// Moves a chunk to the retired region (no longer needed).
    pub fn retire(&mut self, chunk: u32) {
        if self.is_retired(chunk) {
            return;
        }
        // Climb level by level to the top, then step over the retired boundary.
        let top = self.start.len() - 1;
        let mut a = self.level[chunk as usize] as usize;
        while a < top {
            let last = self.start[a + 1] - 1;
            self.swap(self.pos[chunk as usize], last);
            self.start[a + 1] -= 1;
            a += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(av: &Availability) {
        let levels: Vec<u32> = av.rarest_first().map(|c| av.level(c)).collect();
        assert!(levels.windows(2).all(|w| w[0] <= w[1]), "sorted by level: {levels:?}");
        for (p, &c) in av.order.iter().enumerate() {
            assert_eq!(av.pos[c as usize] as usize, p);
        }
    }

    #[test]
    fn stays_sorted_under_updates() {
        let mut av = Availability::new((0..10).rev().collect());
        for (c, times) in [(3, 2), (5, 1), (7, 3), (0, 1), (3, 1)] {
            for _ in 0..times {
                av.raise(c);
                check(&av);
            }
        }
        assert_eq!(av.level(3), 3);
        assert_eq!(av.unannounced().count(), 6);
        av.lower(7);
        check(&av);
        av.retire(5);
        av.retire(3);
        check(&av);
        assert_eq!(av.needed(), 8);
        assert!(av.is_retired(5) && av.is_retired(3));
        assert!(!av.rarest_first().any(|c| c == 5 || c == 3));
        av.raise(5);
        assert_eq!(av.needed(), 8, "retired chunks do not come back");
        let first: Vec<u32> = av.rarest_first().take(5).collect();
        assert!(first.iter().all(|&c| av.level(c) == 0));
    }
}
