//! Per-replica memory and CPU limits.
//!
//! Each replica process gets its own cgroup under a `modelgate-<pid>` group created inside the
//! cgroup modelgate itself runs in, so limits above modelgate still apply to everything below it.
//! cgroup v2 is used when its `memory` controller can be delegated to that group; otherwise the
//! cgroup v1 `memory` (and `cpu`) hierarchies when they are mounted writable; otherwise the replica
//! limits its own address space with `RLIMIT_AS` and CPU is not limited. [`Limits::detect`] picks
//! one at start and says which; the replica listing reports it per replica.
//!
//! With a cgroup, going over the limit makes the kernel's OOM killer end the replica, which the
//! supervisor tells from other deaths by the group's `oom_kill` count. The replica process joins
//! its group itself, first thing, before the interpreter starts (`replica-runtime serve
//! --join-cgroup`), so the model's import is already inside the limit and nothing needs `unsafe`
//! code between fork and exec here.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What `server.replica_limits` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitsMode {
    /// cgroup v2, else cgroup v1, else `RLIMIT_AS`.
    #[default]
    Auto,
    /// cgroup v2, else cgroup v1; refuse to start without either.
    Cgroup,
    /// Always `RLIMIT_AS` (and no CPU limit), even where cgroups are available.
    Rlimit,
}

/// How replica memory limits are enforced on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    CgroupV2,
    CgroupV1,
    RlimitAs,
}

impl Enforcement {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::CgroupV2 => "cgroup_v2",
            Enforcement::CgroupV1 => "cgroup_v1",
            Enforcement::RlimitAs => "rlimit_as",
        }
    }
}

/// CPU period the quota of a replica is expressed in, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CPU quota the kernel accepts, in microseconds.
const MIN_CPU_QUOTA_US: u64 = 1_000;

/// The parent groups of every replica group, or none with `RLIMIT_AS`.
#[derive(Debug)]
pub struct Limits {
    enforcement: Enforcement,
    /// The `modelgate-<pid>` group holding replica groups in the memory hierarchy (v2: the only
    /// hierarchy).
    memory_root: Option<PathBuf>,
    /// The same in the CPU hierarchy; under v2 equal to `memory_root` when `cpu` is delegated.
    cpu_root: Option<PathBuf>,
    /// CPUs modelgate (and so each replica) may run on: a quota of this many or more cannot bind.
    cpus: f64,
}

/// The CPUs this process may run on.
fn usable_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

impl Limits {
    /// Limits that never use cgroups.
    pub fn rlimit() -> Limits {
        Limits {
            enforcement: Enforcement::RlimitAs,
            memory_root: None,
            cpu_root: None,
            cpus: usable_cpus(),
        }
    }

    /// Picks the enforcement `mode` allows on this machine and creates the parent groups.
    pub fn detect(mode: LimitsMode) -> anyhow::Result<Limits> {
        if mode == LimitsMode::Rlimit {
            return Ok(Limits::rlimit());
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let name = format!("modelgate-{}", std::process::id());
        let mut why = Vec::new();
        match try_v2(&mounts, &own, &name) {
            Ok(limits) => return Ok(limits),
            Err(e) => why.push(format!("cgroup v2: {e}")),
        }
        match try_v1(&mounts, &own, &name) {
            Ok(limits) => return Ok(limits),
            Err(e) => why.push(format!("cgroup v1: {e}")),
        }
        let why = why.join("; ");
        if mode == LimitsMode::Cgroup {
            anyhow::bail!("server.replica_limits = \"cgroup\", but no cgroup can be used ({why})");
        }
        tracing::info!("replica memory limits use RLIMIT_AS, CPU is not limited ({why})");
        Ok(Limits::rlimit())
    }

    pub fn enforcement(&self) -> Enforcement {
        self.enforcement
    }

    /// Whether a replica asking for `cpu` cores gets a CFS quota. Not when cgroups are not in
    /// use, and not when the quota could never bind (`cpu` at least the CPUs modelgate may use):
    /// CFS bandwidth accounting costs about 8 % of a small model's throughput
    /// (`loadtests/limits-cost.sh`), for nothing in that case.
    pub fn cpu_enforced(&self, cpu: f64) -> bool {
        self.cpu_root.is_some() && cpu < self.cpus
    }

    /// Creates the group of one replica process with its limits. `None` under `RLIMIT_AS`.
    pub fn create(
        &self,
        name: &str,
        memory_bytes: Option<u64>,
        cpu: Option<f64>,
    ) -> io::Result<Option<ReplicaCgroup>> {
        let Some(memory_root) = &self.memory_root else {
            return Ok(None);
        };
        let v2 = self.enforcement == Enforcement::CgroupV2;
        let mut group = ReplicaCgroup {
            v2,
            memory_dir: memory_root.join(name),
            cpu_dir: None,
            memory_limit: memory_bytes,
        };
        make_dir(&group.memory_dir)?;
        if let Some(bytes) = memory_bytes {
            if v2 {
                write(&group.memory_dir.join("memory.max"), bytes)?;
                // Swap would let a replica exceed its limit unseen; a whole-group kill also takes
                // whatever the model forked.
                let _ = write(&group.memory_dir.join("memory.swap.max"), 0);
                let _ = write(&group.memory_dir.join("memory.oom.group"), 1);
            } else {
                write(&group.memory_dir.join("memory.limit_in_bytes"), bytes)?;
                let memsw = group.memory_dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, bytes)?;
                }
            }
        }
        if let (Some(cpu_root), Some(cpu)) = (&self.cpu_root, cpu.filter(|&c| self.cpu_enforced(c)))
        {
            let quota = cpu_quota_us(cpu);
            if v2 {
                write(
                    &group.memory_dir.join("cpu.max"),
                    format!("{quota} {CPU_PERIOD_US}"),
                )?;
            } else {
                let dir = cpu_root.join(name);
                make_dir(&dir)?;
                // Recorded before the writes, so a failed one still gets the group removed.
                group.cpu_dir = Some(dir.clone());
                write(&dir.join("cpu.cfs_period_us"), CPU_PERIOD_US)?;
                write(&dir.join("cpu.cfs_quota_us"), quota)?;
            }
        }
        Ok(Some(group))
    }

    /// Removes the parent groups (after every replica is gone).
    pub fn remove(&self) {
        for root in [&self.memory_root, &self.cpu_root].into_iter().flatten() {
            remove_tree(root);
        }
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The CFS quota, in microseconds per [`CPU_PERIOD_US`], of `cpu` cores.
pub fn cpu_quota_us(cpu: f64) -> u64 {
    ((cpu * CPU_PERIOD_US as f64).round() as u64).max(MIN_CPU_QUOTA_US)
}

/// How close to its limit a group's peak usage must have come for an OOM kill to count as the
/// limit's doing (the kernel charges in pages and batches).
const LIMIT_SLACK: u64 = 4 * 1024 * 1024;

/// The group(s) of one replica process: removed, with anything left in them killed, on drop.
#[derive(Debug)]
pub struct ReplicaCgroup {
    v2: bool,
    memory_dir: PathBuf,
    /// Only under v1, where CPU is a separate hierarchy.
    cpu_dir: Option<PathBuf>,
    memory_limit: Option<u64>,
}

impl ReplicaCgroup {
    /// The `cgroup.procs` files the replica writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        std::iter::once(&self.memory_dir)
            .chain(self.cpu_dir.as_ref())
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }

    /// Whether the kernel's OOM killer killed a process of this group because the group hit its
    /// own limit (not the machine running out: that also counts in `oom_kill`, but the group's
    /// limit was never reached then).
    pub fn killed_at_limit(&self) -> bool {
        let read = |file: &str| fs::read_to_string(self.memory_dir.join(file)).unwrap_or_default();
        if self.v2 {
            let events = read("memory.events");
            keyed_value(&events, "oom_kill").unwrap_or(0) > 0
                && keyed_value(&events, "oom").unwrap_or(0) > 0
        } else {
            // v1's fail counters are not reliable across kernels (0 here after a kill at the
            // memory+swap limit), but the peak usage says whether the limit was reached.
            // With swap accounted (limited equally), memory+swap is what reaches the limit.
            let peak = [
                "memory.max_usage_in_bytes",
                "memory.memsw.max_usage_in_bytes",
            ]
            .iter()
            .map(|f| read(f).trim().parse::<u64>().unwrap_or(0))
            .max()
            .unwrap_or(0);
            keyed_value(&read("memory.oom_control"), "oom_kill").unwrap_or(0) > 0
                && self
                    .memory_limit
                    .is_some_and(|limit| peak + LIMIT_SLACK >= limit)
        }
    }

    /// Memory the group uses now, in bytes.
    pub fn memory_current(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        fs::read_to_string(self.memory_dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills every process still in the group and removes it, waiting up to a second for the
    /// kernel to let the dead leave.
    pub async fn release(self) {
        for _ in 0..50 {
            if self.try_remove() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(group = %self.memory_dir.display(), "replica cgroup could not be removed");
    }

    fn try_remove(&self) -> bool {
        let mut gone = true;
        for dir in std::iter::once(&self.memory_dir).chain(self.cpu_dir.as_ref()) {
            kill_members(dir);
            gone &= match fs::remove_dir(dir) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
        }
        gone
    }
}

impl Drop for ReplicaCgroup {
    fn drop(&mut self) {
        // `release` is the normal way out; this catches early returns, and gives members that
        // are still dying a second to go.
        if !self.try_remove() {
            let group = ReplicaCgroup {
                v2: self.v2,
                memory_dir: std::mem::take(&mut self.memory_dir),
                cpu_dir: self.cpu_dir.take(),
                memory_limit: self.memory_limit,
            };
            std::thread::spawn(move || {
                for _ in 0..50 {
                    std::thread::sleep(Duration::from_millis(20));
                    if group.try_remove() {
                        break;
                    }
                }
                // Whatever is left goes with the parent group at exit, or at the next start.
                std::mem::forget(group);
            });
        }
    }
}

fn try_v2(mounts: &str, own: &str, name: &str) -> Result<Limits, String> {
    let mount = mount_point(mounts, |fstype, _| fstype == "cgroup2").ok_or("not mounted")?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no v2 group")?;
    let dir = under(&mount, path);
    let controllers = fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", dir.join("cgroup.controllers").display()))?;
    let available: Vec<&str> = controllers.split_whitespace().collect();
    if !available.contains(&"memory") {
        return Err(format!(
            "the memory controller is not available in {}",
            dir.display()
        ));
    }
    enable_v2(&dir, &["memory"])?;
    // CPU is optional: a kernel may refuse it (realtime threads) while memory works.
    let cpu = available.contains(&"cpu") && enable_v2(&dir, &["cpu"]).is_ok();
    clean_stale(&dir);
    let root = dir.join(name);
    // Named after this pid, so anything already there was left by a dead process that had it.
    remove_tree(&root);
    make_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    if let Err(e) = enable_v2(&root, &["memory"]) {
        let _ = fs::remove_dir(&root);
        return Err(e);
    }
    let cpu = cpu && enable_v2(&root, &["cpu"]).is_ok();
    tracing::info!(group = %root.display(), cpu, "replica limits use cgroup v2");
    Ok(Limits {
        enforcement: Enforcement::CgroupV2,
        cpu_root: cpu.then(|| root.clone()),
        memory_root: Some(root),
        cpus: usable_cpus(),
    })
}

/// Enables `controllers` for the children of `dir`. A group that holds processes cannot (the
/// "no internal processes" rule): when modelgate is the only process in it, as in a service with
/// its own delegated group, modelgate moves itself into a `supervisor` child first.
fn enable_v2(dir: &Path, controllers: &[&str]) -> Result<(), String> {
    let control = dir.join("cgroup.subtree_control");
    let enabled =
        fs::read_to_string(&control).map_err(|e| format!("{}: {e}", control.display()))?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let enable = || write(&control, missing.join(" "));
    match enable() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            let me = std::process::id().to_string();
            if procs.lines().any(|p| p.trim() != me) {
                return Err(format!(
                    "{} holds other processes, so its controllers cannot be delegated",
                    dir.display()
                ));
            }
            let own = dir.join("supervisor");
            make_dir(&own).map_err(|e| format!("{}: {e}", own.display()))?;
            write(&own.join("cgroup.procs"), 0).map_err(|e| format!("moving modelgate: {e}"))?;
            enable().map_err(|e| format!("{}: {e}", control.display()))
        }
        Err(e) => Err(format!("{}: {e}", control.display())),
    }
}

fn try_v1(mounts: &str, own: &str, name: &str) -> Result<Limits, String> {
    let memory = v1_dir(mounts, own, "memory").ok_or("no memory hierarchy is mounted")?;
    clean_stale(&memory);
    let memory_root = memory.join(name);
    // Named after this pid, so anything already there was left by a dead process that had it.
    remove_tree(&memory_root);
    make_dir(&memory_root).map_err(|e| format!("{}: {e}", memory_root.display()))?;
    if !memory_root.join("memory.limit_in_bytes").exists() {
        let _ = fs::remove_dir(&memory_root);
        return Err(format!("{} has no memory.limit_in_bytes", memory.display()));
    }
    let cpu_root = v1_dir(mounts, own, "cpu").and_then(|cpu| {
        clean_stale(&cpu);
        let root = cpu.join(name);
        remove_tree(&root);
        match make_dir(&root) {
            Ok(()) if root.join("cpu.cfs_quota_us").exists() => Some(root),
            Ok(()) => {
                let _ = fs::remove_dir(&root);
                None
            }
            Err(e) => {
                tracing::info!("CPU is not limited: {}: {e}", root.display());
                None
            }
        }
    });
    tracing::info!(
        memory = %memory_root.display(),
        cpu = %cpu_root.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "not limited".into()),
        "replica limits use cgroup v1"
    );
    Ok(Limits {
        enforcement: Enforcement::CgroupV1,
        memory_root: Some(memory_root),
        cpu_root,
        cpus: usable_cpus(),
    })
}

/// The directory of this process's group in the v1 hierarchy carrying `controller`.
fn v1_dir(mounts: &str, own: &str, controller: &str) -> Option<PathBuf> {
    let mount = mount_point(mounts, |fstype, options| {
        fstype == "cgroup" && options.split(',').any(|o| o == controller)
    })?;
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })?;
    Some(under(&mount, path))
}

/// The mount point of the first mount in `/proc/self/mountinfo` text whose filesystem type and
/// super options satisfy `matches`, with the root of the mount within its hierarchy.
fn mount_point(mountinfo: &str, matches: impl Fn(&str, &str) -> bool) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (fields, tail) = line.split_once(" - ")?;
        let mut tail = tail.split_whitespace();
        let (fstype, _source, options) = (tail.next()?, tail.next()?, tail.next().unwrap_or(""));
        if !matches(fstype, options) {
            return None;
        }
        let fields: Vec<&str> = fields.split_whitespace().collect();
        Some((PathBuf::from(fields.get(4)?), fields.get(3)?.to_string()))
    })
}

/// `path` (as `/proc/self/cgroup` names it) inside the mount of its hierarchy.
fn under((mount, root): &(PathBuf, String), path: &str) -> PathBuf {
    let path = path.trim();
    let rel = path
        .strip_prefix(root.as_str())
        .unwrap_or(path)
        .trim_start_matches('/');
    if rel.is_empty() {
        mount.clone()
    } else {
        mount.join(rel)
    }
}

/// The value after `key` on its line of a `key value` file.
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Removes the `modelgate-<pid>` groups of modelgate processes that no longer exist (killed
/// before they could clean up), killing replicas they left behind.
fn clean_stale(parent: &Path) {
    for entry in crate::left_by_dead_modelgates(parent) {
        tracing::info!(group = %entry.path().display(), "removing the group of an earlier modelgate");
        remove_tree(&entry.path());
    }
}

/// Kills the processes of `dir` and its descendants, then removes them, deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        kill_members(dir);
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn kill_members(dir: &Path) {
    let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// One `write(2)` of `value`, as cgroup files want it.
fn write(file: &Path, value: impl std::fmt::Display) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(file)?;
    f.write_all(value.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_own_group_of_each_hierarchy() {
        let mounts = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /outer /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        let own = "4:memory:/outer/svc\n1:cpu,cpuacct:/\n0::/user.slice/a.scope\n";
        assert_eq!(
            v1_dir(mounts, own, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/svc"))
        );
        assert_eq!(
            v1_dir(mounts, own, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(v1_dir(mounts, own, "pids"), None);
        let v2 = mount_point(mounts, |t, _| t == "cgroup2").unwrap();
        assert_eq!(
            under(&v2, "/user.slice/a.scope"),
            PathBuf::from("/sys/fs/cgroup/unified/user.slice/a.scope")
        );
    }

    #[test]
    fn reads_oom_kill_counts_of_both_versions() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(keyed_value(v1, "oom_kill"), Some(3));
        assert_eq!(keyed_value(v2, "oom_kill"), Some(2));
        assert_eq!(keyed_value(v2, "oom"), Some(2));
    }

    #[test]
    fn cpu_quota_follows_the_cores_asked_for() {
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(0.25), 25_000);
        assert_eq!(cpu_quota_us(2.5), 250_000);
        assert_eq!(cpu_quota_us(0.001), MIN_CPU_QUOTA_US);
    }
}
