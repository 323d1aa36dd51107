//! What this runner tells the gateway it runs: its own `[commands]` read
//! once at start, with each allowed Django command's options read from the
//! runner host's Django (its python, its settings), exactly as the gateway
//! does in local mode.

use crate::commands::introspect::{self, Known, Snapshot};
use crate::commands::remote::{Described, Description};
use crate::commands::{config as cmdcfg, introspection_job};
use bytes::Bytes;

/// The runner's Django options and its description for the gateway.
pub(super) struct Offer {
    /// What Django said (empty without the Django preset).
    pub(super) intro: Snapshot,
    /// The `POST /__runner__/describe` body.
    pub(super) body: Bytes,
    /// SHA-256 of `body`, sent with every poll.
    pub(super) digest: String,
}

/// Reads the Django commands' options (when the preset is configured) and
/// builds the description of every command these rules allow.
pub(super) async fn read(cfg: &cmdcfg::CommandsConfig) -> Offer {
    let mut intro = Snapshot::default();
    let result = match introspection_job(cfg) {
        Some(job) => {
            let r = introspect::run(&job).await;
            if let Ok(found) = &r {
                let ready = found.values().filter(|r| r.is_ok()).count();
                tracing::info!(
                    commands = ready,
                    failed = found.len() - ready,
                    "read the Django commands' options"
                );
            }
            r
        }
        None => Ok(Default::default()),
    };
    introspect::store(&mut intro, result);
    let mut d = Description::default();
    for c in &cfg.custom {
        d.commands.insert(c.name.clone(), Described::Custom);
    }
    if cfg.django.is_some() {
        let names = match &cfg.mode {
            cmdcfg::Mode::Allowlist(list) => list.clone(),
            cmdcfg::Mode::Blocklist(_) => intro.names(),
        };
        for name in names {
            if cfg.custom(&name).is_some() || !cfg.allowed(&name) {
                continue;
            }
            let entry = match intro.get(&name) {
                Known::Ready(info) => Described::Django {
                    info: Some((*info).clone()),
                    error: None,
                },
                Known::Failed(e) => Described::Django {
                    info: None,
                    // The details are in this runner's log, not the gateway's.
                    error: Some(e.replace("the gateway log", "the runner's log")),
                },
                Known::Pending => Described::Django {
                    info: None,
                    error: Some("its options are still being read".into()),
                },
            };
            d.commands.insert(name, entry);
        }
    }
    let body = Bytes::from(serde_json::to_vec(&d).unwrap_or_default());
    let digest = crate::secret::hex(&crate::secret::sha256(&body));
    Offer {
        intro,
        body,
        digest,
    }
}
