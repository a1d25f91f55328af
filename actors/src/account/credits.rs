//! Credit grants, adjustments and top-ups, with their idempotent replays.

use super::*;

impl AccountState {
    /// The answer to a repeated grant, adjustment or top-up: the first reply, or a conflict
    /// if the key came with a different request. `None`: the key is new.
    pub(super) fn credit_replay(
        &self,
        op: IdemOp,
        key: &str,
        digest: [u8; 32],
    ) -> Result<Option<Result<CreditReply, AccountError>>, StoreError> {
        Ok(self.find_replay(op, key)?.map(|prev| match prev.kind {
            EntryKind::Credit(rec) if rec.digest == digest => Ok(CreditReply {
                seq: prev.seq,
                record: rec,
                replayed: true,
            }),
            _ => Err(AccountError::IdempotencyConflict { seq: prev.seq }),
        }))
    }

    /// Appends an entry that answers idempotency key `key` of `op`, indexes the key, and
    /// snapshots when due: the write path of every keyed operation but consume (which claims
    /// its key before deciding).
    pub(super) fn record_keyed(
        &mut self,
        kind: EntryKind,
        now: i64,
        op: IdemOp,
        key: &str,
    ) -> Result<LedgerEntry, StoreError> {
        let entry = self.append(kind, now)?;
        self.deps.store.put_idem(
            &self.id,
            op,
            key,
            IdemRecord {
                seq: entry.seq,
                at_ms: now,
            },
        )?;
        // New credits pay credit debt first.
        self.settle_debt(now)?;
        self.after_write()?;
        Ok(entry)
    }

    /// Looks up an idempotency key. `Ok(Some(entry))` is a replay of that entry.
    pub(super) fn find_replay(
        &self,
        op: IdemOp,
        key: &str,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        match self.deps.store.get_idem(&self.id, op, key)? {
            Some(rec) => self.entry_for_key(rec.seq, op, key),
            None => Ok(None),
        }
    }

    /// The entry an idempotency record points at, if it really is that key's entry. A record
    /// can dangle (it is written just before its entry, and a crash can fall in between): a
    /// dangling record is no replay.
    pub(super) fn entry_for_key(
        &self,
        seq: u64,
        op: IdemOp,
        key: &str,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        if seq > self.fold.last_seq {
            return Ok(None);
        }
        Ok(self
            .deps
            .store
            .read_entry(&self.id, seq)?
            .filter(|e| idem_of(&e.kind).is_some_and(|(o, k)| o == op && k == key)))
    }

    pub(super) fn credit(
        &mut self,
        cmd: CreditCmd,
        reply: RpcReplyPort<Result<CreditReply, AccountError>>,
    ) -> Result<(), StoreError> {
        // A retry of an earlier grant answers as before, even once its terms (an expiry in
        // the future, say) would no longer be accepted as new.
        if self.fold.profile.is_some()
            && let Some(r) =
                self.credit_replay(IdemOp::Credit, cmd.idempotency_key.as_str(), cmd.digest())?
        {
            self.reply_after_commit(reply, r);
            return Ok(());
        }
        let now = self.deps.clock.now_ms();
        let checked = (|| {
            if cmd.amount == 0 || cmd.amount == i64::MIN {
                return Err(ValidationError::new("amount must be a non-zero integer"));
            }
            if cmd.reason.len() > 500 {
                return Err(ValidationError::new("reason is longer than 500 bytes"));
            }
            let g = &cmd.grant;
            let has_terms = g.priority.is_some()
                || g.effective_at_ms.is_some()
                || g.expires_at_ms.is_some()
                || g.category.is_some()
                || g.external_id.is_some();
            if cmd.amount < 0 {
                if has_terms {
                    return Err(ValidationError::new(
                        "grant terms (priority, effective_at, expires_at, category, external_id) apply to positive amounts only",
                    ));
                }
                return Ok(None);
            }
            let priority = g.priority.unwrap_or(50);
            if priority > 100 {
                return Err(ValidationError::new("priority must be from 0 to 100"));
            }
            let effective_at_ms = g.effective_at_ms.unwrap_or(now);
            if let Some(e) = g.expires_at_ms
                && (e <= effective_at_ms || e <= now)
            {
                return Err(ValidationError::new(
                    "expires_at must be after effective_at and in the future",
                ));
            }
            if g.external_id
                .as_ref()
                .is_some_and(|x| x.is_empty() || x.len() > 255)
            {
                return Err(ValidationError::new("external_id must be 1 to 255 bytes"));
            }
            Ok(Some(GrantTerms {
                priority,
                effective_at_ms,
                expires_at_ms: g.expires_at_ms,
                category: g.category.unwrap_or(CreditCategory::Promotional),
                external_id: g.external_id.clone(),
                package: None,
            }))
        })();
        let terms = match checked {
            Ok(t) => t,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return Ok(());
            }
        };
        let digest = cmd.digest();
        self.apply_credit(
            IdemOp::Credit,
            cmd.idempotency_key.as_str(),
            digest,
            cmd.amount,
            cmd.reason,
            terms,
            reply,
        )
    }

    pub(super) fn top_up(
        &mut self,
        cmd: TopUpCmd,
        reply: RpcReplyPort<Result<CreditReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let r = self.write_top_up(cmd)?;
        self.reply_after_commit(reply, r);
        Ok(())
    }

    pub(super) fn write_top_up(
        &mut self,
        cmd: TopUpCmd,
    ) -> Result<Result<CreditReply, AccountError>, StoreError> {
        let Some(package) = self
            .deps
            .catalog
            .credit_packages
            .iter()
            .find(|p| p.name == cmd.package)
            .cloned()
        else {
            let known: Vec<&str> = self
                .deps
                .catalog
                .credit_packages
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            return Ok(Err(ValidationError::new(format!(
                "unknown package `{}`; configured packages: {}",
                cmd.package,
                known.join(", ")
            ))
            .into()));
        };
        let Ok(amount) = i64::try_from(package.credits) else {
            return Ok(Err(ValidationError::new("package too large").into()));
        };
        let now = self.deps.clock.now_ms();
        let terms = GrantTerms {
            priority: 50,
            effective_at_ms: now,
            expires_at_ms: None,
            category: CreditCategory::Paid,
            external_id: Some(cmd.external_id.as_str().to_owned()),
            package: Some(package.name.clone()),
        };
        let digest = cmd.digest();
        self.write_credit(
            IdemOp::Topup,
            cmd.external_id.as_str(),
            digest,
            amount,
            format!("top-up {}", package.name),
            Some(terms),
        )
    }

    /// The shared write path of grants, adjustments and top-ups: replay or conflict by key,
    /// lazy rollover and expiry, then one `Credit` entry.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_credit(
        &mut self,
        op: IdemOp,
        key: &str,
        digest: [u8; 32],
        amount: i64,
        reason: String,
        terms: Option<GrantTerms>,
        reply: RpcReplyPort<Result<CreditReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let r = self.write_credit(op, key, digest, amount, reason, terms)?;
        self.reply_after_commit(reply, r);
        Ok(())
    }

    /// [`Self::apply_credit`] without the reply: the answer (a replay, a refusal or the new
    /// entry), to be sent only after a commit.
    pub(super) fn write_credit(
        &mut self,
        op: IdemOp,
        key: &str,
        digest: [u8; 32],
        amount: i64,
        reason: String,
        terms: Option<GrantTerms>,
    ) -> Result<Result<CreditReply, AccountError>, StoreError> {
        if self.fold.profile.is_none() {
            return Ok(Err(AccountError::UnknownAccount(self.id.clone())));
        }
        if let Some(r) = self.credit_replay(op, key, digest)? {
            return Ok(r);
        }
        let now = self.deps.clock.now_ms();
        // Decide on the caught-up balances in memory: a refusal writes nothing.
        let Some(balances) = self.balances_at(now) else {
            return Ok(Err(AccountError::UnknownAccount(self.id.clone())));
        };
        let balance = balances.live_credits(now);
        let (burns, credits_after) = if amount > 0 {
            // Every grant, effective or not yet, counts toward the bound on all credits held.
            if !balances.can_hold(amount.unsigned_abs()) {
                return Ok(Err(ValidationError::new(format!(
                    "credit balance would overflow: all grants together may hold at most {} credits",
                    i64::MAX
                ))
                .into()));
            }
            // A grant that is effective already counts at once.
            let live_now = terms.as_ref().is_some_and(|t| t.effective_at_ms <= now);
            let after = if live_now {
                balance.checked_add(amount.unsigned_abs())
            } else {
                Some(balance)
            };
            let Some(after) = after else {
                return Ok(Err(
                    ValidationError::new("credit balance would overflow").into()
                ));
            };
            (Vec::new(), after)
        } else {
            match balances.burn_plan(now, amount.unsigned_abs()) {
                Some(b) => (b, balance - amount.unsigned_abs()),
                None => {
                    return Ok(Err(AccountError::CreditBalanceTooLow { balance, amount }));
                }
            }
        };
        self.catch_up(now)?;
        let record = CreditRecord {
            amount,
            reason,
            idempotency_key: key.to_owned(),
            digest,
            grant: terms,
            burns,
            credits_after,
        };
        let entry = self.record_keyed(EntryKind::Credit(record), now, op, key)?;
        let EntryKind::Credit(record) = entry.kind else {
            return Ok(Err(AccountError::Storage("credit entry expected".into())));
        };
        Ok(Ok(CreditReply {
            seq: entry.seq,
            record,
            replayed: false,
        }))
    }

    /// Records a top-up Checkout Session about to be created for this account: only for its
    /// own linked customer (the session's customer), so a completion can be matched to it.
    pub(super) fn record_pending_topup(
        &mut self,
        topup_id: &str,
        rec: crate::store::PendingTopUp,
    ) -> Result<Result<(), AccountError>, StoreError> {
        let Some(profile) = &self.fold.profile else {
            return Ok(Err(AccountError::UnknownAccount(self.id.clone())));
        };
        if rec.account != self.id.as_str()
            || profile.stripe_customer_id.as_deref() != Some(rec.customer.as_str())
            || topup_id.is_empty()
            || topup_id.len() > 255
        {
            return Ok(Err(ValidationError::new(
                "a pending top-up must name this account, its Stripe customer and an id",
            )
            .into()));
        }
        self.deps.store.put_pending_topup(topup_id, &rec)?;
        Ok(Ok(()))
    }
}
