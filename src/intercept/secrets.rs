//! The live credentials injected into intercepted requests: one store per secret file, held by
//! the reload snapshot and re-read every second (`reload`), so a rotated Kubernetes Secret takes
//! effect on the next request without a restart.
//!
//! A secret is never logged, never written to an audit line and never compared: it is only
//! formatted into the header it is injected as (marked sensitive, so hyper's HPACK-like
//! encoders and `Debug` output keep it out). A file that stays missing, empty or unreadable for
//! [`REVOKE_AFTER_MISSES`] reads is taken as removed: requests needing it are refused with
//! `credential_unavailable` rather than sent without it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

/// Largest secret accepted (an API key or a bearer token is well under a kilobyte; a GitHub
/// App JWT under two).
pub const MAX_SECRET_BYTES: usize = 8192;

/// After this many consecutive missing or empty reads (one a second) the secret is dropped: the
/// kubelet swaps Secret files atomically, so a file that stays gone means the key was removed.
pub const REVOKE_AFTER_MISSES: u32 = 3;

/// Why a secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read secret file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty (after trimming whitespace) or too long.
    #[error("secret file {} must hold 1 to {MAX_SECRET_BYTES} bytes (surrounding whitespace is ignored)", path.display())]
    Length {
        /// The file.
        path: PathBuf,
    },
    /// The secret holds a byte a header value cannot carry (a control character, a line break
    /// inside it).
    #[error("secret file {} holds a character a header value cannot carry (control characters, line breaks inside the value)", path.display())]
    NotHeaderValue {
        /// The file.
        path: PathBuf,
    },
}

/// One secret file, re-read as it changes.
#[derive(Debug)]
pub struct Secret {
    path: PathBuf,
    /// The secret; empty when unavailable.
    value: ArcSwap<Vec<u8>>,
    misses: AtomicU32,
    /// A new value read once: applied when the next read finds the same bytes (a writer that
    /// truncates and then writes must not make a half-written key live).
    pending: Mutex<Option<Vec<u8>>>,
}

/// The secret stores of a config, one per distinct file.
#[derive(Debug, Default)]
pub struct Secrets {
    files: Vec<Arc<Secret>>,
}

// === impl Secret ===

impl Secret {
    /// Read the secret from `path`; a file that cannot be read makes a store that is
    /// unavailable until the file appears (validation has reported it already).
    pub fn load(path: &Path) -> Secret {
        let (value, misses) = match read_secret(path) {
            Ok(v) => (v, 0),
            Err(_) => (Vec::new(), REVOKE_AFTER_MISSES),
        };
        Secret {
            path: path.to_owned(),
            value: ArcSwap::from_pointee(value),
            misses: AtomicU32::new(misses),
            pending: Mutex::new(None),
        }
    }

    /// The file the secret comes from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current secret, or `None` while it is unavailable.
    pub fn get(&self) -> Option<Arc<Vec<u8>>> {
        let v = self.value.load_full();
        (!v.is_empty()).then_some(v)
    }

    /// Re-read the file; returns true if the secret changed. A new value is applied once two
    /// reads in a row find it (`at_once`, for SIGHUP: on the first). A missing, unreadable or
    /// empty file keeps the old value for a moment and drops it after
    /// [`REVOKE_AFTER_MISSES`] reads in a row; the error is returned for logging.
    pub fn refresh(&self, at_once: bool) -> Result<bool, SecretError> {
        let fresh = match read_secret(&self.path) {
            Ok(v) => v,
            Err(e) => {
                let misses = self.misses.fetch_add(1, Ordering::Relaxed) + 1;
                if misses >= REVOKE_AFTER_MISSES && !self.value.load().is_empty() {
                    self.value.store(Arc::new(Vec::new()));
                    tracing::warn!(file = %self.path.display(), "secret file gone: requests that need it are refused");
                    return Ok(true);
                }
                return Err(e);
            }
        };
        self.misses.store(0, Ordering::Relaxed);
        let mut pending = self.pending.lock();
        if **self.value.load() == fresh {
            *pending = None;
            return Ok(false);
        }
        if !at_once && pending.as_ref() != Some(&fresh) {
            *pending = Some(fresh);
            return Ok(false);
        }
        *pending = None;
        self.value.store(Arc::new(fresh));
        Ok(true)
    }
}

/// Read and check a secret file: bounded, trimmed, fit for a header value.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    use std::io::Read;
    // Bounded: a path naming a device or a huge file must not exhaust memory.
    let limit = (2 * MAX_SECRET_BYTES + 1) as u64;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit).read_to_end(&mut bytes))
        .map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() || trimmed.len() > MAX_SECRET_BYTES || bytes.len() as u64 == limit {
        return Err(SecretError::Length {
            path: path.to_owned(),
        });
    }
    // RFC 9110 §5.5 field-value: visible ASCII, obs-text, and inner spaces and tabs.
    if trimmed
        .iter()
        .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err(SecretError::NotHeaderValue {
            path: path.to_owned(),
        });
    }
    Ok(trimmed.to_vec())
}

// === impl Secrets ===

impl Secrets {
    /// The stores for `paths` (deduplicated). A file `prev` already watches keeps its store
    /// (its value and its count of missing reads); a new one is read now.
    pub fn load<'a>(paths: impl IntoIterator<Item = &'a Path>, prev: Option<&Secrets>) -> Secrets {
        let mut files: Vec<Arc<Secret>> = Vec::new();
        for path in paths {
            if files.iter().any(|s| s.path() == path) {
                continue;
            }
            let kept = prev.and_then(|p| p.files.iter().find(|s| s.path() == path));
            files.push(match kept {
                Some(s) => Arc::clone(s),
                None => Arc::new(Secret::load(path)),
            });
        }
        Secrets { files }
    }

    /// The store of `path`, if the config names it.
    pub fn get(&self, path: &Path) -> Option<&Secret> {
        self.files.iter().find(|s| s.path() == path).map(|s| &**s)
    }

    /// Every store.
    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.files.iter().map(|s| &**s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_settles_and_removal_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-one\n").unwrap();
        let s = Secret::load(&path);
        assert_eq!(s.get().unwrap().as_slice(), b"sk-one");
        std::fs::write(&path, "sk-two").unwrap();
        assert!(
            !s.refresh(false).unwrap(),
            "first read of a new value waits"
        );
        assert_eq!(s.get().unwrap().as_slice(), b"sk-one");
        assert!(s.refresh(false).unwrap());
        assert_eq!(s.get().unwrap().as_slice(), b"sk-two");
        std::fs::remove_file(&path).unwrap();
        for _ in 1..REVOKE_AFTER_MISSES {
            assert!(s.refresh(false).is_err());
            assert!(s.get().is_some(), "kept for a moment");
        }
        assert!(s.refresh(false).unwrap());
        assert!(s.get().is_none());
    }

    #[test]
    fn bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        for bad in [&b"  \n"[..], b"a\r\nb", b"a\x00b"] {
            std::fs::write(&path, bad).unwrap();
            assert!(read_secret(&path).is_err(), "{bad:?}");
        }
        std::fs::write(&path, vec![b'x'; MAX_SECRET_BYTES + 1]).unwrap();
        assert!(matches!(
            read_secret(&path),
            Err(SecretError::Length { .. })
        ));
        assert!(matches!(
            read_secret(&dir.path().join("none")),
            Err(SecretError::Read { .. })
        ));
        let s = Secret::load(&dir.path().join("none"));
        assert!(s.get().is_none());
    }
}
