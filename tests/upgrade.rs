//! `corral upgrade`: the running corral replaced by another binary in the same
//! process, its listeners and workers carried over (docs/upgrade.md); and a binary
//! that cannot take over refused with nothing changed. Real corral processes, real
//! worker processes, the operator's command.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use support::{relay, Corral, TempDir};

/// A worker whose `/hold` answers only once the file `release` exists in its
/// directory (it makes `held` when the request has come), whose Engine.IO path
/// opens polling sessions it alone knows (a sid of another worker gets 400, as
/// python-engineio answers it; a poll with `wait` in its query is held as `/hold`
/// is, as a long-poll waits), and whose other paths answer at once with its pid.
const HOLDING_WORKER: &str = r#"
import http.server, os, sys, time, uuid, urllib.parse
here = os.path.dirname(os.path.abspath(__file__))
sessions = set()
def hold():
    open(os.path.join(here, "held"), "w").close()
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(here, "release")) and time.time() < deadline:
        time.sleep(0.02)
class H(http.server.BaseHTTPRequestHandler):
    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path.startswith("/socket.io/"):
            sid = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("sid")
            if not sid:
                new = uuid.uuid4().hex
                sessions.add(new)
                hs = '0{"sid":"%s","upgrades":[],"pingInterval":25000,"pingTimeout":20000}' % new
                return self.answer(200, hs.encode())
            if sid[0] in sessions:
                if "wait" in self.path:
                    hold()
                return self.answer(200, b"6")
            return self.answer(400, b'{"code":1,"message":"Session ID unknown"}')
        if self.path.startswith("/hold"):
            hold()
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

fn start(dir: &TempDir) -> Corral {
    Corral::start(&config(dir, 2))
}

/// The config of `start`, with `count` workers.
fn config(dir: &TempDir, count: usize) -> String {
    let script = dir.file("worker.py", HOLDING_WORKER);
    format!(
        "[workers]\ncommand = [\"python3\", \"{}\", \"{{port}}\"]\ncount = {count}\n\
         [message_queue]\nembedded = true\n[timeouts]\nshutdown_drain = \"30s\"\n{}",
        script.display(),
        relay::STATUS
    )
}

fn admin_socket(corral: &Corral) -> PathBuf {
    corral.dir.0.join("admin.sock")
}

/// `corral upgrade` against `corral`, started; its output read by the caller.
fn upgrade_command(corral: &Corral, binary: Option<&Path>) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
    cmd.arg("upgrade").arg("--socket").arg(admin_socket(corral));
    if let Some(b) = binary {
        cmd.arg("--binary").arg(b);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("corral upgrade")
}

/// `corral upgrade` run to its end: success, and what it printed.
fn upgrade(corral: &Corral, binary: Option<&Path>) -> (bool, String) {
    let out = upgrade_command(corral, binary)
        .wait_with_output()
        .expect("corral upgrade");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn pids(corral: &Corral) -> Vec<u64> {
    let mut pids: Vec<u64> = corral
        .workers()
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .collect();
    pids.sort();
    pids
}

fn image(corral: &Corral) -> serde_json::Value {
    support::addresses(&admin_socket(corral)).expect("addresses")["image"].clone()
}

fn get(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    let ask = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    support::exchange(addr, ask.as_bytes()).map(|r| r.status)
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe")
}

/// A copy of corral's binary: "another build" the upgrade can be told apart by.
fn copy_of_corral(dir: &TempDir, name: &str) -> PathBuf {
    let to = dir.0.join(name);
    std::fs::copy(env!("CARGO_BIN_EXE_corral"), &to).expect("copy corral");
    to
}

/// Waits (bounded) for `cond`.
fn wait_until(limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A binary that cannot take over is refused before anything is let go: one that
/// fails, one that answers another hand-over format, and the running corral's own
/// binary with a config it refuses. Each time: a non-zero exit naming why, the same
/// image, the same workers, still serving.
#[test]
fn a_binary_that_cannot_take_over_is_refused_and_nothing_changes() {
    let dir = TempDir::new("upgrade-refused");
    let corral = start(&dir);
    let (before, workers) = (image(&corral), pids(&corral));
    let other_format = dir.file(
        "other-format",
        "#!/bin/sh\necho \"corral-handover 999 9.9.9\"\n",
    );
    make_executable(&other_format);
    let cases: [(&Path, &str); 2] = [
        (Path::new("/bin/false"), "refused the upgrade"),
        (&other_format, "hand-over format 999"),
    ];
    for (binary, why) in cases {
        let (ok, said) = upgrade(&corral, Some(binary));
        assert!(!ok, "{} was taken: {said}", binary.display());
        assert!(said.contains(why), "{said}");
        assert_eq!(image(&corral), before, "{said}");
        assert_eq!(pids(&corral), workers);
        assert_eq!(get(corral.addr, "/"), Some(200));
    }
    let config = std::fs::read_to_string(dir_config(&corral)).expect("config");
    std::fs::write(dir_config(&corral), format!("{config}\nno_such_key = 1\n")).expect("write");
    let (ok, said) = upgrade(&corral, None);
    assert!(!ok, "a broken config was taken: {said}");
    assert!(said.contains("no_such_key"), "{said}");
    assert_eq!(image(&corral), before);
    assert_eq!(pids(&corral), workers);
    assert_eq!(get(corral.addr, "/"), Some(200));
}

fn dir_config(corral: &Corral) -> PathBuf {
    corral.dir.0.join("corral.toml")
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The upgrade finishes a request in flight in the old image while new connections
/// wait in the listener's backlog; the new image (another file) serves every one of
/// them, with the same worker processes, the same pid and the same message queue.
/// A second upgrade back keeps them too; after it a crashed worker is restarted and
/// a rolling restart replaces the workers, as before any upgrade.
#[test]
fn an_upgrade_carries_the_listeners_backlog_and_the_workers() {
    let dir = TempDir::new("upgrade-carry");
    let work = TempDir::new("upgrade-worker");
    let corral = start(&work);
    let pid = corral.child.id();
    let (before, workers) = (image(&corral), pids(&corral));
    let queue = support::addresses(&admin_socket(&corral)).expect("addresses")["broker"].clone();
    let inode = || {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(admin_socket(&corral)).ok()?;
        Some((m.ino(), m.ctime(), m.ctime_nsec()))
    };
    let admin_inode = inode();
    let addr = corral.addr;
    let held = thread::spawn(move || get(addr, "/hold"));
    wait_until(Duration::from_secs(10), "the held request", || {
        work.0.join("held").exists()
    });
    let next = copy_of_corral(&dir, "corral-next");
    let mut command = upgrade_command(&corral, Some(&next));
    let mut said = String::new();
    BufReader::new(command.stdout.as_mut().expect("stdout"))
        .read_line(&mut said)
        .expect("its first line");
    assert!(said.starts_with("ok: upgrading"), "{said}");
    wait_until(Duration::from_secs(10), "accepting stopped", || {
        support::addresses(&admin_socket(&corral)).is_some_and(|a| a["upgrading"] == true)
    });
    // Accepting has stopped: these wait in the backlog, their requests sent.
    let waiting: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .expect("send");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            s
        })
        .collect();
    std::fs::write(work.0.join("release"), "").expect("release");
    assert_eq!(
        held.join().expect("held"),
        Some(200),
        "{}",
        corral.log_text()
    );
    for mut s in waiting {
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert_eq!(reply.split(' ').nth(1), Some("200"), "{reply:?}");
    }
    let out = command.wait_with_output().expect("upgrade ends");
    let rest = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{rest}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rest.contains("upgraded: pid"), "{rest}");
    assert_eq!(exe_of(pid), next, "the process does not run the new file");
    let after = image(&corral);
    assert_ne!(after["started_ms"], before["started_ms"]);
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(pids(&corral), workers, "the workers were not carried");
    let told = support::addresses(&admin_socket(&corral)).expect("addresses");
    assert_eq!(told["broker"], queue, "the message queue moved");
    assert_eq!(inode(), admin_inode, "the admin socket was bound again");
    assert_eq!(get(addr, "/"), Some(200));
    let status = status_json(&corral);
    let record = &status["upgrades"][0];
    assert_eq!(record["binary"], next.display().to_string(), "{status}");
    assert_eq!(record["carried"]["workers"], 2, "{status}");
    assert_eq!(record["carried"]["listeners"], 1, "{status}");
    assert_eq!(record["closed"], serde_json::json!({}), "{status}");

    // Back to the first build: carried again.
    let (ok, said) = upgrade(&corral, Some(Path::new(env!("CARGO_BIN_EXE_corral"))));
    assert!(ok, "{said}");
    assert_eq!(pids(&corral), workers, "the workers were not carried twice");

    // Supervised as before: a crash is restarted, a rolling restart replaces both.
    let first = workers[0] as i32;
    // SAFETY: a signal to a worker process this test's corral started.
    unsafe {
        libc::kill(first, libc::SIGKILL);
    }
    corral.wait_workers(Duration::from_secs(20), |w| {
        w.iter().all(|w| w["state"] == "up")
            && w.iter().any(|w| w["restarts"] == 1 && w["pid"] != first)
    });
    assert!(corral.admin("reload").starts_with("ok"));
    let rolled = pids(&corral);
    assert!(
        rolled.iter().all(|p| !workers.contains(p)),
        "{rolled:?} {workers:?}"
    );
    assert_eq!(get(addr, "/"), Some(200));
    // And a reload that keeps the workers scales them.
    corral.rewrite(&config(&work, 3));
    let said = corral.admin("reload --keep-workers");
    assert!(said.starts_with("ok"), "{said}");
    let now = pids(&corral);
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(rolled.iter().all(|p| now.contains(p)), "{rolled:?} {now:?}");
}

/// Polling sessions opened before an upgrade go on after it, each still routed to
/// the worker that knows it: the session table is carried over (left behind, the
/// new image would answer their sids as unknown). A long-poll in flight is carried
/// with its worker connection, and answered by the new image when the worker
/// answers.
#[test]
fn an_upgrade_carries_the_session_table() {
    let work = TempDir::new("upgrade-sessions");
    let corral = start(&work);
    let open = |addr| {
        let hs = "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: a\r\n\r\n";
        let reply = support::exchange(addr, hs.as_bytes()).expect("handshake");
        let text = reply.text();
        let start = text.find("\"sid\":\"").expect("a sid") + 7;
        text[start..start + 32].to_string()
    };
    let sids: Vec<String> = (0..20).map(|_| open(corral.addr)).collect();
    let poll = |sid: &str| {
        let ask = format!(
            "GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        support::exchange(corral.addr, ask.as_bytes()).map(|r| (r.status, r.text()))
    };
    for sid in &sids {
        assert_eq!(poll(sid), Some((200, "6".into())));
    }
    // A long-poll in flight, on a kept-alive connection: the upgrade does not wait
    // for its answer (it would wait out the drain period), it carries it.
    let (mut waiting, mut waiting_r) = {
        let s = TcpStream::connect(corral.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        (s.try_clone().expect("clone"), BufReader::new(s))
    };
    let long_poll = format!(
        "GET /socket.io/?EIO=4&transport=polling&sid={}&wait=1 HTTP/1.1\r\nHost: a\r\n\r\n",
        sids[0]
    );
    waiting.write_all(long_poll.as_bytes()).expect("long-poll");
    wait_until(Duration::from_secs(10), "the long-poll held", || {
        work.0.join("held").exists()
    });
    let (ok, said) = upgrade(&corral, None);
    assert!(ok, "{said}");
    assert!(!work.0.join("release").exists());
    std::fs::write(work.0.join("release"), "").expect("release");
    let answer = support::read_reply(&mut waiting_r).expect("the long-poll's answer");
    assert_eq!((answer.status, answer.text()), (200, "6".into()));
    let next = format!(
        "GET /socket.io/?EIO=4&transport=polling&sid={} HTTP/1.1\r\nHost: a\r\n\r\n",
        sids[0]
    );
    waiting.write_all(next.as_bytes()).expect("next poll");
    let answer = support::read_reply(&mut waiting_r).expect("the next poll's answer");
    assert_eq!((answer.status, answer.text()), (200, "6".into()));
    for sid in &sids {
        assert_eq!(
            poll(sid),
            Some((200, "6".into())),
            "{sid} after the upgrade"
        );
    }
    let record = &status_json(&corral)["upgrades"][0];
    assert_eq!(record["carried"]["connections"], 1, "{record}");
    assert_eq!(record["closed"], serde_json::json!({}), "{record}");
}

/// The embedded broker's clients go on over an upgrade on the same connections: a
/// subscriber keeps its subscription, and a command sent in part before the
/// upgrade is finished after it and runs (the message reaches the subscriber).
#[test]
fn an_upgrade_carries_the_brokers_clients_mid_command() {
    let work = TempDir::new("upgrade-broker");
    let corral = start(&work);
    let told = support::addresses(&admin_socket(&corral)).expect("addresses");
    let queue: std::net::SocketAddr = told["broker"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("the broker's address");
    let connect = || {
        let s = TcpStream::connect(queue).expect("connect to the broker");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s
    };
    let read_exactly = |s: &mut TcpStream, n: usize| {
        let mut got = vec![0u8; n];
        s.read_exact(&mut got).expect("read");
        String::from_utf8_lossy(&got).into_owned()
    };
    let mut subscriber = connect();
    subscriber
        .write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
        .expect("subscribe");
    let subscribed = "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
    assert_eq!(read_exactly(&mut subscriber, subscribed.len()), subscribed);
    let mut publisher = connect();
    publisher
        .write_all(b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$5\r\nhel")
        .expect("half a command");
    // The probe takes longer than the broker's read: the half command is read
    // before the upgrade, and carried as unread bytes.
    let (ok, said) = upgrade(&corral, None);
    assert!(ok, "{said}");
    publisher.write_all(b"lo\r\n").expect("the rest");
    assert_eq!(
        read_exactly(&mut publisher, 4),
        ":1\r\n",
        "{}",
        corral.log_text()
    );
    let message = "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n";
    assert_eq!(read_exactly(&mut subscriber, message.len()), message);
}

/// A websocket tunnel goes on over an upgrade on the same two connections, from
/// where its relay stood: the worker floods frames of every header form, the
/// upgrade comes in the middle, and every frame reaches the client whole and in
/// order; at the stop after it, 1001 comes between two frames (the relay's place in
/// the frame stream was carried). The status listener keeps its port.
#[test]
fn an_upgrade_carries_a_websocket_tunnel_mid_frame() {
    let corral_for = |worker: &support::RawWorker, extra: &str| {
        Corral::start(&format!("upstreams = [\"{}\"]\n{extra}\n", worker.addr))
    };
    let (_worker, mut corral, rt, mut ws) = relay::one_tunnel(corral_for, "");
    let status = corral.status;
    relay::flood_until_going_away(&rt, &mut ws, &mut corral, Duration::ZERO, |corral| {
        let (ok, said) = upgrade(corral, None);
        assert!(ok, "{said}");
        assert_eq!(corral.bound_now().1, status, "the status listener moved");
        relay::wait_tunnels(corral, 1);
    });
}

/// Kept-alive client connections go on over an upgrade on the same sockets: one
/// between two requests, one that had sent nothing yet, one in the middle of a
/// request head, and one whose request was in flight (answered by the old image,
/// then carried). Each one's next request is answered by the new image.
#[test]
fn an_upgrade_carries_kept_alive_connections() {
    let work = TempDir::new("upgrade-keepalive");
    let corral = start(&work);
    let connect = || {
        let s = TcpStream::connect(corral.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        (s.try_clone().expect("clone"), BufReader::new(s))
    };
    let ask = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let (mut between, mut between_r) = connect();
    between.write_all(ask).expect("first");
    let first = support::read_reply(&mut between_r).expect("first answer");
    assert_eq!(first.status, 200);
    let (mut silent, mut silent_r) = connect();
    let (mut halfway, mut halfway_r) = connect();
    halfway
        .write_all(b"GET / HTTP/1.1\r\nHo")
        .expect("half a head");
    let (mut busy, mut busy_r) = connect();
    busy.write_all(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("held");
    wait_until(Duration::from_secs(10), "the held request", || {
        work.0.join("held").exists()
    });
    // Every one accepted by the old image, none waiting in the backlog.
    wait_until(Duration::from_secs(10), "the connections accepted", || {
        accept_queue(corral.addr.port()) == 0
    });
    let mut command = upgrade_command(&corral, None);
    wait_until(Duration::from_secs(10), "accepting stopped", || {
        support::addresses(&admin_socket(&corral)).is_some_and(|a| a["upgrading"] == true)
    });
    std::fs::write(work.0.join("release"), "").expect("release");
    let held = support::read_reply(&mut busy_r).expect("the held answer");
    assert_eq!(held.status, 200);
    assert!(command.wait().expect("upgrade").success());
    let pid_of = |r: support::Reply| r.text();
    let old_worker = pid_of(first);
    between.write_all(ask).expect("second");
    silent.write_all(ask).expect("first, late");
    halfway.write_all(b"st: a\r\n\r\n").expect("the rest");
    busy.write_all(ask).expect("after the held one");
    for (name, r) in [
        ("between", &mut between_r),
        ("silent", &mut silent_r),
        ("halfway", &mut halfway_r),
        ("busy", &mut busy_r),
    ] {
        let reply = support::read_reply(r)
            .unwrap_or_else(|| panic!("{name}: no answer: {}", corral.log_text()));
        assert_eq!(reply.status, 200, "{name}");
        assert!(!reply.text().is_empty(), "{name}: {old_worker}");
    }
}

fn status_json(corral: &Corral) -> serde_json::Value {
    let (_, status) = corral.bound_now();
    let status = status.expect("a status listener");
    let ask = b"GET /status.json HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n";
    let reply = support::exchange(status, ask).expect("status.json");
    serde_json::from_str(&reply.text()).expect("json")
}

/// A TLS tunnel cannot be carried (this kernel has no kTLS to hold the session):
/// at the upgrade it gets 1012 "service restart" after the frame in flight, so its
/// client reconnects at once, while a cleartext tunnel beside it goes on. The
/// upgrade's record says what was closed and why.
#[test]
fn an_upgrade_closes_a_tls_tunnel_with_1012_and_carries_a_plain_one() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;
    let worker = support::RawWorker::start(support::Mode::WebSocket);
    let dir = TempDir::new("upgrade-tls");
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    let cert_pem = made.cert.pem();
    let cert = dir.file("cert.pem", &cert_pem);
    let key = dir.file("key.pem", &made.signing_key.serialize_pem());
    let corral = Corral::start(&format!(
        "upstreams = [\"{}\"]\n{}[[listener]]\naddress = \"127.0.0.1:0\"\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n",
        worker.addr,
        relay::STATUS,
        cert.display(),
        key.display()
    ));
    let rt = relay::runtime();
    let mut plain = relay::open(&rt, &corral);
    let tls_addr = corral.listeners[1];
    let connector = support::tls_trusting(&cert_pem);
    let (mut tls, _) = rt
        .block_on(async {
            let tcp = tokio::net::TcpStream::connect(tls_addr)
                .await
                .expect("connect");
            let name = rustls_pki_types::ServerName::IpAddress(tls_addr.ip().into());
            let io = connector.connect(name, tcp).await.expect("TLS handshake");
            let url = format!("ws://{tls_addr}/socket.io/?EIO=4&transport=websocket");
            tokio_tungstenite::client_async(url, io).await
        })
        .expect("websocket over TLS");
    relay::wait_tunnels(&corral, 2);
    let (ok, said) = upgrade(&corral, None);
    assert!(ok, "{said}");
    relay::expect_close(&rt, &mut tls, CloseCode::Restart, &corral);
    rt.block_on(plain.send(Message::text("still here")))
        .expect("send");
    assert_eq!(
        relay::next(&rt, &mut plain, &corral),
        Message::text("still here")
    );
    let record = &status_json(&corral)["upgrades"][0];
    assert_eq!(record["carried"]["tunnels"], 1, "{record}");
    assert_eq!(record["closed"]["tunnels (TLS: 1012 sent)"], 1, "{record}");
    drop(rt.block_on(tls.next()));
}

/// Under systemd (`Type=notify-reload`, `ExecReload=corral upgrade …`): the old
/// image says RELOADING=1 before it lets go, and the new one READY=1 once it
/// serves; the main pid does not change.
#[test]
fn systemd_hears_reloading_then_ready_around_an_upgrade() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new("upgrade-notify");
    let path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the stand-in for systemd");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let work = TempDir::new("upgrade-notify-worker");
    let corral = Corral::start_with(&config(&work, 1), |cmd| {
        cmd.env("NOTIFY_SOCKET", &path);
    });
    let next = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().starts_with("READY=1\n"));
    let pid = corral.child.id();
    let (ok, said) = upgrade(&corral, None);
    assert!(ok, "{said}");
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert!(reloading.contains("STATUS=upgrading"), "{reloading}");
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert_eq!(image(&corral)["pid"], pid);
}

/// With `h2c` on, a connection that has sent nothing yet is being looked at for
/// the HTTP/2 preface: an upgrade carries it as it is, and its request, sent after,
/// is answered by the new image.
#[test]
fn an_upgrade_carries_a_silent_connection_with_h2c_on() {
    let worker = support::RawWorker::start(support::Mode::Echo);
    let corral = Corral::start(&format!("upstreams = [\"{}\"]\nh2c = true\n", worker.addr));
    let mut silent = TcpStream::connect(corral.addr).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // Accepted (and looked at), not waiting in the backlog.
    wait_until(Duration::from_secs(10), "the connection accepted", || {
        accept_queue(corral.addr.port()) == 0
    });
    let (ok, said) = upgrade(&corral, None);
    assert!(ok, "{said}");
    silent
        .write_all(b"GET /late HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    let _ = silent.read_to_string(&mut reply);
    assert_eq!(reply.split(' ').nth(1), Some("200"), "{reply:?}");
}

/// Connections waiting in the accept queues of the listening sockets on `port`
/// (`/proc/net/tcp`: a listening socket's receive queue is its accept queue).
fn accept_queue(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let listening = *fields.get(3)? == "0A";
            let rx = fields.get(4)?.split(':').nth(1)?;
            let ours = u16::from_str_radix(local_port, 16).ok()? == port;
            (ours && listening).then(|| u64::from_str_radix(rx, 16).ok())?
        })
        .sum()
}

/// The new image reads the config as it is now: two workers carried into a config
/// that asks for one keep both through the upgrade, then the newest is served out.
#[test]
fn an_upgrade_into_a_config_with_fewer_workers_scales_them_after() {
    let work = TempDir::new("upgrade-fewer");
    let corral = start(&work);
    let before = pids(&corral);
    corral.rewrite(&config(&work, 1));
    let (ok, said) = upgrade(&corral, None);
    assert!(ok, "{said}");
    let left = corral.wait_workers(Duration::from_secs(30), |w| w.len() == 1);
    let pid = left[0]["pid"].as_u64().expect("a pid");
    assert!(before.contains(&pid), "{before:?} {left:?}");
    assert_eq!(get(corral.addr, "/"), Some(200));
}

/// With tagged sids and no configured key, the key corral made at random is carried
/// over: a tagged sid issued before the upgrade still reads after it (with another
/// key, its signature would not, and the session would be unknown).
#[test]
fn an_upgrade_carries_a_random_tag_key() {
    let work = TempDir::new("upgrade-tags");
    let corral = Corral::start(&format!(
        "{}[engineio]\ntag_sids = true\n",
        config(&work, 2)
    ));
    let hs = "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: a\r\n\r\n";
    let reply = support::exchange(corral.addr, hs.as_bytes()).expect("handshake");
    let text = reply.text();
    let start = text.find("\"sid\":\"").expect("a sid") + 7;
    let end = start + text[start..].find('"').expect("the sid's end");
    let sid = text[start..end].to_string();
    assert!(sid.contains('.'), "not tagged: {sid}");
    let poll = || {
        let ask = format!(
            "GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        support::exchange(corral.addr, ask.as_bytes()).map(|r| (r.status, r.text()))
    };
    assert_eq!(poll(), Some((200, "6".into())));
    let (ok, said) = upgrade(&corral, None);
    assert!(ok, "{said}");
    assert_eq!(poll(), Some((200, "6".into())), "{}", corral.log_text());
}
