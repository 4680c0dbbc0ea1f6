//! glibc allocator settings for the proxy and the replica, applied the only way glibc takes them
//! after a program has started: by starting it again.
//!
//! glibc reads `GLIBC_TUNABLES` once, when a program starts. A program that wants settings of its
//! own calls [`restart_with`] first thing in `main`: when the environment lacks any of them it
//! executes itself again, once, with them appended. The process stays the same (id, process
//! group, descriptors, arguments), so whoever starts it need not know. Settings the environment
//! already has, in `GLIBC_TUNABLES` or by an older variable, always win.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

/// One setting: its `GLIBC_TUNABLES` name, the value wanted, and the older environment variable
/// that sets the same, if there is one.
#[derive(Debug, Clone, Copy)]
pub struct Tunable {
    pub name: &'static str,
    pub value: &'static str,
    pub older: Option<&'static str>,
}

/// A replica's settings, which the proxy takes too: blocks under 32 MiB come from the heap, and
/// up to 32 MiB freed at its top is kept for the next request, at most what the process already
/// used. With glibc's self-adjusting thresholds a large body's blocks were mapped and unmapped,
/// or freed together into more than it keeps at the top of the heap, so every request faulted
/// its pages in again, at about 2.8 µs a page on the machine of `docs/PERFORMANCE.md`:
/// - in a replica, a 5 MB request makes a few allocations of its size at once (the bytes read
///   and the values built from them): about 2,400 page faults, half its CPU time;
/// - in the proxy, a large request arrives in read buffers of up to about 400 KB, all alive until
///   its body is written into the replica: 56 faults a 5 MB request in `recv`, and that
///   request's p50 went from 2.59 to 2.18 ms without them.
pub const HEAP_THRESHOLDS: [Tunable; 2] = [
    Tunable {
        name: "glibc.malloc.mmap_threshold",
        value: "33554432",
        older: Some("MALLOC_MMAP_THRESHOLD_"),
    },
    Tunable {
        name: "glibc.malloc.trim_threshold",
        value: "33554432",
        older: Some("MALLOC_TRIM_THRESHOLD_"),
    },
];

/// `modelgate serve`'s settings, which its replicas inherit (so they need not start again):
/// [`HEAP_THRESHOLDS`], and a larger per-thread cache. glibc keeps up to 7 freed blocks of each
/// small size per thread (its tcache) to hand out again without its arena's slower paths. The
/// proxy frees a batch's requests together and allocates the next batch's together, more than 7
/// of a size at c=16, so most missed it; with 64 they do not (1,100–1,400 fewer instructions a
/// request at c=16, about 6 %). The cache holds only blocks freed, at most 64 of each size up to
/// 1,032 bytes per thread. The load tests' floors run with the same settings, so that they are
/// measured on the same allocator.
pub const PROXY: [Tunable; 3] = [
    Tunable {
        name: "glibc.malloc.tcache_count",
        value: "64",
        older: None,
    },
    HEAP_THRESHOLDS[0],
    HEAP_THRESHOLDS[1],
];

/// `GLIBC_TUNABLES` with each of `wanted` that the environment does not set already (in
/// `current`, or by its older variable: `is_set`) appended; `None` when nothing is missing.
pub fn with_tunables(
    current: &str,
    wanted: &[Tunable],
    is_set: impl Fn(&str) -> bool,
) -> Option<String> {
    let mut all: Vec<String> = current
        .split(':')
        .filter(|kv| !kv.is_empty())
        .map(str::to_string)
        .collect();
    let before = all.len();
    for t in wanted {
        let set = all[..before]
            .iter()
            .any(|kv| kv.split('=').next() == Some(t.name));
        if !set && !t.older.is_some_and(&is_set) {
            all.push(format!("{}={}", t.name, t.value));
        }
    }
    (all.len() != before).then(|| all.join(":"))
}

/// Executes the running program again with `wanted` added to `GLIBC_TUNABLES` and `marker` set,
/// unless `marker` is already set (so it never restarts twice, whatever glibc does with the
/// variable) or nothing is missing. `program` names it in messages. Programs it starts inherit
/// the settings.
///
/// No restart when the binary cannot be told apart from a loader running it (`ld.so program
/// ...`: the executable is not the one `argv[0]` names), or when the variable is not UTF-8. If
/// the `exec` itself fails (the binary was replaced since it started), the program goes on
/// without the settings, and nothing else about it has changed: `execve` is called directly,
/// since std's `Command::exec` first resets what the program relies on (`SIGPIPE` ignored, so a
/// write to a peer that has gone away fails with `EPIPE` instead of ending the process). Call it
/// before any other thread starts.
pub fn restart_with(program: &str, wanted: &[Tunable], marker: &str) {
    if std::env::var_os(marker).is_some() {
        return;
    }
    let current = match std::env::var_os("GLIBC_TUNABLES") {
        None => String::new(),
        Some(v) => match v.into_string() {
            Ok(v) => v,
            Err(_) => return, // not ours to rewrite
        },
    };
    let Some(tunables) = with_tunables(&current, wanted, |v| std::env::var_os(v).is_some()) else {
        return;
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            eprintln!("{program}: no allocator settings: cannot find own executable: {err}");
            return;
        }
    };
    let argv0 = std::env::args_os().next().map(std::path::PathBuf::from);
    if argv0.as_deref().and_then(|p| p.file_name()) != exe.file_name() {
        eprintln!(
            "{program}: no allocator settings: {} is not the program {:?} names",
            exe.display(),
            argv0.unwrap_or_default()
        );
        return;
    }
    let c = |bytes: &[u8]| CString::new(bytes).ok();
    let env = std::env::vars_os()
        .filter(|(k, _)| k != "GLIBC_TUNABLES" && k != marker)
        .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .chain([
            c(format!("GLIBC_TUNABLES={tunables}").as_bytes()),
            c(format!("{marker}=1").as_bytes()),
        ])
        .collect::<Option<Vec<CString>>>();
    let args = std::env::args_os()
        .map(|a| c(a.as_bytes()))
        .collect::<Option<Vec<CString>>>();
    // The same arguments, `argv[0]` included; none of these can hold a NUL byte.
    let (Some(path), Some(args), Some(env)) = (c(exe.as_os_str().as_bytes()), args, env) else {
        return;
    };
    let Err(err) = nix::unistd::execve(&path, &args, &env);
    eprintln!("{program}: could not restart with allocator settings ({err}); going on");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunable(name: &'static str, value: &'static str, older: Option<&'static str>) -> Tunable {
        Tunable { name, value, older }
    }

    #[test]
    fn tunables_are_added_once_and_never_override_the_environment() {
        #[rustfmt::skip]
        let wanted = [
            tunable("glibc.malloc.mmap_threshold", "33554432", Some("MALLOC_MMAP_THRESHOLD_")),
            tunable("glibc.malloc.trim_threshold", "33554432", Some("MALLOC_TRIM_THRESHOLD_")),
        ];
        let none = |_: &str| false;
        let ours = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=33554432";
        assert_eq!(with_tunables("", &wanted, none).as_deref(), Some(ours));
        // After the restart they are all there.
        assert_eq!(with_tunables(ours, &wanted, none), None);
        // A setting of the environment's own is kept, and only the missing one added.
        assert_eq!(
            with_tunables("glibc.malloc.trim_threshold=0:glibc.cpu.x86_ibt=off", &wanted, none)
                .as_deref(),
            Some("glibc.malloc.trim_threshold=0:glibc.cpu.x86_ibt=off:glibc.malloc.mmap_threshold=33554432")
        );
        // So is one set by its older variable.
        let trim_set = |v: &str| v == "MALLOC_TRIM_THRESHOLD_";
        assert_eq!(
            with_tunables("", &wanted, trim_set).as_deref(),
            Some("glibc.malloc.mmap_threshold=33554432")
        );
        let both_set = |v: &str| v.starts_with("MALLOC_");
        assert_eq!(with_tunables("", &wanted, both_set), None);
        // A setting with no older variable is added unless GLIBC_TUNABLES has it.
        let tcache = [tunable("glibc.malloc.tcache_count", "64", None)];
        assert_eq!(
            with_tunables("", &tcache, |_| true).as_deref(),
            Some("glibc.malloc.tcache_count=64")
        );
        assert_eq!(
            with_tunables("glibc.malloc.tcache_count=7", &tcache, none),
            None
        );
    }
}
