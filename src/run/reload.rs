//! Config reload (`corral reload [--keep-workers]`, SIGHUP, SIGUSR2): reads the file
//! again, checks it whole as `corral check` does, and applies what changed to the
//! running corral without dropping a connection. New connections take the new
//! gate (limits, timeouts, auth, access log, forwarding rules); open
//! ones finish on the gate they started with, as an nginx worker of the old
//! generation does. Static upstreams join or are served out; workers take the new
//! `[workers]` table, scaled or rolled.
//!
//! It owns the rule of which keys change live, the order a reload is applied in
//! (everything that can fail before anything is changed: never half applied), and
//! the record of reloads for /status. It builds parts with `run`'s own builders and
//! never reaches into a part's insides.

use super::parts;
use super::preflight;
use crate::admin::Addresses;
use crate::config::{Config, ConfigError};
use crate::edge::listen::{Front, Serving, Slots};
use crate::edge::status::{self, StatusListener};
use crate::engineio::router::Router;
use crate::observe::metrics::{Reload, Reloads, Sources};
use crate::proxy::route::{Proxy, Tags};
use crate::runtime::life::Life;
use crate::workers::health;
use crate::workers::pool::Pool;
use crate::workers::supervisor::Supervisor;
use std::sync::Arc;

/// Reads the config again as corral was started (file and command-line flags);
/// also returns the file's name for messages.
pub type Reread = Arc<dyn Fn() -> Result<(Config, String), ConfigError> + Send + Sync>;

/// Keys (a table stands for every key in it) a reload applies to a running corral.
/// A change to any other refuses the whole reload, naming it.
const LIVE: &[&str] = &[
    "limits",
    "timeouts",
    "auth",
    "access_log",
    "trusted_proxies",
    "underscores_in_headers",
    "h2c",
    "engineio.path",
    "engineio.sticky",
    "engineio.max_sessions",
    "engineio.session_idle",
    "balance",
    "health",
    "upstreams",
    "listen",
    "listener",
    "admin",
    "cluster.key",
    "cluster.key_file",
    "cluster.accept_keys",
    "cluster.previous_key_for",
    "cluster.nodes",
];

/// Keys under `[workers]` that make a worker a different program: a worker started
/// before they changed is replaced even by `--keep-workers`.
const WORKER_IDENTITY: &[&str] = &["workers.command", "workers.env", "workers.cwd"];

/// The running parts, as the App holds them and a reload changes them.
pub struct Live {
    /// How the config is read again; None when corral was not started from a file.
    pub(super) reread: Option<Reread>,
    /// The config in force; held for the whole of a reload, so reloads take turns.
    pub(super) current: tokio::sync::Mutex<Arc<Config>>,
    pub(super) front: Front,
    pub(super) slots: Slots,
    pub(super) pool: Arc<Pool>,
    pub(super) router: Arc<Router>,
    pub(super) checks: health::Checks,
    pub(super) supervisor: Option<Arc<Supervisor>>,
    pub(super) serving: Arc<Serving>,
    /// The status listener (`[admin]`), when one runs.
    pub(super) status: std::sync::Mutex<Option<StatusListener>>,
    pub(super) sources: Arc<Sources>,
    pub(super) addresses: Addresses,
    /// The App's lifetime, for the tasks a reload starts; `late`, for access log
    /// writers.
    pub(super) root: Life,
    pub(super) late: Life,
    pub(super) reloads: Arc<Reloads>,
}

/// What a reload does to the status listener, decided before anything changes.
enum StatusChange {
    Keep,
    Close,
    /// The same address, these credentials.
    Auth(Option<Arc<crate::edge::auth::BasicAuth>>),
    /// Bound on a new address (the old one, if any, closes).
    Start(
        status::StatusSocket,
        Option<Arc<crate::edge::auth::BasicAuth>>,
    ),
}

/// What an applied reload did.
struct Applied {
    changed: Vec<String>,
    workers: Result<String, String>,
}

impl crate::admin::Reload for Live {
    fn reload(
        &self,
        keep_workers: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(self.reload(keep_workers))
    }
}

impl Live {
    /// Reads the file again and applies it; the answer says what changed and what
    /// happened to the workers, or why nothing changed.
    pub async fn reload(&self, keep_workers: bool) -> Result<String, String> {
        let mut current = self.current.lock().await;
        let outcome = self.apply(&mut current, keep_workers).await;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (record, answer) = match outcome {
            Ok(a) => {
                let changed = match a.changed.is_empty() {
                    true => "nothing changed in the config".to_string(),
                    false => format!("changed {}", a.changed.join(", ")),
                };
                let workers = match &a.workers {
                    Ok(w) | Err(w) => w.clone(),
                };
                let answer = match &a.workers {
                    Ok(w) => Ok(format!("config reloaded: {changed}; workers: {w}")),
                    Err(w) => Err(format!(
                        "config reloaded ({changed}), but the workers were not: {w}"
                    )),
                };
                let record = Reload {
                    at,
                    applied: true,
                    changed: a.changed,
                    error: a.workers.err(),
                    workers,
                };
                (record, answer)
            }
            Err(why) => {
                let record = Reload {
                    at,
                    applied: false,
                    changed: Vec::new(),
                    error: Some(why.clone()),
                    workers: "kept".into(),
                };
                (
                    record,
                    Err(format!("{why}; the running config is unchanged")),
                )
            }
        };
        match &answer {
            Ok(text) => tracing::info!("reload: {text}"),
            Err(text) => tracing::error!("reload: {text}"),
        }
        self.reloads.record(record);
        answer
    }

    /// Everything that can fail comes before the first change.
    async fn apply(
        &self,
        current: &mut Arc<Config>,
        keep_workers: bool,
    ) -> Result<Applied, String> {
        let Some(reread) = &self.reread else {
            return Err("corral was not started from a config file".into());
        };
        let (cfg, file) = reread().map_err(|e| e.to_string())?;
        for w in preflight::check(&cfg, &file).map_err(|e| e.to_string())? {
            tracing::warn!("{w}");
        }
        let changed = changed_keys(current, &cfg);
        let fixed: Vec<&str> = changed
            .iter()
            .map(String::as_str)
            .filter(|k| !is_live(k))
            .collect();
        if !fixed.is_empty() {
            return Err(format!(
                "{file}: cannot change while corral runs: {} (restart corral for these)",
                fixed.join(", ")
            ));
        }
        if parts::admin_path(current) != parts::admin_path(&cfg) {
            return Err(format!(
                "{file}: listen: the first listener's port names the admin socket, which \
                 `corral reload` and `corral status` find corral by; set admin_socket, or \
                 keep that listener first"
            ));
        }
        let mut changed = changed;
        let cfg = Arc::new(cfg);
        let mut proxy = self.front.load().proxy().renewed(cfg.clone());
        if let Some(tags) = retag(&proxy, &cfg).map_err(|e| format!("{file}: {e}"))? {
            let rekeyed = proxy
                .tags()
                .is_some_and(|t| t.tagger.key() != tags.tagger.key());
            if rekeyed && !changed.iter().any(|k| k.starts_with("cluster.key")) {
                changed.push("cluster.key_file (its contents)".into());
            }
            proxy.enable_tags(tags);
        }
        let listeners = self
            .serving
            .plan(&cfg)
            .map_err(|e| format!("{file}: {e}"))?;
        let status = self
            .plan_status(&cfg)
            .await
            .map_err(|e| format!("{file}: {e:#}"))?;
        let gate = parts::gate_for(&cfg, Arc::new(proxy), &self.root, &self.late)
            .map_err(|e| format!("{file}: {e:#}"))?;
        // From here on nothing fails: the parts take the new settings.
        self.apply_upstreams(current, &cfg);
        self.pool.set_policy(cfg.balance.policy);
        self.pool.set_thresholds(cfg.health.rise, cfg.health.fall);
        self.checks.store(Arc::new(cfg.health.clone()));
        self.router
            .set_bounds(cfg.engineio.max_sessions, cfg.engineio.session_idle);
        self.slots.resize(cfg.limits.max_connections);
        if let (Some(sup), Some(spec)) = (&self.supervisor, &cfg.workers) {
            sup.set_spec(spec.clone());
        }
        // The listeners' kinds before the gate: an accept loop reads its kind again
        // when it sees a new gate.
        self.serving.commit(listeners);
        self.addresses
            .listeners
            .store(Arc::new(self.serving.addrs()));
        self.commit_status(status);
        self.front.store(Arc::new(gate));
        *current = cfg.clone();
        let workers = self.workers(&cfg, &changed, keep_workers).await;
        Ok(Applied { changed, workers })
    }

    /// Binds a new status listener, or makes its new credentials.
    async fn plan_status(&self, cfg: &Config) -> anyhow::Result<StatusChange> {
        let running = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.configured);
        Ok(match (running, &cfg.admin) {
            (None, None) => StatusChange::Keep,
            (Some(_), None) => StatusChange::Close,
            (Some(at), Some(admin)) if at == admin.listen => {
                StatusChange::Auth(parts::admin_auth(admin)?)
            }
            (_, Some(admin)) => {
                let auth = parts::admin_auth(admin)?;
                StatusChange::Start(status::bind(admin.listen).await?, auth)
            }
        })
    }

    fn commit_status(&self, change: StatusChange) {
        let mut running = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match change {
            StatusChange::Keep => return,
            StatusChange::Auth(auth) => {
                if let Some(l) = running.as_ref() {
                    l.set_auth(auth);
                }
                return;
            }
            StatusChange::Close | StatusChange::Start(..) => {
                if let Some(old) = running.take() {
                    old.close();
                    tracing::info!(addr = %old.addr, "status listener closed");
                }
            }
        }
        if let StatusChange::Start(socket, auth) = change {
            let l = status::start(socket, self.sources.clone(), auth, &self.root);
            parts::say_status(l.addr);
            *running = Some(l);
        }
        let addr = running.as_ref().map(|l| l.addr);
        self.addresses.status.store(Arc::new(addr));
    }

    /// Static upstreams added join at once; removed ones are served out (their
    /// sessions reconnect elsewhere) and then leave the pool.
    fn apply_upstreams(&self, old: &Config, new: &Config) {
        for addr in new.upstreams.iter().filter(|a| !old.upstreams.contains(a)) {
            let w = self.pool.add(*addr, false);
            tracing::info!(worker = w.id, %addr, "upstream added");
        }
        for addr in old.upstreams.iter().filter(|a| !new.upstreams.contains(a)) {
            let Some(w) = self.pool.static_at(*addr) else {
                continue;
            };
            let pool = self.pool.clone();
            let drain = new
                .timeouts
                .shutdown_drain
                .max(std::time::Duration::from_secs(30));
            let spread = new
                .workers
                .as_ref()
                .map_or(crate::config::DEFAULT_CLOSE_SPREAD, |w| w.close_spread);
            let addr = *addr;
            self.root.spawn_until_drained(async move {
                pool.serve_out(&w, drain, spread).await;
                pool.retire(&w);
                tracing::info!(worker = w.id, %addr, "upstream removed");
            });
        }
    }

    /// Rolls the workers (a plain reload, or a new command, environment or
    /// directory), else scales them to a new count.
    async fn workers(
        &self,
        cfg: &Config,
        changed: &[String],
        keep: bool,
    ) -> Result<String, String> {
        let (Some(sup), Some(spec)) = (&self.supervisor, &cfg.workers) else {
            return Ok("none supervised".into());
        };
        let new_program = changed.iter().find(|k| {
            WORKER_IDENTITY
                .iter()
                .any(|w| *k == w || k.starts_with(&format!("{w}.")))
        });
        let count = spec.count.resolve();
        let mut said = Vec::new();
        if !keep || new_program.is_some() {
            let before = sup.count().await;
            sup.rolling_restart().await.map_err(|e| e.to_string())?;
            said.push(match (keep, new_program) {
                (true, Some(key)) => format!("{before} replaced ({key} changed)"),
                _ => format!("{before} replaced"),
            });
        }
        if sup.count().await != count {
            sup.scale(count).await.map_err(|e| e.to_string())?;
            said.push(format!("scaled to {count}"));
        }
        Ok(match said.is_empty() {
            true => format!("{count} kept"),
            false => said.join(", "),
        })
    }
}

/// The tags for `cfg`'s cluster, when sids are tagged: its key (or the random one
/// this corral started with, when none is configured), the keys it accepts, and
/// the key it replaces accepted for `previous_key_for`; the other nodes found
/// where they were.
fn retag(proxy: &Proxy, cfg: &Config) -> Result<Option<Tags>, String> {
    let Some(old) = proxy.tags() else {
        return Ok(None);
    };
    let cluster = &cfg.cluster;
    let key = match cluster.key.is_some() || cluster.key_file.is_some() {
        true => cluster.signing_key().map_err(|e| e.to_string())?,
        false => old.tagger.key().to_vec(),
    };
    let tagger = parts::tagger_for(cluster, key).after(&old.tagger, cluster.previous_key_for);
    Ok(Some(Tags::new(tagger, cluster).found_as(old)))
}

/// Whether a reload may change `key` in a running corral.
fn is_live(key: &str) -> bool {
    // `[workers]` as a whole (added or removed) is not; each key in it is.
    if key.starts_with("workers.") {
        return true;
    }
    LIVE.iter()
        .any(|l| key == *l || key.strip_prefix(l).is_some_and(|r| r.starts_with('.')))
}

/// The dotted keys whose values differ between `old` and `new` (a table added or
/// removed as one key, arrays compared whole).
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (
        toml::Value::try_from(old).ok(),
        toml::Value::try_from(new).ok(),
    );
    let mut out = Vec::new();
    walk("", a.as_ref(), b.as_ref(), &mut out);
    out
}

fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
    match (a, b) {
        (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = match prefix {
                    "" => k.clone(),
                    p => format!("{p}.{k}"),
                };
                walk(&key, x.get(k), y.get(k), out);
            }
        }
        (a, b) if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "t.toml").expect("config")
    }

    #[test]
    fn changed_keys_name_each_leaf_and_whole_tables() {
        let a = parse("upstreams = [\"127.0.0.1:1\"]\n[limits]\nmax_body = \"1M\"\n");
        let b = parse(
            "upstreams = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n[limits]\nmax_body = \"2M\"\n\
             [auth]\nhtpasswd = \"x\"\n",
        );
        assert_eq!(
            changed_keys(&a, &b),
            ["auth", "limits.max_body", "upstreams"]
        );
        assert!(changed_keys(&a, &a).is_empty());
    }

    #[test]
    fn only_listed_keys_change_live() {
        for key in [
            "limits.max_body",
            "timeouts.read",
            "auth",
            "auth.realm",
            "access_log.enabled",
            "workers.count",
            "workers.command",
            "upstreams",
            "balance.policy",
            "listen",
            "listener",
            "admin",
            "admin.listen",
            "admin.htpasswd",
            "cluster.key",
            "cluster.key_file",
            "cluster.accept_keys",
            "cluster.nodes",
            "cluster.nodes.b",
        ] {
            assert!(is_live(key), "{key}");
        }
        for key in [
            "workers",
            "message_queue.listen",
            "engineio.tag_sids",
            "cluster.node",
            "threads",
            "admin_socket",
            "limitsx",
        ] {
            assert!(!is_live(key), "{key}");
        }
    }
}
