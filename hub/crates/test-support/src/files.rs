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

/// A self-signed CA certificate (P-256, made with the openssl CLI) in `dir`, which signs
/// nothing the tests talk to: a CA a client must not trust the servers by. Returns its path.
pub fn unrelated_ca(dir: &Path) -> String {
    let ca = dir.join("unrelated-ca.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=unrelated-test-ca",
            "-keyout",
        ])
        .arg(dir.join("unrelated-ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("run openssl (make test installs it)");
    assert!(out.status.success(), "openssl: {out:?}");
    ca.to_str().expect("UTF-8 temp path").to_owned()
}

/// Writes `text` to `dir/name` and returns the path as a string (for a setting).
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path.to_str().expect("UTF-8 temp path").to_owned()
}
