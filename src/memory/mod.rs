//! Guest memory: the memslot registry, its host-side mirror (wbtree and the other
//! slot indexes), and the MMIO-miss cache.
