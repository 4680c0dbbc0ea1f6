//! Secrets and private paths: access key generation and the replicas' socket directory.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use rand::Rng;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A new access key: 32 characters from a 36-letter alphabet, about 165 bits.
pub fn generate_access_key() -> String {
    // ThreadRng is a CSPRNG reseeded from the operating system.
    let mut rng = rand::rng();
    (0..32)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Creates a fresh 0700 directory for this process's replica sockets.
pub fn private_runtime_dir() -> std::io::Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    remove_stale_runtime_dirs(&base);
    let suffix: u32 = rand::rng().random();
    let dir = base.join(format!("modelgate-{}-{suffix:08x}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Removes socket directories left by modelgate processes that no longer exist (killed with
/// SIGKILL, so they could not clean up).
fn remove_stale_runtime_dirs(base: &std::path::Path) {
    for entry in crate::left_by_dead_modelgates(base) {
        let ours = entry.metadata().is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw()
        });
        if ours {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_keys_are_long_and_distinct() {
        let a = generate_access_key();
        let b = generate_access_key();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a, b);
    }
}
