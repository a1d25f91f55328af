//! Meter event identifiers: what meterd names each event it sends to Stripe, and the way back.
//!
//! An identifier is derived from the account and the ledger sequence number only, so every
//! retry of the same usage carries the same identifier (and idempotency key), and Stripe's
//! 24-hour identifier dedup makes a resend harmless. Stripe allows 100 characters:
//!
//! - one entry: `{account}:{seq}`; an aggregated range of entries: `{account}:{first}-{last}`;
//! - when that would be longer than 100 characters (possible only for account ids longer than
//!   [`HASHED_ABOVE`] characters), the account is replaced by `h` and 40 hex digits of its
//!   SHA-256. The store keeps an index from that hash back to the account
//!   (`Store::identifier_owner`), written with the account's first ledger entry, so every
//!   identifier meterd sends can be mapped back to its account ([`parse`]).

use sha2::{Digest, Sha256};

use crate::model::AccountId;

/// Account ids at most this long always appear in plain text in identifiers: the longest
/// identifier is `{account}:{first}-{last}` with two 20-digit seqs, 42 characters besides the
/// account.
pub const HASHED_ABOVE: usize = 100 - 42;

/// The meter event identifier (and idempotency key) of ledger entry `seq` of `account`.
pub fn entry(account: &AccountId, seq: u64) -> String {
    let plain = format!("{account}:{seq}");
    if plain.len() <= 100 {
        return plain;
    }
    format!("{}:{seq}", hashed(account))
}

/// The identifier of a batch of entries `first..=last` of `account`. It never equals an
/// entry's identifier (those end in digits after the last `:`, without `-`).
pub fn batch(account: &AccountId, first: u64, last: u64) -> String {
    let plain = format!("{account}:{first}-{last}");
    if plain.len() <= 100 {
        return plain;
    }
    format!("{}:{first}-{last}", hashed(account))
}

/// The identifier of the reconciler's repair of the window whose first billable entry is
/// `first`: `{account}:r{first}` (one repair per window, never two). An account id that
/// [`may_be_hashed`] (so its hash index exists) is always hashed here; the others give at
/// most 80 characters.
pub fn repair(account: &AccountId, first: u64) -> String {
    let plain = format!("{account}:r{first}");
    if !may_be_hashed(account) {
        return plain;
    }
    format!("{}:r{first}", hashed(account))
}

/// Whether some identifier of `account` may carry its hash instead of its id.
pub fn may_be_hashed(account: &AccountId) -> bool {
    account.as_str().len() > HASHED_ABOVE
}

/// `h` and 40 hex digits of the account id's SHA-256.
pub fn hashed(account: &AccountId) -> String {
    let h = Sha256::digest(account.as_str().as_bytes());
    format!("h{}", &hex::encode(h)[..40])
}

/// Whether `owner` (the part of an identifier before the last `:`) has the shape of a hashed
/// account id. A plain account id may have it too; the hash index decides.
pub fn looks_hashed(owner: &str) -> bool {
    owner.len() == 41
        && owner.starts_with('h')
        && owner[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An identifier read back: who it names (an account id, or a hash to look up with
/// `Store::identifier_owner`) and its first ledger seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The text before the last `:`: the account id, or its hash.
    pub owner: String,
    /// The ledger entry (the first of an aggregated range).
    pub seq: u64,
}

/// Parses an identifier meterd sent: `{owner}:{seq}`, `{owner}:{first}-{last}` or a repair's
/// `{owner}:r{first}`.
pub fn parse(ident: &str) -> Option<Parsed> {
    let (owner, rest) = ident.rsplit_once(':')?;
    if let Some(first) = rest.strip_prefix('r') {
        let seq = first.parse().ok()?;
        return (!owner.is_empty()).then(|| Parsed {
            owner: owner.to_owned(),
            seq,
        });
    }
    let seq = match rest.split_once('-') {
        Some((first, last)) => {
            let first: u64 = first.parse().ok()?;
            let last: u64 = last.parse().ok()?;
            (first <= last).then_some(first)?
        }
        None => rest.parse().ok()?,
    };
    (!owner.is_empty()).then(|| Parsed {
        owner: owner.to_owned(),
        seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> AccountId {
        AccountId::parse(s).unwrap()
    }

    #[test]
    fn entry_identifiers_derive_from_account_and_seq_and_fit_stripe() {
        assert_eq!(entry(&a("team_42"), 7), "team_42:7");
        let long = a(&"x".repeat(128));
        let id = entry(&long, u64::MAX);
        assert!(id.len() <= 100, "{}", id.len());
        assert_eq!(id, entry(&long, u64::MAX), "deterministic");
        assert_ne!(entry(&long, 1), entry(&long, 2));
    }

    #[test]
    fn batch_identifiers_name_the_range_and_fit_stripe() {
        let t = a("team_42");
        assert_eq!(batch(&t, 3, 17), "team_42:3-17");
        assert_ne!(batch(&t, 3, 17), entry(&t, 3));
        let long = a(&"x".repeat(128));
        let id = batch(&long, u64::MAX - 1, u64::MAX);
        assert!(id.len() <= 100, "{}", id.len());
        assert!(
            id.ends_with(&format!(":{}-{}", u64::MAX - 1, u64::MAX)),
            "{id}"
        );
        assert_eq!(id, batch(&long, u64::MAX - 1, u64::MAX));
        assert_ne!(batch(&long, 1, 2), batch(&long, 1, 3));
        // The longest id kept in plain text with 20-digit seqs.
        let edge = a(&"y".repeat(HASHED_ABOVE));
        assert_eq!(batch(&edge, u64::MAX, u64::MAX).len(), 100);
        assert!(!may_be_hashed(&edge));
    }

    #[test]
    fn repair_identifiers_parse_back_to_the_first_entry_and_differ_from_entries() {
        let t = a("team_42");
        assert_eq!(repair(&t, 7), "team_42:r7");
        assert_ne!(repair(&t, 7), entry(&t, 7));
        assert_eq!(
            parse(&repair(&t, 7)),
            Some(Parsed {
                owner: "team_42".into(),
                seq: 7
            })
        );
        for len in [HASHED_ABOVE, HASHED_ABOVE + 1, 128] {
            let id = a(&"q".repeat(len));
            let r = repair(&id, u64::MAX);
            assert!(r.len() <= 100, "{}", r.len());
            let p = parse(&r).unwrap();
            assert_eq!(p.seq, u64::MAX);
            assert_eq!(looks_hashed(&p.owner), may_be_hashed(&id), "{r}");
        }
    }

    #[test]
    fn only_ids_longer_than_the_bound_are_ever_hashed() {
        for len in [1, 10, 41, HASHED_ABOVE, HASHED_ABOVE + 1, 99, 100, 128] {
            let id = a(&"z".repeat(len));
            let hashed_some = [
                entry(&id, 0),
                entry(&id, u64::MAX),
                batch(&id, 0, 1),
                batch(&id, u64::MAX - 1, u64::MAX),
            ]
            .iter()
            .any(|i| !i.starts_with(id.as_str()));
            assert!(!hashed_some || may_be_hashed(&id), "{len}");
            assert_eq!(may_be_hashed(&id), len > HASHED_ABOVE, "{len}");
        }
    }

    #[test]
    fn every_identifier_parses_back_to_its_owner_and_first_seq() {
        for id in [
            "acct_1",
            "a:b:c",
            "h-dash",
            &"x".repeat(128),
            &"q".repeat(59),
        ] {
            let acct = a(id);
            for (ident, first) in [
                (entry(&acct, 42), 42),
                (entry(&acct, u64::MAX), u64::MAX),
                (batch(&acct, 3, 17), 3),
                (batch(&acct, u64::MAX - 1, u64::MAX), u64::MAX - 1),
            ] {
                let p = parse(&ident).unwrap_or_else(|| panic!("{ident}"));
                assert_eq!(p.seq, first, "{ident}");
                if ident.starts_with(acct.as_str()) {
                    assert_eq!(p.owner, acct.as_str());
                } else {
                    assert!(looks_hashed(&p.owner), "{ident}");
                    assert_eq!(p.owner, hashed(&acct));
                }
            }
        }
        assert_eq!(parse("meterd-acct_acme-000000004410"), None);
        assert_eq!(parse("acct_1:x"), None);
        assert_eq!(parse("acct_1:r"), None);
        assert_eq!(parse("acct_1:r1-2"), None);
        assert_eq!(parse("acct_1:9-3"), None, "a range runs forward");
        assert_eq!(parse(":5"), None);
        assert!(!looks_hashed("acct_1"));
        assert!(!looks_hashed(&format!("h{}", "G".repeat(40))));
    }
}
