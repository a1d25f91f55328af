//! Ledger entries as the API shows them: one flat row per entry, as JSON pages or as CSV
//! (one writer for every `format=csv` route, formula-safe).

use super::*;

/// One ledger entry, flat so it maps onto one CSV row.
#[derive(Debug, Object)]
pub struct LedgerEntryView {
    pub seq: u64,
    pub at: String,
    /// account_upserted, period_rolled, consume or credit.
    pub kind: String,
    #[oai(skip_serializing_if_is_none)]
    pub meter: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub quantity: Option<u64>,
    /// allowed or denied (consume).
    #[oai(skip_serializing_if_is_none)]
    pub decision: Option<String>,
    /// Denial code (consume).
    #[oai(skip_serializing_if_is_none)]
    pub code: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub billable: Option<u64>,
    /// Change of the credit balance.
    #[oai(skip_serializing_if_is_none)]
    pub credits_delta: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub used_after: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub credits_after: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub idempotency_key: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub plan: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub period_start: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Object)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntryView>,
    /// Pass as `after_seq` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_after_seq: Option<u64>,
}

pub fn ledger_entry_view(e: &LedgerEntry) -> LedgerEntryView {
    let mut v = LedgerEntryView {
        seq: e.seq,
        at: format_rfc3339(e.at_ms),
        kind: e.kind.name().to_owned(),
        meter: None,
        quantity: None,
        decision: None,
        code: None,
        billable: None,
        credits_delta: None,
        used_after: None,
        credits_after: None,
        idempotency_key: None,
        plan: None,
        reason: None,
        period_start: None,
        metadata: None,
    };
    match &e.kind {
        EntryKind::AccountUpserted(p) => v.plan = Some(p.plan.clone()),
        EntryKind::PeriodRolled { to, .. } | EntryKind::PeriodAdjusted { to, .. } => {
            v.period_start = Some(format_rfc3339(to.start_ms))
        }
        EntryKind::Consume(c) => {
            v.meter = Some(c.meter.clone());
            v.quantity = Some(c.quantity);
            let (decision, code) = match c.outcome {
                Outcome::Allowed => ("allowed", None),
                Outcome::Denied(d) => ("denied", Some(d.as_str().to_owned())),
            };
            v.decision = Some(decision.into());
            v.code = code;
            v.billable = Some(c.billable);
            v.credits_delta = Some(-i64::try_from(c.credits_spent).unwrap_or(i64::MAX));
            v.used_after = Some(c.used_after);
            v.credits_after = Some(c.credits_after);
            v.idempotency_key = Some(c.idempotency_key.clone());
            if !c.metadata.is_empty() {
                v.metadata = Some(c.metadata.iter().cloned().collect());
            }
        }
        EntryKind::Credit(c) => {
            v.credits_delta = Some(c.amount);
            v.credits_after = Some(c.credits_after);
            v.idempotency_key = Some(c.idempotency_key.clone());
            v.reason = Some(c.reason.clone());
        }
        EntryKind::Reserved(h) => {
            v.meter = Some(h.meter.clone());
            v.quantity = Some(h.quantity);
            let (decision, code) = match h.outcome {
                Outcome::Allowed => ("held", None),
                Outcome::Denied(d) => ("denied", Some(d.as_str().to_owned())),
            };
            v.decision = Some(decision.into());
            v.code = code;
            v.credits_delta = Some(
                -i64::try_from(h.burns.iter().map(|(_, n)| n).sum::<u64>()).unwrap_or(i64::MAX),
            );
            v.used_after = Some(h.used_after);
            v.credits_after = Some(h.credits_after);
            v.idempotency_key = Some(h.idempotency_key.clone());
        }
        EntryKind::Settled(r) => {
            v.meter = Some(r.meter.clone());
            v.quantity = r.committed;
            v.decision = Some(
                if r.committed.is_some() {
                    "committed"
                } else if r.expired {
                    "expired"
                } else {
                    "released"
                }
                .into(),
            );
            v.billable = Some(r.billable);
            let refunded: u64 = r.refunds.iter().map(|(_, n)| n).sum();
            let burned: u64 = r.burns.iter().map(|(_, n)| n).sum();
            v.credits_delta = Some(
                i64::try_from(refunded).unwrap_or(i64::MAX)
                    - i64::try_from(burned).unwrap_or(i64::MAX),
            );
            v.used_after = Some(r.used_after);
            v.credits_after = Some(r.credits_after);
            v.reason = Some(format!("reservation {}", r.rid));
        }
        EntryKind::CreditExpired {
            grant_id,
            amount,
            credits_after,
        } => {
            v.credits_delta = Some(-i64::try_from(*amount).unwrap_or(i64::MAX));
            v.credits_after = Some(*credits_after);
            v.reason = Some(format!("grant {grant_id} expired"));
        }
        EntryKind::Stripe(r) => {
            v.decision = Some(r.outcome.as_str().to_owned());
            v.idempotency_key = Some(r.event_id.clone());
            v.reason = Some(match &r.outcome {
                StripeOutcome::Applied => r.event_type.clone(),
                StripeOutcome::Stale(why) | StripeOutcome::Ignored(why) => {
                    format!("{}: {why}", r.event_type)
                }
            });
        }
        EntryKind::Clawback(c) => {
            let taken: u64 = c.burns.iter().map(|(_, n)| n).sum();
            v.credits_delta = Some(-i64::try_from(taken).unwrap_or(i64::MAX));
            v.credits_after = Some(c.credits_after);
            v.reason = Some(if c.reference == meterd_actors::ledger::DEBT {
                format!("credit debt paid: {}, left {}", c.debt_paid, c.debt_after)
            } else {
                format!(
                    "payment {} refunded or lost: {} credits owed in all, {taken} taken, {} to debt, {} forgiven; debt {}",
                    c.reference, c.owed, c.debt_added, c.forgiven, c.debt_after
                )
            });
        }
    }
    v
}

pub(super) const LEDGER_CSV_HEADER: [&str; 14] = [
    "seq",
    "at",
    "kind",
    "meter",
    "quantity",
    "decision",
    "code",
    "billable",
    "credits_delta",
    "used_after",
    "credits_after",
    "idempotency_key",
    "plan",
    "reason",
];

/// A CSV cell made safe for spreadsheets: a cell that starts with `=`, `+`, `-`, `@`, a tab or a
/// carriage return would be read as a formula (CSV injection), so it gets a leading `'`, unless
/// it is a plain number (`-5`, `-0.25`: an optional `-`, digits, an optional fraction), which
/// stays a number.
pub(super) fn csv_cell(s: &str) -> Cow<'_, str> {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && !plain_number(s) {
        Cow::Owned(format!("'{s}"))
    } else {
        Cow::Borrowed(s)
    }
}

pub(super) fn plain_number(s: &str) -> bool {
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    let unsigned = s.strip_prefix('-').unwrap_or(s);
    match unsigned.split_once('.') {
        Some((int, frac)) => digits(int) && digits(frac),
        None => digits(unsigned),
    }
}

/// The one CSV writer of the API, for every `format=csv` route: the `csv` crate (RFC 4180
/// quoting, `\n` line ends) writes the header row, then the rows; every cell is defused
/// (`csv_cell`).
pub fn csv_table<R, C>(header: &[&str], rows: R) -> Result<String, ApiError>
where
    R: IntoIterator<Item = C>,
    C: IntoIterator<Item = String>,
{
    // Writing to memory cannot fail, nor can rows of one table differ in width; say so if it
    // ever does rather than send a truncated table.
    let failed = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "cannot write CSV");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header.iter().map(|h| csv_cell(h).into_owned()))
        .map_err(|e| failed(&e))?;
    for row in rows {
        let cells: Vec<String> = row.into_iter().map(|c| csv_cell(&c).into_owned()).collect();
        w.write_record(&cells).map_err(|e| failed(&e))?;
    }
    let bytes = w.into_inner().map_err(|e| failed(&e.error()))?;
    String::from_utf8(bytes).map_err(|e| failed(&e))
}

pub fn ledger_csv(entries: &[LedgerEntryView]) -> Result<String, ApiError> {
    let num = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    let rows = entries.iter().map(|e| {
        [
            e.seq.to_string(),
            e.at.clone(),
            e.kind.clone(),
            text(&e.meter),
            num(e.quantity),
            text(&e.decision),
            text(&e.code),
            num(e.billable),
            e.credits_delta.map(|n| n.to_string()).unwrap_or_default(),
            num(e.used_after),
            num(e.credits_after),
            text(&e.idempotency_key),
            text(&e.plan),
            text(&e.reason),
        ]
    });
    csv_table(&LEDGER_CSV_HEADER, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_defuse_formulas_but_not_numbers() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(csv_cell("+1+cmd|' /C calc'!A0"), "'+1+cmd|' /C calc'!A0");
        assert_eq!(csv_cell("-1+A1"), "'-1+A1");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("\t=1"), "'\t=1");
        assert_eq!(csv_cell("\r=1"), "'\r=1");
        assert_eq!(csv_cell("-"), "'-");
        assert_eq!(csv_cell("-e5"), "'-e5");
        assert_eq!(csv_cell("-1e5"), "'-1e5");
        assert_eq!(csv_cell("-5."), "'-5.");
        assert_eq!(csv_cell("+5"), "'+5");
        // Plain numbers stay numbers; a later `=` is harmless.
        assert_eq!(csv_cell("-5"), "-5");
        assert_eq!(csv_cell("-0.25"), "-0.25");
        assert_eq!(csv_cell("42"), "42");
        assert_eq!(csv_cell("a=b"), "a=b");
        assert_eq!(csv_cell(""), "");
    }

    #[test]
    fn csv_tables_quote_and_defuse_every_cell() {
        let rows = vec![
            vec!["plain".to_owned(), "a,b".into(), "-5".into()],
            vec!["say \"hi\"".into(), "=SUM(A1)".into(), "line\nbreak".into()],
            vec!["=1,2".into(), "@x".into(), "\r".into()],
        ];
        assert_eq!(
            csv_table(&["name", "=h", "n"], rows).unwrap(),
            "name,'=h,n\n\
             plain,\"a,b\",-5\n\
             \"say \"\"hi\"\"\",'=SUM(A1),\"line\nbreak\"\n\
             \"'=1,2\",'@x,\"'\r\"\n"
        );
        assert_eq!(
            csv_table(&["a", "b"], Vec::<Vec<String>>::new()).unwrap(),
            "a,b\n"
        );
    }
}
