//! Preflight: what a configuration needs from the machine before corral can run it
//! (the files and directories it names readable, the worker program findable, the
//! worker command telling each worker its port and asking its server for one
//! worker). `corral check`, `corral run` and a
//! reload ask the same questions here, so a file `check` passes does not fail at
//! start for one of these reasons.
//!
//! It reads; it binds nothing, starts nothing and keeps nothing. What the file
//! alone can tell (types, ranges, combinations) is `config`'s.

use crate::config::{prefix, Config, ConfigError, TlsSetting, WorkerCommand};
use crate::edge::{auth::BasicAuth, tls};
use std::path::{Path, PathBuf};

/// Something that will probably not work as meant, but might (said, not refused).
pub type Warning = String;

/// Checks `cfg` (read from `file`) against the machine; the warnings are for the
/// operator to read.
pub fn check(cfg: &Config, file: &str) -> Result<Vec<Warning>, ConfigError> {
    let bad = |key: &str, message: String| ConfigError::Key {
        file: file.into(),
        key: key.into(),
        message,
    };
    if let Some(a) = &cfg.auth {
        BasicAuth::new(&a.htpasswd, &a.realm, Vec::new())
            .map_err(|e| bad("auth.htpasswd", e.to_string()))?;
    }
    if let Some(h) = cfg.admin.as_ref().and_then(|a| a.htpasswd.as_ref()) {
        BasicAuth::new(h, "corral admin", Vec::new())
            .map_err(|e| bad("admin.htpasswd", e.to_string()))?;
    }
    for (i, l) in cfg.listener.iter().enumerate() {
        if let Some(TlsSetting::Files { cert, key }) = &l.tls {
            tls::load(cert, key).map_err(|e| bad(&format!("listener[{i}].tls"), e.to_string()))?;
        }
    }
    if cfg.cluster.key_file.is_some() {
        cfg.cluster
            .signing_key()
            .map_err(|e| bad("cluster.key_file", e.to_string()))?;
    }
    if cfg.access_log.enabled && cfg.access_log.path != "-" {
        let path = Path::new(&cfg.access_log.path);
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(bad(
                "access_log.path",
                format!("directory {} does not exist", dir.display()),
            ));
        }
    }
    let mut warnings = Vec::new();
    if let Some(w) = &cfg.workers {
        if let Some((server, n)) = prefix::several_workers(&w.command, &w.env) {
            return Err(bad(
                "workers.command",
                format!(
                    "asks {name} for {n} workers: each corral worker would be {n} processes \
                     behind one port, and Engine.IO sessions would thrash among them \
                     (\"Invalid session\"). Give the command one worker (-w 1, or no \
                     --workers) and set [workers] count = {n}; or run `corral {name} …` \
                     with the command line as it is",
                    name = server.name()
                ),
            ));
        }
        let cwd = w.cwd.clone();
        if let Some(dir) = &cwd {
            if !dir.is_dir() {
                return Err(bad(
                    "workers.cwd",
                    format!("directory {} does not exist", dir.display()),
                ));
            }
        }
        if let WorkerCommand::Args(args) = &w.command {
            if let Some(program) = args.first() {
                find_program(program, cwd.as_deref(), &w.env)
                    .map_err(|message| bad("workers.command", message))?;
            }
        }
        if let Some(w) = port_problem(&w.command).map_err(|m| bad("workers.command", m))? {
            warnings.push(format!("{file}: key `workers.command`: {w}"));
        }
    }
    Ok(warnings)
}

/// A command that names no `{port}`: an error when it binds a port of its own
/// (every worker would try the same one, and corral would probe another), else a
/// warning (the worker gets its port in `$PORT` only, which gunicorn and many Node
/// apps read, and others do not).
fn port_problem(command: &WorkerCommand) -> Result<Option<Warning>, String> {
    let words = command.words();
    if words
        .iter()
        .any(|w| w.contains("{port}") || w.contains("PORT"))
    {
        return Ok(None);
    }
    // gunicorn's and hypercorn's -b/--bind (also as -b127.0.0.1:5000), uvicorn's --port.
    let binds = |w: &&str| {
        ["--bind", "--port", "-b"]
            .iter()
            .any(|o| prefix::option_in(w, o).is_some())
    };
    if let Some(bind) = words.iter().find(|w| binds(w)) {
        return Err(format!(
            "has no {{port}} but binds with `{bind}`: each worker must listen on the port corral \
             gives it; write {{port}} where the port goes (e.g. -b 127.0.0.1:{{port}})"
        ));
    }
    Ok(Some(
        "has no {port}: each worker learns its port only from $PORT (gunicorn and many Node \
         apps read it); if yours does not, write {port} where the port goes"
            .into(),
    ))
}

/// Whether `program` can be started: a path (relative to the workers' directory)
/// that exists, or a name found on `PATH` (the workers' own `PATH` if they get one).
fn find_program(
    program: &str,
    cwd: Option<&Path>,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = match (Path::new(program).is_relative(), cwd) {
            (true, Some(dir)) => dir.join(program),
            _ => PathBuf::from(program),
        };
        return match runnable(&path) {
            true => Ok(()),
            false if path.exists() => Err(format!("`{}` is not executable", path.display())),
            false => Err(format!("`{}` does not exist", path.display())),
        };
    }
    let path = env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    match std::env::split_paths(&path).any(|dir| runnable(&dir.join(program))) {
        true => Ok(()),
        false => Err(format!("`{program}` is not found on PATH ({path})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> WorkerCommand {
        WorkerCommand::Args(a.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_fixed_bind_without_port_is_refused() {
        for cmd in [
            args(&["gunicorn", "-b", "127.0.0.1:5000", "app:app"]),
            args(&["gunicorn", "--bind=0.0.0.0:5000", "app:app"]),
            args(&["uvicorn", "--port", "8000", "app:app"]),
            WorkerCommand::Shell("gunicorn -w 1 -b 127.0.0.1:5000 app:app".into()),
        ] {
            assert!(port_problem(&cmd).is_err(), "{cmd:?}");
        }
    }

    #[test]
    fn port_placeholders_and_port_variables_pass() {
        assert_eq!(
            port_problem(&args(&["gunicorn", "-b", "127.0.0.1:{port}", "a:b"])),
            Ok(None)
        );
        assert_eq!(
            port_problem(&WorkerCommand::Shell("node server.js --port $PORT".into())),
            Ok(None)
        );
    }

    #[test]
    fn a_command_that_may_read_port_itself_is_a_warning() {
        assert!(matches!(
            port_problem(&args(&["node", "server.js"])),
            Ok(Some(_))
        ));
    }

    #[test]
    fn programs_are_looked_up_as_the_worker_would_start_them() {
        let env = Default::default();
        assert!(find_program("sh", None, &env).is_ok());
        assert!(find_program("/bin/sh", None, &env).is_ok());
        assert!(find_program("no-such-program-here", None, &env).is_err());
        assert!(find_program("./missing.py", Some(Path::new("/")), &env).is_err());
    }
}
