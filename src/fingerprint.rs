//! A stable hash of file contents: how the config, token and TLS watchers tell a changed file
//! from one read again unchanged. Its own module so that `config` and `tls` both use it
//! without depending on each other.

use std::hash::{Hash, Hasher};

/// A hash of `bytes`, stable for the life of the process (it is only ever compared with
/// hashes this process made).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}
