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
            let r = db
                .flush()
                .map_err(|e| CommitError::FlushFailed(e.to_string()))
                .and_then(|_| match &sync_file {
                    Some(f) => f
                        .sync_data()
                        .map_err(|e| CommitError::FlushFailed(e.to_string())),
                    None => Ok(()),
                });
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
