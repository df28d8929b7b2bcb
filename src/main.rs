//! The `corral` command: parses the command line, loads the config and runs.

use clap::{Args, Parser, Subcommand};
use corral::config::prefix::Server;
use corral::config::{self, Config, Count, Policy, Workers};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

// Every request allocates and frees a few small buffers on one thread: mimalloc's
// per-thread pages make that several times cheaper than glibc's malloc (about 15 %
// of corral's instructions under load with glibc, by callgrind).
#[global_allocator]
static ALLOCATOR: Mimalloc = Mimalloc;

/// mimalloc, asked for a plain block whenever the alignment wanted is one every
/// block has. The `mimalloc` crate always calls the aligned entry points, whose
/// slow path over-allocates: 4 of a proxied request's 18 allocations took it, at
/// about 350 instructions each.
struct Mimalloc;

/// Every block mimalloc hands out is aligned to a word at least.
const PLAIN_ALIGN: usize = std::mem::size_of::<usize>();

// SAFETY: each call is mimalloc's own for that purpose; a block is freed by
// `mi_free` whichever entry point made it.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        match layout.align() <= PLAIN_ALIGN {
            true => mi_malloc(layout.size()).cast(),
            false => mi_malloc_aligned(layout.size(), layout.align()).cast(),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        match layout.align() <= PLAIN_ALIGN {
            true => mi_zalloc(layout.size()).cast(),
            false => mi_zalloc_aligned(layout.size(), layout.align()).cast(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        match layout.align() <= PLAIN_ALIGN {
            true => mi_realloc(ptr.cast(), size).cast(),
            false => mi_realloc_aligned(ptr.cast(), size, layout.align()).cast(),
        }
    }
}

/// `corral --version`: the version and the commit it was built from.
const VERSION: &str = corral::run::upgrade::VERSION;

#[derive(Parser)]
#[command(
    name = "corral",
    version = VERSION,
    about = "One port in front of many Socket.IO workers"
)]
struct Cli {
    /// corral's own config file, for `corral gunicorn|uvicorn|hypercorn …` (the
    /// server's command line sets the workers and the listeners over it).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Validate a config file and print the effective configuration.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Make a running corral read its config file again and apply it without
    /// dropping a connection, then replace its workers one at a time (SIGHUP).
    /// A file with an error is refused, naming the key; nothing changes then.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
        /// Keep the workers (SIGUSR2): scale them to a new count, and replace them
        /// only if their command, environment or directory changed.
        #[arg(long)]
        keep_workers: bool,
    },
    /// Set the number of workers of a running corral.
    Scale {
        #[command(flatten)]
        admin: AdminArgs,
        /// The new number of workers.
        count: usize,
    },
    /// Print a running corral's workers as JSON.
    Status(AdminArgs),
    /// Replace a running corral by a new binary in the same process, carrying its
    /// listeners and workers over (none restarted, no connection refused). The
    /// binary is first run as a probe with the running corral's arguments: one
    /// that cannot take over, or a config it refuses, changes nothing.
    Upgrade {
        #[command(flatten)]
        admin: AdminArgs,
        /// The new binary (default: the file the running corral was started from,
        /// so that replacing that file and running `corral upgrade` deploys it).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Asked of a new binary by `corral upgrade`: reads the running corral's
    /// arguments as a start would and answers with the hand-over format it speaks.
    #[command(hide = true)]
    UpgradeProbe {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (corral.1 and one per subcommand) into a directory.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Run gunicorn's own command line behind corral: `-w N` becomes N workers of
    /// one each on loopback ports, `-b` corral's listeners, `--certfile/--keyfile`
    /// corral's TLS; every other argument goes to each gunicorn unchanged.
    Gunicorn(ServerLine),
    /// Run uvicorn's own command line behind corral (`--workers`, `--host`/`--port`,
    /// `--ssl-certfile`/`--ssl-keyfile` taken over; `--uds` refused).
    Uvicorn(ServerLine),
    /// Run hypercorn's own command line behind corral (as gunicorn's).
    Hypercorn(ServerLine),
    /// Run only the embedded message queue (a Redis-protocol pub/sub broker).
    Mq {
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6379", value_parser = config::parse_addr)]
        listen: SocketAddr,
        /// Clients must AUTH with this password (required beyond loopback).
        #[arg(long)]
        password: Option<String>,
        /// Disconnect a subscriber whose unsent backlog passes this, e.g. 32M.
        #[arg(long, value_parser = config::parse_size)]
        output_limit: Option<u64>,
    },
}

/// A server's arguments after `corral gunicorn` (or uvicorn, hypercorn).
#[derive(Args)]
struct ServerLine {
    /// The server's arguments, as you would give them to it.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

#[derive(Args)]
struct AdminArgs {
    /// The running corral's config file (to find its admin socket).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The admin socket path, instead of a config file.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The running corral's listen address, when it runs without a config file.
    #[arg(long, value_name = "ADDR", value_parser = config::parse_addr)]
    listen: Option<SocketAddr>,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Config file (TOML). Flags given as well override it.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable).
    #[arg(long, value_name = "ADDR", value_parser = config::parse_addr)]
    listen: Vec<SocketAddr>,
    /// Worker address (repeatable).
    #[arg(long = "upstream", value_name = "ADDR", value_parser = config::parse_addr)]
    upstreams: Vec<SocketAddr>,
    /// Balancing policy for new Engine.IO sessions.
    #[arg(long, value_parser = parse_policy)]
    policy: Option<Policy>,
    /// Largest request body, e.g. 200M.
    #[arg(long, value_parser = config::parse_size)]
    max_body: Option<u64>,
    /// Number of workers to start from the command after `--` (a number or "auto").
    #[arg(short = 'w', long = "workers", value_parser = parse_count)]
    workers: Option<Count>,
    /// The worker command, after `--`; `{port}` and `{id}` are filled in per worker.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_count(s: &str) -> Result<Count, config::BadValue> {
    if s == "auto" {
        return Ok(Count::Auto);
    }
    s.parse()
        .map(Count::Fixed)
        .map_err(|_| config::BadValue::new("expected a number or \"auto\"".into()))
}

fn parse_policy(s: &str) -> Result<Policy, config::BadValue> {
    match s {
        "least-connections" => Ok(Policy::LeastConnections),
        "round-robin" => Ok(Policy::RoundRobin),
        "ip-hash" => Ok(Policy::IpHash),
        _ => Err(config::BadValue::new(
            "expected least-connections, round-robin or ip-hash".into(),
        )),
    }
}

fn main() -> ExitCode {
    // First, before any thread: an upgrade's hand-over, if this image is one.
    let handover = match corral::handover::take_from_env() {
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => {
            eprintln!("corral: upgrade: {e}");
            return ExitCode::from(2);
        }
        None => None,
    };
    let cli = Cli::parse();
    match cli.command {
        Command::UpgradeProbe { args } => probe(args),
        Command::Upgrade { admin: a, binary } => upgrade(a, binary),
        Command::Check { config } => match checked(&config) {
            Ok((c, warnings)) => {
                for w in warnings {
                    eprintln!("corral: warning: {w}");
                }
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("corral: {e}");
                ExitCode::from(2)
            }
        },
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "corral", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match std::fs::create_dir_all(&dir).and_then(|_| clap_mangen::generate_to(cmd, &dir)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("corral: cannot write man pages to {}: {e}", dir.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Reload {
            admin: a,
            keep_workers,
        } => admin(
            a,
            match keep_workers {
                true => "reload --keep-workers".into(),
                false => "reload".into(),
            },
        ),
        Command::Scale { admin: a, count } => admin(a, format!("scale {count}")),
        Command::Status(a) => admin(a, "status".into()),
        Command::Mq {
            listen,
            password,
            output_limit,
        } => run_broker(listen, password, output_limit),
        Command::Gunicorn(l) => run_prefixed(cli.config, Server::Gunicorn, l.args, handover),
        Command::Uvicorn(l) => run_prefixed(cli.config, Server::Uvicorn, l.args, handover),
        Command::Hypercorn(l) => run_prefixed(cli.config, Server::Hypercorn, l.args, handover),
        Command::Run(args) => {
            let config = match told(build_config(&args)) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // A reload reads the file again with the same flags over it.
            let reread: Option<corral::run::reload::Reread> = args.config.is_some().then(|| {
                let args = args.clone();
                std::sync::Arc::new(move || {
                    let (cfg, _) = build_config(&args)?;
                    let file = args.config.as_ref().map(|p| p.display().to_string());
                    Ok((cfg, file.unwrap_or_default()))
                }) as corral::run::reload::Reread
            });
            run_until_done(corral::run::run(config, reread, handover))
        }
    }
}

/// `corral upgrade-probe ARGS…`: ARGS are a running corral's own; its config is
/// built and checked as that command's start would, and the answer names the
/// hand-over format (`corral upgrade` refuses a binary that answers otherwise).
fn probe(args: Vec<std::ffi::OsString>) -> ExitCode {
    let mut line = vec![std::ffi::OsString::from("corral")];
    line.extend(args);
    let cli = match Cli::try_parse_from(line) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("corral: upgrade-probe: {e}");
            return ExitCode::from(2);
        }
    };
    let built = match cli.command {
        Command::Run(args) => build_config(&args),
        Command::Gunicorn(l) => prefixed_line(cli.config, Server::Gunicorn, l.args)(),
        Command::Uvicorn(l) => prefixed_line(cli.config, Server::Uvicorn, l.args)(),
        Command::Hypercorn(l) => prefixed_line(cli.config, Server::Hypercorn, l.args)(),
        _ => {
            eprintln!("corral: upgrade-probe: not the command line of a running corral");
            return ExitCode::from(2);
        }
    };
    match told(built) {
        Ok(_) => {
            println!("{}", corral::handover::probe_answer(VERSION));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `corral upgrade`: asks the running corral to upgrade itself, then waits until
/// the new image is ready.
fn upgrade(args: AdminArgs, binary: Option<PathBuf>) -> ExitCode {
    let binary = binary.map(|b| std::path::absolute(&b).unwrap_or(b));
    let path = match admin_path(&args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let Some(runtime) = small_runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let told = |reply: &str| serde_json::from_str::<serde_json::Value>(reply).ok();
        let ask = |command: String| {
            let path = path.clone();
            async move { corral::admin::send(&path, &command, Duration::from_secs(60)).await }
        };
        let before = match ask("addresses".into()).await {
            Ok(reply) => told(&reply).map(|v| v["image"]["started_ms"].clone()),
            Err(e) => {
                eprintln!("corral: {e}");
                return ExitCode::FAILURE;
            }
        };
        let command = match &binary {
            Some(b) => format!("upgrade {}", b.display()),
            None => "upgrade".into(),
        };
        match ask(command).await {
            Ok(reply) if reply.starts_with("ok") => print!("{reply}"),
            Ok(reply) => {
                eprint!("corral: {reply}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("corral: {e}");
                return ExitCode::FAILURE;
            }
        }
        // The new image answers once it has taken everything over and is ready.
        let deadline = std::time::Instant::now() + UPGRADE_LIMIT;
        while std::time::Instant::now() < deadline {
            let now = ask("addresses".into()).await.ok().and_then(|r| told(&r));
            if let Some(now) = now.filter(|n| n["ready"] == true) {
                if Some(&now["image"]["started_ms"]) != before.as_ref() {
                    let image = &now["image"];
                    println!(
                        "upgraded: pid {} runs {} ({})",
                        image["pid"],
                        image["exe"].as_str().unwrap_or("?"),
                        image["version"].as_str().unwrap_or("?")
                    );
                    return ExitCode::SUCCESS;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("corral: the new image was not ready within {UPGRADE_LIMIT:?}");
        ExitCode::FAILURE
    })
}

/// How long `corral upgrade` waits for the new image: the drain period and a
/// worker's readiness probe fit in it.
const UPGRADE_LIMIT: Duration = Duration::from_secs(300);

/// A built config with its warnings said, or its error said and the exit status.
fn told(built: Result<(Config, Vec<String>), config::ConfigError>) -> Result<Config, ExitCode> {
    match built {
        Ok((cfg, warnings)) => {
            for w in warnings {
                eprintln!("corral: warning: {w}");
            }
            Ok(cfg)
        }
        Err(e) => {
            eprintln!("corral: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// `corral gunicorn …` and the like: the server's command line over corral's own
/// file (if given), run as `corral run` would, and read the same way on a reload.
fn run_prefixed(
    file: Option<PathBuf>,
    server: Server,
    args: Vec<String>,
    handover: Option<corral::handover::Handover>,
) -> ExitCode {
    let build = prefixed_line(file, server, args);
    let config = match told(build()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let reread: corral::run::reload::Reread = std::sync::Arc::new(move || {
        let (cfg, _) = build()?;
        Ok((cfg, "the command line".into()))
    });
    run_until_done(corral::run::run(config, Some(reread), handover))
}

/// How the prefix mode's config is built (and built again on a reload).
fn prefixed_line(
    file: Option<PathBuf>,
    server: Server,
    args: Vec<String>,
) -> impl Fn() -> Result<(Config, Vec<String>), config::ConfigError> + Send + Sync + 'static {
    let mut line = vec![server.name().to_string()];
    line.extend(args);
    let control_socket = server == Server::Gunicorn && knows_no_control_socket(&line[0]);
    move || prefixed_config(file.as_deref(), server, &line, control_socket)
}

fn prefixed_config(
    file: Option<&std::path::Path>,
    server: Server,
    line: &[String],
    control_socket: bool,
) -> Result<(Config, Vec<String>), config::ConfigError> {
    let (mut cfg, source) = match file {
        Some(path) => (Config::load_part(path)?, path.display().to_string()),
        None => (Config::default(), "the command line".to_string()),
    };
    let env_workers = std::env::var("WEB_CONCURRENCY").ok();
    let taken = config::prefix::take(server, line, env_workers.as_deref(), control_socket)
        .map_err(|message| config::ConfigError::Key {
            file: format!("`corral {}`", line.join(" ")),
            key: server.name().into(),
            message,
        })?;
    let mut warnings = taken.apply(&mut cfg);
    cfg.validate(&source)?;
    warnings.extend(corral::run::preflight::check(&cfg, &source)?);
    Ok((cfg, warnings))
}

/// Whether this gunicorn takes `--no-control-socket` (gunicorn 23 and later, whose
/// masters would otherwise all use one control socket path).
fn knows_no_control_socket(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--no-control-socket"))
}

/// A config file read, validated and checked against the machine, as `run` would;
/// a file with no workers in it as the part of a config it is (the prefix mode's).
fn checked(path: &std::path::Path) -> Result<(Config, Vec<String>), config::ConfigError> {
    let cfg = Config::load_part(path)?;
    let file = path.display().to_string();
    cfg.validate_part(&file)?;
    let mut warnings = Vec::new();
    if cfg.is_part() {
        warnings.push(format!(
            "{file} has no upstreams and no [workers]: checked as a part of a config, \
             for the prefix mode (`corral -c {file} gunicorn …`), which gives the workers"
        ));
    }
    warnings.extend(corral::run::preflight::check(&cfg, &file)?);
    Ok((cfg, warnings))
}

/// The config `run` uses: the file (if any), the flags over it, validated and
/// checked against the machine; with the warnings for the operator.
fn build_config(args: &RunArgs) -> Result<(Config, Vec<String>), config::ConfigError> {
    let (mut cfg, source) = match &args.config {
        Some(path) => (Config::load_part(path)?, path.display().to_string()),
        None => (Config::default(), "command line".to_string()),
    };
    if !args.listen.is_empty() {
        cfg.listen = args.listen.clone();
    }
    if !args.upstreams.is_empty() {
        cfg.upstreams = args.upstreams.clone();
    }
    if let Some(p) = args.policy {
        cfg.balance.policy = p;
    }
    if let Some(n) = args.max_body {
        cfg.limits.max_body = n;
    }
    if !args.command.is_empty() {
        let count = args.workers.unwrap_or(Count::Fixed(1));
        cfg.workers = Some(Workers::from_args(args.command.clone(), count));
    } else if let Some(count) = args.workers {
        match cfg.workers.as_mut() {
            Some(w) => w.count = count,
            None => {
                return Err(config::ConfigError::Key {
                    file: source,
                    key: "workers".into(),
                    message: "-w needs a worker command after `--` or a [workers] section".into(),
                })
            }
        }
    }
    if let Some(w) = cfg.workers.as_mut() {
        if let Some(quiet) =
            config::prefix::without_control_socket(&w.command, knows_no_control_socket)
        {
            w.command = quiet;
        }
    }
    cfg.validate(&source)?;
    let warnings = corral::run::preflight::check(&cfg, &source)?;
    Ok((cfg, warnings))
}

fn run_broker(listen: SocketAddr, password: Option<String>, output_limit: Option<u64>) -> ExitCode {
    let mut mq = config::MessageQueue {
        embedded: Some(true),
        listen,
        password,
        ..Default::default()
    };
    if let Some(hard) = output_limit {
        mq.output_limit_hard = hard;
        mq.output_limit_soft = mq.output_limit_soft.min(hard);
    }
    if !listen.ip().is_loopback() && mq.password.as_deref().unwrap_or("").is_empty() {
        eprintln!("corral: --password is required when the message queue listens beyond loopback");
        return ExitCode::from(2);
    }
    run_until_done(async move {
        let owner = corral::Life::new();
        let settings = corral::broker::Settings::from_config(&mq);
        let (_broker, addr) = corral::broker::start(mq.listen, settings, &owner).await?;
        tracing::info!(%addr, "message queue listening");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        owner.stop(std::time::Duration::from_secs(5)).await;
        anyhow::Ok(())
    })
}

/// Logging on, then `task` on the multi-threaded runtime; its error is printed and
/// becomes the exit code.
/// The runtime runs on a thread of its own: the main thread forks the workers and
/// makes an upgrade's exec (`corral::on_main_thread`).
fn run_until_done(
    task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> ExitCode {
    init_logging();
    let work = move || {
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("corral: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(task) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("corral: {e:#}");
                ExitCode::FAILURE
            }
        }
    };
    corral::on_main_thread(work).unwrap_or_else(|e| {
        eprintln!("corral: {e}");
        ExitCode::FAILURE
    })
}

/// The admin socket an operator command means.
fn admin_path(args: &AdminArgs) -> Result<PathBuf, ExitCode> {
    Ok(match (&args.socket, &args.config, args.listen) {
        (Some(p), _, _) => p.clone(),
        (None, Some(file), _) => match Config::load_part(file)
            .and_then(|c| c.validate_part(&file.display().to_string()).map(|_| c))
        {
            Ok(c) => corral::admin::path_for(&c),
            Err(e) => {
                eprintln!("corral: {e}");
                return Err(ExitCode::from(2));
            }
        },
        (None, None, Some(addr)) => corral::admin::default_path(addr.port()),
        (None, None, None) => corral::admin::default_path(8000),
    })
}

/// A runtime on this thread, for a command's conversation with a running corral.
fn small_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("corral: {e}");
            None
        }
    }
}

/// Sends one admin command to a running corral and prints its answer.
fn admin(args: AdminArgs, command: String) -> ExitCode {
    let path = match admin_path(&args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let Some(runtime) = small_runtime() else {
        return ExitCode::FAILURE;
    };
    // A rolling restart waits for every worker to start and drain.
    let wait = std::time::Duration::from_secs(3600);
    match runtime.block_on(corral::admin::send(&path, &command, wait)) {
        Ok(reply) => {
            if reply.starts_with("error") {
                eprint!("corral: {reply}");
                ExitCode::FAILURE
            } else {
                print!("{reply}");
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("corral: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORRAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
