//! Lifetimes at their edges, over real sockets: a request in flight when SIGTERM
//! arrives, websocket tunnels at shutdown, and the connection cap with tunnels.
//!
//! corral runs as its own process in front of an in-process raw worker
//! (`support::RawWorker`) that can delay its answers or speak websocket.

mod support;

use futures_util::{SinkExt, StreamExt};
use std::io::{BufReader, Write};
use std::thread;
use std::time::{Duration, Instant};
use support::relay::{self, expect_close};
use support::{read_reply, Corral, Mode, RawWorker};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn corral_for(worker: &RawWorker, extra: &str) -> Corral {
    Corral::start(&format!("upstreams = [\"{}\"]\n{extra}", worker.addr))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The number after `key=` in the first line of `text` that has one.
fn number_after(text: &str, key: &str) -> u32 {
    text.split(&format!("{key}="))
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in: {text}"))
}

/// A process's state letter and group id (from /proc), or None once it is gone.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let pgrp = f.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Running (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|(state, _)| state != 'Z')
}

/// SIGTERM half a second into a request the worker takes 2 s to answer: the answer
/// still arrives (it used to be an empty reply at once), and corral then exits.
#[test]
fn sigterm_lets_a_request_in_flight_finish() {
    let worker = RawWorker::start(Mode::Delay(Duration::from_secs(2)));
    let mut corral = corral_for(&worker, "[timeouts]\nshutdown_drain = \"10s\"\n");
    let mut s = corral.connect();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    // In flight: the worker has it.
    assert!(worker.wait_for(|seen| seen.iter().any(|r| r.target() == "/slow")));
    corral.terminate();
    let reply = read_reply(&mut BufReader::new(s));
    let reply = reply.unwrap_or_else(|| panic!("no answer: {}", corral.log_text()));
    assert_eq!(reply.status, 200);
    let status = corral.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// SIGTERM with a kept-alive client connection idle between requests: corral
/// closes it at once (the drain tells every connection), rather than leaving it
/// open until the drain period (30 s here) runs out, and exits.
#[test]
fn sigterm_closes_idle_keepalive_connections_at_once() {
    let worker = RawWorker::start(Mode::Echo);
    let mut corral = corral_for(&worker, "[timeouts]\nshutdown_drain = \"30s\"\n");
    let s = corral.connect();
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    (&s).write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let reply = read_reply(&mut reader).expect("first reply");
    assert_eq!(reply.status, 200);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    corral.terminate();
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut reader, &mut rest);
    assert!(
        read.is_ok(),
        "the idle connection was not closed within 5 s of SIGTERM: {read:?}"
    );
    let status = corral.wait_exit(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// SIGTERM while a client has connected to a TLS listener but not begun its
/// handshake (the handshake may take up to `header_read`, 30 s here): the
/// connection is dropped at once and corral exits, instead of the drain waiting
/// for a handshake that may never come.
#[test]
fn sigterm_drops_a_tls_handshake_not_yet_done() {
    let worker = RawWorker::start(Mode::Echo);
    let mut corral = corral_for(
        &worker,
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"self-signed\"\n\
         [timeouts]\nheader_read = \"30s\"\nshutdown_drain = \"30s\"\n",
    );
    let tls_port = corral.listeners[1].port();
    let s = std::net::TcpStream::connect(("127.0.0.1", tls_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // Accepted and waiting for a ClientHello before the signal.
    thread::sleep(Duration::from_millis(300));
    corral.terminate();
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut &s, &mut rest);
    assert!(read.is_ok(), "still open 5 s after SIGTERM: {read:?}");
    let status = corral.wait_exit(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// With `h2c` on, a plain connection that has sent nothing yet is being looked at
/// for the HTTP/2 preface: SIGTERM ends that look at once, so corral exits without
/// waiting out `shutdown_drain` (or `header_read`) for it.
#[test]
fn sigterm_drops_an_h2c_connection_that_sent_nothing() {
    let worker = RawWorker::start(Mode::Echo);
    let mut corral = corral_for(
        &worker,
        "h2c = true\n[timeouts]\nheader_read = \"30s\"\nshutdown_drain = \"30s\"\n",
    );
    let s = std::net::TcpStream::connect(corral.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // Accepted and looked at before the signal.
    thread::sleep(Duration::from_millis(300));
    corral.terminate();
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut &s, &mut rest);
    assert!(read.is_ok(), "still open 5 s after SIGTERM: {read:?}");
    let status = corral.wait_exit(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// At shutdown an open websocket gets a close frame, 1001 "going away", so the
/// client sees a clean close and reconnects; the worker connection is closed too.
#[test]
fn sigterm_closes_websockets_cleanly() {
    let worker = RawWorker::start(Mode::WebSocket);
    let mut corral = corral_for(&worker, "");
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", corral.addr);
    let rt = runtime();
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(url.as_str()))
        .expect("websocket through corral");
    rt.block_on(ws.send(Message::text("ping"))).expect("send");
    let echo = rt.block_on(ws.next()).expect("echo").expect("frame");
    assert_eq!(echo, Message::text("ping"));
    corral.terminate();
    let started = Instant::now();
    expect_close(&rt, &mut ws, CloseCode::Away, &corral);
    assert!(started.elapsed() < Duration::from_secs(3));
    let status = corral.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// A tunnel is relayed on its worker's serving thread, whichever thread accepted
/// the client: both sockets move there with the bytes already read (here the
/// worker's greeting, which came in the same segment as its 101) and, over TLS,
/// with the session, and frames of every size still arrive whole and in order both
/// ways; at shutdown each client still gets 1001.
#[test]
fn tunnels_moved_to_their_workers_thread_carry_frames_whole_and_close_cleanly() {
    moved_tunnels(false);
}

#[test]
fn tls_tunnels_moved_to_their_workers_thread_carry_frames_whole_and_close_cleanly() {
    moved_tunnels(true);
}

fn moved_tunnels(tls: bool) {
    let worker = RawWorker::start(Mode::WebSocketHello);
    let dir = support::TempDir::new("moved");
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    let cert_pem = made.cert.pem();
    let cert = dir.file("cert.pem", &cert_pem);
    let key = dir.file("key.pem", &made.signing_key.serialize_pem());
    let extra = format!(
        "threads = 4\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let mut corral = corral_for(&worker, &extra);
    let addr = corral.listeners[usize::from(tls)];
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let connector = tls.then(|| support::tls_trusting(&cert_pem));
    let rt = runtime();
    let mut clients = Vec::new();
    for _ in 0..12 {
        let (mut ws, _) = rt
            .block_on(async {
                use tokio_util::either::Either;
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let io = match &connector {
                    Some(c) => {
                        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
                        Either::Right(c.connect(name, tcp).await.expect("TLS handshake"))
                    }
                    None => Either::Left(tcp),
                };
                tokio_tungstenite::client_async(url.as_str(), io).await
            })
            .expect("websocket through corral");
        let hello = rt.block_on(ws.next()).expect("greeting").expect("frame");
        assert_eq!(hello, Message::text("hello"), "{}", corral.log_text());
        clients.push(ws);
    }
    relay::echo_rounds(&rt, &mut clients, &corral, 60_000, 10);
    corral.terminate();
    for ws in clients.iter_mut() {
        expect_close(&rt, ws, CloseCode::Away, &corral);
    }
    let status = corral.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// With `max_connections = 1`, an open tunnel holds the one slot: a second client
/// is not served until the first tunnel closes.
#[test]
fn a_tunnel_holds_its_connection_slot() {
    let worker = RawWorker::start(Mode::WebSocket);
    let corral = corral_for(
        &worker,
        "[limits]\nmax_connections = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let url = format!("ws://{}/ws", corral.addr);
    let rt = runtime();
    let (mut first, _) = rt
        .block_on(tokio_tungstenite::connect_async(url.as_str()))
        .expect("first tunnel");
    rt.block_on(first.send(Message::text("a"))).expect("send");
    assert!(rt.block_on(first.next()).is_some());
    relay::wait_tunnels(&corral, 1);
    let second = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(1500),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
    });
    assert!(
        second.is_err(),
        "a second tunnel opened while the first held the only slot"
    );
    rt.block_on(first.close(None)).expect("close");
    drop(first);
    let (mut again, _) = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            )
            .await
        })
        .expect("served once the first tunnel closed")
        .expect("tunnel");
    rt.block_on(again.send(Message::text("b"))).expect("send");
    assert_eq!(
        rt.block_on(again.next()).expect("echo").expect("frame"),
        Message::text("b")
    );
}

/// One health check that times out costs a live worker nothing (fall 3); checks
/// that keep failing do mark it down (so the first half can fail).
#[test]
fn one_slow_health_check_marks_nothing_down() {
    let health = "[health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let once = RawWorker::start(Mode::SlowHealth(1));
    let always = RawWorker::start(Mode::SlowHealth(usize::MAX));
    let c_once = corral_for(&once, health);
    let c_always = corral_for(&always, health);
    let up = |c: &Corral| c.metric("corral_worker_up");
    let deadline = Instant::now() + Duration::from_secs(10);
    while up(&c_always) != Some(0.0) {
        assert!(Instant::now() < deadline, "{}", c_always.log_text());
        thread::sleep(Duration::from_millis(20));
    }
    // The slow check and the fast ones after it, as many as marked the other down.
    let checks = |w: &RawWorker| w.seen_for("/health").len();
    while checks(&once) < checks(&always) {
        assert!(Instant::now() < deadline, "{}", c_once.log_text());
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(up(&c_once), Some(1.0), "{}", c_once.log_text());
}

/// The children of `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Zombie children of `pid`.
fn zombies_of(pid: u32) -> Vec<u32> {
    children(pid)
        .into_iter()
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|s| {
                    s.rfind(')')
                        .map(|i| s[i + 1..].trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// As a container's entrypoint (PID 1 of a new pid namespace, as `docker run`
/// makes it), corral starts its worker (it used to fail with EINVAL forever while
/// saying "ready") and reaps the orphans the worker leaves, as tini does.
#[test]
fn as_pid_1_workers_start_and_orphans_are_reaped() {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        // CI runs as root, where it must work: a skip there would hide the test.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "unshare --pid is refused under CI: {probe:?}"
        );
        eprintln!("SKIPPED: unshare --pid is refused here ({probe:?}); CI runs as root");
        return;
    }
    let dir = support::TempDir::new("pid1");
    let log = dir.0.join("corral.log");
    let out = std::fs::File::create(&log).expect("log");
    let admin = dir.0.join("admin.sock");
    // The worker leaves an orphan behind: a subshell's `sleep` whose parent exits.
    let config = dir.file(
        "corral.toml",
        &format!(
            "listen = [\"127.0.0.1:0\"]\nadmin_socket = \"{}\"\n[workers]\ncount = 1\ncommand = [\"sh\", \"-c\", \"(sleep 0.3 &); exec python3 -m http.server --bind 127.0.0.1 {{port}}\"]\n",
            admin.display()
        ),
    );
    let mut unshare = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_corral"))
        .arg("run")
        .arg("-c")
        .arg(&config)
        .env("CORRAL_LOG", "corral=debug")
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("unshare");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = None;
    while Instant::now() < deadline && answered.is_none() {
        thread::sleep(Duration::from_millis(200));
        // Where it listens, asked of its admin socket (port 0 in the config).
        let told = support::addresses(&admin);
        let Some(addr) = told.and_then(|t| t["listeners"][0].as_str()?.parse().ok()) else {
            continue;
        };
        answered = support::exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .filter(|r| r.status == 200);
    }
    let corral = children(unshare.id()).first().copied();
    // Orphans are reaped once they have been zombies for a scan (about a second).
    thread::sleep(Duration::from_secs(3));
    let zombies = corral.map(zombies_of).unwrap_or_default();
    if let Some(pid) = corral {
        // SAFETY: a plain signal to the corral this test started.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    let stopped = (0..100).any(|_| {
        thread::sleep(Duration::from_millis(100));
        unshare.try_wait().ok().flatten().is_some()
    });
    if !stopped {
        let _ = unshare.kill();
        let _ = unshare.wait();
    }
    let log = text();
    assert!(answered.is_some(), "the worker never answered: {log}");
    assert!(!log.contains("Invalid argument"), "{log}");
    assert!(log.contains("running as PID 1"), "{log}");
    assert!(zombies.is_empty(), "zombies left: {zombies:?}\n{log}");
    assert!(stopped, "corral did not stop on SIGTERM: {log}");
}

/// A chunked PUT that meets a kept-alive worker connection closing under it is not
/// sent again without its body (it used to be, and the client got 200): its body
/// cannot be sent again, so the client gets 502. A bodiless GET is sent again.
#[test]
fn a_retried_request_never_loses_its_body() {
    let worker = RawWorker::start(Mode::CloseSecond);
    // One serving thread: kept-alive worker connections are kept per thread.
    let corral = corral_for(&worker, "threads = 1\n");
    let warm = b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n";
    let put = b"PUT /put HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(
        support::exchange(corral.addr, warm).expect("warm").status,
        200
    );
    // The worker closes the kept-alive connection on the PUT, unanswered.
    let r = support::exchange(corral.addr, put).expect("reply");
    assert!(
        r.status == 502 || (r.status == 200 && r.body == b"hello"),
        "{r:?}: {:?}",
        worker.seen()
    );
    let puts = worker.seen_for("/put");
    assert!(
        puts.iter().any(|s| s.aborted),
        "the PUT did not meet the closing connection: {puts:?}"
    );
    for s in &puts {
        assert!(
            s.aborted || s.body == b"hello",
            "PUT sent without its body: {s:?}"
        );
    }
    // A GET on the next kept-alive connection that closes is sent again and served.
    assert_eq!(
        support::exchange(corral.addr, warm).expect("warm").status,
        200
    );
    let get =
        support::exchange(corral.addr, b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n").expect("reply");
    assert_eq!(get.status, 200, "{:?}", worker.seen());
}

/// A worker is ready when *it* answers: another process that took its port (here a
/// worker that never listens, and the test answering on its port) does not make it
/// ready.
#[test]
fn readiness_is_checked_against_the_workers_own_socket() {
    let corral = Corral::start_unready(
        "[workers]\ncommand = [\"sleep\", \"30\"]\ncount = 1\nstart_timeout = \"20s\"\n",
    );
    let workers = corral.wait_workers(Duration::from_secs(10), |w| w[0]["pid"].is_u64());
    let port = workers[0]["port"].as_u64().expect("port");
    let intruder = RawWorker::start_on(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        Mode::Echo,
    );
    // Several of corral's probes answered by the intruder, and still not ready.
    assert!(
        intruder.wait_for(|s| s.len() >= 5),
        "corral's readiness check never reached the port"
    );
    assert_eq!(
        corral.workers()[0]["state"],
        "starting",
        "{}",
        corral.log_text()
    );
}

/// What a worker leaves in its process group when it exits is killed with it,
/// while the worker's pid (the group's id) is still held by its zombie, so no other
/// process can be signalled by a reused pid.
#[test]
fn an_exited_workers_group_goes_with_it() {
    let corral = Corral::start_unready(
        "[workers]\ncommand = [\"sh\", \"-c\", \"sleep 30 & sleep 0.5; exit 3\"]\ncount = 1\nstart_timeout = \"20s\"\n",
    );
    let workers = corral.wait_workers(Duration::from_secs(10), |w| w[0]["pid"].is_u64());
    let pid = workers[0]["pid"].as_u64().expect("pid") as u32;
    let in_group = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| proc_state(*p).is_some_and(|(state, group)| group == pid && state != 'Z'))
            .count()
    };
    assert!(in_group() >= 1, "the worker's group is not running");
    corral.wait_workers(Duration::from_secs(5), |w| {
        w[0]["restarts"].as_u64() >= Some(1)
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_group() > 0 {
        assert!(
            Instant::now() < deadline,
            "left in the group: {}",
            corral.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A worker that starts in a second and answers `/slow` in three.
const SLOW_WORKER: &str = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(3)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
time.sleep(1)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// SIGHUP starts a rolling restart of two workers that each serve a 3 s request;
/// SIGTERM comes while the first old worker drains. Stopping lets the requests
/// finish, no worker is started after the signal, and every worker process is gone
/// when corral exits. (Before, the restart went on and could start a worker after
/// the stop had taken its list, which then died by SIGKILL with corral.)
#[test]
fn a_rolling_restart_racing_sigterm_starts_nothing_after_it() {
    let dir = support::TempDir::new("slow");
    let script = dir.file("slow.py", SLOW_WORKER);
    let mut corral = Corral::start(&format!(
        "[workers]\ncommand = [\"python3\", \"{}\", \"{{port}}\"]\ncount = 2\ndrain_timeout = \"10s\"\n[timeouts]\nshutdown_drain = \"10s\"\n",
        script.display()
    ));
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let addr = corral.addr;
            thread::spawn(move || {
                support::exchange(addr, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n").map(|r| r.status)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    // SAFETY: plain signals to the corral this test started.
    unsafe {
        libc::kill(corral.child.id() as i32, libc::SIGHUP);
    }
    // The first replacement is ready after a second; the old worker then drains
    // its 3 s request.
    corral.wait_workers(Duration::from_secs(10), |w| {
        w.iter().any(|w| w["index"] == 2 && w["state"] == "up")
    });
    corral.terminate();
    let status = corral.wait_exit(Duration::from_secs(30));
    let log = corral.log_text();
    assert!(status.is_some(), "corral did not exit: {log}");
    for t in slow {
        assert_eq!(t.join().expect("client"), Some(200), "{log}");
    }
    let stopping = log.find("stopping:").unwrap_or_else(|| panic!("{log}"));
    assert!(
        !log[stopping..].contains("worker started"),
        "a worker started after the stop began:\n{log}"
    );
    for line in log.lines().filter(|l| l.contains("worker started")) {
        let pid = number_after(line, "pid");
        assert!(!alive(pid), "worker {pid} outlived corral:\n{log}");
    }
}

/// A request outside any session whose worker refuses the connection goes once
/// to another worker, if it can be sent again (no body); one with a body is not
/// sent again, and gets corral's own answer.
#[test]
fn a_refused_connection_sends_a_bodiless_request_to_another_worker() {
    let live = RawWorker::start(Mode::Echo);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    // The dead worker first: with no load anywhere, it is the first choice.
    let corral = support::Corral::start(&format!(
        "threads = 1\nupstreams = [\"{dead}\", \"{}\"]\n[health]\ninterval = \"60s\"\nfall = 100\n[engineio]\nsticky = false\n",
        live.addr
    ));
    let get =
        support::exchange(corral.addr, b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n").expect("reply");
    assert_eq!(get.status, 200, "{get:?}");
    assert!(
        corral.log_text().contains("cannot connect to worker"),
        "the dead worker was never tried: {}",
        corral.log_text()
    );
    assert_eq!(live.seen_for("/first").len(), 1);
    let post = b"POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(support::exchange(corral.addr, post).expect("reply").status);
    }
    // Least connections alternates between the two: some POSTs met the dead one
    // and were not sent on; each that reached the live one arrived once.
    assert!(statuses.iter().any(|s| *s != 200), "{statuses:?}");
    assert_eq!(
        live.seen_for("/post").len(),
        statuses.iter().filter(|s| **s == 200).count(),
        "{statuses:?}"
    );
}

/// A connection to a worker left idle in corral's cache is closed once it has been
/// idle for `upstream_idle`, without waiting for another request to notice (a quiet
/// worker used to keep one open for good).
#[test]
fn idle_worker_connections_are_closed_on_time() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(
        &worker,
        "[timeouts]\nupstream_idle = \"300ms\"\n[health]\ninterval = \"1h\"\n",
    );
    let mut s = corral.connect();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let reply = read_reply(&mut BufReader::new(&s)).expect("reply");
    assert_eq!(reply.status, 200);
    assert!(worker.open_connections() >= 1, "{}", corral.log_text());
    assert!(
        worker.wait_all_closed(Duration::from_secs(3)),
        "the idle connection stayed open: {}",
        corral.log_text()
    );
}

/// A supervised Engine.IO-ish worker: answers a polling handshake with a sid, holds
/// a long-poll of that sid for 30 s (nothing to say), accepts websockets and holds
/// them, answers other requests at once, keeps connections alive, and on SIGTERM
/// prints how many connections were idle between requests and exits.
const LEAVING_WORKER: &str = r#"
import base64, hashlib, http.server, os, signal, sys, threading, time
lock = threading.Lock()
idle = [0]
def on_term(*_):
    with lock:
        n = idle[0]
    print(f"idle keep-alive connections at SIGTERM: {n}", flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def setup(self):
        super().setup()
        self.waiting = False
        self.set_idle(True)
    def set_idle(self, on):
        with lock:
            if on != self.waiting:
                idle[0] += 1 if on else -1
                self.waiting = on
    def parse_request(self):
        self.set_idle(False)
        return super().parse_request()
    def finish(self):
        self.set_idle(False)
        super().finish()
    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.set_idle(True)
    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            while self.rfile.read(1):
                pass
            self.close_connection = True
        elif "sid=" in self.path:
            time.sleep(30)
            self.reply(b"6")
        elif self.path.startswith("/socket.io/"):
            self.reply(b'0{"sid":"S%d","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}' % os.getpid())
        else:
            self.reply(b"ok")
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// A rolling restart of a worker with a websocket, a long-poll in flight and an
/// idle keep-alive connection from corral: the websocket gets 1012 (service
/// restart), the long-poll "Session ID unknown" (both: reconnect), well before the
/// long-poll or `drain_timeout` would end, and the old worker gets SIGTERM with no
/// idle connection of corral's left open (a gevent gunicorn waits its graceful
/// timeout for those), so it exits at once and nothing is SIGKILLed.
#[test]
fn a_replaced_worker_closes_its_websockets_and_long_polls_and_stops_cleanly() {
    let dir = support::TempDir::new("leaving");
    let script = dir.file("leaving.py", LEAVING_WORKER);
    let corral = Corral::start(&format!(
        "[workers]\ncommand = [\"python3\", \"{}\", \"{{port}}\"]\ncount = 1\n\
         drain_timeout = \"25s\"\nclose_spread = \"1s\"\nstop_grace = \"10s\"\n\
         [timeouts]\nupstream_idle = \"60s\"\n",
        script.display()
    ));
    let handshake = support::exchange(
        corral.addr,
        b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .expect("handshake");
    let text = handshake.text();
    let sid = text
        .split("\"sid\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no sid in {text}"))
        .to_owned();
    let addr = corral.addr;
    let poll = thread::spawn(move || {
        let started = Instant::now();
        let req = format!(
            "GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let status = support::exchange(addr, req.as_bytes()).map(|r| r.status);
        (status, started.elapsed())
    });
    // A plain request leaves a kept-alive connection in corral's cache.
    let mut plain = corral.connect();
    plain
        .write_all(b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    assert_eq!(
        read_reply(&mut BufReader::new(&plain)).map(|r| r.status),
        Some(200)
    );
    let rt = runtime();
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", corral.addr);
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(url.as_str()))
        .expect("websocket through corral");
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    // SAFETY: a plain signal to the corral this test started.
    unsafe {
        libc::kill(corral.child.id() as i32, libc::SIGHUP);
    }
    let close = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), ws.next()).await })
        .unwrap_or_else(|_| panic!("no close frame: {}", corral.log_text()));
    match close {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Restart, "{}", corral.log_text())
        }
        other => panic!(
            "expected a close frame, got {other:?}: {}",
            corral.log_text()
        ),
    }
    let (status, took) = poll.join().expect("long-poll client");
    assert_eq!(status, Some(400), "{}", corral.log_text());
    assert!(
        took < Duration::from_secs(20),
        "long-poll answered after {took:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !corral.log_text().contains("worker replaced") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let log = corral.log_text();
    assert!(log.contains("worker replaced"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(15), "{log}");
    assert!(
        log.contains("idle keep-alive connections at SIGTERM: 0"),
        "corral held connections to the worker it stopped:\n{log}"
    );
    assert!(log.contains("worker exited on SIGTERM"), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
}

/// Workers that all crash at start: a client is told that no worker is ready and
/// why (not "no worker configured"), and each worker's output is logged once, not
/// again for every restart nor inside each error line.
#[test]
fn crash_looping_workers_are_reported_once_and_clients_told_why() {
    let corral = Corral::start_until(
        "[workers]\ncommand = [\"sh\", \"-c\", \"echo Traceback-marker; exit 3\"]\ncount = 2\nbackoff_max = \"200ms\"\n",
        "worker not ready",
        |_| {},
    );
    // Several restarts each.
    corral.wait_workers(Duration::from_secs(20), |w| {
        w.len() == 2 && w.iter().all(|w| w["restarts"].as_u64() >= Some(3))
    });
    let reply = support::exchange(
        corral.addr,
        b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .expect("reply");
    let log = corral.log_text();
    assert_eq!(reply.status, 503);
    let text = reply.text();
    assert!(
        text.contains("no worker is ready") && text.contains("restarts"),
        "{text}"
    );
    assert!(log.contains("exited (exit status: 3)"), "{log}");
    let shown = log.matches("Traceback-marker").count();
    assert_eq!(shown, 2, "once per worker, not per restart:\n{log}");
}

/// A worker that never answers HTTP: the error says what was probed and what
/// answered, and how to make the worker listen where corral looks.
#[test]
fn a_worker_not_ready_in_time_says_what_was_probed() {
    let corral = Corral::start_until(
        "[workers]\ncommand = [\"sleep\", \"30\"]\ncount = 1\nstart_timeout = \"1s\"\n",
        "not ready within",
        |_| {},
    );
    let log = corral.log_text();
    assert!(log.contains("probed GET / on http://127.0.0.1:"), "{log}");
    assert!(log.contains("nothing answered HTTP there"), "{log}");
    assert!(log.contains("{port}"), "{log}");
}

/// A crash loop says why at every exit: its status each time; its output when it
/// differs from the last shown (three exits, each with other output), and for
/// identical output (three more) where that output was shown, not nothing.
#[test]
fn a_crash_loop_reports_every_exit_and_counts_the_same_output() {
    let dir = support::TempDir::new("crashloop");
    let counter = dir.0.join("runs");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; \
         if [ $n -le 3 ]; then echo output-of-run-$n; else echo the-same-output; fi; exit 3",
        c = counter.display()
    );
    let corral = Corral::start_unready(&format!(
        "[workers]\ncommand = [\"sh\", \"-c\", {script:?}]\ncount = 1\nbackoff_max = \"50ms\"\n"
    ));
    corral.wait_workers(Duration::from_secs(20), |w| {
        w.len() == 1 && w[0]["restarts"].as_u64() >= Some(6)
    });
    let log = corral.log_text();
    let exits = log.matches("exited (exit status: 3)").count();
    assert!(exits >= 6, "each exit with its status:\n{log}");
    for run in 1..=3 {
        assert!(
            log.contains(&format!("output-of-run-{run}")),
            "run {run}:\n{log}"
        );
    }
    assert_eq!(
        log.matches("the-same-output").count(),
        1,
        "shown once:\n{log}"
    );
    assert!(
        log.matches("with the same output as worker 0's exit at")
            .count()
            >= 2,
        "{log}"
    );
}

/// A client that goes away while its request waits on the worker cancels it: the
/// worker's connection is closed (nginx's 499), not answered into and put back in
/// corral's cache for the next request (kept here: `upstream_idle` is long).
#[test]
fn a_client_gone_before_its_answer_cancels_the_request() {
    let worker = RawWorker::start(Mode::Delay(Duration::from_millis(1500)));
    let corral = corral_for(
        &worker,
        "[timeouts]\nupstream_idle = \"60s\"\n[health]\ninterval = \"1h\"\n",
    );
    let mut s = corral.connect();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    assert!(worker.wait_for(|seen| seen.iter().any(|r| r.target() == "/slow")));
    drop(s);
    // The worker answers after its delay, into a connection corral has closed, and
    // then sees it end; a connection put back would stay open for a minute.
    assert!(
        worker.wait_all_closed(Duration::from_secs(5)),
        "the worker's connection stayed open: {}",
        corral.log_text()
    );
}
