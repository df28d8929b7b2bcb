//! What ships around the binary: `--version` naming the commit, shell completions
//! and man pages, the health endpoints for load balancers and orchestrators, and
//! systemd's readiness protocol (a datagram socket in the test stands in for
//! systemd).

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};
use support::{exchange, Corral, Mode, RawWorker, TempDir};

fn corral() -> Command {
    Command::new(env!("CARGO_BIN_EXE_corral"))
}

#[test]
fn version_names_the_commit() {
    let out = corral().arg("--version").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.starts_with(&format!("corral {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(!text.contains("commit )"), "{text}");
}

#[test]
fn completions_and_man_pages() {
    for (shell, marker) in [
        ("bash", "_corral()"),
        ("zsh", "#compdef corral"),
        ("fish", "complete -c corral"),
    ] {
        let out = corral().args(["completions", shell]).output().expect("run");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(text.contains("reload"), "{shell} lists the subcommands");
    }
    let dir = TempDir::new("man");
    let out = corral().arg("man").arg(&dir.0).output().expect("run");
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(dir.0.join("corral.1")).expect("corral.1");
    assert!(page.contains(".TH corral"), "{page}");
    assert!(dir.0.join("corral-run.1").exists());
}

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("answer");
    (r.status, r.text())
}

/// `/healthz` says corral is alive, `/readyz` whether a worker is ready, with the
/// counts; both without the admin listener's credentials.
#[test]
fn health_endpoints() {
    let dir = TempDir::new("adminauth");
    let htpasswd = support::htpasswd(&dir, "ops", "secret");
    let worker = RawWorker::start(Mode::Echo);
    let up = Corral::start(&format!(
        "upstreams = [\"{}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"{}\"\n",
        worker.addr,
        htpasswd.display()
    ));
    let admin_addr = up.status.expect("status listener");
    assert_eq!(get(admin_addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(
        get(admin_addr, "/readyz"),
        (200, "ready: 1 of 1 workers ready\n".into())
    );
    assert_eq!(get(admin_addr, "/status.json").0, 401);
    // A supervised worker that never listens: alive, not ready.
    let down = Corral::start_until(
        "[workers]\ncommand = [\"sleep\", \"30\"]\ncount = 1\nstart_timeout = \"20s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        "worker started",
        |_| {},
    );
    let admin2_addr = down.status.expect("status listener");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && std::net::TcpStream::connect(admin2_addr).is_err() {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(admin2_addr, "/healthz").0, 200);
    assert_eq!(
        get(admin2_addr, "/readyz"),
        (503, "not ready: 0 of 1 workers ready\n".into())
    );
}

/// Under systemd (`Type=notify`): READY=1 once the worker is ready, RELOADING=1
/// then READY=1 around a rolling restart (SIGHUP), STOPPING=1 at SIGTERM.
#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let dir = TempDir::new("notify");
    let path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the stand-in for systemd");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut corral = Corral::start_with(
        "[workers]\ncommand = [\"python3\", \"-m\", \"http.server\", \"--bind\", \"127.0.0.1\", \"{port}\"]\ncount = 1\n",
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &path);
        },
    );
    let next = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains("STATUS=1 of 1 workers ready"), "{ready}");
    // SAFETY: a plain signal to the corral this test started.
    unsafe {
        libc::kill(corral.child.id() as i32, libc::SIGHUP);
    }
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    let again = next();
    assert!(
        again.starts_with("READY=1"),
        "{again}: {}",
        corral.log_text()
    );
    corral.terminate();
    let stopping = next();
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    assert!(corral.wait_exit(Duration::from_secs(20)).is_some());
}
