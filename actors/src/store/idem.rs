//! Idempotency records, in generations that expire whole.
//!
//! Records that are kept for good (top-ups, Stripe events) live in the `idem` tree. Every
//! other record lives in exactly one *generation*: a tree named `idem@{start}-{end}` (hex
//! milliseconds) that holds records written for times in `[start, end)`. Expiry drops a
//! whole generation once its end is older than the retention cutoff (one `drop_tree`, never a
//! record at a time), so it keeps up with any write rate; a record lives between the
//! retention and the retention plus one generation width.
//!
//! A lookup asks the generations newest first (a handful: the daemon makes the width a third
//! of the retention). A record always lives in the generation covering its own time, and a
//! write removes the key from the generation it was found in, if another: a key is never in
//! two generations, a fresh claim never sits in one that expires before its own retention,
//! and putting a replayed record back returns it to its own generation (a replay does not
//! extend how long a key is remembered).
//! Writers hold the read side of a lock that expiry takes exclusively, so no write lands in
//! a generation being dropped; records for times already expired are not written.

use std::collections::BTreeMap;

use super::*;

const PREFIX: &[u8] = b"idem@";

/// Width of a new generation until the daemon sets one: 24 hours.
pub const DEFAULT_GENERATION_MS: i64 = 24 * 3_600_000;

pub(super) struct Generations {
    db: sled::Db,
    width_ms: i64,
    /// Times before this are expired: their generations are gone and no record for them is
    /// written.
    expired_before: UnixMs,
    /// start → (end, tree).
    trees: BTreeMap<UnixMs, (UnixMs, sled::Tree)>,
}

fn name(start: UnixMs, end: UnixMs) -> Vec<u8> {
    let mut n = PREFIX.to_vec();
    n.extend_from_slice(format!("{start:016x}-{end:016x}").as_bytes());
    n
}

fn parse(name: &[u8]) -> Option<(UnixMs, UnixMs)> {
    let rest = std::str::from_utf8(name.strip_prefix(PREFIX)?).ok()?;
    let (s, e) = rest.split_once('-')?;
    let (s, e) = (
        i64::from_str_radix(s, 16).ok()?,
        i64::from_str_radix(e, 16).ok()?,
    );
    (s < e).then_some((s, e))
}

impl Generations {
    pub(super) fn open(db: &sled::Db) -> Result<Generations, StoreError> {
        let mut trees = BTreeMap::new();
        for n in db.tree_names() {
            if let Some((start, end)) = parse(&n) {
                trees.insert(start, (end, db.open_tree(&n)?));
            }
        }
        Ok(Generations {
            db: db.clone(),
            width_ms: DEFAULT_GENERATION_MS,
            expired_before: UnixMs::MIN,
            trees,
        })
    }

    /// The generation holding `k`, newest first: (start, value).
    fn find(&self, k: &[u8]) -> Result<Option<(UnixMs, sled::IVec)>, StoreError> {
        for (start, (_, t)) in self.trees.iter().rev() {
            if let Some(v) = t.get(k)? {
                return Ok(Some((*start, v)));
            }
        }
        Ok(None)
    }

    /// The generation whose range holds `at`.
    fn covering(&self, at: UnixMs) -> Option<UnixMs> {
        self.trees
            .range(..=at)
            .next_back()
            .filter(|(_, (end, _))| at < *end)
            .map(|(s, _)| *s)
    }

    /// Creates the generation for `at`: aligned to the width, clipped to its neighbours.
    fn create(&mut self, at: UnixMs) -> Result<UnixMs, StoreError> {
        let w = self.width_ms.max(1);
        let mut start = at - at.rem_euclid(w);
        let mut end = start.saturating_add(w);
        if let Some((_, (prev_end, _))) = self.trees.range(..=at).next_back() {
            start = start.max(*prev_end);
        }
        if let Some((next_start, _)) = self.trees.range(at + 1..).next() {
            end = end.min(*next_start);
        }
        let tree = self.db.open_tree(name(start, end))?;
        self.trees.insert(start, (end, tree));
        Ok(start)
    }

    /// Writes `v` for key `k` at time `at`, creating its generation if needed (the 2 → 3
    /// migration, which runs before anything else can write).
    pub(super) fn put(
        &mut self,
        k: &[u8],
        v: &[u8],
        at: UnixMs,
    ) -> Result<Option<sled::IVec>, StoreError> {
        let at = at.clamp(0, UnixMs::MAX / 2);
        if self.covering(at).is_none() {
            self.create(at)?;
        }
        Ok(self.write(k, v, at)?.flatten())
    }

    /// Writes `v` for key `k` at time `at` (see the module doc) and returns the value it
    /// replaced; `None` if no generation covers `at` yet (the caller creates it).
    fn write(
        &self,
        k: &[u8],
        v: &[u8],
        at: UnixMs,
    ) -> Result<Option<Option<sled::IVec>>, StoreError> {
        let Some((target, t)) = self
            .covering(at)
            .and_then(|s| self.trees.get(&s).map(|(_, t)| (s, t)))
        else {
            return Ok(None);
        };
        let found = self.find(k)?;
        let replaced = t.insert(k, v)?;
        if let Some((start, _)) = &found
            && *start != target
            && let Some((_, old)) = self.trees.get(start)
        {
            old.remove(k)?;
        }
        Ok(Some(found.map(|(_, old)| old).or(replaced)))
    }
}

impl Store {
    fn generations(&self) -> std::sync::RwLockReadGuard<'_, Generations> {
        self.inner
            .idem_gens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn generations_mut(&self) -> std::sync::RwLockWriteGuard<'_, Generations> {
        self.inner
            .idem_gens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the width of generations created from now on (the daemon: a third of the
    /// retention, so a lookup asks about four of them).
    pub fn set_idem_generation(&self, width_ms: i64) {
        self.generations_mut().width_ms = width_ms.max(60_000);
    }

    /// Writes an expiring record and returns the one it replaced.
    fn write_expiring(
        &self,
        k: &[u8],
        v: &[u8],
        at: UnixMs,
    ) -> Result<Option<sled::IVec>, StoreError> {
        let at = at.clamp(0, UnixMs::MAX / 2);
        {
            let g = self.generations();
            if at < g.expired_before {
                // Already expired (a recovery rewriting an old entry's record): not kept.
                return Ok(g.find(k)?.map(|(_, old)| old));
            }
            if let Some(old) = g.write(k, v, at)? {
                return Ok(old);
            }
        }
        let mut g = self.generations_mut();
        if g.covering(at).is_none() {
            g.create(at)?;
        }
        Ok(g.write(k, v, at)?.flatten())
    }

    pub fn put_idem(
        &self,
        account: &AccountId,
        op: IdemOp,
        key: &str,
        rec: IdemRecord,
    ) -> Result<(), StoreError> {
        self.swap_idem(account, op, key, rec).map(|_| ())
    }

    /// Writes `rec` and returns the record it replaced, if any.
    pub fn swap_idem(
        &self,
        account: &AccountId,
        op: IdemOp,
        key: &str,
        rec: IdemRecord,
    ) -> Result<Option<IdemRecord>, StoreError> {
        let k = codec::idem_key(account, op, key);
        let v = codec::encode_idem(rec)?;
        let old = if op.expires() {
            self.write_expiring(&k, &v, rec.at_ms)?
        } else {
            self.inner.idem.insert(k, v)?
        };
        old.map(|o| codec::decode_idem(&o)).transpose()
    }

    pub fn get_idem(
        &self,
        account: &AccountId,
        op: IdemOp,
        key: &str,
    ) -> Result<Option<IdemRecord>, StoreError> {
        let k = codec::idem_key(account, op, key);
        let v = if op.expires() {
            self.generations().find(&k)?.map(|(_, v)| v)
        } else {
            self.inner.idem.get(k)?
        };
        v.map(|v| codec::decode_idem(&v)).transpose()
    }

    /// Expires every record written for a time before `cutoff_ms` by dropping the
    /// generations that end by then. Returns (generations dropped, records in them).
    pub fn expire_idem(&self, cutoff_ms: UnixMs) -> Result<(usize, usize), StoreError> {
        let gone: Vec<(UnixMs, UnixMs, sled::Tree)> = {
            let mut g = self.generations_mut();
            g.expired_before = g.expired_before.max(cutoff_ms);
            let starts: Vec<UnixMs> = g
                .trees
                .iter()
                .filter(|(_, (end, _))| *end <= cutoff_ms)
                .map(|(s, _)| *s)
                .collect();
            starts
                .into_iter()
                .filter_map(|s| g.trees.remove(&s).map(|(e, t)| (s, e, t)))
                .collect()
        };
        // Outside the lock: no writer can reach these any more.
        let mut records = 0;
        for (start, end, tree) in &gone {
            records += tree.len();
            self.inner.db.drop_tree(name(*start, *end))?;
        }
        Ok((gone.len(), records))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_round_trip_and_sort_by_start() {
        let n = name(86_400_000, 172_800_000);
        assert_eq!(parse(&n), Some((86_400_000, 172_800_000)));
        assert!(name(1, 2) < name(16, 32));
        assert_eq!(parse(b"idem"), None);
        assert_eq!(parse(b"idem@zz-1"), None);
        assert_eq!(parse(&name(5, 5)), None);
    }
}
