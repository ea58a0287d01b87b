//! Configuration reload: the settings in force as one swappable [`Active`], rebuilt from a new
//! `proxy.toml` on `SIGHUP` or when the file changes, and applied to new requests at once.
//!
//! Requests load the `Active` when they start and keep it to their end, so a request in flight
//! finishes on the configuration it began with and no connection is touched. Every route keeps
//! its purges; a route whose limit did not change keeps its in-process buckets. What only a
//! restart applies (listeners, workers, the upstream, Redis, traces, the log format, cache sizes)
//! keeps its running value and is reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use metrics::{Counter, Gauge};
use tokio::signal::unix::Signal;

use crate::cache::Cache;
use crate::config::{self, Config, ConfigErrors};
use crate::metrics::{
    Metrics, CONFIG_INFO, CONFIG_LAST_RELOAD_SUCCESSFUL, CONFIG_RELOADS_TOTAL, CONFIG_RESTART_REQUIRED,
};
use crate::ratelimit::RateLimiter;
use crate::route::{Route, Routes};
use crate::telemetry;

/// How long the configuration's directory must be quiet before the file is read (a Kubernetes
/// ConfigMap update is several renames; an editor may write in several steps).
const SETTLE: Duration = Duration::from_millis(250);
/// How often the watch checks that its directory was not replaced.
const RECHECK: Duration = Duration::from_secs(2);
/// What a reload remembers of a file it could not read.
const UNREADABLE: &str = "unreadable";

/// The configuration in force and the routes compiled from it.
pub struct Active {
    /// The configuration, with the running values of settings that need a restart.
    pub config: Arc<Config>,
    /// The route table.
    pub routes: Routes,
    /// When it was loaded.
    pub loaded: SystemTime,
    /// Settings the loaded file changed that only a restart applies.
    pub restart_required: Vec<&'static str>,
}

/// What the routes are built on: the process-wide cache, limiter and metrics.
#[derive(Clone)]
pub struct Parts {
    /// The cache (`None` when switched off by `SIDECACHE_CACHE_ENABLED=false`).
    pub cache: Option<Arc<Cache>>,
    /// The rate limiter (`None` when switched off by `SIDECACHE_RATE_LIMIT_ENABLED=false`).
    pub limiter: Option<Arc<RateLimiter>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

impl Active {
    /// Compile `config`'s routes. A route of `previous` with the same name and limit settings
    /// keeps its limit (its in-process buckets); every route keeps its cache generation.
    pub fn build(
        config: Config,
        parts: &Parts,
        previous: Option<&Active>,
        restart_required: Vec<&'static str>,
    ) -> Active {
        let registrar = parts.metrics.registrar();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let before = previous.and_then(|p| p.routes.get(&r.name));
                Route::new(
                    r.name.clone(),
                    r.pattern.clone(),
                    r.methods.clone(),
                    match (&parts.cache, &r.cache) {
                        (Some(cache), Some(c)) => Some(cache.route(&r.name, c, &registrar)),
                        _ => None,
                    },
                    parts.limiter.as_ref().and_then(|l| l.limit(r, before.and_then(|b| b.limit.as_ref()), &registrar)),
                    parts.metrics.route(&r.name),
                )
            })
            .collect();
        Active { config: Arc::new(config), routes: Routes::new(routes), loaded: SystemTime::now(), restart_required }
    }
}

/// The result of a reload.
#[derive(Debug)]
pub enum Reloaded {
    /// The new configuration is in force; these settings of it wait for a restart.
    Applied(Vec<&'static str>),
    /// The text is the one in force.
    Unchanged,
    /// Refused; the configuration in force keeps running.
    Invalid(ConfigErrors),
}

impl Reloaded {
    const LABELS: [&'static str; 3] = ["applied", "unchanged", "invalid"];

    fn index(&self) -> usize {
        match self {
            Reloaded::Applied(_) => 0,
            Reloaded::Unchanged => 1,
            Reloaded::Invalid(_) => 2,
        }
    }
}

/// What set off a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `SIGHUP`: always re-read.
    Signal,
    /// A change in the file's directory: re-read only when the text changed.
    File,
}

/// Swaps the [`Active`] configuration.
pub struct Reloader {
    active: Arc<ArcSwap<Active>>,
    parts: Parts,
    results: [Counter; 3],
    last_successful: Gauge,
    restart_required: Gauge,
    /// Serializes reloads, and holds the hash of the newest text read, in force or refused.
    newest: Mutex<String>,
}

impl Reloader {
    /// The reloader of `active`, whose configuration is the one in force.
    pub fn new(active: Arc<ArcSwap<Active>>, parts: Parts) -> Reloader {
        let registrar = parts.metrics.registrar();
        let hash = active.load().config.hash.clone();
        registrar.gauge(CONFIG_INFO, &[("hash", &hash)]).set(1.0);
        let last_successful = registrar.gauge(CONFIG_LAST_RELOAD_SUCCESSFUL, &[]);
        last_successful.set(1.0);
        Reloader {
            results: Reloaded::LABELS.map(|r| registrar.counter(CONFIG_RELOADS_TOTAL, &[("result", r)])),
            last_successful,
            restart_required: registrar.gauge(CONFIG_RESTART_REQUIRED, &[]),
            newest: Mutex::new(hash),
            active,
            parts,
        }
    }

    /// Re-read `path` against the process environment and apply it. A file event that finds the
    /// text last read (in force or refused), or the same read error, does nothing (`None`).
    pub fn reload_file(&self, path: &Path, trigger: Trigger) -> Option<Reloaded> {
        let read = Config::read(path);
        let seen = read.as_ref().map_or_else(|_| UNREADABLE.to_string(), |text| config::text_hash(text));
        let mut newest = self.lock();
        if trigger == Trigger::File && *newest == seen {
            return None;
        }
        *newest = seen;
        Some(match read {
            Ok(text) => match Config::from_sources(&text, &std::env::vars().collect()) {
                Ok(config) => self.apply_locked(config),
                Err(errors) => self.refuse(errors),
            },
            Err(errors) => self.refuse(errors),
        })
    }

    /// Validate `text` with `env` and apply it.
    pub fn reload_text(&self, text: &str, env: &HashMap<String, String>) -> Reloaded {
        let mut newest = self.lock();
        *newest = config::text_hash(text);
        match Config::from_sources(text, env) {
            Ok(config) => self.apply_locked(config),
            Err(errors) => self.refuse(errors),
        }
    }

    /// Put a validated configuration in force for new requests.
    pub fn apply(&self, config: Config) -> Reloaded {
        let mut newest = self.lock();
        newest.clone_from(&config.hash);
        self.apply_locked(config)
    }

    /// Reloads one at a time (a poisoned lock is still usable: it guards only a hash).
    fn lock(&self) -> MutexGuard<'_, String> {
        self.newest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn apply_locked(&self, mut config: Config) -> Reloaded {
        let current = self.active.load_full();
        let result = if config.hash == current.config.hash {
            Reloaded::Unchanged
        } else {
            let restart_required = config.keep_restart_only(&current.config);
            let (old_hash, new_hash) = (current.config.hash.clone(), config.hash.clone());
            if config.log.level != current.config.log.level {
                telemetry::set_level(&config.log.level);
            }
            let active = Active::build(config, &self.parts, Some(&current), restart_required.clone());
            let routes = active.routes.iter().count();
            self.active.store(Arc::new(active));
            let registrar = self.parts.metrics.registrar();
            registrar.gauge(CONFIG_INFO, &[("hash", &old_hash)]).set(0.0);
            registrar.gauge(CONFIG_INFO, &[("hash", &new_hash)]).set(1.0);
            self.restart_required.set(if restart_required.is_empty() { 0.0 } else { 1.0 });
            if restart_required.is_empty() {
                tracing::info!(hash = %new_hash, previous = %old_hash, routes, "configuration reloaded");
            } else {
                tracing::warn!(
                    hash = %new_hash,
                    previous = %old_hash,
                    routes,
                    restart_required = restart_required.join(", "),
                    "configuration reloaded; these changed settings keep their running values until a restart"
                );
            }
            Reloaded::Applied(restart_required)
        };
        self.last_successful.set(1.0);
        self.results[result.index()].increment(1);
        result
    }

    /// Count and log a refused text.
    fn refuse(&self, errors: ConfigErrors) -> Reloaded {
        let problems: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        tracing::warn!(
            problems = problems.join("; "),
            hash = %self.active.load().config.hash,
            "configuration refused; the one in force keeps running"
        );
        self.last_successful.set(0.0);
        let result = Reloaded::Invalid(errors);
        self.results[result.index()].increment(1);
        result
    }
}

/// Reload `path` on every `hangup` signal and whenever its directory changes (a Kubernetes
/// ConfigMap volume swaps a symlink in it), until the task is aborted. A burst of changes is read
/// once it has been quiet for [`SETTLE`]; a directory that is replaced is watched again.
pub fn watch(path: PathBuf, mut hangup: Signal, reloader: Arc<Reloader>) -> tokio::task::JoinHandle<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (changed, mut changes) = tokio::sync::mpsc::channel::<()>(1);
    let mut watch = DirWatch { dir, changed, watching: None, lost: Arc::default(), failed: false };
    watch.ensure();
    tokio::spawn(async move {
        let mut check = tokio::time::interval(RECHECK);
        loop {
            let trigger = tokio::select! {
                Some(()) = hangup.recv() => Trigger::Signal,
                Some(()) = changes.recv() => {
                    // At most 20 windows: a directory that never goes quiet is still read.
                    for _ in 0..20 {
                        if !matches!(tokio::time::timeout(SETTLE, changes.recv()).await, Ok(Some(()))) {
                            break;
                        }
                    }
                    watch.ensure();
                    Trigger::File
                }
                _ = check.tick() => {
                    if !watch.ensure() {
                        continue;
                    }
                    Trigger::File
                }
            };
            tracing::debug!(?trigger, path = %path.display(), "reading the configuration");
            let (reloader, path) = (reloader.clone(), path.clone());
            // Reading and validating touch the file system: off the event loop.
            if let Err(e) = tokio::task::spawn_blocking(move || reloader.reload_file(&path, trigger)).await {
                tracing::error!(error = %e, "a configuration reload failed");
            }
        }
    })
}

/// A watch on the configuration's directory, made again when the directory is replaced.
struct DirWatch {
    dir: PathBuf,
    changed: tokio::sync::mpsc::Sender<()>,
    /// The watcher and the inode of the directory it watches.
    watching: Option<(notify::RecommendedWatcher, u64)>,
    /// Set when the watched directory itself goes (a new one may reuse its inode number).
    lost: Arc<AtomicBool>,
    /// Whether the last attempt failed (logged once until one succeeds).
    failed: bool,
}

impl DirWatch {
    /// Watch the directory if it is not watched yet or was replaced. Whether a new watch began
    /// (the file may have changed unseen).
    fn ensure(&mut self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&self.dir).map(|m| m.ino());
        if let (Some((_, watched)), Ok(inode)) = (&self.watching, &inode) {
            if watched == inode && !self.lost.load(Ordering::Relaxed) {
                return false;
            }
        }
        self.watching = None;
        self.lost.store(false, Ordering::Relaxed);
        let (changed, lost, dir) = (self.changed.clone(), self.lost.clone(), self.dir.clone());
        let watcher = inode.and_then(|inode| {
            let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_remove() && event.paths.contains(&dir) {
                    lost.store(true, Ordering::Relaxed);
                }
                if matters(&event.kind) {
                    let _ = changed.try_send(());
                }
            })
            .map_err(std::io::Error::other)?;
            notify::Watcher::watch(&mut watcher, &self.dir, notify::RecursiveMode::NonRecursive)
                .map_err(std::io::Error::other)?;
            Ok((watcher, inode))
        });
        match watcher {
            Ok(watching) => {
                if std::mem::take(&mut self.failed) {
                    tracing::info!(dir = %self.dir.display(), "watching the configuration's directory again");
                }
                self.watching = Some(watching);
                true
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failed, true) {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the configuration's directory; SIGHUP still reloads, and the watch is retried");
                }
                false
            }
        }
    }
}

/// Whether a file-system event can change the configuration: anything but reading (the reload's
/// own reads), except the close of a file written.
fn matters(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}
