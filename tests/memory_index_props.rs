//! Property tests: every slot index against a simple model, and the wbtree's depth bound.

use proptest::prelude::*;
use std::collections::BTreeMap;
use wbvmm::memory::{AnyIndex, RangeIndex, RangeItem, SlotIndexKind, WbTree};

#[derive(Clone, Debug, PartialEq)]
struct R {
    start: u64,
    end: u64,
    tag: u64,
}

impl RangeItem for R {
    fn start(&self) -> u64 {
        self.start
    }
    fn end(&self) -> u64 {
        self.end
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u64),
    Remove(u64),
    /// Remove the n-th existing range (so removes usually hit).
    RemoveNth(usize),
    Lookup(u64),
}

fn op() -> impl Strategy<Value = Op> {
    // A small address space (64 units of 16 bytes) so that adjacency and overlap are common.
    prop_oneof![
        4 => (0u64..64, 1u64..8).prop_map(|(s, l)| Op::Insert(s * 16, l * 16)),
        1 => (0u64..64).prop_map(|s| Op::Remove(s * 16)),
        2 => any::<usize>().prop_map(Op::RemoveNth),
        4 => (0u64..1100).prop_map(Op::Lookup),
    ]
}

fn depth_bound(n: usize) -> u32 {
    2 * (usize::BITS - n.leading_zeros()) + 2
}

fn run(kind: SlotIndexKind, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut idx: AnyIndex<R> = AnyIndex::new(kind);
    let mut model: BTreeMap<u64, R> = BTreeMap::new();
    let mut hint = 0u32;
    for (n, op) in ops.iter().enumerate() {
        match *op {
            Op::Insert(s, l) => {
                let r = R {
                    start: s,
                    end: s + l,
                    tag: n as u64,
                };
                let overlaps = model.values().any(|m| s < m.end && m.start < s + l);
                let res = idx.insert(r.clone());
                prop_assert_eq!(res.is_err(), overlaps, "insert {:?}", r);
                if let Err(e) = res {
                    // The reported range really overlaps.
                    prop_assert!(s < e.end && e.start < s + l);
                } else {
                    model.insert(s, r);
                }
            }
            Op::Remove(s) => {
                prop_assert_eq!(idx.remove(s), model.remove(&s));
            }
            Op::RemoveNth(k) => {
                if !model.is_empty() {
                    let s = *model.keys().nth(k % model.len()).unwrap();
                    prop_assert_eq!(idx.remove(s), model.remove(&s));
                }
            }
            Op::Lookup(a) => {
                let want = model.values().find(|m| m.contains(a));
                let (got, nodes) = idx.lookup(a, &mut hint);
                prop_assert_eq!(got, want, "lookup {:#x}", a);
                prop_assert!(nodes as usize <= model.len() + 2);
                // Overlap query agrees with the model too.
                let want_o = model.values().any(|m| a < m.end && m.start < a + 20);
                prop_assert_eq!(idx.overlapping(a, a + 20).is_some(), want_o);
            }
        }
        prop_assert_eq!(idx.len(), model.len());
        if let AnyIndex::Wbtree(t) = &idx {
            t.check_invariants().map_err(TestCaseError::fail)?;
            prop_assert!(t.depth() <= depth_bound(t.len()));
        }
    }
    let items = idx.items();
    let want: Vec<R> = model.values().cloned().collect();
    prop_assert_eq!(items, want);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn linear_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(SlotIndexKind::Linear, &ops)?;
    }

    #[test]
    fn size_sorted_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(SlotIndexKind::SizeSorted, &ops)?;
    }

    #[test]
    fn binary_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(SlotIndexKind::Binary, &ops)?;
    }

    #[test]
    fn btree_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(SlotIndexKind::Btree, &ops)?;
    }

    #[test]
    fn wbtree_matches_model(ops in prop::collection::vec(op(), 1..200)) {
        run(SlotIndexKind::Wbtree, &ops)?;
    }

    /// Adversarial insertion orders and size patterns, then random removals: the depth
    /// bound holds after every operation.
    #[test]
    fn wbtree_depth_bound(
        n in 1usize..700,
        order in 0u8..4,
        sizes in 0u8..4,
        seed in any::<u64>(),
        removals in 0usize..300,
    ) {
        let mut keys: Vec<u64> = (0..n as u64).collect();
        match order {
            0 => {}
            1 => keys.reverse(),
            2 => keys = (0..n as u64)
                .map(|i| if i % 2 == 0 { i / 2 } else { n as u64 - 1 - i / 2 })
                .collect(),
            _ => {
                // Fisher-Yates with a tiny LCG: a random order.
                let mut s = seed | 1;
                for i in (1..keys.len()).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    keys.swap(i, (s >> 33) as usize % (i + 1));
                }
            }
        }
        let size_of = |k: u64| match sizes {
            0 => 1,                 // equal
            1 => k + 1,             // increasing with address
            2 => n as u64 - k,      // decreasing
            _ => if k.is_multiple_of(2) { 1 } else { 1 << 20 }, // alternating
        };
        let mut t = WbTree::new();
        for &k in &keys {
            t.insert(R { start: k << 32, end: (k << 32) + size_of(k), tag: k }).unwrap();
            prop_assert!(t.depth() <= depth_bound(t.len()), "n={} depth={}", t.len(), t.depth());
        }
        t.check_invariants().map_err(TestCaseError::fail)?;
        for &k in keys.iter().rev().take(removals) {
            prop_assert!(t.remove(k << 32).is_some());
            prop_assert!(t.depth() <= depth_bound(t.len()));
        }
        t.check_invariants().map_err(TestCaseError::fail)?;
    }
}

#[test]
fn slot_index_names_parse() {
    for k in SlotIndexKind::ALL {
        assert_eq!(k.name().parse::<SlotIndexKind>().unwrap(), k);
    }
    let e = "splay".parse::<SlotIndexKind>().unwrap_err().to_string();
    assert!(
        e.contains("linear, size-sorted, binary, btree, wbtree"),
        "{e}"
    );
    assert_eq!(SlotIndexKind::default(), SlotIndexKind::Wbtree);
}
