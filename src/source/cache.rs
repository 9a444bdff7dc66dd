//! On-disk cache of remote modules: content by (source digest, path), evicted least recently
//! used first past a size bound; and tag or branch resolutions, trusted for a limited time
//! when the remote cannot be asked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cue::ModuleFiles;
use crate::lru::Lru;
use crate::metrics::Metrics;

const RESOLUTIONS_FILE: &str = "resolutions.json";
const MODULES_DIR: &str = "modules";

static STAGING: AtomicU64 = AtomicU64::new(0);

/// A tag or branch and the digest it last pointed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub digest: String,
    /// Seconds since the Unix epoch.
    pub resolved_at: u64,
}

/// The module cache. Cheap to share behind an `Arc`.
pub struct ModuleCache {
    root: PathBuf,
    max_bytes: u64,
    resolution_ttl: Duration,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

struct State {
    modules: Lru<()>,
    resolutions: BTreeMap<String, Resolution>,
}

impl ModuleCache {
    /// Opens the cache under `root`, indexing what an earlier run left there (oldest
    /// modification first) and trimming it to `max_bytes`.
    pub fn open(root: impl Into<PathBuf>, max_bytes: u64, resolution_ttl: Duration, metrics: Arc<Metrics>) -> Self {
        let root = root.into();
        let modules_dir = root.join(MODULES_DIR);
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&modules_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    // A write that a process did not finish.
                    remove_abandoned(&path);
                    continue;
                }
                let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
                found.push((modified, name, dir_size(&path)));
            }
        }
        found.sort();
        let mut modules = Lru::default();
        for (_, name, size) in found {
            modules.insert(name, (), size);
        }
        let resolutions = std::fs::read(root.join(RESOLUTIONS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let cache = Self {
            root,
            max_bytes,
            resolution_ttl,
            metrics,
            state: Mutex::new(State { modules, resolutions }),
        };
        let mut state = cache.lock();
        let before = (0, 0);
        cache.trim(&mut state, before);
        drop(state);
        cache
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cache key of a module: the source's kind and digest, the folder inside it, and who
    /// fetched it (`credentials`: the pull Secret, or empty): a module fetched with a Secret is
    /// served only to Transforms that use the same Secret, never to one that merely names its
    /// digest.
    pub fn key(kind: &str, digest: &str, path: &str, credentials: &str) -> String {
        let mut hasher = Sha256::new();
        for part in [kind, digest, path, credentials] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        format!("{kind}-{}", &hex::encode(hasher.finalize())[..40])
    }

    /// The module stored under `key`, if any. A module that no longer reads back is dropped.
    pub fn get(&self, key: &str) -> Option<ModuleFiles> {
        let mut state = self.lock();
        if state.modules.get(key).is_none() {
            self.metrics.cue_cache_misses_total.inc();
            return None;
        }
        let dir = self.root.join(MODULES_DIR).join(key);
        match ModuleFiles::from_dir(&dir) {
            Ok(files) => {
                self.metrics.cue_cache_hits_total.inc();
                // Start-up orders by modification time; keep it close to last use.
                let _ = std::fs::File::open(&dir).and_then(|f| f.set_modified(SystemTime::now()));
                Some(files)
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "dropping unreadable cached module");
                let before = (state.modules.len(), state.modules.bytes());
                state.modules.remove(key);
                let _ = std::fs::remove_dir_all(&dir);
                self.report(&state, before);
                self.metrics.cue_cache_misses_total.inc();
                None
            }
        }
    }

    /// Stores `files` under `key`, then evicts the least recently used modules over the bound.
    pub fn put(&self, key: &str, files: &ModuleFiles) -> std::io::Result<()> {
        let modules_dir = self.root.join(MODULES_DIR);
        let staging = modules_dir.join(format!(
            ".staging-{}-{}",
            std::process::id(),
            STAGING.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&staging)?;
        for (name, content) in files.files() {
            std::fs::write(staging.join(name), content)?;
        }
        let dir = modules_dir.join(key);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&staging, &dir)?;
        let size = files.files().values().map(|c| c.len() as u64).sum();
        let mut state = self.lock();
        let before = (state.modules.len(), state.modules.bytes());
        state.modules.insert(key.to_string(), (), size);
        self.trim(&mut state, before);
        Ok(())
    }

    fn trim(&self, state: &mut State, before: (usize, u64)) {
        // The newest module stays even when it alone exceeds the bound: it is in use.
        while state.modules.bytes() > self.max_bytes && state.modules.len() > 1 {
            let Some((key, ())) = state.modules.pop_oldest() else {
                break;
            };
            let _ = std::fs::remove_dir_all(self.root.join(MODULES_DIR).join(&key));
            self.metrics.cue_cache_evictions_total.inc();
        }
        self.report(state, before);
    }

    fn report(&self, state: &State, (entries, bytes): (usize, u64)) {
        self.metrics
            .cue_cache_entries
            .add(state.modules.len() as i64 - entries as i64);
        self.metrics
            .cue_cache_size_bytes
            .add(state.modules.bytes() as i64 - bytes as i64);
    }

    /// Records that `source` (a tag or branch) points at `digest` now.
    pub fn record_resolution(&self, source: &str, digest: &str, now: SystemTime) {
        let mut state = self.lock();
        let resolution = Resolution {
            digest: digest.to_string(),
            resolved_at: unix_seconds(now),
        };
        if state.resolutions.get(source) == Some(&resolution) {
            return;
        }
        state.resolutions.insert(source.to_string(), resolution);
        let ttl = self.resolution_ttl.as_secs();
        let now_secs = unix_seconds(now);
        state
            .resolutions
            .retain(|_, r| now_secs.saturating_sub(r.resolved_at) <= ttl);
        if let Err(e) = write_atomic(&self.root, RESOLUTIONS_FILE, &state.resolutions) {
            tracing::warn!(error = %e, "cannot persist module resolutions");
        }
    }

    /// The last resolution of `source` with its age, unless it is older than the TTL.
    pub fn last_resolution(&self, source: &str, now: SystemTime) -> Option<(Resolution, Duration)> {
        let state = self.lock();
        let resolution = state.resolutions.get(source)?.clone();
        let age = Duration::from_secs(unix_seconds(now).saturating_sub(resolution.resolved_at));
        (age <= self.resolution_ttl).then_some((resolution, age))
    }

    /// Bytes of modules on disk, as indexed.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.lock().modules.bytes()
    }

    #[cfg(test)]
    pub fn contains(&self, key: &str) -> bool {
        self.lock().modules.get(key).is_some()
    }
}

/// How old scratch files must be before another process removes them: a process sharing
/// the folder may still be working in younger ones.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// Removes a scratch folder left by a process that died, if it is old enough.
pub(super) fn remove_abandoned(path: &Path) {
    let abandoned = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > ABANDONED_AFTER);
    if abandoned {
        let _ = std::fs::remove_dir_all(path);
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn write_atomic(root: &Path, name: &str, value: &impl Serialize) -> std::io::Result<()> {
    std::fs::create_dir_all(root)?;
    let staging = root.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(
        &staging,
        serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(staging, root.join(name))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn module(content: &str) -> ModuleFiles {
        ModuleFiles::new(BTreeMap::from([("a.cue".to_string(), content.to_string())])).unwrap()
    }

    fn open(dir: &Path, max_bytes: u64, metrics: &Arc<Metrics>) -> ModuleCache {
        ModuleCache::open(dir, max_bytes, Duration::from_secs(3600), metrics.clone())
    }

    #[test]
    fn evicts_least_recently_used_past_the_size_bound_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let cache = open(dir.path(), 250, &metrics);
        let key = |n: &str| ModuleCache::key("oci", n, "", "");
        cache.put(&key("1"), &module(&"1".repeat(100))).unwrap();
        cache.put(&key("2"), &module(&"2".repeat(100))).unwrap();
        assert!(cache.get(&key("1")).is_some()); // 1 is now newer than 2
        cache.put(&key("3"), &module(&"3".repeat(100))).unwrap();
        assert!(cache.get(&key("2")).is_none());
        assert!(!dir.path().join("modules").join(key("2")).exists());
        assert_eq!(cache.get(&key("1")).unwrap(), module(&"1".repeat(100)));
        assert_eq!(cache.bytes(), 200);
        assert_eq!(metrics.cue_cache_evictions_total.get(), 1);
        assert_eq!(metrics.cue_cache_entries.get(), 2);
        assert_eq!(metrics.cue_cache_size_bytes.get(), 200);
        assert_eq!(metrics.cue_cache_hits_total.get(), 2);
        assert_eq!(metrics.cue_cache_misses_total.get(), 1);
        drop(cache);

        // A new process finds both modules and applies a smaller bound at once.
        let metrics = Arc::new(Metrics::new().unwrap());
        let reopened = open(dir.path(), 150, &metrics);
        assert_eq!(reopened.bytes(), 100);
        assert_eq!(metrics.cue_cache_entries.get(), 1);
        assert_eq!(metrics.cue_cache_evictions_total.get(), 1);
    }

    #[test]
    fn one_module_larger_than_the_bound_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let cache = open(dir.path(), 10, &metrics);
        let key = ModuleCache::key("git", "abc", "platforms/web", "");
        cache.put(&key, &module(&"x".repeat(50))).unwrap();
        assert!(cache.contains(&key));
    }

    #[test]
    fn keys_differ_by_kind_digest_path_and_credentials() {
        let a = ModuleCache::key("git", "abc", "x", "");
        assert_ne!(a, ModuleCache::key("git", "abc", "y", ""));
        assert_ne!(a, ModuleCache::key("oci", "abc", "x", ""));
        assert_ne!(a, ModuleCache::key("git", "abd", "x", ""));
        assert_ne!(a, ModuleCache::key("git", "abc", "x", "team/pull"));
        assert!(a.starts_with("git-"));
    }

    #[test]
    fn resolutions_expire_after_the_ttl_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let ttl = Duration::from_secs(3600);
        let cache = ModuleCache::open(dir.path(), 1 << 20, ttl, metrics.clone());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        cache.record_resolution("oci:r/w:v1", "sha256:aa", t0);
        let (r, age) = cache
            .last_resolution("oci:r/w:v1", t0 + Duration::from_secs(60))
            .unwrap();
        assert_eq!((r.digest.as_str(), age), ("sha256:aa", Duration::from_secs(60)));
        assert!(
            cache
                .last_resolution("oci:r/w:v1", t0 + ttl + Duration::from_secs(1))
                .is_none()
        );
        assert!(cache.last_resolution("oci:r/w:v2", t0).is_none());
        drop(cache);
        let reopened = ModuleCache::open(dir.path(), 1 << 20, ttl, metrics);
        assert_eq!(
            reopened.last_resolution("oci:r/w:v1", t0).unwrap().0.digest,
            "sha256:aa"
        );
    }
}
