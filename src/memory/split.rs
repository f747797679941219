//! Guest RAM split over several memslots (`--mem-slots N`).

use super::registry::validate;
use super::{MemoryError, SlotFlags, PAGE_SIZE};

/// Split RAM ranges `(gpa, size)` into `nslots` page-aligned slots, as equal as possible.
///
/// Slots never span a hole between ranges, so every range gets at least one slot; the rest
/// go one at a time to the range whose pieces are currently largest (this minimises the
/// largest piece). Within a range, piece sizes differ by at most one page.
pub fn split_layout(
    ram_ranges: &[(u64, u64)],
    nslots: u32,
) -> Result<Vec<(u64, u64)>, MemoryError> {
    let ranges: Vec<(u64, u64)> = ram_ranges.iter().copied().filter(|r| r.1 > 0).collect();
    for &(gpa, size) in &ranges {
        validate(gpa, size, SlotFlags::NONE)?;
    }
    let pages: Vec<u64> = ranges.iter().map(|r| r.1 / PAGE_SIZE).collect();
    let total: u64 = pages.iter().sum();
    let n = u64::from(nslots);
    if n < ranges.len() as u64 || n > total || n == 0 {
        return Err(MemoryError::BadSplit {
            nslots: n,
            ranges: ranges.len(),
            pages: total,
            max: total,
        });
    }
    let mut count = vec![1u64; ranges.len()];
    // Max-heap on the current largest piece (ceil(pages / count)) of each range.
    let mut heap: std::collections::BinaryHeap<(u64, usize)> =
        pages.iter().enumerate().map(|(i, &p)| (p, i)).collect();
    let mut left = n - ranges.len() as u64;
    while left > 0 {
        let Some((_, i)) = heap.pop() else { break };
        count[i] += 1;
        left -= 1;
        if count[i] < pages[i] {
            heap.push((pages[i].div_ceil(count[i]), i));
        }
    }
    let mut out = Vec::with_capacity(nslots as usize);
    for (i, &(gpa, _)) in ranges.iter().enumerate() {
        let (q, r) = (pages[i] / count[i], pages[i] % count[i]);
        let mut at = gpa;
        for k in 0..count[i] {
            let p = q + u64::from(k < r);
            out.push((at, p * PAGE_SIZE));
            at += p * PAGE_SIZE;
        }
    }
    Ok(out)
}
