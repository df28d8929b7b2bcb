//! The `corral` command line: `check` prints the effective config or names the file
//! and key that is wrong, and exits non-zero.

use std::process::Command;

mod support;

fn corral() -> Command {
    Command::new(env!("CARGO_BIN_EXE_corral"))
}

/// A config file in a temporary directory of its own (one per file: the tests run
/// in parallel), both removed when dropped.
struct Temp {
    path: std::path::PathBuf,
    _dir: support::TempDir,
}

impl std::ops::Deref for Temp {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

/// `corral check -c path`, run.
fn check(path: &std::path::Path) -> std::process::Output {
    corral()
        .args(["check", "-c"])
        .arg(path)
        .output()
        .expect("run")
}

fn write(name: &str, text: &str) -> Temp {
    let dir = support::TempDir::new("cli");
    Temp {
        path: dir.file(name, text),
        _dir: dir,
    }
}

#[test]
fn check_prints_effective_config() {
    let path = write(
        "good.toml",
        "upstreams = [\"127.0.0.1:5000\"]\n[limits]\nmax_body = \"200M\"\n",
    );
    let out = check(&path);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_body = 209715200"), "{text}");
    assert!(text.contains("policy = \"least-connections\""), "{text}");
    assert!(text.contains("path = \"/socket.io/\""), "{text}");
}

#[test]
fn check_names_file_and_key() {
    for (name, text, key) in [
        (
            "unknown.toml",
            "upstreams = [\"127.0.0.1:1\"]\nlisten_on = 1\n",
            "listen_on",
        ),
        (
            "badtype.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[timeouts]\nconnect = true\n",
            "timeouts.connect",
        ),
        (
            "badpath.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[engineio]\npath = \"socket.io\"\n",
            "engineio.path",
        ),
        ("syntax.toml", "upstreams = [\n", "syntax.toml"),
        (
            "shortkey.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[cluster]\nkey = \"short\"\n",
            "cluster.key",
        ),
        (
            "nokey.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[engineio]\ntag_sids = true\n[cluster]\nnode = \"a\"\nnodes = { b = \"10.0.0.2:8000\" }\n",
            "cluster.key",
        ),
        (
            "notags.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[cluster]\nnode = \"a\"\nkey = \"0123456789abcdef\"\nnodes = { b = \"10.0.0.2:8000\" }\n",
            "engineio.tag_sids",
        ),
        (
            "badnode.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[engineio]\ntag_sids = true\n[cluster]\nnode = \"a\"\nkey = \"0123456789abcdef\"\nnodes = { b = \"no-port\" }\n",
            "cluster.nodes.b",
        ),
        (
            "selfnode.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[engineio]\ntag_sids = true\n[cluster]\nnode = \"a\"\nkey = \"0123456789abcdef\"\nnodes = { a = \"h:1\" }\n",
            "cluster.nodes",
        ),
    ] {
        let path = write(name, text);
        let out = check(&path);
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{name}: {err}");
        assert!(err.contains(key), "{name}: {err}");
    }
}

#[test]
fn missing_file_is_named() {
    let out = corral()
        .args(["check", "-c", "/nonexistent/corral.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/corral.toml"));
}

#[test]
fn run_without_upstreams_explains() {
    let out = corral().args(["run"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstreams"));
}

/// `check` refuses what `run` would fail on at start, naming the file and key:
/// files and directories that are not there, a worker program not to be found, a
/// worker command that binds a fixed port, an ambiguous size.
#[test]
fn check_asks_the_machine_what_run_needs() {
    let w = "[workers]\ncount = 2\ncommand";
    for (name, text, key, says) in [
        (
            "nohtpasswd.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[auth]\nhtpasswd = \"missing.htpasswd\"\n",
            "auth.htpasswd",
            "missing.htpasswd",
        ),
        (
            "noadminhtpasswd.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"gone\"\n",
            "admin.htpasswd",
            "gone",
        ),
        (
            "nocert.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = { cert = \"no.pem\", key = \"no.key\" }\n",
            "listener[0].tls",
            "no.pem",
        ),
        (
            "nocwd.toml",
            &format!("{w} = \"gunicorn -b 127.0.0.1:{{port}} app:app\"\ncwd = \"no-such-dir\"\n"),
            "workers.cwd",
            "no-such-dir",
        ),
        (
            "noprogram.toml",
            &format!("{w} = [\"gunicron\", \"-b\", \"127.0.0.1:{{port}}\", \"app:app\"]\n"),
            "workers.command",
            "gunicron",
        ),
        (
            "fixedport.toml",
            &format!("{w} = \"gunicorn -w 1 -b 127.0.0.1:5000 app:app\"\n"),
            "workers.command",
            "{port}",
        ),
        (
            "megabytes.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[limits]\nmax_body = \"200MB\"\n",
            "limits.max_body",
            "200M",
        ),
    ] {
        let path = write(name, text);
        let out = check(&path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        for part in [name, key, says] {
            assert!(err.contains(part), "{name}: no `{part}` in: {err}");
        }
        // `run` refuses the same file the same way, before binding anything.
        let run = corral()
            .args(["run", "-c"])
            .arg(&*path)
            .output()
            .expect("run");
        assert_eq!(run.status.code(), Some(2), "{name}: {run:?}");
        assert!(String::from_utf8_lossy(&run.stderr).contains(key), "{name}: {run:?}");
    }
}

/// A command with no `{port}` that may read `$PORT` itself (a Node app) is
/// accepted with a warning that says what to do if it does not.
#[test]
fn check_warns_of_a_command_without_port() {
    let path = write(
        "portless.toml",
        "[workers]\ncommand = [\"sh\", \"server.sh\"]\n",
    );
    let out = check(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning") && err.contains("{port}"), "{err}");
}

/// Errors a newcomer hit, each saying what to do: a TLS table typo names the
/// accepted forms, an unknown key gets the nearest known one, a port out of range
/// and a host name are explained, on the command line as in a file.
#[test]
fn errors_say_what_to_write_instead() {
    for (name, text, says) in [
        (
            "tlstypo.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = { crt = \"a.pem\", key = \"b.pem\" }\n",
            "\"self-signed\" or { cert",
        ),
        (
            "typo.toml",
            "upstreams = [\"127.0.0.1:1\"]\n[timeouts]\nconect = \"5s\"\n",
            "did you mean `connect`?",
        ),
        (
            "bigport.toml",
            "listen = [\"127.0.0.1:99999\"]\nupstreams = [\"127.0.0.1:1\"]\n",
            "port 99999 is out of range",
        ),
        (
            "hostname.toml",
            "upstreams = [\"localhost:5000\"]\n",
            "host names are not accepted",
        ),
    ] {
        let path = write(name, text);
        let out = check(&path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(says), "{name}: no `{says}` in: {err}");
        assert!(!err.contains("untagged"), "{name}: {err}");
    }
    let out = corral()
        .args([
            "run",
            "--listen",
            "localhost:9443",
            "--upstream",
            "127.0.0.1:1",
        ])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("127.0.0.1:9443") && err.contains("host names"),
        "{err}"
    );
}

/// A file for the prefix mode (TLS and limits, no workers): `check` validates it as
/// the part of a config it is and says so; a bad key in it is still named.
#[test]
fn check_takes_a_prefix_mode_file_as_a_part() {
    let path = write(
        "part.toml",
        "[[listener]]\naddress = \"127.0.0.1:18443\"\ntls = \"self-signed\"\n[limits]\nmax_body = \"200M\"\n",
    );
    let out = check(&path);
    assert!(out.status.success(), "{out:?}");
    let told = String::from_utf8_lossy(&out.stderr);
    assert!(told.contains("part of a config"), "{told}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_body = 209715200"));
    let bad = write("bad.toml", "[limits]\nmax_body = \"lots\"\n");
    let out = check(&bad);
    assert!(!out.status.success());
    let told = String::from_utf8_lossy(&out.stderr);
    assert!(
        told.contains("bad.toml") && told.contains("limits.max_body"),
        "{told}"
    );
}

/// A corral started from a config file named relative to where it runs (its admin
/// socket relative too) links its admin socket by that file, and takes the link
/// away when it stops.
#[test]
fn the_admin_link_by_config_file_goes_when_corral_stops() {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let worker = support::RawWorker::start(support::Mode::Echo);
    let config = write(
        "corral.toml",
        &format!(
            "listen = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\nadmin_socket = \"admin.sock\"\n",
            worker.addr
        ),
    );
    let dir = config.parent().expect("dir").to_path_buf();
    let mut child = corral()
        .args(["run", "-c", "corral.toml"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let canonical = std::fs::canonicalize(&*config).expect("canonical");
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let link = std::env::temp_dir().join(format!("corral-file-{hex}.sock"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while support::addresses(&dir.join("admin.sock")).is_none() {
        assert!(std::time::Instant::now() < deadline, "corral did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        link.symlink_metadata().is_ok(),
        "no link at {}",
        link.display()
    );
    // SAFETY: a plain signal to the corral this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().expect("exit").success());
    assert!(link.symlink_metadata().is_err(), "the link stayed");
}
