//! What ends a run, and what only ends a scenario.

use std::io;
use std::time::Duration;

/// A failure of the run. All but [`Error::Exchange`] end it before a report is printed: the
/// settings, the chokepoint build, or a process or socket the bench cannot do without.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A `LOAD_…` variable that is not a non-negative number.
    #[error("{name}={value}: expected a non-negative number")]
    Setting { name: &'static str, value: String },
    /// `cargo build --release -p chokepoint` failed, or named no `chokepoint` executable.
    #[error("building the release chokepoint binary: {0}")]
    Build(String),
    /// A step the run depends on (a temp dir, the origin's socket, starting the proxy).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The proxy never printed `listen=ADDR` on stderr.
    #[error("chokepoint did not report its listen address within {0:?}")]
    NoListenAddr(Duration),
    /// The certificates or TLS settings of scenarios i and j could not be made.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A scenario's own traffic failed (d, e): its row says so and the run goes on.
    #[error(transparent)]
    Exchange(#[from] io::Error),
}

impl Error {
    /// `map_err` for an I/O step the run depends on: `what` says which.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
