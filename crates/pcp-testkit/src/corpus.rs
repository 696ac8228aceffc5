//! Fuzz corpora replayed by `cargo test`: a crate's `fuzz/<sub>` files, which inputs
//! break the fuzz target's invariants, and a reproducible random stream.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// `<manifest_dir>/fuzz/<sub>` (pass `env!("CARGO_MANIFEST_DIR")`).
pub fn fuzz_dir(manifest_dir: &str, sub: &str) -> PathBuf {
    Path::new(manifest_dir).join("fuzz").join(sub)
}

/// The non-hidden files of `dir`, sorted by name; none if the directory does not exist.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("read_dir entry").path())
        .filter(|p| p.is_file())
        // Hidden files (a `.gitkeep`, an editor's swap file) are not inputs.
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'))
        })
        .collect();
    out.sort();
    out
}

/// Lower-case hex.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `check` on the contents of each of `paths`; those it panics on, as
/// `<path> (<n> octets): <hex>`.
pub fn failing(paths: &[PathBuf], check: impl Fn(&[u8])) -> Vec<String> {
    paths
        .iter()
        .filter_map(|p| {
            let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            catch_unwind(AssertUnwindSafe(|| check(&data)))
                .is_err()
                .then(|| format!("{} ({} octets): {}", p.display(), data.len(), hex(&data)))
        })
        .collect()
}

/// Xorshift64 (13, 7, 17): a reproducible stream with no extra dependency.
pub struct XorShift(pub u64);

impl XorShift {
    /// The seed the corpus tests use.
    pub fn new() -> XorShift {
        XorShift(0x9e37_79b9_7f4a_7c15)
    }

    /// The next state.
    pub fn next_u64(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }
}

impl Default for XorShift {
    fn default() -> Self {
        XorShift::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tempdir::TempDir;

    #[test]
    fn failing_names_exactly_the_inputs_that_panic_and_skips_hidden_files() {
        let dir = TempDir::new();
        dir.write("a-good", [1u8, 2]);
        dir.write("b-bad", [0xffu8]);
        dir.write(".gitkeep", [0xffu8]);
        let inputs = files(&dir.0);
        assert_eq!(inputs, [dir.join("a-good"), dir.join("b-bad")]);
        let bad = failing(&inputs, |d| assert!(!d.contains(&0xff)));
        assert_eq!(
            bad,
            [format!("{} (1 octets): ff", dir.join("b-bad").display())]
        );
        assert!(files(&dir.join("missing")).is_empty());
    }

    #[test]
    fn xorshift_is_the_13_7_17_stream() {
        let mut x = XorShift::new();
        let mut y: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3 {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            assert_eq!(x.next_u64(), y);
        }
    }
}
