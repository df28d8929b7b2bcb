//! The gate in front of the proxy, built from a config: at start, and again at each
//! reload (which then puts it in the listeners' `Front`). It builds; it holds
//! nothing.

use crate::config::Config;
use crate::edge::auth::BasicAuth;
use crate::edge::gate::Gate;
use crate::observe::access::AccessLog;
use crate::proxy::route::Proxy;
use crate::runtime::tasks::Background;
use std::sync::Arc;

/// The gate for `cfg` in front of `proxy`: basic auth (its file watched for
/// changes while the gate lives) and the access log, as configured.
pub(super) fn gate_for(
    cfg: &Arc<Config>,
    proxy: Arc<Proxy>,
    background: &Background,
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
        )?),
        false => None,
    };
    Ok(Gate::new(cfg.clone(), auth, access, proxy))
}
