//! A worker server's own command line, read as corral's config: `corral gunicorn
//! -w 5 -b 0.0.0.0:5000 'app:create_app()'` runs five gunicorns of one worker each,
//! each on a loopback port of its own, behind a corral listening on 0.0.0.0:5000.
//! The same for uvicorn and hypercorn. Also the rule `corral run` applies to a
//! worker command: one that asks its server for several workers is refused, since
//! Engine.IO sessions would be spread among them inside one corral worker.
//!
//! It reads argument lists and writes config values; it starts nothing. Which
//! options it takes over is written here once per server: the worker count, the
//! binds and the certificate; every other argument passes through unchanged.

use super::{parse_addr, Count, Listener, TlsSetting, WorkerCommand, Workers};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The servers whose command line corral can take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// gunicorn (`-w`, `-b`, `--certfile`/`--keyfile`).
    Gunicorn,
    /// uvicorn (`--workers`, `--host`/`--port`, `--ssl-certfile`/`--ssl-keyfile`).
    Uvicorn,
    /// hypercorn (as gunicorn).
    Hypercorn,
}

impl Server {
    /// The server a program name (or path) is, if one of these.
    pub fn of(program: &str) -> Option<Server> {
        let name = program.rsplit('/').next().unwrap_or(program);
        match name {
            "gunicorn" => Some(Server::Gunicorn),
            "uvicorn" => Some(Server::Uvicorn),
            "hypercorn" => Some(Server::Hypercorn),
            _ => None,
        }
    }

    /// Its program name.
    pub fn name(self) -> &'static str {
        match self {
            Server::Gunicorn => "gunicorn",
            Server::Uvicorn => "uvicorn",
            Server::Hypercorn => "hypercorn",
        }
    }

    /// The options that set the worker count.
    fn workers_options(self) -> &'static [&'static str] {
        match self {
            Server::Uvicorn => &["--workers"],
            _ => &["-w", "--workers"],
        }
    }
}

/// What corral takes from a server's command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Taken {
    /// How many workers (`-w`, else `WEB_CONCURRENCY`, else 1).
    pub count: usize,
    /// Where corral listens (the server's binds, or its default).
    pub listen: Vec<SocketAddr>,
    /// `listen` is the server's default: the command line named no address.
    pub defaulted: bool,
    /// The certificate and key the server was given, for corral's TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// One worker's command: the server's own arguments with one worker bound to
    /// `127.0.0.1:{port}`.
    pub command: Vec<String>,
}

impl Taken {
    /// The `[workers]` table and the listeners this makes, over corral's own file
    /// (`cfg`). The rule for listeners: every address the file names and every one
    /// the command line binds is served, once; an address both name is one
    /// listener with the file's settings (its TLS, its redirect); the command
    /// line's others are plain, or TLS with its certificate. With no bind on the
    /// command line and listeners in the file, the file's alone are served (not
    /// the server's default as well). Returns what the operator should know of it.
    pub fn apply(&self, cfg: &mut super::Config) -> Vec<String> {
        let tls = self.tls.as_ref().map(|(cert, key)| TlsSetting::Files {
            cert: cert.clone(),
            key: key.clone(),
        });
        let mut notes = Vec::new();
        let in_file = !cfg.listen.is_empty() || !cfg.listener.is_empty();
        if !(self.defaulted && in_file) {
            for a in &self.listen {
                if cfg.listener.iter().any(|l| l.address == *a) {
                    notes.push(format!(
                        "{a} is both a [[listener]] of the file and a bind of the command \
                         line: one listener, with the file's settings"
                    ));
                    continue;
                }
                match &tls {
                    Some(_) => {
                        cfg.listen.retain(|x| x != a);
                        cfg.listener.push(Listener {
                            address: *a,
                            tls: tls.clone(),
                            redirect_https: false,
                        });
                    }
                    None if cfg.listen.contains(a) => {}
                    None => cfg.listen.push(*a),
                }
            }
            if in_file {
                notes.push(format!(
                    "listening on the file's listeners and on the command line's binds ({})",
                    self.listen
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let mut workers = Workers::from_args(self.command.clone(), Count::Fixed(self.count));
        if let Some(old) = &cfg.workers {
            // A [workers] table in corral's own file keeps its other settings.
            workers = Workers {
                command: workers.command,
                count: workers.count,
                ..old.clone()
            };
        }
        cfg.workers = Some(workers);
        notes
    }
}

/// A `[workers]` command that runs gunicorn (its first word, or the word after a
/// shell's `exec`), with `--no-control-socket` put after the program when `knows`
/// says that gunicorn takes it and the command does not say it already: every
/// one-worker gunicorn master would otherwise announce the same control socket in
/// the user's home. None: nothing to add.
pub fn without_control_socket(
    cmd: &WorkerCommand,
    knows: impl Fn(&str) -> bool,
) -> Option<WorkerCommand> {
    const OPTION: &str = "--no-control-socket";
    let words = cmd.words();
    let at = usize::from(words.first() == Some(&"exec"));
    let program = *words.get(at)?;
    if Server::of(program) != Some(Server::Gunicorn) || words.contains(&OPTION) || !knows(program) {
        return None;
    }
    Some(match cmd {
        WorkerCommand::Args(args) => {
            let mut args = args.clone();
            args.insert(at + 1, OPTION.into());
            WorkerCommand::Args(args)
        }
        WorkerCommand::Shell(line) => {
            let start = line.find(program)? + program.len();
            WorkerCommand::Shell(format!("{} {OPTION}{}", &line[..start], &line[start..]))
        }
    })
}

/// Reads `args` (the server's program first) as that server would, taking what
/// corral does itself. `env_workers` is `WEB_CONCURRENCY`; `control_socket` says
/// the gunicorn there knows `--no-control-socket` (gunicorn 23 and later: each
/// master would otherwise use the same control socket path).
pub fn take(
    server: Server,
    args: &[String],
    env_workers: Option<&str>,
    control_socket: bool,
) -> Result<Taken, String> {
    let Some((program, rest)) = args.split_first() else {
        return Err(format!(
            "give the {} command line after `{}`",
            server.name(),
            server.name()
        ));
    };
    let mut count = None;
    let mut binds: Vec<String> = Vec::new();
    let (mut host, mut port): (Option<String>, Option<String>) = (None, None);
    let (mut cert, mut key) = (None, None);
    let mut kept = vec![program.clone()];
    let mut i = 0;
    while i < rest.len() {
        let arg = &rest[i];
        let Some((option, value, used)) =
            option_value(server, arg, rest.get(i + 1).map(String::as_str))
        else {
            if matches!(server, Server::Uvicorn) && option_in(arg, "--uds").is_some() {
                return Err("--uds: corral listens on TCP; give --host and --port".into());
            }
            if matches!(server, Server::Uvicorn) && (arg == "--fd" || arg.starts_with("--fd=")) {
                return Err("--fd: corral binds the port itself; give --host and --port".into());
            }
            kept.push(arg.clone());
            i += 1;
            continue;
        };
        let Some(value) = value else {
            return Err(format!("{option} needs a value"));
        };
        match option {
            "-w" | "--workers" => {
                let n = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or_else(|| format!("{option} {value}: a worker count from 1 to 1024"))?;
                count = Some(n);
            }
            "-b" | "--bind" => binds.push(value),
            "--host" => host = Some(value),
            "--port" => port = Some(value),
            "--certfile" | "--ssl-certfile" => cert = Some(PathBuf::from(value)),
            "--keyfile" | "--ssl-keyfile" => key = Some(PathBuf::from(value)),
            _ => unreachable!("option_value returns only the options above"),
        }
        i += used;
    }
    let count = match (count, env_workers) {
        (Some(n), _) => n,
        (None, Some(v)) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| format!("WEB_CONCURRENCY={v}: a worker count from 1 to 1024"))?,
        (None, None) => 1,
    };
    let defaulted = match server {
        Server::Uvicorn => host.is_none() && port.is_none(),
        _ => binds.is_empty(),
    };
    let listen = match server {
        Server::Uvicorn => vec![uvicorn_listen(host.as_deref(), port.as_deref())?],
        _ if binds.is_empty() => vec![SocketAddr::from(([127, 0, 0, 1], 8000))],
        _ => binds
            .iter()
            .map(|b| bind_address(b))
            .collect::<Result<_, _>>()?,
    };
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err("give both the certificate and the key file, or neither".into()),
    };
    match server {
        Server::Gunicorn => {
            kept.extend(["-w", "1", "-b", "127.0.0.1:{port}"].map(String::from));
            if control_socket {
                kept.push("--no-control-socket".into());
            }
        }
        Server::Hypercorn => kept.extend(["-w", "1", "-b", "127.0.0.1:{port}"].map(String::from)),
        Server::Uvicorn => {
            kept.extend(["--host", "127.0.0.1", "--port", "{port}"].map(String::from))
        }
    }
    Ok(Taken {
        count,
        listen,
        defaulted,
        tls,
        command: kept,
    })
}

/// The option `arg` is, if corral takes it over, with its value (inline, or the
/// next argument) and how many arguments it used.
fn option_value<'a>(
    server: Server,
    arg: &'a str,
    next: Option<&str>,
) -> Option<(&'a str, Option<String>, usize)> {
    let taken: &[&str] = match server {
        Server::Gunicorn | Server::Hypercorn => {
            &["-w", "--workers", "-b", "--bind", "--certfile", "--keyfile"]
        }
        Server::Uvicorn => &[
            "--workers",
            "--host",
            "--port",
            "--ssl-certfile",
            "--ssl-keyfile",
        ],
    };
    taken
        .iter()
        .find_map(|option| match option_in(arg, option)? {
            None => Some((*option, next.map(String::from), 2)),
            Some(v) => Some((*option, Some(v.to_string()), 1)),
        })
}

/// Whether `arg` is the command-line option `option`: `Some(None)` when it is the
/// option alone (its value comes next), `Some(Some(value))` with the value attached
/// (`--bind=…`, and for a short option `-b…`).
pub fn option_in<'a>(arg: &'a str, option: &str) -> Option<Option<&'a str>> {
    if arg == option {
        return Some(None);
    }
    if let Some(v) = arg.strip_prefix(option).and_then(|v| v.strip_prefix('=')) {
        return Some(Some(v));
    }
    let short = option.len() == 2 && !option.starts_with("--");
    if short && arg.len() > 2 && arg.starts_with(option) && !arg.starts_with("--") {
        return Some(Some(&arg[2..]));
    }
    None
}

/// A gunicorn or hypercorn bind as an address corral can listen on.
fn bind_address(bind: &str) -> Result<SocketAddr, String> {
    if bind.starts_with("unix:") || bind.starts_with("fd://") {
        return Err(format!(
            "-b {bind}: corral listens on TCP only; bind a host and port (e.g. -b 0.0.0.0:8000)"
        ));
    }
    let (host, port) = match bind.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => (h, p),
        // No port (`-b 0.0.0.0`): gunicorn's default.
        _ => (bind, "8000"),
    };
    address(host, port).map_err(|e| format!("-b {bind}: {e}"))
}

fn uvicorn_listen(host: Option<&str>, port: Option<&str>) -> Result<SocketAddr, String> {
    address(host.unwrap_or("127.0.0.1"), port.unwrap_or("8000"))
        .map_err(|e| format!("--host/--port: {e}"))
}

/// `host` and `port` as an address; `localhost` (and an empty host) mean
/// 127.0.0.1, as the servers read them.
fn address(host: &str, port: &str) -> Result<SocketAddr, String> {
    let host = match host {
        "" | "localhost" => "127.0.0.1",
        h => h,
    };
    let text = match host.contains(':') && !host.starts_with('[') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    };
    parse_addr(&text).map_err(|e| e.to_string())
}

/// A worker command that asks its server for several workers, with the count:
/// `gunicorn -w 4`, `uvicorn --workers 4`, `hypercorn -w 4`, or gunicorn's
/// `WEB_CONCURRENCY` in the workers' environment.
pub fn several_workers(
    command: &WorkerCommand,
    env: &std::collections::BTreeMap<String, String>,
) -> Option<(Server, usize)> {
    let words = command.words();
    // The server may come after a wrapper (`exec`, `env X=1`, a venv path).
    let at = words.iter().position(|w| Server::of(w).is_some())?;
    let server = Server::of(words[at])?;
    let rest = &words[at + 1..];
    let mut count = None;
    for (i, arg) in rest.iter().enumerate() {
        if let Some((option, Some(value), _)) = option_value(server, arg, rest.get(i + 1).copied())
        {
            if server.workers_options().contains(&option) {
                count = value.parse::<usize>().ok();
            }
        }
    }
    let count = count.or_else(|| match server {
        Server::Uvicorn => None,
        _ => env.get("WEB_CONCURRENCY")?.trim().parse().ok(),
    })?;
    (count > 1).then_some((server, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_are_found_alone_with_equals_or_short_and_attached() {
        assert_eq!(option_in("-b", "-b"), Some(None));
        assert_eq!(
            option_in("-b0.0.0.0:5000", "-b"),
            Some(Some("0.0.0.0:5000"))
        );
        assert_eq!(option_in("--bind=h:1", "--bind"), Some(Some("h:1")));
        assert_eq!(option_in("--bind", "--bind"), Some(None));
        assert_eq!(option_in("--binder", "--bind"), None);
        assert_eq!(option_in("--bind", "-b"), None);
        assert_eq!(option_in("-w4", "-w"), Some(Some("4")));
    }

    #[test]
    fn the_seed_gunicorn_line_becomes_five_workers_behind_its_bind() {
        let t = take(
            Server::Gunicorn,
            &words("gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker -w 5 --threads 100 -b 0.0.0.0:5000 app:create_app()"),
            None,
            true,
        )
        .expect("taken");
        assert_eq!(t.count, 5);
        assert_eq!(t.listen, vec!["0.0.0.0:5000".parse().expect("addr")]);
        assert_eq!(
            t.command.join(" "),
            "gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker --threads 100 \
             app:create_app() -w 1 -b 127.0.0.1:{port} --no-control-socket"
        );
    }

    #[test]
    fn every_spelling_of_the_options_is_taken() {
        let t = take(
            Server::Gunicorn,
            &words("gunicorn --workers=3 -b127.0.0.1:7000 --bind [::1]:7001 --certfile c.pem --keyfile=k.pem a:b"),
            None,
            false,
        )
        .expect("taken");
        assert_eq!(t.count, 3);
        assert_eq!(t.listen.len(), 2);
        assert_eq!(t.tls, Some(("c.pem".into(), "k.pem".into())));
        assert_eq!(t.command.join(" "), "gunicorn a:b -w 1 -b 127.0.0.1:{port}");
        let t = take(Server::Gunicorn, &words("gunicorn -w4 a:b"), None, false).expect("taken");
        assert_eq!(t.count, 4);
        assert_eq!(t.listen, vec!["127.0.0.1:8000".parse().expect("addr")]);
    }

    #[test]
    fn web_concurrency_counts_when_no_option_does() {
        let t = take(Server::Gunicorn, &words("gunicorn a:b"), Some("3"), false).expect("taken");
        assert_eq!(t.count, 3);
        let t = take(
            Server::Gunicorn,
            &words("gunicorn -w 2 a:b"),
            Some("3"),
            false,
        )
        .expect("t");
        assert_eq!(t.count, 2);
    }

    #[test]
    fn uvicorn_and_hypercorn_lines() {
        let t = take(
            Server::Uvicorn,
            &words("uvicorn --workers 4 --host 0.0.0.0 --port 9000 --app-dir x asgi:app"),
            None,
            false,
        )
        .expect("taken");
        assert_eq!((t.count, t.listen[0].port()), (4, 9000));
        assert_eq!(
            t.command.join(" "),
            "uvicorn --app-dir x asgi:app --host 127.0.0.1 --port {port}"
        );
        assert!(take(
            Server::Uvicorn,
            &words("uvicorn --uds /tmp/s a:b"),
            None,
            false
        )
        .is_err());
        let t = take(
            Server::Hypercorn,
            &words("hypercorn -w 2 -b 0.0.0.0:8000 a:b"),
            None,
            false,
        )
        .expect("taken");
        assert_eq!(
            t.command.join(" "),
            "hypercorn a:b -w 1 -b 127.0.0.1:{port}"
        );
    }

    #[test]
    fn unix_binds_and_half_a_certificate_are_refused() {
        for line in [
            "gunicorn -b unix:/tmp/g.sock a:b",
            "gunicorn --certfile c.pem a:b",
            "gunicorn -w 0 a:b",
            "gunicorn -w",
        ] {
            assert!(
                take(Server::Gunicorn, &words(line), None, false).is_err(),
                "{line}"
            );
        }
    }

    #[test]
    fn commands_asking_for_several_workers_are_found() {
        let env = Default::default();
        let shell = |s: &str| WorkerCommand::Shell(s.into());
        assert_eq!(
            several_workers(&shell("gunicorn -w 4 -b 127.0.0.1:{port} a:b"), &env),
            Some((Server::Gunicorn, 4))
        );
        assert_eq!(
            several_workers(
                &shell("/venv/bin/uvicorn --workers=2 --port {port} a:b"),
                &env
            ),
            Some((Server::Uvicorn, 2))
        );
        assert_eq!(several_workers(&shell("gunicorn -w 1 a:b"), &env), None);
        assert_eq!(several_workers(&shell("node server.js -w 4"), &env), None);
        let env = [("WEB_CONCURRENCY".to_string(), "3".to_string())].into();
        assert_eq!(
            several_workers(&shell("gunicorn a:b"), &env),
            Some((Server::Gunicorn, 3))
        );
    }
}

#[cfg(test)]
mod control_socket_tests {
    use super::*;

    #[test]
    fn a_gunicorn_worker_command_gets_no_control_socket_once() {
        let yes = |_: &str| true;
        let shell = WorkerCommand::Shell("gunicorn -w 1 -b 127.0.0.1:{port} 'app:app'".into());
        assert_eq!(
            without_control_socket(&shell, yes),
            Some(WorkerCommand::Shell(
                "gunicorn --no-control-socket -w 1 -b 127.0.0.1:{port} 'app:app'".into()
            ))
        );
        let exec = WorkerCommand::Args(vec![
            "exec".into(),
            "/venv/bin/gunicorn".into(),
            "a:b".into(),
        ]);
        assert_eq!(
            without_control_socket(&exec, yes),
            Some(WorkerCommand::Args(vec![
                "exec".into(),
                "/venv/bin/gunicorn".into(),
                "--no-control-socket".into(),
                "a:b".into()
            ]))
        );
        let said = WorkerCommand::Shell("gunicorn --no-control-socket a:b".into());
        assert_eq!(without_control_socket(&said, yes), None);
        assert_eq!(
            without_control_socket(&shell, |_| false),
            None,
            "an older gunicorn"
        );
        let other = WorkerCommand::Shell("uvicorn --port {port} a:b".into());
        assert_eq!(without_control_socket(&other, yes), None);
    }
}

#[cfg(test)]
mod listener_rule_tests {
    use super::*;
    use crate::config::Config;

    fn taken(line: &str) -> Taken {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        take(Server::Gunicorn, &args, None, false).expect("taken")
    }

    fn tls_listener(addr: &str) -> Listener {
        Listener {
            address: addr.parse().expect("addr"),
            tls: Some(TlsSetting::Mode("self-signed".into())),
            redirect_https: false,
        }
    }

    /// The file's TLS listener and `-b` on the same address are one listener, with
    /// the file's TLS; said once.
    #[test]
    fn the_same_address_in_the_file_and_on_the_command_line_is_one_listener() {
        let mut cfg = Config {
            listener: vec![tls_listener("127.0.0.1:18080")],
            ..Config::default()
        };
        let notes = taken("gunicorn -w 2 -b 127.0.0.1:18080 a:b").apply(&mut cfg);
        assert_eq!(cfg.listeners().len(), 1, "{:?}", cfg.listeners());
        assert!(cfg.listener[0].tls.is_some());
        assert!(cfg.listen.is_empty());
        assert!(
            notes.iter().any(|n| n.contains("one listener")),
            "{notes:?}"
        );
    }

    /// Another address on the command line is served beside the file's listener,
    /// plain, and the operator is told; with no bind at all, the file's alone.
    #[test]
    fn other_binds_are_served_beside_the_files_listeners_and_said() {
        let mut cfg = Config {
            listener: vec![tls_listener("127.0.0.1:18443")],
            ..Config::default()
        };
        let notes = taken("gunicorn -b 127.0.0.1:18080 a:b").apply(&mut cfg);
        assert_eq!(cfg.listen, vec!["127.0.0.1:18080".parse().expect("addr")]);
        assert_eq!(cfg.listener.len(), 1);
        assert!(
            notes.iter().any(|n| n.contains("127.0.0.1:18080")),
            "{notes:?}"
        );

        let mut cfg = Config {
            listener: vec![tls_listener("127.0.0.1:18443")],
            ..Config::default()
        };
        let notes = taken("gunicorn -w 2 a:b").apply(&mut cfg);
        assert!(
            cfg.listen.is_empty(),
            "no default 8000 beside the file's listener"
        );
        assert_eq!(cfg.listeners().len(), 1);
        assert!(notes.is_empty(), "{notes:?}");
    }
}
