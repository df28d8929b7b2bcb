//! HTTP basic authentication from an htpasswd file, as `htpasswd` (apache2-utils)
//! writes it: bcrypt (`$2y$`, `$2b$`, `$2a$`), Apache MD5 (`$apr1$`) and `{SHA}`.
//!
//! It owns the user table (reloaded when the file changes) and a cache of verified
//! credentials, so that polling traffic does not pay bcrypt on every request: the
//! cache is keyed by a SHA-256 of the credentials (never the password itself), bounded,
//! expiring, and emptied when the file changes. It decides nothing about paths beyond
//! the exempt prefixes it is given.

use base64::Engine;
use md5::{Digest, Md5};
use sha2::Sha256;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Verified credentials are trusted this long without checking the hash again.
const CACHE_TTL: Duration = Duration::from_secs(300);
/// Most cached credentials; when full, expired ones go, then everything.
const CACHE_MAX: usize = 10_000;
/// Longest Authorization header value considered.
const MAX_HEADER: usize = 4096;

/// A stored password hash.
#[derive(Debug, Clone, PartialEq)]
pub enum Hash {
    /// `$2y$…`, as `htpasswd -B` writes.
    Bcrypt(String),
    /// Apache's MD5 (`$apr1$salt$digest`, `htpasswd -m`).
    Apr1 {
        /// The salt.
        salt: String,
        /// The whole hash, as stored.
        full: String,
    },
    /// `{SHA}` and base64 of SHA-1 (`htpasswd -s`).
    Sha1(Vec<u8>),
}

/// What is wrong with an htpasswd file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("{}: cannot read: {cause}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// A line is not `user:hash`.
    #[error("line {0}: expected user:hash")]
    NotUserHash(usize),
    /// A line has no user name.
    #[error("line {0}: empty user name")]
    EmptyUser(usize),
    /// A line's hash is malformed or of an unsupported kind.
    #[error("line {line} (user {user}): {problem}")]
    Hash {
        /// The line number, from 1.
        line: usize,
        /// The user it names.
        user: String,
        /// What is wrong with the hash.
        problem: &'static str,
    },
    /// The same, in a file.
    #[error("{}: {cause}", path.display())]
    InFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong in it.
        cause: Box<Error>,
    },
}

/// Parses htpasswd text: `user:hash` per line; blank lines and `#` comments skipped.
/// An error names the line and what is wrong with it.
pub fn parse(text: &str) -> Result<HashMap<String, Hash>, Error> {
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line.split_once(':').ok_or(Error::NotUserHash(n + 1))?;
        if user.is_empty() {
            return Err(Error::EmptyUser(n + 1));
        }
        let hash = parse_hash(hash).map_err(|problem| Error::Hash {
            line: n + 1,
            user: user.to_string(),
            problem,
        })?;
        users.insert(user.to_string(), hash);
    }
    Ok(users)
}

fn parse_hash(h: &str) -> Result<Hash, &'static str> {
    if ["$2y$", "$2b$", "$2a$"].iter().any(|p| h.starts_with(p)) {
        if h.len() != 60 {
            return Err("bcrypt hash is not 60 characters");
        }
        return Ok(Hash::Bcrypt(h.to_string()));
    }
    if let Some(rest) = h.strip_prefix("$apr1$") {
        let (salt, digest) = rest
            .split_once('$')
            .ok_or("apr1 hash without a '$' after the salt")?;
        if salt.is_empty() || salt.len() > 8 || digest.len() != 22 {
            return Err("malformed apr1 hash");
        }
        return Ok(Hash::Apr1 {
            salt: salt.to_string(),
            full: h.to_string(),
        });
    }
    if let Some(b64) = h.strip_prefix("{SHA}") {
        let digest = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "{SHA} hash is not base64")?;
        if digest.len() != 20 {
            return Err("{SHA} hash is not 20 bytes");
        }
        return Ok(Hash::Sha1(digest));
    }
    Err("unsupported hash (use htpasswd -B for bcrypt, -m for MD5 or -s for SHA)")
}

/// Whether `password` matches `hash` (constant-time where the comparison is ours).
pub fn verify(hash: &Hash, password: &str) -> bool {
    match hash {
        Hash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
        Hash::Apr1 { salt, full } => constant_time_eq(
            apr1(password.as_bytes(), salt.as_bytes()).as_bytes(),
            full.as_bytes(),
        ),
        Hash::Sha1(d) => {
            let got = sha1::Sha1::digest(password.as_bytes());
            constant_time_eq(&got, d)
        }
    }
}

/// Equal in time that does not depend on where the bytes differ (`subtle`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Apache's MD5-based crypt (`$apr1$salt$digest`).
pub fn apr1(pw: &[u8], salt: &[u8]) -> String {
    let salt = &salt[..salt.len().min(8)];
    let mut alt = Md5::new();
    alt.update(pw);
    alt.update(salt);
    alt.update(pw);
    let alt = alt.finalize();
    let mut ctx = Md5::new();
    ctx.update(pw);
    ctx.update(b"$apr1$");
    ctx.update(salt);
    let mut left = pw.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alt[..n]);
        left -= n;
    }
    let mut i = pw.len();
    while i > 0 {
        if i & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&pw[..1]);
        }
        i >>= 1;
    }
    let mut fin = ctx.finalize();
    for i in 0..1000 {
        let mut c = Md5::new();
        if i & 1 == 1 {
            c.update(pw);
        } else {
            c.update(fin);
        }
        if i % 3 != 0 {
            c.update(salt);
        }
        if i % 7 != 0 {
            c.update(pw);
        }
        if i & 1 == 1 {
            c.update(fin);
        } else {
            c.update(pw);
        }
        fin = c.finalize();
    }
    const ITOA: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::new();
    let mut to64 = |mut v: u32, n: usize| {
        for _ in 0..n {
            out.push(ITOA[(v & 0x3f) as usize] as char);
            v >>= 6;
        }
    };
    let f = |i: usize| fin[i] as u32;
    to64((f(0) << 16) | (f(6) << 8) | f(12), 4);
    to64((f(1) << 16) | (f(7) << 8) | f(13), 4);
    to64((f(2) << 16) | (f(8) << 8) | f(14), 4);
    to64((f(3) << 16) | (f(9) << 8) | f(15), 4);
    to64((f(4) << 16) | (f(10) << 8) | f(5), 4);
    to64(f(11), 2);
    format!("$apr1${}${out}", String::from_utf8_lossy(salt))
}

struct Users {
    table: HashMap<String, Hash>,
    generation: u64,
    stamp: Option<(SystemTime, u64)>,
}

/// Basic authentication for every request not under an exempt prefix.
pub struct BasicAuth {
    file: PathBuf,
    pub realm: String,
    pub exempt: Vec<String>,
    users: RwLock<Users>,
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    /// Hash verifications done (cache misses), for tests and metrics.
    pub verifications: std::sync::atomic::AtomicU64,
    /// Verifications that may run at once: bcrypt costs milliseconds of CPU each,
    /// and a client guessing passwords must not take every blocking thread and core.
    verify_slots: tokio::sync::Semaphore,
    /// Most verifications seen running at once (for the test of the cap).
    busy: std::sync::atomic::AtomicUsize,
    busy_peak: std::sync::atomic::AtomicUsize,
}

/// How long a check waits for a verification slot before it counts as a failure.
const VERIFY_WAIT: Duration = Duration::from_secs(2);

/// One verification slot per core.
fn verify_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn load(path: &Path) -> Result<HashMap<String, Hash>, Error> {
    let text = std::fs::read_to_string(path).map_err(|cause| Error::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    parse(&text).map_err(|e| Error::InFile {
        path: path.to_path_buf(),
        cause: Box::new(e),
    })
}

impl BasicAuth {
    pub fn new(file: &Path, realm: &str, exempt: Vec<String>) -> Result<BasicAuth, Error> {
        let table = load(file)?;
        Ok(BasicAuth {
            file: file.to_path_buf(),
            realm: realm.to_string(),
            exempt,
            users: RwLock::new(Users {
                table,
                generation: 0,
                stamp: stamp(file),
            }),
            cache: Mutex::new(HashMap::new()),
            verifications: std::sync::atomic::AtomicU64::new(0),
            verify_slots: tokio::sync::Semaphore::new(verify_slots()),
            busy: Default::default(),
            busy_peak: Default::default(),
        })
    }

    /// Whether a normalised path needs no credentials.
    pub fn is_exempt(&self, path: &str) -> bool {
        self.exempt
            .iter()
            .any(|p| crate::edge::path::under(path, p))
    }

    /// Checks an `Authorization` header value.
    pub async fn allows(&self, header: Option<&[u8]>) -> bool {
        let Some((user, password)) = header.and_then(credentials) else {
            return false;
        };
        let (hash, generation) = {
            let users = self.users.read().unwrap_or_else(|e| e.into_inner());
            match users.table.get(&user) {
                Some(h) => (h.clone(), users.generation),
                None => return false,
            }
        };
        let key = cache_key(generation, &user, &password);
        if self.cached(&key) {
            return true;
        }
        // bcrypt is deliberately slow: keep it off the async workers, a few at a time.
        let Ok(Ok(_slot)) = tokio::time::timeout(VERIFY_WAIT, self.verify_slots.acquire()).await
        else {
            tracing::warn!("too many password checks waiting; refusing this one");
            return false;
        };
        self.verifications
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = self.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        self.busy_peak
            .fetch_max(now, std::sync::atomic::Ordering::AcqRel);
        let ok = tokio::task::spawn_blocking(move || verify(&hash, &password))
            .await
            .unwrap_or(false);
        self.busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if ok {
            self.remember(key);
        }
        ok
    }

    #[cfg(test)]
    /// Most password verifications that ran at once so far.
    pub fn busy_peak(&self) -> usize {
        self.busy_peak.load(std::sync::atomic::Ordering::Acquire)
    }

    fn cached(&self, key: &[u8; 32]) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).is_some_and(|t| t.elapsed() < CACHE_TTL)
    }

    fn remember(&self, key: [u8; 32]) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, t| t.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, Instant::now());
    }

    /// Reloads the file if it changed; a broken file keeps the previous table.
    pub fn reload_if_changed(&self) {
        let now = stamp(&self.file);
        if now == self.users.read().unwrap_or_else(|e| e.into_inner()).stamp {
            return;
        }
        match load(&self.file) {
            Ok(table) => {
                let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
                users.table = table;
                users.generation += 1;
                users.stamp = now;
                drop(users);
                self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
                tracing::info!(file = %self.file.display(), "htpasswd reloaded");
            }
            Err(e) => {
                tracing::error!("htpasswd not reloaded, keeping the previous users: {e}");
                self.users.write().unwrap_or_else(|e| e.into_inner()).stamp = now;
            }
        }
    }

    /// Watches the file for changes once a second.
    pub fn spawn_reloader(self: &Arc<Self>, bg: &crate::runtime::life::Life) {
        // Weak: an auth a config reload replaced ends its reloader with it.
        let auth = Arc::downgrade(self);
        bg.spawn_until_drained(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                match auth.upgrade() {
                    Some(auth) => auth.reload_if_changed(),
                    None => return,
                }
            }
        });
    }
}

fn cache_key(generation: u64, user: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(generation.to_le_bytes());
    h.update(user.as_bytes());
    h.update([0]);
    h.update(password.as_bytes());
    h.finalize().into()
}

/// `Basic base64(user:password)` → (user, password).
fn credentials(value: &[u8]) -> Option<(String, String)> {
    if value.len() > MAX_HEADER {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, b64) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_passwords_verify_a_few_at_a_time() {
        let dir = std::env::temp_dir().join(format!("corral-auth-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("htpasswd");
        let hash = bcrypt::hash("right", 8).expect("bcrypt");
        std::fs::write(&file, format!("alice:{hash}\n")).expect("write");
        let auth = Arc::new(BasicAuth::new(&file, "r", Vec::new()).expect("auth"));
        let guesses: Vec<_> = (0..24)
            .map(|i| {
                let auth = auth.clone();
                tokio::spawn(async move {
                    let header = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(format!("alice:guess{i}"))
                    );
                    auth.allows(Some(header.as_bytes())).await
                })
            })
            .collect();
        for g in guesses {
            assert!(!g.await.expect("task"));
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(auth.busy_peak() >= 1);
        assert!(
            auth.busy_peak() <= verify_slots(),
            "{} verifications ran at once",
            auth.busy_peak()
        );
    }

    #[test]
    fn apr1_known_vector() {
        // openssl passwd -apr1 -salt saltsalt password
        assert_eq!(
            apr1(b"password", b"saltsalt"),
            "$apr1$saltsalt$yAAkm4libquA.ZWLHbSBq/"
        );
    }

    #[test]
    fn parses_and_verifies_each_format() {
        let bc = bcrypt::hash("pw1", 4).expect("bcrypt");
        let text = format!(
            "# comment\nalice:{bc}\nbob:{}\ncarol:{{SHA}}{}\n\n",
            apr1(b"pw2", b"abcdefgh"),
            base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(b"pw3"))
        );
        let users = parse(&text).expect("parse");
        assert!(verify(&users["alice"], "pw1"));
        assert!(!verify(&users["alice"], "pw2"));
        assert!(verify(&users["bob"], "pw2"));
        assert!(!verify(&users["bob"], "pw1"));
        assert!(verify(&users["carol"], "pw3"));
        assert!(!verify(&users["carol"], ""));
    }

    #[test]
    fn bad_lines_are_named() {
        assert!(parse("nocolon\n")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        assert!(parse("a:plaintext\n")
            .unwrap_err()
            .to_string()
            .contains("unsupported"));
        assert!(parse("a:{SHA}!!!\n").is_err());
        assert!(parse("a:$apr1$nosalt\n").is_err());
        assert!(parse(":$apr1$a$b\n")
            .unwrap_err()
            .to_string()
            .contains("empty user"));
    }

    #[test]
    fn credentials_header() {
        assert_eq!(
            credentials(b"Basic dXNlcjpwYTpzcw=="),
            Some(("user".into(), "pa:ss".into()))
        );
        assert_eq!(credentials(b"Bearer x"), None);
        assert_eq!(credentials(b"Basic !!!"), None);
        assert_eq!(credentials(b"Basic"), None);
    }
}
