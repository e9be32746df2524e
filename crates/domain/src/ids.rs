//! Snowflake ids: 41 bits of milliseconds since 2024-01-01, 10 bits of node id,
//! 12 bits of sequence. Unique across processes as long as node ids differ.

use std::sync::Mutex;

use crate::{clock::now_ms, Error, Result};

const EPOCH_MS: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
pub const MAX_NODE_ID: u16 = (1 << NODE_BITS) - 1;

#[derive(Debug)]
pub struct IdGenerator {
    node: i64,
    state: Mutex<(i64, i64)>, // (last ms, sequence within that ms)
}

impl IdGenerator {
    pub fn new(node: u16) -> Result<Self> {
        if node > MAX_NODE_ID {
            return Err(Error::Internal(format!("node id {node} exceeds {MAX_NODE_ID}")));
        }
        Ok(Self { node: node as i64, state: Mutex::new((0, 0)) })
    }

    pub fn next_id(&self) -> i64 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = now_ms().max(state.0); // never go back if the clock does
        if now == state.0 {
            state.1 += 1;
            if state.1 >= 1 << SEQ_BITS {
                // 4096 ids in one millisecond: borrow the next millisecond.
                now += 1;
                state.1 = 0;
            }
        } else {
            state.1 = 0;
        }
        state.0 = now;
        ((now - EPOCH_MS) << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | state.1
    }
}

/// Spreads snowflake ids evenly over `n` buckets (writers, workers, stripes).
/// `id % n` would not: the low bits are the within-millisecond counter, which
/// is 0 for nearly every id made at ordinary rates.
pub fn bucket(id: i64, n: usize) -> usize {
    (((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % n.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    #[test]
    fn buckets_spread_ids_whose_low_bits_are_zero() {
        // One node, one id per millisecond: the within-millisecond counter is 0.
        let mut counts = [0usize; 4];
        for ms in 0..4000i64 {
            counts[super::bucket((ms << 22) | (1 << 12), 4)] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
    }

    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_and_increasing() {
        let g = IdGenerator::new(7).unwrap();
        let ids: Vec<i64> = (0..20_000).map(|_| g.next_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(ids.iter().all(|id| (id >> SEQ_BITS) & MAX_NODE_ID as i64 == 7));
    }

    #[test]
    fn nodes_never_collide() {
        let a = IdGenerator::new(1).unwrap();
        let b = IdGenerator::new(2).unwrap();
        let mut seen = HashSet::new();
        for _ in 0..5000 {
            assert!(seen.insert(a.next_id()));
            assert!(seen.insert(b.next_id()));
        }
        assert!(IdGenerator::new(MAX_NODE_ID + 1).is_err());
    }
}
