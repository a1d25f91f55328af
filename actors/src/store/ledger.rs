//! The ledger (append-only, the source of truth), its snapshots, and the hashed-identifier
//! index written with an account's creation.

use super::*;

impl Store {
    /// Appends a ledger entry. An account's creation (its first entry) also indexes its hashed
    /// identifier when it may need one, in the same commit.
    pub fn append_entry(&self, account: &AccountId, entry: &LedgerEntry) -> Result<(), StoreError> {
        let bytes = codec::encode_entry(entry)?;
        if matches!(entry.kind, crate::ledger::EntryKind::AccountUpserted(_))
            && crate::identifier::may_be_hashed(account)
        {
            self.inner.hashed_ids.insert(
                crate::identifier::hashed(account),
                account.as_str().as_bytes(),
            )?;
        }
        self.inner
            .ledger
            .insert(codec::ledger_key(account, entry.seq), bytes)?;
        Ok(())
    }

    /// The account an identifier's owner part names (see [`crate::identifier::parse`]): the
    /// account whose hash it is, else the account id it spells. `None`: no account (an
    /// invalid id, or a hash meterd never indexed).
    pub fn identifier_owner(&self, owner: &str) -> Result<Option<AccountId>, StoreError> {
        if crate::identifier::looks_hashed(owner)
            && let Some(a) = migrate::account_of_hashed(&self.inner.hashed_ids, owner)?
        {
            return Ok(Some(a));
        }
        Ok(AccountId::parse(owner).ok())
    }

    pub fn read_entry(
        &self,
        account: &AccountId,
        seq: u64,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        match self.inner.ledger.get(codec::ledger_key(account, seq))? {
            Some(v) => Ok(Some(codec::decode_entry(&v)?)),
            None => Ok(None),
        }
    }

    /// Whether the account exists: one key lookup (its first ledger entry is its creation),
    /// so a request for an unknown id costs no actor and no memory.
    pub fn account_exists(&self, account: &AccountId) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .ledger
            .contains_key(codec::ledger_key(account, 1))?)
    }

    /// The highest sequence number in the account's ledger, if it has any entry.
    pub fn last_seq(&self, account: &AccountId) -> Result<Option<u64>, StoreError> {
        let upper = codec::ledger_key(account, u64::MAX);
        let prefix = codec::account_prefix(account);
        if let Some(v) = self.inner.ledger.get(&upper)? {
            let e = codec::decode_entry(&v)?;
            return Ok(Some(e.seq));
        }
        match self.inner.ledger.get_lt(&upper)? {
            Some((k, _)) if k.starts_with(&prefix) => codec::seq_of_key(&k, prefix.len()).map(Some),
            _ => Ok(None),
        }
    }

    /// Entries with `seq > after_seq`, oldest first, at most `limit` of them.
    pub fn entries_after(
        &self,
        account: &AccountId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let from = codec::ledger_key(account, start);
        let to = codec::ledger_key(account, u64::MAX);
        let mut out = Vec::new();
        for item in self.inner.ledger.range(from..=to).take(limit) {
            let (_, v) = item?;
            out.push(codec::decode_entry(&v)?);
        }
        Ok(out)
    }

    /// Every account that has a ledger, in key order, for verification.
    pub fn ledger_accounts(&self) -> impl Iterator<Item = Result<AccountId, StoreError>> + '_ {
        let mut next_from: Option<Vec<u8>> = Some(Vec::new());
        std::iter::from_fn(move || {
            let from = next_from.take()?;
            let item = self.inner.ledger.range(from..).next()?;
            let r = item.map_err(StoreError::from).and_then(|(k, _)| {
                let sep = k
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: "ledger",
                        detail: "key without separator".into(),
                    })?;
                let id = std::str::from_utf8(&k[..sep])
                    .ok()
                    .and_then(|s| AccountId::parse(s).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: "ledger",
                        detail: "key with an invalid account id".into(),
                    })?;
                // The smallest key after every key of this account: the id followed by 0x01.
                let mut after = k[..sep].to_vec();
                after.push(1);
                next_from = Some(after);
                Ok(id)
            });
            Some(r)
        })
    }

    pub fn put_snapshot(
        &self,
        account: &AccountId,
        snap: &AccountSnapshot,
    ) -> Result<(), StoreError> {
        self.inner
            .accounts
            .insert(account.as_str().as_bytes(), codec::encode_snapshot(snap)?)?;
        Ok(())
    }

    pub fn get_snapshot(&self, account: &AccountId) -> Result<Option<AccountSnapshot>, StoreError> {
        match self.inner.accounts.get(account.as_str().as_bytes())? {
            Some(v) => Ok(Some(codec::decode_snapshot(&v)?)),
            None => Ok(None),
        }
    }
}
