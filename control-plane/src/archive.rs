//! Safe extraction of uploaded project archives (tar, or gzip-compressed tar).
//!
//! An upload is untrusted: every entry must stay inside the destination (no absolute paths, no
//! `..`), links may only point inside it, hard links and device files are refused, and the
//! number of entries and the bytes unpacked are capped, so a small archive cannot expand into a
//! disk-filling one.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Caps on what one archive may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    pub max_total_bytes: u64,
    pub max_file_bytes: u64,
    pub max_entries: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive entry {0:?}: {1}")]
    Entry(String, &'static str),
    #[error("archive unpacks to more than {0} bytes")]
    TooLarge(u64),
    #[error("archive has more than {0} entries")]
    TooManyEntries(usize),
    #[error("archive entry {0:?} is larger than {1} bytes")]
    FileTooLarge(String, u64),
    #[error("not a tar or tar.gz archive: {0}")]
    Format(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A relative path made only of normal components, or None.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Where a symlink at `entry` (relative) pointing to `target` lands, if inside the root.
fn link_stays_inside(entry: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: Vec<&std::ffi::OsStr> = entry
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(n) => depth.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Unpacks `archive` (gzip detected by its magic bytes) into the empty directory `dest`.
pub fn extract(archive: &Path, dest: &Path, limits: ArchiveLimits) -> Result<usize, ArchiveError> {
    let mut magic = [0u8; 2];
    let gz = {
        let mut f = std::fs::File::open(archive)?;
        f.read(&mut magic)? == 2 && magic == [0x1f, 0x8b]
    };
    let file = std::fs::File::open(archive)?;
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut tar = tar::Archive::new(reader);
    std::fs::create_dir_all(dest)?;
    let mut total = 0u64;
    let mut count = 0usize;
    for entry in tar
        .entries()
        .map_err(|e| ArchiveError::Format(e.to_string()))?
    {
        let mut entry = entry.map_err(|e| ArchiveError::Format(e.to_string()))?;
        count += 1;
        if count > limits.max_entries {
            return Err(ArchiveError::TooManyEntries(limits.max_entries));
        }
        let raw = entry
            .path()
            .map_err(|e| ArchiveError::Format(e.to_string()))?
            .into_owned();
        let name = raw.display().to_string();
        let Some(rel) = safe_relative(&raw) else {
            if raw.components().all(|c| matches!(c, Component::CurDir)) {
                continue; // "./" itself
            }
            return Err(ArchiveError::Entry(name, "absolute or '..' path"));
        };
        let target = dest.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
        } else if kind.is_file() {
            let size = entry.header().size().unwrap_or(0);
            if size > limits.max_file_bytes {
                return Err(ArchiveError::FileTooLarge(name, limits.max_file_bytes));
            }
            // Sizes in headers can lie: count what is actually written.
            let mut out = std::fs::File::create(&target)?;
            let written =
                std::io::copy(&mut (&mut entry).take(limits.max_file_bytes + 1), &mut out)?;
            if written > limits.max_file_bytes {
                return Err(ArchiveError::FileTooLarge(name, limits.max_file_bytes));
            }
            total += written;
            if total > limits.max_total_bytes {
                return Err(ArchiveError::TooLarge(limits.max_total_bytes));
            }
            let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode | 0o600))?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(|e| ArchiveError::Format(e.to_string()))?
                .ok_or(ArchiveError::Entry(
                    name.clone(),
                    "symlink without a target",
                ))?
                .into_owned();
            if !link_stays_inside(&rel, &link) {
                return Err(ArchiveError::Entry(
                    name,
                    "symlink points outside the project",
                ));
            }
            std::os::unix::fs::symlink(&link, &target)?;
        } else if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        } else {
            return Err(ArchiveError::Entry(
                name,
                "only files, directories and symlinks are accepted",
            ));
        }
    }
    Ok(count)
}

/// For the fuzz target and its corpus replay: extracts `data` as an archive into a scratch
/// directory under small limits, then removes it. Must never panic or write outside it.
#[doc(hidden)]
pub fn fuzz_extract(data: &[u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let root = std::env::temp_dir().join(format!(
        "modelgate-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::create_dir_all(&root);
    let archive = root.join("archive");
    let dest = root.join("out");
    if std::fs::write(&archive, data).is_ok() {
        let limits = ArchiveLimits {
            max_total_bytes: 1 << 20,
            max_file_bytes: 1 << 18,
            max_entries: 256,
        };
        let _ = extract(&archive, &dest, limits);
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ArchiveLimits = ArchiveLimits {
        max_total_bytes: 1 << 20,
        max_file_bytes: 1 << 19,
        max_entries: 100,
    };

    /// One entry of a test archive: path, type, contents, link target.
    type Entry<'a> = (&'a str, tar::EntryType, &'a [u8], Option<&'a str>);

    /// Builds a tar by hand so hostile paths (which `tar::Builder` refuses) can be written.
    fn tar_with(entries: &[Entry<'_>], gzip: bool) -> tempfile::NamedTempFile {
        let mut buf = Vec::new();
        {
            let mut b = tar::Builder::new(&mut buf);
            for (path, kind, data, link) in entries {
                let mut h = tar::Header::new_gnu();
                let name = path.as_bytes();
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_entry_type(*kind);
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                if let Some(l) = link {
                    h.set_link_name(l).unwrap();
                }
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            b.finish().unwrap();
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        if gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut enc, &buf).unwrap();
            buf = enc.finish().unwrap();
        }
        std::io::Write::write_all(&mut f, &buf).unwrap();
        f
    }

    #[test]
    fn extracts_files_dirs_and_inner_symlinks_from_tar_and_tar_gz() {
        for gzip in [false, true] {
            let a = tar_with(
                &[
                    ("src/", tar::EntryType::Directory, b"", None),
                    (
                        "src/predict.py",
                        tar::EntryType::Regular,
                        b"def f(a): return a\n",
                        None,
                    ),
                    (
                        "link.py",
                        tar::EntryType::Symlink,
                        b"",
                        Some("src/predict.py"),
                    ),
                ],
                gzip,
            );
            let out = tempfile::tempdir().unwrap();
            extract(a.path(), out.path(), LIMITS).unwrap();
            assert_eq!(
                std::fs::read_to_string(out.path().join("link.py")).unwrap(),
                "def f(a): return a\n"
            );
        }
    }

    #[test]
    fn refuses_traversal_escaping_links_hard_links_and_bombs() {
        let cases: Vec<(Vec<Entry<'_>>, &str)> = vec![
            (
                vec![("../evil.py", tar::EntryType::Regular, b"x", None)],
                "'..' path",
            ),
            (
                vec![("/etc/evil", tar::EntryType::Regular, b"x", None)],
                "absolute",
            ),
            (
                vec![("a/../../evil", tar::EntryType::Regular, b"x", None)],
                "'..' path",
            ),
            (
                vec![("l", tar::EntryType::Symlink, b"", Some("/etc/passwd"))],
                "outside the project",
            ),
            (
                vec![("d/l", tar::EntryType::Symlink, b"", Some("../../x"))],
                "outside the project",
            ),
            (
                vec![("h", tar::EntryType::Link, b"", Some("x"))],
                "only files",
            ),
            (vec![("dev", tar::EntryType::Char, b"", None)], "only files"),
        ];
        for (entries, needle) in cases {
            let a = tar_with(&entries, false);
            let out = tempfile::tempdir().unwrap();
            let err = extract(a.path(), out.path(), LIMITS)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
        // A gzip bomb: 4 MiB of zeros compresses to a few KiB but unpacks past the cap.
        let zeros = vec![0u8; 400 * 1024];
        let names: Vec<String> = (0..10).map(|i| format!("z{i}")).collect();
        let entries: Vec<_> = names
            .iter()
            .map(|n| (n.as_str(), tar::EntryType::Regular, &zeros[..], None))
            .collect();
        let a = tar_with(&entries, true);
        assert!(std::fs::metadata(a.path()).unwrap().len() < 64 * 1024);
        let out = tempfile::tempdir().unwrap();
        let err = extract(a.path(), out.path(), LIMITS).unwrap_err();
        assert!(matches!(err, ArchiveError::TooLarge(_)), "{err}");
        let many: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
        let entries: Vec<_> = many
            .iter()
            .map(|n| (n.as_str(), tar::EntryType::Regular, &b"x"[..], None))
            .collect();
        let err = extract(
            tar_with(&entries, false).path(),
            tempfile::tempdir().unwrap().path(),
            LIMITS,
        )
        .unwrap_err();
        assert!(matches!(err, ArchiveError::TooManyEntries(100)), "{err}");
        let err = extract(
            tar_with(
                &[("big", tar::EntryType::Regular, &vec![1u8; 600 * 1024], None)],
                false,
            )
            .path(),
            tempfile::tempdir().unwrap().path(),
            LIMITS,
        )
        .unwrap_err();
        assert!(matches!(err, ArchiveError::FileTooLarge(..)), "{err}");
        let mut junk = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut junk,
            b"this is not an archive at all, not even close........",
        )
        .unwrap();
        assert!(extract(junk.path(), tempfile::tempdir().unwrap().path(), LIMITS).is_err());
    }
}
