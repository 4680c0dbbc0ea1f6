//! `modelgate`: runs the server (`modelgate serve`) and is the command-line client of its API.
#![forbid(unsafe_code)]

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use modelgate::config::{Config, Overrides};

/// Exit status for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "modelgate",
    version,
    about = "Serve Python model functions over HTTP"
)]
struct Cli {
    /// Base URL of a running modelgate, for the client commands.
    #[arg(
        long,
        global = true,
        env = "MODELGATE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and its replicas. Without --config, serves the bundled examples
    /// (paths relative to the working directory).
    Serve {
        /// TOML configuration file (see config/modelgate.example.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address; overrides server.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (store, builds, dependency cache); overrides server.data_dir.
        /// Default ./data.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Check the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// Give the oldest active admin a new API key, written to DATA_DIR/admin-api-key (0600), for
    /// when the admin's key is lost or expired. Works on the data directory directly; a running
    /// modelgate picks the key up within seconds.
    RecoverAdmin {
        /// Configuration whose server.data_dir to use.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory; overrides the configuration's. Default ./data.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Projects: directories of model code.
    #[command(subcommand)]
    Projects(cli::Projects),
    /// Models of a project.
    #[command(subcommand)]
    Models(cli::Models),
    /// Builds of a model.
    #[command(subcommand)]
    Builds(cli::Builds),
    /// Deployments of a model.
    #[command(subcommand)]
    Deployments(cli::Deployments),
    /// Replicas of a model's running deployment.
    #[command(subcommand)]
    Replicas(cli::Replicas),
    /// Users and their site roles.
    #[command(subcommand)]
    Users(cli::Users),
    /// API keys: for the API and for models with authentication enabled.
    #[command(subcommand)]
    Keys(cli::Keys),
    /// Collaborators of a project and their roles.
    #[command(subcommand)]
    Collaborators(cli::Collaborators),
    /// The audit trail (site admins).
    Audit {
        /// Show records after this id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Site settings: API key expiry.
    #[command(subcommand)]
    Settings(cli::Settings),
    /// Store an API key (read from standard input) for the other commands.
    Login,
    /// Call a model. Sends your API key too, for models with authentication enabled.
    Predict {
        /// The model's access key (prefer the environment variable: arguments land in history).
        #[arg(long, env = "MODELGATE_ACCESS_KEY", hide_env_values = true)]
        access_key: String,
        /// The request object, as JSON.
        #[arg(long)]
        data: String,
    },
}

/// Set in the environment of the restarted `modelgate serve`, so it never restarts twice.
const RESTARTED: &str = "MODELGATE_MALLOC_SET";

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MODELGATE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let target = cli::Target {
        url: cli.url,
        json: cli.json,
        api_key: cli::api_key(),
    };
    let client = |fut: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>>>>| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        match rt.block_on(fut) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("modelgate: {msg}");
                ExitCode::FAILURE
            }
        }
    };
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            check,
        } => {
            if !check {
                // Its allocator settings (`glibc::PROXY`), which replicas inherit.
                modelgate_protocol::glibc::restart_with(
                    "modelgate",
                    &modelgate_protocol::glibc::PROXY,
                    RESTARTED,
                );
            }
            serve(config, listen, data_dir, check)
        }
        Command::RecoverAdmin { config, data_dir } => recover_admin(config, data_dir),
        Command::Projects(c) => client(Box::pin(cli::projects(&target, c))),
        Command::Models(c) => client(Box::pin(cli::models(&target, c))),
        Command::Builds(c) => client(Box::pin(cli::builds(&target, c))),
        Command::Deployments(c) => client(Box::pin(cli::deployments(&target, c))),
        Command::Replicas(c) => client(Box::pin(cli::replicas(&target, c))),
        Command::Users(c) => client(Box::pin(cli::users(&target, c))),
        Command::Keys(c) => client(Box::pin(cli::keys(&target, c))),
        Command::Collaborators(c) => client(Box::pin(cli::collaborators(&target, c))),
        Command::Audit { after, limit } => client(Box::pin(cli::audit(&target, after, limit))),
        Command::Settings(c) => client(Box::pin(cli::settings(&target, c))),
        Command::Login => client(Box::pin(cli::login(&target))),
        Command::Predict { access_key, data } => {
            client(Box::pin(cli::predict(&target, &access_key, &data)))
        }
    }
}

fn serve(
    config_path: Option<PathBuf>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    check: bool,
) -> ExitCode {
    let overrides = Overrides {
        listen,
        data_dir,
        env: std::env::vars().collect(),
    };
    let config = match &config_path {
        Some(path) => Config::from_file(path, &overrides),
        None => Config::embedded(Path::new("."), &overrides),
    };
    let config = match config {
        Ok(c) => c,
        Err(err) => {
            eprintln!("modelgate: {err}");
            if config_path.is_none() {
                eprintln!("modelgate: without --config, run from the repository root so ./examples is found");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match replica_runtime_path(&config) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("modelgate: {msg}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => match modelgate::server::tls_acceptor(cert, key) {
            Ok(acceptor) => Some(acceptor),
            Err(err) => {
                eprintln!("modelgate: {err:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        _ => None,
    };
    if check {
        println!("configuration ok: {} model(s)", config.models.len());
        return ExitCode::SUCCESS;
    }
    // Secrets meant for this process must not reach replicas or builds, which inherit its
    // environment. Still single-threaded here, so changing the environment is sound.
    let admin_key = std::env::var("MODELGATE_ADMIN_API_KEY").ok();
    for name in ["MODELGATE_ADMIN_API_KEY", "MODELGATE_API_KEY"] {
        std::env::remove_var(name);
    }
    // `remove_var` cannot wipe the environment block the kernel shows in /proc/<pid>/environ.
    // A non-dumpable process's /proc files belong to root, so replicas and builds (same user,
    // not root) cannot read it, nor attach to this process.
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("could not make the process non-dumpable: {err}");
    }

    // One worker per CPU this process may run on (its affinity mask, so a pinned server does not
    // bounce requests between workers that share one core), unless configured. One worker runs
    // tokio's current-thread scheduler: it runs woken tasks in order, where the multi-thread one
    // runs the task just woken first, so the connections woken by one `epoll_wait` all queue their
    // requests before the replica's dispatcher takes a batch (about twice the batch at c=16 on one
    // CPU; throughput 0.99-1.21x in four runs of alternating rounds; docs/PERFORMANCE.md).
    let workers = config.server.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    }
    .enable_all()
    .build()
    .expect("tokio runtime");
    rt.block_on(async move {
        tracing::info!(
            workers,
            "runtime: {}",
            if workers == 1 {
                "current-thread"
            } else {
                "multi-thread"
            }
        );
        let metrics = match modelgate::metrics::install() {
            Ok(h) => h,
            Err(err) => {
                eprintln!("modelgate: metrics: {err}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(&config.server.listen).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!(
                    "modelgate: cannot listen on {}: {err}",
                    config.server.listen
                );
                return ExitCode::FAILURE;
            }
        };
        let run = modelgate::run(
            config,
            listener,
            runtime,
            metrics,
            admin_key,
            tls,
            shutdown_signal(),
        );
        match run.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("modelgate: {err:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn recover_admin(config_path: Option<PathBuf>, data_dir: Option<PathBuf>) -> ExitCode {
    let data_dir = match (data_dir, &config_path) {
        (Some(d), _) => d,
        (None, Some(path)) => match Config::from_file(path, &Overrides::default()) {
            Ok(c) => c.server.data_dir(),
            Err(err) => {
                eprintln!("modelgate: {err}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        (None, None) => PathBuf::from("data"),
    };
    let db = data_dir.join("modelgate.db");
    if !db.is_file() {
        eprintln!("modelgate: no store at {}", db.display());
        return ExitCode::FAILURE;
    }
    let result = modelgate_control::store::SqliteStore::open(&db)
        .map_err(anyhow::Error::from)
        .and_then(|store| modelgate::auth::recover_admin(&store, &data_dir));
    match result {
        Ok(path) => {
            println!("a new API key of the admin is in {}", path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("modelgate: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn replica_runtime_path(config: &Config) -> Result<PathBuf, String> {
    let path = match &config.server.replica_runtime {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot locate own executable: {e}"))?
            .with_file_name("replica-runtime"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "replica runtime not found at {} (build it with `cargo build -p replica-runtime`, or set server.replica_runtime)",
            path.display()
        ))
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
