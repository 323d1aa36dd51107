//! [`Live`]: the gateway state being served, swapped whole on reload.

use crate::config::Config;
use crate::gateway::State;
use arc_swap::ArcSwap;
use std::path::Path;
use std::sync::Arc;

/// The state being served, swapped atomically when the configuration is
/// reloaded. Requests in flight keep the state they started with.
pub struct Live {
    current: ArcSwap<State>,
}

impl Live {
    /// Starts serving `state`.
    pub fn new(state: Arc<State>) -> Arc<Live> {
        Arc::new(Live {
            current: ArcSwap::new(state),
        })
    }

    /// The state new requests use.
    pub fn state(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Reads, validates and swaps in the configuration at `path`. On any
    /// problem the running configuration stays and the problems are returned.
    /// On success, returns the changed settings that need a restart.
    pub fn reload(&self, path: &Path) -> Result<Vec<String>, Vec<String>> {
        let config = Config::load(path).map_err(|p| p.0)?;
        let (state, restart_needed) = self.state().reload(config)?;
        self.current.store(state);
        Ok(restart_needed)
    }
}
