//! The one group-commit flusher thread: every `commit` waiter is answered after one flush
//! (and `fdatasync` in that mode) that covers everything inserted before it.

use super::*;

pub(super) type Waiter = Box<dyn FnOnce(Result<(), CommitError>) + Send>;

pub(super) enum FlushCmd {
    Wait(Waiter),
    Stop(mpsc::Sender<Result<(), CommitError>>),
}

/// Counters the flusher keeps, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: AtomicU64,
    pub waiters: AtomicU64,
    /// Blob files (values sled writes apart from its log, and never syncs) synced.
    pub blobs_synced: AtomicU64,
}

/// What `fdatasync` mode syncs besides sled's log file: the blob files sled writes for large
/// values (it never syncs them), the `blobs` directory that names them, and, once, the data
/// directory itself. Blobs are few (sled collects them); the directory listing is cheap.
pub(super) struct SyncExtras {
    data_dir: PathBuf,
    synced: std::collections::HashSet<std::ffi::OsString>,
    data_dir_synced: bool,
    /// The `blobs` directory's modification time when last listed: unchanged (and old
    /// enough to trust), no blob was created since (one `stat` per check, not a listing).
    listed_at: Option<std::time::SystemTime>,
}

impl SyncExtras {
    pub(super) fn new(data_dir: PathBuf) -> SyncExtras {
        SyncExtras {
            data_dir,
            synced: Default::default(),
            data_dir_synced: false,
            listed_at: None,
        }
    }

    /// Syncs every blob not synced yet, then the `blobs` directory if any was. Returns how
    /// many blobs were synced.
    fn sync(&mut self) -> std::io::Result<u64> {
        if !self.data_dir_synced {
            File::open(&self.data_dir)?.sync_all()?;
            self.data_dir_synced = true;
        }
        let blobs = self.data_dir.join("blobs");
        let modified = match std::fs::metadata(&blobs) {
            Ok(m) => m.modified().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        // Directory times are coarse (a few ms): an unchanged time proves nothing new only
        // once it is a while old.
        let settled = modified.is_some_and(|m| {
            m.elapsed()
                .is_ok_and(|age| age > std::time::Duration::from_secs(1))
        });
        if settled && modified == self.listed_at {
            return Ok(0);
        }
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut present = std::collections::HashSet::new();
        let mut n = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Collected by sled meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                n += 1;
            }
            present.insert(name);
        }
        // Forget blobs sled collected.
        self.synced = present;
        self.listed_at = modified;
        if n > 0 {
            File::open(&blobs)?.sync_all()?;
        }
        Ok(n)
    }
}

/// Opens sled, waiting (bounded) for the directory lock: a previous owner of the directory
/// (the process being replaced on restart, or sled's own threads of a store just closed)
/// can hold it for a moment.
pub(super) fn open_db(cfg: &StoreConfig) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = sled::Config::new()
            .path(&cfg.path)
            .cache_capacity(cfg.cache_capacity_bytes)
            .flush_every_ms(Some(500))
            .open();
        match r {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

pub(super) fn flusher_loop(
    db: sled::Db,
    sync_file: Option<File>,
    mut extras: Option<SyncExtras>,
    rx: mpsc::Receiver<FlushCmd>,
    failed: Arc<AtomicBool>,
    stats: Arc<FlushStats>,
) {
    while let Ok(first) = rx.recv() {
        let mut waiters = Vec::new();
        let mut stop = None;
        let mut push = |cmd| match cmd {
            FlushCmd::Wait(w) => waiters.push(w),
            FlushCmd::Stop(tx) => stop = Some(tx),
        };
        push(first);
        while let Ok(cmd) = rx.try_recv() {
            push(cmd);
        }
        let result = if failed.load(Ordering::Acquire) {
            Err(CommitError::FlushFailed("an earlier flush failed".into()))
        } else {
            let mut sync_extras = || -> Result<(), CommitError> {
                if let Some(x) = extras.as_mut() {
                    let n = x
                        .sync()
                        .map_err(|e| CommitError::FlushFailed(format!("syncing blobs: {e}")))?;
                    stats.blobs_synced.fetch_add(n, Ordering::Relaxed);
                }
                Ok(())
            };
            // Blobs the inserts wrote first (the log will point at them), then the log, then
            // any blob the flush itself wrote.
            let r = sync_extras()
                .and_then(|()| {
                    db.flush()
                        .map_err(|e| CommitError::FlushFailed(e.to_string()))
                })
                .and_then(|_| match &sync_file {
                    Some(f) => f
                        .sync_data()
                        .map_err(|e| CommitError::FlushFailed(e.to_string())),
                    None => Ok(()),
                })
                .and_then(|()| sync_extras());
            if let Err(e) = &r {
                tracing::error!(error = %e, "flush failed; refusing further writes");
                failed.store(true, Ordering::Release);
            }
            r
        };
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .waiters
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        for w in waiters {
            w(result.clone());
        }
        if let Some(tx) = stop {
            let _ = tx.send(result);
            return;
        }
    }
}
