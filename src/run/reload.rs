//! Config reload (`corral reload [--keep-workers]`, SIGHUP, SIGUSR2): reads the file
//! again, checks it whole as `corral check` does, and applies what changed to the
//! running corral without dropping a connection. New connections take the new
//! gate (limits, timeouts, auth, access log, forwarding rules, fast paths); open
//! ones finish on the gate they started with, as an nginx worker of the old
//! generation does. Static upstreams join or are served out; workers take the new
//! `[workers]` table, scaled or rolled.
//!
//! It owns the rule of which keys change live, the order a reload is applied in
//! (everything that can fail before anything is changed: never half applied), and
//! the record of reloads for /status. It builds parts with `run`'s own builders and
//! never reaches into a part's insides.

use super::preflight;
use crate::config::{Config, ConfigError};
use crate::edge::listen::{Front, Slots};
use crate::edge::tls;
use crate::engineio::router::Router;
use crate::observe::metrics::{Reload, Reloads};
use crate::runtime::tasks::Background;
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
    "experimental",
    "engineio.path",
    "engineio.sticky",
    "engineio.max_sessions",
    "engineio.session_idle",
    "balance",
    "health",
    "upstreams",
];

/// Keys under `[workers]` that make a worker a different program: a worker started
/// before they changed is replaced even by `--keep-workers`.
const WORKER_IDENTITY: &[&str] = &["workers.command", "workers.env", "workers.cwd"];

/// The parts a reload changes.
pub struct Live {
    pub(super) reread: Reread,
    /// The config in force; held for the whole of a reload, so reloads take turns.
    pub(super) current: tokio::sync::Mutex<Arc<Config>>,
    pub(super) front: Front,
    pub(super) slots: Slots,
    pub(super) pool: Arc<Pool>,
    pub(super) router: Arc<Router>,
    pub(super) checks: health::Checks,
    pub(super) supervisor: Option<Arc<Supervisor>>,
    pub(super) certs: Vec<Arc<tls::Certs>>,
    pub(super) background: Background,
    pub(super) reloads: Arc<Reloads>,
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
        let (cfg, file) = (self.reread)().map_err(|e| e.to_string())?;
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
        let cfg = Arc::new(cfg);
        let proxy = Arc::new(self.front.load().proxy().renewed(cfg.clone()));
        let gate = super::front::gate_for(&cfg, proxy, &self.background)
            .map_err(|e| format!("{file}: {e:#}"))?;
        // From here on nothing fails: the parts take the new settings.
        self.apply_upstreams(current, &cfg);
        self.pool.set_policy(cfg.balance.policy);
        self.pool.set_thresholds(cfg.health.rise, cfg.health.fall);
        self.checks.store(Arc::new(cfg.health.clone()));
        self.router
            .set_bounds(cfg.engineio.max_sessions, cfg.engineio.session_idle);
        self.slots
            .resize(cfg.limits.max_connections, &self.background);
        if let (Some(sup), Some(spec)) = (&self.supervisor, &cfg.workers) {
            sup.set_spec(spec.clone());
        }
        self.front.store(Arc::new(gate));
        for c in &self.certs {
            if let Err(e) = c.reload() {
                tracing::error!("TLS certificate not reloaded, keeping the old one: {e}");
            }
        }
        *current = cfg.clone();
        let workers = self.workers(&cfg, &changed, keep_workers).await;
        Ok(Applied { changed, workers })
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
            self.background.spawn(async move {
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
        ] {
            assert!(is_live(key), "{key}");
        }
        for key in [
            "listen",
            "listener",
            "workers",
            "message_queue.listen",
            "engineio.tag_sids",
            "cluster.key",
            "threads",
            "admin.listen",
            "limitsx",
        ] {
            assert!(!is_live(key), "{key}");
        }
    }
}
