//! The guest kernel's function symbols, for `name+0xoff` in SIGUSR1 snapshots and the
//! GDB stub: read from the `--kernel` ELF's symbol table once, sorted by address, then
//! looked up by binary search. Nothing here runs on the exit path.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

/// One function: where it starts, how long it is (0 when the ELF does not say), its
/// demangled name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Symbol {
    addr: u64,
    size: u64,
    name: String,
}

/// The function symbols of one ELF, sorted by address. Empty for a kernel that is not
/// an ELF (a bzImage) or has no symbol table (a stripped image).
#[derive(Debug, Default, Clone)]
pub struct SymbolTable {
    sorted: Vec<Symbol>,
}

impl SymbolTable {
    /// The function symbols of the ELF image in `bytes`; empty when it is no ELF.
    pub fn parse(bytes: &[u8]) -> Self {
        let Ok(file) = object::File::parse(bytes) else {
            return Self::default();
        };
        let mut sorted: Vec<Symbol> = file
            .symbols()
            .filter(|s| s.address() != 0 && is_code(&file, s))
            .filter_map(|s| {
                let name = s.name().ok()?;
                // `{:#}` leaves out the hash suffix of Rust's legacy mangling.
                let name = format!("{:#}", rustc_demangle::demangle(name));
                Some(Symbol {
                    addr: s.address(),
                    size: s.size(),
                    name,
                })
            })
            .collect();
        // At one address, the sized symbol first (a function before its local labels).
        sorted.sort_by(|a, b| a.addr.cmp(&b.addr).then(b.size.cmp(&a.size)));
        sorted.dedup_by_key(|s| s.addr);
        Self { sorted }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// `name+0xoff` for `addr`: the closest function at or below it, if `addr` lies
    /// inside it (within its size, or before the next symbol when it has none).
    pub fn describe(&self, addr: u64) -> Option<String> {
        let i = self
            .sorted
            .partition_point(|s| s.addr <= addr)
            .checked_sub(1)?;
        let s = &self.sorted[i];
        let off = addr - s.addr;
        let inside = if s.size != 0 {
            off < s.size
        } else {
            self.sorted.get(i + 1).is_some_and(|n| addr < n.addr)
        };
        inside.then(|| format!("{}+{off:#x}", s.name))
    }

    /// The address of the function called `name` (demangled, without hash).
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.sorted.iter().find(|s| s.name == name).map(|s| s.addr)
    }
}

/// Functions, and the untyped labels of assembly code (`_start32`,
/// `entry_SYSCALL_64`'s neighbours) in executable sections.
fn is_code(file: &object::File, s: &object::Symbol) -> bool {
    match s.kind() {
        SymbolKind::Text => true,
        SymbolKind::Unknown | SymbolKind::Label => s
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
            .is_some_and(|sec| sec.kind() == SectionKind::Text),
        _ => false,
    }
}

/// A kernel's symbols, read the first time they are wanted (the first snapshot), so
/// that a large vmlinux costs nothing before the first guest instruction.
#[derive(Debug)]
pub struct KernelSymbols {
    path: PathBuf,
    table: OnceLock<SymbolTable>,
}

impl KernelSymbols {
    pub fn new(kernel: &Path) -> Self {
        Self {
            path: kernel.to_path_buf(),
            table: OnceLock::new(),
        }
    }

    pub fn table(&self) -> &SymbolTable {
        self.table.get_or_init(|| match std::fs::read(&self.path) {
            Ok(bytes) => SymbolTable::parse(&bytes),
            Err(e) => {
                log::debug!("no kernel symbols from {}: {e}", self.path.display());
                SymbolTable::default()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(syms: &[(u64, u64, &str)]) -> SymbolTable {
        let mut sorted: Vec<Symbol> = syms
            .iter()
            .map(|&(addr, size, name)| Symbol {
                addr,
                size,
                name: name.into(),
            })
            .collect();
        sorted.sort_by_key(|s| s.addr);
        SymbolTable { sorted }
    }

    #[test]
    fn describes_addresses_inside_functions_only() {
        let t = table(&[(0x1000, 0x10, "a"), (0x1020, 0, "b"), (0x1040, 8, "c")]);
        assert_eq!(t.describe(0x1000).as_deref(), Some("a+0x0"));
        assert_eq!(t.describe(0x100f).as_deref(), Some("a+0xf"));
        assert_eq!(t.describe(0x1010), None, "past a's size");
        assert_eq!(
            t.describe(0x103f).as_deref(),
            Some("b+0x1f"),
            "unsized: to the next"
        );
        assert_eq!(t.describe(0x0fff), None);
        assert_eq!(t.describe(0x1048), None);
        assert_eq!(t.address_of("c"), Some(0x1040));
        assert_eq!(t.address_of("d"), None);
    }

    #[test]
    fn not_an_elf_is_an_empty_table() {
        assert!(SymbolTable::parse(b"MZ not an elf").is_empty());
        assert_eq!(SymbolTable::parse(&[]).describe(0), None);
    }

    /// The test guest's ELF (built by guest-images/build-testguest.sh) has a symbol
    /// table; its entry point is `_start` or inside it.
    #[test]
    fn reads_the_test_guests_symbols() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-images/out/testguest.elf");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run guest-images/build-testguest.sh)",
                path.display()
            )
        });
        let t = SymbolTable::parse(&bytes);
        let hold = t
            .address_of("testguest::commands::hold")
            .expect("testguest::commands::hold in the symbol table");
        assert_eq!(
            t.describe(hold + 1).as_deref(),
            Some("testguest::commands::hold+0x1")
        );
    }
}
