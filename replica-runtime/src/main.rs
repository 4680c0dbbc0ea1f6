//! `replica-runtime`: loads one model function into an embedded CPython and serves it.
//!
//! `serve` connects to the Unix socket the proxy is listening on, imports the model, says
//! [`Kind::Ready`] (or [`Kind::LoadFailed`] with the traceback on stderr) and then answers one
//! request at a time until the proxy closes the socket or stops it with SIGTERM, which is noticed
//! between requests (see [`Stop`]). `check` only imports the module and resolves the function, for
//! build-time validation.
//!
//! The model's own stdout and stderr are this process's, which the proxy reads line by line into
//! the replica's log.
#![forbid(unsafe_code)]

mod outbox;

use outbox::Outbox;
use replica_runtime::python;

use std::io::{self, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use modelgate_protocol::{self as protocol, Kind, ModelError, Ready};

#[derive(Parser)]
#[command(name = "replica-runtime", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve predictions to the proxy listening on `--connect`.
    Serve {
        /// Unix socket the proxy listens on for this replica.
        #[arg(long)]
        connect: PathBuf,
        /// A `cgroup.procs` file to move this process into before anything else runs (the
        /// proxy's per-replica memory and CPU limits); repeatable, one per hierarchy.
        #[arg(long = "join-cgroup")]
        join_cgroup: Vec<PathBuf>,
        /// Size of the in-place region offered to the proxy in `Ready`: a buffer it writes large
        /// requests into directly (the proxy's largest request). 0 offers none. The proxy sets
        /// the variable, which runtimes from before the region ignore.
        #[arg(long, env = "MODELGATE_IN_PLACE_BYTES", default_value_t = 0)]
        in_place_bytes: usize,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Import the module and resolve the function, then exit 0 (or 1 with the traceback).
    Check {
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory; it becomes the working directory and is put first on `sys.path`.
    #[arg(long)]
    dir: PathBuf,
    /// Python file inside the model directory, e.g. `predict.py`.
    #[arg(long)]
    file: String,
    /// Function in that file that takes the request dict and returns the response.
    #[arg(long)]
    function: String,
    /// Further directories for `sys.path`, after the model directory (e.g. installed dependencies).
    #[arg(long = "python-path")]
    python_path: Vec<PathBuf>,
    /// Address-space limit for this process, in bytes (RLIMIT_AS); allocations past it raise
    /// MemoryError in the model.
    #[arg(long)]
    memory_limit_bytes: Option<u64>,
}

/// Set in the environment of the restarted process, so it never restarts twice whatever glibc
/// does with `GLIBC_TUNABLES`.
const RESTARTED: &str = "MODELGATE_REPLICA_MALLOC_SET";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { model } => match load(&model, 0) {
            Ok(_) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("replica-runtime: {}: {}", err.exception, err.message);
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            connect,
            join_cgroup,
            in_place_bytes,
            model,
        } => {
            // Whoever starts replicas (the proxy, the load tests, a container) need not know;
            // the model sees the variable in its environment, and programs it starts inherit it.
            // Its allocator settings (`glibc::HEAP_THRESHOLDS`), unless it has them already (from
            // modelgate, say).
            protocol::glibc::restart_with(
                "replica-runtime",
                &protocol::glibc::HEAP_THRESHOLDS,
                RESTARTED,
            );
            // Before the interpreter starts, so the model's import is inside the limits too.
            for procs in &join_cgroup {
                if let Err(err) = std::fs::write(procs, b"0") {
                    eprintln!(
                        "replica-runtime: cannot join cgroup {}: {err}",
                        procs.display()
                    );
                    return ExitCode::from(4);
                }
            }
            // The interpreter lives on this thread for the life of the process: it owns the model,
            // reads requests from the socket and answers them, so a request costs no thread hop.
            let stream = match UnixStream::connect(&connect) {
                Ok(s) => s,
                Err(err) => {
                    eprintln!(
                        "replica-runtime: cannot connect to {}: {err}",
                        connect.display()
                    );
                    return ExitCode::from(2);
                }
            };
            match serve(stream, &model, in_place_bytes) {
                Ok(code) => code,
                Err(err) => {
                    eprintln!("replica-runtime: connection to proxy failed: {err}");
                    ExitCode::from(3)
                }
            }
        }
    }
}

/// Address space the runtime itself takes after it starts, added to `--memory-limit-bytes` so
/// the model keeps what it was given: the outbox's flusher thread gets its own glibc malloc
/// arena, a reservation of 64 MiB (of which it touches a few pages; glibc maps twice that for a
/// moment to align it, and shares an existing arena if that fails).
const RUNTIME_ADDRESS_SPACE: u64 = 64 << 20;

/// `reserved` is address space the runtime already took for itself (the in-place region), added
/// to the limit like [`RUNTIME_ADDRESS_SPACE`].
fn load(model: &ModelArgs, reserved: usize) -> Result<python::Model, ModelError> {
    if let Some(limit) = model.memory_limit_bytes {
        let limit = limit
            .saturating_add(RUNTIME_ADDRESS_SPACE)
            .saturating_add(reserved as u64);
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, limit, limit)
            .map_err(|err| ModelError {
                kind: protocol::ModelErrorKind::Load,
                exception: "OSError".into(),
                message: format!("cannot set the memory limit of {limit} bytes: {err}"),
            })?;
    }
    std::env::set_current_dir(&model.dir).map_err(|err| ModelError {
        kind: protocol::ModelErrorKind::Load,
        exception: "OSError".into(),
        message: format!(
            "cannot enter model directory {}: {err}",
            model.dir.display()
        ),
    })?;
    let dir = std::env::current_dir().unwrap_or_else(|_| model.dir.clone());
    let mut path = vec![dir];
    path.extend(model.python_path.iter().cloned());
    python::Model::load(&path, &model.file, &model.function)
}

fn serve(
    stream: UnixStream,
    model_args: &ModelArgs,
    in_place_bytes: usize,
) -> io::Result<ExitCode> {
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let writer = Outbox::new(stream)?;

    // The in-place region, mapped before the memory limit is set. Its pages cost nothing until
    // the proxy writes a request there; from then on they stay, as the socket's request buffer
    // would. It is never remapped, so its address holds for the life of the process.
    let region = Region::map(in_place_bytes);
    let model = match load(model_args, region.as_ref().map_or(0, |r| r.map.len())) {
        Ok(m) => m,
        Err(err) => {
            write_json_frame(&writer, Kind::LoadFailed, &err)?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let ready = Ready {
        protocol: protocol::PROTOCOL_VERSION,
        pid: std::process::id(),
        python_version: model.python_version(),
        in_place: region.as_ref().map(Region::announce),
    };
    write_json_frame(&writer, Kind::Ready, &ready)?;
    // Only now: SIGTERM during the import ends the process at once, as it did before.
    let stop = Stop::install(&model)?;

    // Only grows, and is zeroed only as it grows: a large request is read over the bytes of the
    // last one instead of being zeroed first (a 5 MB memset per request otherwise).
    let mut buffer = Vec::new();
    // Whether the proxy reads large answers from this process's memory, and the one lent to it
    // that it has not yet copied out: kept, unchanged, until it says so.
    let mut lend = false;
    let mut lent: Option<Vec<u8>> = None;
    loop {
        // The request under way when SIGTERM came has been answered; the ones the proxy sent
        // behind it were not started, and it sends them to another replica when this one hangs
        // up.
        if stop.requested() {
            break;
        }
        if reader.buffer().is_empty() {
            writer.flush()?;
            if wait_readable(reader.get_ref(), &stop)? {
                break;
            }
        }
        let mut header = [0u8; protocol::HEADER_LEN];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            // The proxy closed the socket: it is stopping this replica or has gone away.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                run_exit_functions(&model);
                return Ok(ExitCode::SUCCESS);
            }
            Err(err) => return Err(err),
        }
        let header = protocol::decode_header(header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if buffer.len() < header.payload_len {
            buffer.resize(header.payload_len, 0);
        }
        let payload = &mut buffer[..header.payload_len];
        reader.read_exact(payload)?;
        let request: &[u8] = match Kind::from_u8(header.kind) {
            Some(Kind::Predict) => payload,
            // The proxy wrote the request there before it sent this frame, and writes again only
            // once this request is answered.
            Some(Kind::PredictInPlace) => match (protocol::decode_in_place(payload), &region) {
                (Ok(len), Some(region)) if len > 0 && len <= region.len => region.request(len),
                _ => {
                    let err = ModelError {
                        kind: protocol::ModelErrorKind::BadRequest,
                        exception: "ValueError".into(),
                        message: "in-place request frame does not fit the region".into(),
                    };
                    write_json_frame(&writer, Kind::ResultErr, &err)?;
                    continue;
                }
            },
            Some(Kind::Ping) => {
                writer.send(Kind::Pong, &[])?;
                continue;
            }
            Some(Kind::Lend) => {
                lend = true;
                continue;
            }
            Some(Kind::Taken) => {
                lent = None;
                continue;
            }
            // Unknown frames are skipped so newer proxies can add messages.
            _ => continue,
        };
        match model.predict(request) {
            Ok(response) => {
                // A large answer is lent when none is: the proxy copies it out of this process's
                // memory, and it stays here, unchanged, until the proxy has.
                let lending = lend && lent.is_none() && response.len() >= protocol::LEND_MIN;
                let frame;
                let (kind, payload): (Kind, &[u8]) = if lending {
                    frame = protocol::encode_lent(response.as_ptr() as u64, response.len());
                    (Kind::ResultLent, &frame)
                } else {
                    (Kind::ResultOk, &response)
                };
                // Held while the next request can start at once: the proxy wrote the requests
                // waiting for this replica together, and reads their answers together.
                if outbox::starts_with_whole_frame(reader.buffer()) {
                    writer.hold(kind, payload)?
                } else {
                    writer.send(kind, payload)?
                }
                if lending {
                    lent = Some(response);
                }
            }
            Err(err) if err.kind == protocol::ModelErrorKind::OutOfMemory => {
                write_json_frame(&writer, Kind::ResultErr, &err)?;
                // The interpreter's state is suspect and the proxy replaces this process:
                // requests it already sent behind this one must not run here (they go to
                // the replacement), so read past the rest until the proxy hangs up or stops
                // it. No atexit functions either.
                writer.flush()?;
                read_past_requests(&mut reader, &mut lent, &stop)?;
                return Ok(ExitCode::FAILURE);
            }
            Err(err) => write_json_frame(&writer, Kind::ResultErr, &err)?,
        }
    }
    // Stopped by SIGTERM: the answers held go out, and a lent one stays until the proxy has
    // copied it.
    writer.flush()?;
    read_past_requests(&mut reader, &mut lent, &stop)?;
    run_exit_functions(&model);
    Ok(ExitCode::SUCCESS)
}

/// Reads past what the proxy sends, starting no request, until it hangs up or, once stopped,
/// until no answer is lent: a `Taken` gives that back (if none comes, the proxy's SIGKILL after
/// its grace period ends the wait).
fn read_past_requests(
    reader: &mut BufReader<UnixStream>,
    lent: &mut Option<Vec<u8>>,
    stop: &Stop,
) -> io::Result<()> {
    loop {
        if stop.requested() && lent.is_none() {
            return Ok(());
        }
        // Stopped with an answer lent, the read below blocks until the proxy says more.
        if reader.buffer().is_empty() && !stop.requested() && wait_readable(reader.get_ref(), stop)?
        {
            continue;
        }
        let mut header = [0u8; protocol::HEADER_LEN];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        }
        let header = protocol::decode_header(header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        io::copy(
            &mut (&mut *reader).take(header.payload_len as u64),
            &mut io::sink(),
        )?;
        if Kind::from_u8(header.kind) == Some(Kind::Taken) {
            *lent = None;
        }
    }
}

/// The longest the model's `atexit` functions may run as the process ends.
const EXIT_FUNCTIONS_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the model's `atexit` functions, as a Python program's end does, within
/// [`EXIT_FUNCTIONS_LIMIT`]: one that waits on something that never comes (multiprocessing's
/// joins a child that never ends) must not keep a replica alive after a proxy that is gone, and
/// nobody else would end it then.
fn run_exit_functions(model: &python::Model) {
    std::thread::spawn(|| {
        std::thread::sleep(EXIT_FUNCTIONS_LIMIT);
        eprintln!(
            "replica-runtime: the model's atexit functions ran over {EXIT_FUNCTIONS_LIMIT:?}; ending the process"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(std::process::id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    model.run_exit_handlers();
}

/// SIGTERM, the proxy's way of stopping a replica (it sends SIGKILL after a grace period). Left to
/// the default action it would kill the process in the middle of a request, and the model's
/// `atexit` functions would not run. Caught, it is noticed between requests: the one under way is
/// answered, and the process exits as it does when the proxy hangs up.
///
/// The proxy sends SIGTERM to the replica alone, not to its process group: the processes the model
/// started keep working for the request under way, and what is left of them is killed once the
/// replica has ended.
///
/// A process the model forks inherits the handler, and the wake-up socket with it. So processes
/// forked through Python (`os.fork`, multiprocessing) get SIGTERM's default action back as they
/// start ([`python::Model::reset_sigterm_in_forked_children`]), and `terminate()` still ends them.
/// A byte on the wake-up socket from one forked otherwise (by a C library, say) is not taken for a
/// stop: only this process's own flag is.
struct Stop {
    requested: Arc<AtomicBool>,
    /// Readable once SIGTERM has come: wakes [`wait_readable`].
    wake: UnixStream,
}

impl Stop {
    fn install(model: &python::Model) -> io::Result<Stop> {
        use signal_hook::consts::SIGTERM;
        // First, so no process forked from here on keeps the handler.
        model
            .reset_sigterm_in_forked_children()
            .map_err(io::Error::other)?;
        let requested = Arc::new(AtomicBool::new(false));
        // Registered before the wake-up, so the flag is set by the time the socket is readable.
        signal_hook::flag::register(SIGTERM, requested.clone())?;
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(SIGTERM, notify)?;
        Ok(Stop { requested, wake })
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Empties the wake-up socket of bytes that did not come with this process's own SIGTERM.
    fn forget_wakes(&self) {
        let mut scrap = [0u8; 64];
        while matches!((&self.wake).read(&mut scrap), Ok(n) if n > 0) {}
    }
}

/// Blocks until the socket has data (or the proxy hung up), or SIGTERM came (true). A read
/// blocked in `recv` is also woken each time the proxy reads an answer and frees buffer space
/// (Linux wakes a Unix socket's one wait queue for both directions), which costs two context
/// switches per request on the core the proxy shares; `poll` for input only is woken by input
/// only.
fn wait_readable(stream: &UnixStream, stop: &Stop) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [
        PollFd::new(stream.as_fd(), PollFlags::POLLIN),
        PollFd::new(stop.wake.as_fd(), PollFlags::POLLIN),
    ];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if stop.requested() => return Ok(true),
            Ok(_) => {
                if fds[1].any().unwrap_or(false) {
                    stop.forget_wakes();
                    // The stop may have come between the check and the emptying.
                    if stop.requested() {
                        return Ok(true);
                    }
                }
                if fds[0].any().unwrap_or(false) {
                    return Ok(false);
                }
            }
            Err(nix::errno::Errno::EINTR) if stop.requested() => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

/// The size of a transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// The in-place region: `len` bytes from `start` in an anonymous private mapping.
///
/// Transparent huge pages are asked for there: the proxy's write into it pins each page it
/// writes. In a trial on the machine of `docs/PERFORMANCE.md`, 2 MiB pages halved that write
/// for 5 MB, and they took 0.4–0.8 ms off a 5 MB request through modelgate. The region starts
/// at a 2 MiB boundary (the mapping is 2 MiB longer, as not every kernel aligns large mappings)
/// and is a whole number of huge pages, so less than 2 MiB of it stays resident beyond the
/// largest request written there.
struct Region {
    map: memmap2::MmapMut,
    start: usize,
    len: usize,
}

impl Region {
    /// A region of at least `len` bytes; none when `len` is 0 or it cannot be mapped (the proxy
    /// then sends every request over the socket).
    fn map(len: usize) -> Option<Region> {
        if len == 0 {
            return None;
        }
        let len = len.checked_next_multiple_of(HUGE_PAGE)?;
        let map = match memmap2::MmapMut::map_anon(len.checked_add(HUGE_PAGE)?) {
            Ok(map) => map,
            Err(err) => {
                eprintln!("replica-runtime: no in-place region of {len} bytes: {err}");
                return None;
            }
        };
        let addr = map.as_ptr() as usize;
        let start = addr.next_multiple_of(HUGE_PAGE) - addr;
        // Only a hint: without huge pages (disabled, or none free) it works the same.
        let _ = map.advise_range(memmap2::Advice::HugePage, start, len);
        Some(Region { map, start, len })
    }

    fn announce(&self) -> protocol::InPlace {
        protocol::InPlace {
            addr: (self.map.as_ptr() as usize + self.start) as u64,
            len: self.len as u64,
        }
    }

    fn request(&self, len: usize) -> &[u8] {
        &self.map[self.start..self.start + len]
    }
}

fn write_json_frame<T: serde::Serialize>(w: &Outbox, kind: Kind, value: &T) -> io::Result<()> {
    let payload = serde_json::to_vec(value).expect("protocol types serialise");
    w.send(kind, &payload)
}
