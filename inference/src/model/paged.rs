//! The KV cache of the tensor path, paged: one pool of fixed-size blocks per
//! model, allocated once on the device at load (as vLLM and llama.cpp do),
//! and a block table per sequence.
//!
//! Why: a cache that grows by concatenation copies every earlier position of
//! every layer at every step and allocates on the device each time; a pool
//! is written in place (one scatter per layer for keys, one for values) and
//! read for a whole batch of sequences of different lengths in one gather.
//!
//! Blocks are reference-counted: cloning a sequence's cache (the prefix
//! cache hands out copies of a cached prompt) shares its blocks, and a
//! shared block is copied before it is written (copy on write; only the
//! block that holds the next position can be written). The block
//! bookkeeping ([`BlockTable`]) is plain data and is tested without tensors.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

/// Positions per block.
pub const BLOCK_POSITIONS: usize = 16;

/// The free list and reference counts of a pool's blocks.
#[derive(Debug)]
pub(crate) struct BlockTable {
    refs: Vec<u32>,
    free: Vec<u32>,
}

impl BlockTable {
    pub(crate) fn new(blocks: usize) -> BlockTable {
        BlockTable {
            refs: vec![0; blocks],
            // Popped from the end: low blocks first.
            free: (0..blocks as u32).rev().collect(),
        }
    }

    /// A free block, now referenced once; `None` when all are in use.
    pub(crate) fn take(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One more reference to `b`.
    pub(crate) fn share(&mut self, b: u32) {
        self.refs[b as usize] += 1;
    }

    /// One reference fewer to `b`; free when none is left.
    pub(crate) fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than taken");
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(b);
        }
    }

    /// Whether someone else also holds `b`.
    pub(crate) fn shared(&self, b: u32) -> bool {
        self.refs[b as usize] > 1
    }

    /// Blocks in use.
    pub(crate) fn used(&self) -> usize {
        self.refs.len() - self.free.len()
    }
}

/// Every layer's keys and values for `blocks * BLOCK_POSITIONS` positions.
pub(crate) struct KvPool {
    /// Per layer, `[positions, kv_width]`: row `block * BLOCK_POSITIONS + i`
    /// holds position `i` of the block.
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    blocks: Mutex<BlockTable>,
    capacity: usize,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("positions", &self.capacity)
            .field("blocks_in_use", &self.blocks.lock().unwrap().used())
            .finish()
    }
}

impl KvPool {
    /// A pool of at least `positions` positions (whole blocks) for
    /// `n_layer` layers of `kv_width` floats, zeroed on `device`.
    pub(crate) fn new(
        n_layer: usize,
        kv_width: usize,
        positions: usize,
        device: &Device,
    ) -> candle_core::Result<KvPool> {
        let blocks = positions.div_ceil(BLOCK_POSITIONS).max(1);
        let rows = blocks * BLOCK_POSITIONS;
        let mut k = Vec::with_capacity(n_layer);
        let mut v = Vec::with_capacity(n_layer);
        for _ in 0..n_layer {
            k.push(Tensor::zeros((rows, kv_width), DType::F32, device)?);
            v.push(Tensor::zeros((rows, kv_width), DType::F32, device)?);
        }
        Ok(KvPool {
            k,
            v,
            blocks: Mutex::new(BlockTable::new(blocks)),
            capacity: rows,
        })
    }

    /// Positions the pool holds in all.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions of the blocks in use.
    pub(crate) fn used(&self) -> usize {
        self.blocks.lock().unwrap().used() * BLOCK_POSITIONS
    }

    /// Whether the free blocks cover what these steps would take: for each,
    /// a sequence of this pool and `(held, t)` as [`PagedSeq::prepare`]
    /// takes them. The engine asks before a pass, so that it can make room
    /// (evict, preempt) instead of failing the pass.
    pub(crate) fn has_room<'a>(
        &self,
        steps: impl IntoIterator<Item = (&'a PagedSeq, usize, usize)>,
    ) -> bool {
        let table = self.blocks.lock().unwrap();
        let wanted: usize = steps
            .into_iter()
            .map(|(seq, held, t)| seq.blocks_wanted(&table, held, t))
            .sum();
        wanted <= table.free.len()
    }

    /// Copies block `from` to block `to` in every layer.
    fn copy_block(&self, from: u32, to: u32) -> candle_core::Result<()> {
        let (from, to) = (
            from as usize * BLOCK_POSITIONS,
            to as usize * BLOCK_POSITIONS,
        );
        for t in self.k.iter().chain(&self.v) {
            // A copy first: a tensor cannot be read and written in one op.
            let rows = t.narrow(0, from, BLOCK_POSITIONS)?.copy()?;
            t.slice_set(&rows, 0, to)?;
        }
        Ok(())
    }
}

/// One sequence's blocks in a [`KvPool`].
pub(crate) struct PagedSeq {
    pool: Arc<KvPool>,
    blocks: Vec<u32>,
}

impl std::fmt::Debug for PagedSeq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedSeq")
            .field("blocks", &self.blocks)
            .finish()
    }
}

impl Clone for PagedSeq {
    /// Shares the blocks (copy on write).
    fn clone(&self) -> PagedSeq {
        let mut table = self.pool.blocks.lock().unwrap();
        for &b in &self.blocks {
            table.share(b);
        }
        PagedSeq {
            pool: self.pool.clone(),
            blocks: self.blocks.clone(),
        }
    }
}

impl Drop for PagedSeq {
    fn drop(&mut self) {
        let mut table = self.pool.blocks.lock().unwrap();
        for b in self.blocks.drain(..) {
            table.release(b);
        }
    }
}

impl PagedSeq {
    pub(crate) fn new(pool: Arc<KvPool>) -> PagedSeq {
        PagedSeq {
            pool,
            blocks: Vec::new(),
        }
    }

    pub(crate) fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Keeps the blocks that hold the first `len` positions.
    pub(crate) fn truncate(&mut self, len: usize) {
        let keep = len.div_ceil(BLOCK_POSITIONS);
        if keep < self.blocks.len() {
            let mut table = self.pool.blocks.lock().unwrap();
            for b in self.blocks.drain(keep..) {
                table.release(b);
            }
        }
    }

    /// Free blocks that `prepare(held, t)` would take: the new blocks, and
    /// one for a copy of a shared block that the first position lands in.
    fn blocks_wanted(&self, table: &BlockTable, held: usize, t: usize) -> usize {
        let need = (held + t).div_ceil(BLOCK_POSITIONS);
        let cow = !held.is_multiple_of(BLOCK_POSITIONS)
            && self
                .blocks
                .get(held / BLOCK_POSITIONS)
                .is_some_and(|&b| table.shared(b));
        need.saturating_sub(self.blocks.len()) + usize::from(cow)
    }

    /// The pool row of position `pos` (which the sequence must hold).
    pub(crate) fn slot(&self, pos: usize) -> u32 {
        self.blocks[pos / BLOCK_POSITIONS] * BLOCK_POSITIONS as u32 + (pos % BLOCK_POSITIONS) as u32
    }

    /// Makes positions `held..held + t` writable: takes the blocks they need
    /// and copies the block holding `held` first when another sequence
    /// shares it. On failure (the pool is full) the sequence holds what it
    /// held before.
    pub(crate) fn prepare(&mut self, held: usize, t: usize) -> candle_core::Result<()> {
        let before = self.blocks.len();
        let need = (held + t).div_ceil(BLOCK_POSITIONS);
        let mut table = self.pool.blocks.lock().unwrap();
        // The partly filled block that the first new position lands in.
        let mut cow = None;
        if !held.is_multiple_of(BLOCK_POSITIONS) {
            let i = held / BLOCK_POSITIONS;
            let b = self.blocks[i];
            if table.shared(b) {
                match table.take() {
                    Some(fresh) => cow = Some((i, b, fresh)),
                    None => return Err(self.full(&table, t)),
                }
            }
        }
        while self.blocks.len() < need {
            match table.take() {
                Some(b) => self.blocks.push(b),
                None => {
                    for b in self.blocks.drain(before..) {
                        table.release(b);
                    }
                    if let Some((_, _, fresh)) = cow {
                        table.release(fresh);
                    }
                    return Err(self.full(&table, t));
                }
            }
        }
        drop(table);
        if let Some((i, old, fresh)) = cow {
            if let Err(e) = self.pool.copy_block(old, fresh) {
                let mut table = self.pool.blocks.lock().unwrap();
                for b in self.blocks.drain(before..) {
                    table.release(b);
                }
                table.release(fresh);
                return Err(e);
            }
            self.blocks[i] = fresh;
            self.pool.blocks.lock().unwrap().release(old);
        }
        Ok(())
    }

    fn full(&self, table: &BlockTable, t: usize) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "the KV cache is full: {} of {} positions in use, {t} more asked for",
            table.used() * BLOCK_POSITIONS,
            self.pool.capacity
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_taken_shared_and_freed_by_count() {
        let mut t = BlockTable::new(3);
        let a = t.take().unwrap();
        let b = t.take().unwrap();
        assert_eq!((a, b), (0, 1));
        t.share(a);
        assert!(t.shared(a) && !t.shared(b));
        t.release(a);
        assert_eq!(t.used(), 2, "still held once");
        t.release(a);
        assert_eq!(t.used(), 1);
        assert_eq!(t.take(), Some(0), "the last freed block is taken first");
        assert_eq!(t.take(), Some(2));
        assert_eq!(t.take(), None);
    }

    fn pool(positions: usize) -> Arc<KvPool> {
        Arc::new(KvPool::new(2, 4, positions, &Device::Cpu).unwrap())
    }

    #[test]
    fn a_full_pool_refuses_and_the_sequence_keeps_what_it_held() {
        let p = pool(2 * BLOCK_POSITIONS);
        let mut s = PagedSeq::new(p.clone());
        s.prepare(0, BLOCK_POSITIONS + 1).unwrap();
        assert_eq!(p.used(), 2 * BLOCK_POSITIONS);
        let e = s.prepare(BLOCK_POSITIONS + 1, BLOCK_POSITIONS).unwrap_err();
        assert!(e.to_string().contains("the KV cache is full"), "{e}");
        assert_eq!(s.blocks.len(), 2);
        s.truncate(3);
        assert_eq!(p.used(), BLOCK_POSITIONS);
        drop(s);
        assert_eq!(p.used(), 0);
    }

    /// `has_room` says yes exactly when `prepare` would succeed: new
    /// blocks, a copy on write, and several sequences at once.
    #[test]
    fn room_is_judged_as_prepare_takes_blocks() {
        let p = pool(3 * BLOCK_POSITIONS);
        let mut a = PagedSeq::new(p.clone());
        assert!(p.has_room([(&a, 0, 3 * BLOCK_POSITIONS)]));
        assert!(!p.has_room([(&a, 0, 3 * BLOCK_POSITIONS + 1)]));
        a.prepare(0, 5).unwrap();
        // Within its block: nothing to take.
        assert!(p.has_room([(&a, 5, BLOCK_POSITIONS - 5)]));
        let b = a.clone();
        // Writing at 5 now copies the shared block first: one block, and a
        // second for crossing into the next block.
        assert_eq!(a.blocks_wanted(&p.blocks.lock().unwrap(), 5, 1), 1);
        assert!(p.has_room([(&a, 5, BLOCK_POSITIONS)]));
        assert!(!p.has_room([(&a, 5, 1), (&b, 5, BLOCK_POSITIONS)]));
        let mut c = b.clone();
        assert!(!p.has_room([(&c, 5, 2 * BLOCK_POSITIONS)]));
        assert!(c.prepare(5, 2 * BLOCK_POSITIONS).is_err());
        assert!(p.has_room([(&c, 5, BLOCK_POSITIONS)]));
        c.prepare(5, BLOCK_POSITIONS).unwrap();
        assert_eq!(p.used(), 3 * BLOCK_POSITIONS);
        assert!(!p.has_room([(&a, 5, 1)]), "a's block is shared with b");
        drop(b);
        assert!(
            p.has_room([(&a, 5, BLOCK_POSITIONS - 5)]),
            "a alone holds it now"
        );
    }

    #[test]
    fn a_shared_block_is_copied_before_it_is_written() {
        let p = pool(4 * BLOCK_POSITIONS);
        let mut a = PagedSeq::new(p.clone());
        a.prepare(0, 5).unwrap();
        let row = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        p.k[1].slice_set(&row, 0, a.slot(4) as usize).unwrap();
        let mut b = a.clone();
        assert_eq!(p.used(), BLOCK_POSITIONS, "shared, not copied");
        b.prepare(5, 1).unwrap();
        assert_ne!(a.slot(4), b.slot(4), "b writes into its own copy");
        assert_eq!(p.used(), 2 * BLOCK_POSITIONS);
        let copied = p.k[1]
            .narrow(0, b.slot(4) as usize, 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(copied, vec![vec![1., 2., 3., 4.]]);
        // The first writer after a block boundary shares nothing to copy.
        let mut c = a.clone();
        c.truncate(0);
        c.prepare(0, BLOCK_POSITIONS).unwrap();
        assert_eq!(p.used(), 3 * BLOCK_POSITIONS);
        drop((a, b, c));
        assert_eq!(p.used(), 0);
    }
}
