//! Builds: turning a project's files into an immutable, content-addressed artifact.
//!
//! A build runs these steps, appending every line of output to its log file:
//! 1. **Snapshot** the project's files into `builds/<id>/src`, skipping every `.git` directory and
//!    whatever `.gitignore` files ignore, refusing symlinks that leave the project and files over the
//!    size limit.
//! 2. **Dependencies**: `requirements.txt` is installed with pip into a directory keyed by the
//!    sha256 of its contents (and the Python version), shared by every build with the same
//!    requirements, so an unchanged file is not installed twice.
//! 3. **Build script**: `build.sh` (or the reference's `cdsw-build.sh`) runs in the snapshot with a
//!    timeout; what it writes (e.g. `model.pkl` from `fit.py`) becomes part of the artifact.
//! 4. **Check**: `replica-runtime check` imports the file and resolves the function.
//! 5. **Seal**: a manifest of every file's sha256 is written; its own sha256 is the build's digest,
//!    verified again before a deployment starts.

use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

/// How builds run; shared by every build.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// The data directory (`builds/` and `cache/` live under it).
    pub data_dir: PathBuf,
    /// The interpreter used for pip and build scripts.
    pub python: PathBuf,
    /// The `replica-runtime` binary, for the import check.
    pub replica_runtime: PathBuf,
    /// Largest single file accepted into a snapshot.
    pub max_file_bytes: u64,
    /// Longest a build script, or a pip install, may run.
    pub step_timeout: Duration,
    /// Largest project archive accepted by an upload.
    pub max_upload_bytes: u64,
    /// Most an uploaded archive may unpack to.
    pub max_project_bytes: u64,
}

/// Where a build's pieces live on disk.
#[derive(Debug, Clone)]
pub struct BuildPaths {
    pub root: PathBuf,
    pub src: PathBuf,
    pub log: PathBuf,
    pub manifest: PathBuf,
    /// The dependency directory, recorded in `deps.path` (empty when there are no requirements).
    pub deps_ref: PathBuf,
}

impl BuildPaths {
    pub fn new(data_dir: &Path, build_id: i64) -> BuildPaths {
        let root = data_dir.join("builds").join(build_id.to_string());
        BuildPaths {
            src: root.join("src"),
            log: root.join("build.log"),
            manifest: root.join("manifest.txt"),
            deps_ref: root.join("deps.path"),
            root,
        }
    }

    /// The dependency directory this build uses, if it has requirements.
    pub fn deps_dir(&self) -> Option<PathBuf> {
        let p = std::fs::read_to_string(&self.deps_ref).ok()?;
        let p = p.trim();
        (!p.is_empty()).then(|| PathBuf::from(p))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Failed(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends lines to a build log, flushing each so the log can be followed while the build runs.
pub struct BuildLog(std::fs::File);

impl BuildLog {
    pub fn create(path: &Path) -> std::io::Result<BuildLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(BuildLog(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ))
    }

    pub fn line(&mut self, text: &str) {
        let _ = writeln!(self.0, "{text}");
        let _ = self.0.flush();
    }
}

/// Runs every step of a build; on error the reason has also been written to the log.
/// Returns the artifact digest.
pub async fn run_build(
    settings: &BuildSettings,
    source: &Path,
    paths: &BuildPaths,
    file_path: &str,
    function_name: &str,
    log: &mut BuildLog,
) -> Result<String, BuildError> {
    let result = run_steps(settings, source, paths, file_path, function_name, log).await;
    if let Err(err) = &result {
        log.line(&format!("BUILD FAILED: {err}"));
    }
    result
}

async fn run_steps(
    settings: &BuildSettings,
    source: &Path,
    paths: &BuildPaths,
    file_path: &str,
    function_name: &str,
    log: &mut BuildLog,
) -> Result<String, BuildError> {
    log.line(&format!("snapshotting {}", source.display()));
    if let Some(inside) = data_dir_in_project(source, &settings.data_dir) {
        let line = format!(
            "leaving out {}/ (modelgate's data directory)",
            inside.display()
        );
        tracing::warn!(project = %source.display(), "build {line}");
        log.line(&line);
    }
    let copied = {
        let (source, data_dir, dest, max) = (
            source.to_path_buf(),
            settings.data_dir.clone(),
            paths.src.clone(),
            settings.max_file_bytes,
        );
        off_the_runtime("snapshot", move || snapshot(&source, &data_dir, &dest, max)).await?
    };
    log.line(&format!("copied {copied} files"));

    let requirements = paths.src.join("requirements.txt");
    let deps = if requirements.is_file() {
        Some(install_requirements(settings, &requirements, log).await?)
    } else {
        log.line("no requirements.txt");
        None
    };
    std::fs::write(
        &paths.deps_ref,
        deps.as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
    )?;

    for script in ["build.sh", "cdsw-build.sh"] {
        if paths.src.join(script).is_file() {
            log.line(&format!("running {script}"));
            let mut cmd = Command::new("bash");
            cmd.arg(script).current_dir(&paths.src);
            if let Some(d) = &deps {
                cmd.env("PYTHONPATH", d);
            }
            run_logged(cmd, settings.step_timeout, log)
                .await
                .map_err(|e| BuildError::Failed(format!("{script} failed: {e}")))?;
            break;
        }
    }

    log.line(&format!(
        "checking that {file_path} imports and defines {function_name}"
    ));
    let mut check = Command::new(&settings.replica_runtime);
    check
        .arg("check")
        .arg("--dir")
        .arg(&paths.src)
        .arg("--file")
        .arg(file_path)
        .arg("--function")
        .arg(function_name);
    if let Some(d) = &deps {
        check.arg("--python-path").arg(d);
    }
    run_logged(check, settings.step_timeout, log)
        .await
        .map_err(|e| BuildError::Failed(format!("model check failed: {e}")))?;

    let digest = {
        let (src, manifest) = (paths.src.clone(), paths.manifest.clone());
        off_the_runtime("seal", move || seal(&src, &manifest)).await?
    };
    log.line(&format!("built: sha256 {digest}"));
    Ok(digest)
}

/// Removes a directory tree, if there is one, on a blocking thread (a failed pip install or an
/// old upload can hold many thousands of files); errors are ignored, as a leftover is harmless.
pub async fn remove_tree(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(path)).await;
}

/// Runs a step that walks or hashes a whole tree on a blocking thread: on the runtime's thread it
/// would hold up every request while it runs (with one worker, the only thread).
async fn off_the_runtime<T: Send + 'static>(
    step: &str,
    f: impl FnOnce() -> Result<T, BuildError> + Send + 'static,
) -> Result<T, BuildError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BuildError::Failed(format!("{step} did not finish: {e}")))?
}

/// Installs requirements into the cache directory for their hash, unless it is already there.
async fn install_requirements(
    settings: &BuildSettings,
    requirements: &Path,
    log: &mut BuildLog,
) -> Result<PathBuf, BuildError> {
    let contents = std::fs::read(requirements)?;
    let mut h = Sha256::new();
    h.update(&contents);
    h.update(settings.python.as_os_str().as_encoded_bytes());
    let key = hex(&h.finalize());
    let cache = settings.data_dir.join("cache").join("deps");
    let dir = cache.join(&key);
    if dir.join(".complete").is_file() {
        log.line(&format!("dependency cache hit: {key}"));
        return Ok(dir);
    }
    log.line(&format!(
        "dependency cache miss: {key}; installing requirements.txt"
    ));
    let staging = cache.join(format!("{key}.partial-{}", std::process::id()));
    remove_tree(staging.clone()).await;
    std::fs::create_dir_all(&staging)?;
    let mut cmd = Command::new(&settings.python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--target",
    ])
    .arg(&staging)
    .arg("-r")
    .arg(requirements);
    if let Err(e) = run_logged(cmd, settings.step_timeout, log).await {
        remove_tree(staging).await;
        return Err(BuildError::Failed(format!("pip install failed: {e}")));
    }
    std::fs::write(staging.join(".complete"), b"")?;
    // A concurrent build may have finished the same install first; either copy is complete.
    if std::fs::rename(&staging, &dir).is_err() {
        remove_tree(staging).await;
    }
    Ok(dir)
}

/// Runs a command, copying its stdout and stderr into the log line by line.
async fn run_logged(mut cmd: Command, timeout: Duration, log: &mut BuildLog) -> Result<(), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let pumps = [
        child
            .stdout
            .take()
            .map(|o| tokio::spawn(pump(o, tx.clone()))),
        child
            .stderr
            .take()
            .map(|e| tokio::spawn(pump(e, tx.clone()))),
    ];
    drop(tx);
    let waited = tokio::time::timeout(timeout, async {
        let mut status = None;
        loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some(l) => log.line(&l),
                    None => break,
                },
                s = child.wait(), if status.is_none() => status = Some(s),
            }
        }
        match status {
            Some(s) => s,
            None => child.wait().await,
        }
    })
    .await;
    for p in pumps.into_iter().flatten() {
        p.abort();
    }
    match waited {
        Err(_) => {
            // The whole group: a build script's children (pip, python) must not outlive it.
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
            Err(format!("timed out after {timeout:?}"))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("exited with {status}")),
    }
}

async fn pump(r: impl AsyncRead + Unpin, tx: tokio::sync::mpsc::UnboundedSender<String>) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if tx.send(line).is_err() {
            break;
        }
    }
}

/// Walks the project as a build sees it: every file except `.git` directories, modelgate's own
/// data directory when it lies inside the project (a snapshot would otherwise copy itself into
/// itself, and the store, other builds and the admin key with it), and what `.gitignore`
/// ignores; symlinks resolved (and refused when they leave the project). Calls `file(rel, path)`
/// for each file and `dir(rel)` for each directory, in walk order. A project that is the data
/// directory itself is refused.
fn walk_project(
    source: &Path,
    data_dir: &Path,
    mut dir: impl FnMut(&Path) -> Result<(), BuildError>,
    mut file: impl FnMut(&Path, &Path) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    let source = source
        .canonicalize()
        .map_err(|e| BuildError::Failed(format!("project directory {}: {e}", source.display())))?;
    let data_dir = resolved(data_dir);
    if data_dir == source {
        return Err(BuildError::Failed(format!(
            "project directory {} is modelgate's data directory; \
             put the model in a directory of its own",
            source.display()
        )));
    }
    let walker = ignore::WalkBuilder::new(&source)
        .hidden(false)
        .git_ignore(true)
        .git_exclude(false)
        .git_global(false)
        .require_git(false)
        .ignore(false)
        .parents(false)
        .follow_links(false)
        .filter_entry(move |e| e.file_name() != ".git" && e.path() != data_dir)
        .build();
    for entry in walker {
        let entry = entry.map_err(|e| BuildError::Failed(format!("walking the project: {e}")))?;
        let path = entry.path();
        let rel = path
            .strip_prefix(&source)
            .expect("walk stays under its root");
        if rel.as_os_str().is_empty() {
            continue;
        }
        let ft = entry
            .file_type()
            .expect("entries below the root have a type");
        if ft.is_dir() {
            dir(rel)?;
        } else if ft.is_symlink() {
            let resolved = path
                .canonicalize()
                .map_err(|_| BuildError::Failed(format!("{}: dangling symlink", rel.display())))?;
            if !resolved.starts_with(&source) {
                return Err(BuildError::Failed(format!(
                    "{}: symlink points outside the project",
                    rel.display()
                )));
            }
            if resolved.is_file() {
                file(rel, &resolved)?;
            }
        } else if ft.is_file() {
            file(rel, path)?;
        }
    }
    Ok(())
}

/// The data directory as the walk compares it: canonical, or absolute if it cannot be resolved
/// (it exists whenever modelgate builds, so that is only a fallback).
fn resolved(data_dir: &Path) -> PathBuf {
    data_dir
        .canonicalize()
        .or_else(|_| std::path::absolute(data_dir))
        .unwrap_or_else(|_| data_dir.to_path_buf())
}

/// Where modelgate's data directory lies inside the project, relative to it, if it does: a build
/// leaves it out, and says so in its log.
pub fn data_dir_in_project(source: &Path, data_dir: &Path) -> Option<PathBuf> {
    let source = source.canonicalize().ok()?;
    let inside = resolved(data_dir).strip_prefix(&source).ok()?.to_path_buf();
    (!inside.as_os_str().is_empty()).then_some(inside)
}

/// Copies the project tree into `dest`; returns the number of files copied. A project that would
/// copy `dest` into itself (a directory of an earlier build's, say) is refused.
pub fn snapshot(
    source: &Path,
    data_dir: &Path,
    dest: &Path,
    max_file_bytes: u64,
) -> Result<usize, BuildError> {
    std::fs::create_dir_all(dest)?;
    if let (Ok(s), Ok(d)) = (source.canonicalize(), dest.canonicalize()) {
        // The walk leaves the data directory out when it lies in the project (and refuses, in
        // its own words, a project that is the data directory): `dest` is always inside it.
        let data = resolved(data_dir);
        if d.starts_with(&s) && !(data.starts_with(&s) && d.starts_with(&data)) {
            return Err(BuildError::Failed(format!(
                "project directory {} holds the build's own directory {}",
                s.display(),
                d.display()
            )));
        }
    }
    let mut copied = 0;
    walk_project(
        source,
        data_dir,
        |rel| Ok(std::fs::create_dir_all(dest.join(rel))?),
        |rel, path| {
            copy_file(path, &dest.join(rel), rel, max_file_bytes)?;
            copied += 1;
            Ok(())
        },
    )?;
    Ok(copied)
}

/// The sha256 of what a build of `source` would start from: each file the snapshot would take
/// (path and content) and `extra` (the entry point and the interpreter). Two equal fingerprints
/// mean a new build would start from the same inputs.
pub fn fingerprint(source: &Path, data_dir: &Path, extra: &str) -> Result<String, BuildError> {
    let mut lines = Vec::new();
    walk_project(
        source,
        data_dir,
        |_| Ok(()),
        |rel, path| {
            let mut h = Sha256::new();
            std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
            lines.push(format!("{}  {}", hex(&h.finalize()), rel.display()));
            Ok(())
        },
    )?;
    lines.sort();
    lines.push(extra.to_owned());
    Ok(hex(&Sha256::digest(lines.join("\n").as_bytes())))
}

fn copy_file(from: &Path, to: &Path, rel: &Path, max: u64) -> Result<(), BuildError> {
    let len = std::fs::metadata(from)?.len();
    if len > max {
        return Err(BuildError::Failed(format!(
            "{}: {len} bytes is over the limit of {max} bytes per file",
            rel.display()
        )));
    }
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to)?;
    Ok(())
}

/// Lists every file under `dir` (sorted, relative) with its sha256.
fn manifest_of(dir: &Path) -> Result<String, BuildError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                files.push(entry.path());
            }
        }
    }
    let mut lines = Vec::with_capacity(files.len());
    for f in files {
        let rel = f.strip_prefix(dir).expect("under dir");
        if rel
            .components()
            .any(|c| c == Component::Normal("__pycache__".as_ref()))
        {
            continue;
        }
        let mut h = Sha256::new();
        let mut file = std::fs::File::open(&f)?;
        std::io::copy(&mut file, &mut h)?;
        lines.push(format!("{}  {}", hex(&h.finalize()), rel.display()));
    }
    lines.sort();
    Ok(lines.join("\n") + "\n")
}

/// Writes the manifest and returns its digest.
pub fn seal(src: &Path, manifest_path: &Path) -> Result<String, BuildError> {
    let manifest = manifest_of(src)?;
    std::fs::write(manifest_path, &manifest)?;
    Ok(hex(&Sha256::digest(manifest.as_bytes())))
}

/// Recomputes the artifact's digest; a mismatch means it was altered after the build.
pub fn verify(src: &Path, expected: &str) -> Result<(), BuildError> {
    let actual = hex(&Sha256::digest(manifest_of(src)?.as_bytes()));
    if actual == expected {
        Ok(())
    } else {
        Err(BuildError::Failed(format!(
            "build artifact changed since it was built (sha256 {actual}, expected {expected})"
        )))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_skips_git_and_ignored_files_and_refuses_escapes_and_big_files() {
        let src = tempfile::tempdir().unwrap();
        let p = src.path();
        std::fs::write(p.join("predict.py"), "def f(a): return a\n").unwrap();
        std::fs::write(p.join(".gitignore"), "*.log\nsecret/\n").unwrap();
        std::fs::write(p.join("debug.log"), "x").unwrap();
        std::fs::create_dir_all(p.join("secret")).unwrap();
        std::fs::write(p.join("secret/k"), "x").unwrap();
        std::fs::create_dir_all(p.join(".git/objects")).unwrap();
        std::fs::write(p.join(".git/HEAD"), "ref").unwrap();
        std::fs::create_dir_all(p.join("sub/.git")).unwrap();
        std::fs::write(p.join("sub/.git/config"), "x").unwrap();
        std::fs::write(p.join("sub/data.csv"), "1,2").unwrap();
        std::os::unix::fs::symlink("predict.py", p.join("alias.py")).unwrap();

        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("src");
        snapshot(p, out.path(), &dest, 1 << 20).unwrap();
        assert!(dest.join("predict.py").is_file());
        assert!(dest.join("sub/data.csv").is_file());
        assert!(dest.join("alias.py").is_file());
        assert!(dest.join(".gitignore").is_file());
        for absent in [".git", "sub/.git", "debug.log", "secret"] {
            assert!(!dest.join(absent).exists(), "{absent} was copied");
        }
        let before = fingerprint(p, out.path(), "predict.py:f").unwrap();
        assert_eq!(before, fingerprint(p, out.path(), "predict.py:f").unwrap());
        assert_ne!(before, fingerprint(p, out.path(), "predict.py:g").unwrap());
        std::fs::write(p.join("debug.log"), "ignored files do not count").unwrap();
        assert_eq!(before, fingerprint(p, out.path(), "predict.py:f").unwrap());
        std::fs::write(p.join("sub/data.csv"), "1,3").unwrap();
        assert_ne!(before, fingerprint(p, out.path(), "predict.py:f").unwrap());
        std::fs::write(p.join("sub/data.csv"), "1,2").unwrap();
        let digest = seal(&dest, &out.path().join("m")).unwrap();
        verify(&dest, &digest).unwrap();
        std::fs::write(dest.join("predict.py"), "tampered").unwrap();
        assert!(verify(&dest, &digest).is_err());

        std::fs::write(p.join("big.bin"), vec![0u8; 2048]).unwrap();
        let err = snapshot(p, out.path(), &out.path().join("s2"), 1024).unwrap_err();
        assert!(err.to_string().contains("big.bin"), "{err}");
        std::fs::remove_file(p.join("big.bin")).unwrap();

        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("x"), p.join("escape")).unwrap();
        let err = snapshot(p, out.path(), &out.path().join("s3"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("outside the project"), "{err}");
    }

    #[test]
    fn the_data_directory_inside_the_project_is_left_out() {
        let project = tempfile::tempdir().unwrap();
        let p = project.path();
        std::fs::write(p.join("predict.py"), "def f(a): return a\n").unwrap();
        let data = p.join("data");
        std::fs::create_dir_all(data.join("builds/1")).unwrap();
        std::fs::write(data.join("modelgate.db"), "store").unwrap();
        std::fs::write(data.join("admin-api-key"), "secret").unwrap();
        let before = fingerprint(p, &data, "predict.py:f").unwrap();
        assert_eq!(data_dir_in_project(p, &data), Some(PathBuf::from("data")));
        assert_eq!(
            data_dir_in_project(p, &p.join("data/../data")),
            Some(PathBuf::from("data"))
        );
        assert_eq!(data_dir_in_project(&data, p), None);

        let dest = data.join("builds/1/src");
        assert_eq!(snapshot(p, &data, &dest, 1 << 20).unwrap(), 1);
        assert!(dest.join("predict.py").is_file());
        assert!(!dest.join("data").exists());
        std::fs::write(data.join("modelgate.db"), "the store changed").unwrap();
        assert_eq!(before, fingerprint(p, &data, "predict.py:f").unwrap());

        let err = snapshot(&data, &data, &data.join("builds/2/src"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("data directory"), "{err}");
        // A project inside the data directory that holds the snapshot's destination.
        let builds = data.join("builds");
        let err = snapshot(&builds, &data, &builds.join("3/src"), 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains("the build's own directory"),
            "{err}"
        );
    }
}
