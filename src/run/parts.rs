//! What `run` builds from a config at start and `reload` builds again: the gate in
//! front of the proxy (which a reload puts in the listeners' `Front`), the signer
//! of tagged sids, the status pages' credentials, the admin socket's path. It
//! builds; it holds nothing.

use crate::config::{AdminConfig, Cluster, Config};
use crate::edge::auth::BasicAuth;
use crate::edge::gate::Gate;
use crate::engineio::sidtag::Tagger;
use crate::observe::access::AccessLog;
use crate::proxy::route::Proxy;
use crate::runtime::life::Life;
use std::sync::Arc;

/// The gate for `cfg` in front of `proxy`: basic auth (its file watched for
/// changes while the gate lives) and the access log (its writer a thread of
/// `late`, which ends after the client connections), as configured; the file
/// watcher is `background`'s.
pub(super) fn gate_for(
    cfg: &Arc<Config>,
    proxy: Arc<Proxy>,
    background: &Life,
    late: &Life,
) -> anyhow::Result<Gate> {
    let auth = match &cfg.auth {
        Some(a) => {
            let auth = Arc::new(BasicAuth::new(&a.htpasswd, &a.realm, a.exempt.clone())?);
            auth.spawn_reloader(background);
            Some(auth)
        }
        None => None,
    };
    let access = match cfg.access_log.enabled {
        true => Some(AccessLog::start(
            &cfg.access_log.path,
            cfg.access_log.format,
            cfg.access_log.engineio,
            proxy.metrics.clone(),
            late,
        )?),
        false => None,
    };
    Ok(Gate::new(cfg.clone(), auth, access, proxy))
}

/// The signer of tagged sids for `cluster`, signing with `key`.
pub(super) fn tagger_for(cluster: &Cluster, key: Vec<u8>) -> Tagger {
    let accepted = cluster.accept_keys.iter().map(|k| k.as_bytes().to_vec());
    Tagger::new(&key).accepting(accepted)
}

/// The admin socket's path: configured, or named by the first listener's port.
pub(super) fn admin_path(cfg: &Config) -> std::path::PathBuf {
    let path = cfg
        .admin_socket
        .clone()
        .unwrap_or_else(|| crate::admin::default_path(cfg.first_port()));
    // Absolute, as the link by config file points to it and is known by it.
    std::path::absolute(&path).unwrap_or(path)
}

/// Links the admin socket at `admin` where commands given config file `file` look
/// for it (`admin::file_link`), replacing a stale link; None if it cannot.
pub(super) fn link_admin(
    file: &std::path::Path,
    admin: &std::path::Path,
) -> Option<std::path::PathBuf> {
    let link = crate::admin::file_link(file);
    let _ = std::fs::remove_file(&link);
    match std::os::unix::fs::symlink(admin, &link) {
        Ok(()) => Some(link),
        Err(e) => {
            tracing::warn!(link = %link.display(), error = %e, "cannot link the admin socket by config file");
            None
        }
    }
}

/// The status pages' credentials (`[admin] htpasswd`).
pub(super) fn admin_auth(admin: &AdminConfig) -> anyhow::Result<Option<Arc<BasicAuth>>> {
    Ok(match &admin.htpasswd {
        Some(file) => Some(Arc::new(BasicAuth::new(file, "corral admin", Vec::new())?)),
        None => None,
    })
}

/// Says where the status pages are.
pub(super) fn say_status(at: std::net::SocketAddr) {
    tracing::info!("status page on http://{at}/status, metrics on http://{at}/metrics");
}
