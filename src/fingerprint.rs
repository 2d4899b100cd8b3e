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

/// What a file's metadata says about its content: size, modification and change times and, on
/// Unix, device and inode (so a file replaced by rename, or a Kubernetes `..data` symlink swap,
/// is a new stamp). The deny-list watcher compares stamps instead of hashing lists of millions
/// of lines every second; any write changes the change time (nanoseconds on Linux), so an
/// unchanged stamp means unchanged content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileStamp(u64);

impl FileStamp {
    /// The stamp of the file at `path` (through symlinks), or `None` if it cannot be read.
    pub fn of(path: &std::path::Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        meta.len().hash(&mut h);
        meta.modified().ok().hash(&mut h);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec()).hash(&mut h);
        }
        Some(FileStamp(h.finish()))
    }
}
