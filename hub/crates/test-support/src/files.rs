//! Temporary directories (removed on drop, by `tempfile`) and the files tests put in them.

use std::path::Path;

pub use tempfile::TempDir;

/// A fresh directory named after `label`, removed when dropped.
pub fn temp_dir(label: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{label}-"))
        .tempdir()
        .expect("temp dir")
}

/// Writes `text` to `dir/name` and returns the path as a string (for a setting).
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path.to_str().expect("UTF-8 temp path").to_owned()
}
