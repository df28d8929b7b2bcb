//! The `corral` command: parses the command line, loads the config and runs.

use clap::{Args, Parser, Subcommand};
use corral::config::{self, Config, Policy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "One port in front of many Socket.IO workers"
)]
struct Cli {
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
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML). Flags given as well override it.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Worker address (repeatable).
    #[arg(long = "upstream", value_name = "ADDR")]
    upstreams: Vec<SocketAddr>,
    /// Balancing policy for new Engine.IO sessions.
    #[arg(long, value_parser = parse_policy)]
    policy: Option<Policy>,
    /// Largest request body, e.g. 200M.
    #[arg(long, value_parser = config::parse_size)]
    max_body: Option<u64>,
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    match s {
        "least-connections" => Ok(Policy::LeastConnections),
        "round-robin" => Ok(Policy::RoundRobin),
        "ip-hash" => Ok(Policy::IpHash),
        _ => Err("expected least-connections, round-robin or ip-hash".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("corral: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run(args) => {
            let config = match build_config(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("corral: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("corral: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(corral::server::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("corral: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn build_config(args: RunArgs) -> Result<Config, config::ConfigError> {
    let (mut cfg, source) = match &args.config {
        Some(path) => (Config::load(path)?, path.display().to_string()),
        None => (Config::default(), "command line".to_string()),
    };
    if !args.listen.is_empty() {
        cfg.listen = args.listen;
    }
    if !args.upstreams.is_empty() {
        cfg.upstreams = args.upstreams;
    }
    if let Some(p) = args.policy {
        cfg.balance.policy = p;
    }
    if let Some(n) = args.max_body {
        cfg.limits.max_body = n;
    }
    cfg.validate(&source)?;
    Ok(cfg)
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
