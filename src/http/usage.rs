//! `GET /v1/accounts/{id}/usage`: per-meter usage over time, cost to date, and the change
//! against the previous billing period.
//!
//! Read-only. The route takes the account's view from [`Accounts::get`] (which answers only
//! after a flush, so every entry up to its `last_seq` is durable), then folds the account's
//! ledger up to that sequence number in a blocking task. Nothing here changes account state.

use std::collections::BTreeMap;

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use meterd_actors::account::{AccountError, AccountView, Accounts};
use meterd_actors::ledger::EntryKind;
use meterd_actors::model::Outcome;
use meterd_actors::model::{AccountId, Period, UnixMs, format_rfc3339, parse_rfc3339};
use meterd_actors::plan::plan_pricing;
use meterd_actors::pricing::period_cost;
use meterd_actors::store::StoreReader;

use super::auth::ApiKeyAuth;
use super::error::{ApiError, account_id};
use super::views::{account_result, csv_table};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Most day buckets one request may ask for (a leap year).
const MAX_DAY_BUCKETS: i64 = 366;
/// Most hour buckets one request may ask for (a 31-day month).
const MAX_HOUR_BUCKETS: i64 = 744;
/// Ledger entries read per store call.
const PAGE: usize = 1000;

#[derive(Tags)]
enum UsageTags {
    /// Usage reports.
    Usage,
}

pub struct UsageApi {
    pub accounts: Accounts,
    pub store: StoreReader,
}

/// One time bucket of one meter.
#[derive(Debug, Clone, Object)]
pub struct UsageBucket {
    /// Start of the bucket (UTC, aligned to the day or hour); the bucket lasts one
    /// `granularity`.
    pub start: String,
    /// Units of allowed consumption in the bucket (denials consume nothing).
    pub units: u64,
    /// Of those, units that were billable overage.
    pub billable: u64,
}

/// One meter's usage over the requested range.
#[derive(Debug, Clone, Object)]
pub struct UsageMeter {
    /// Allowed units in `[from, to)`: the sum of the series.
    pub total: u64,
    /// Every bucket that overlaps `[from, to)`, oldest first, zeros included (no gaps). Only
    /// consumption inside `[from, to)` is counted, so the first and last buckets may be
    /// partial.
    pub series: Vec<UsageBucket>,
}

/// The billing period before the current one.
#[derive(Debug, Clone, Object)]
pub struct PreviousPeriodUsage {
    pub start: String,
    pub end: String,
    /// Allowed units per meter in that period.
    pub units: BTreeMap<String, u64>,
    /// What that usage costs under the account's current plan, seats and overrides, in minor
    /// units of `currency` (base + seats + priced overage). Absent if the plan cannot price
    /// it.
    #[oai(skip_serializing_if_is_none)]
    pub cost: Option<u64>,
}

/// One meter's change: the current period to date against the whole previous period.
#[derive(Debug, Clone, Object)]
pub struct UsageChange {
    /// Units this period so far minus units in the previous period (negative: less).
    pub units: i64,
    /// `units × 100 / previous units`, rounded toward zero; null when the previous period
    /// had no usage of the meter.
    pub percent: Option<i64>,
}

/// `GET /v1/accounts/{id}/usage`.
#[derive(Debug, Clone, Object)]
pub struct UsageReport {
    pub account_id: String,
    /// Start of the range (inclusive), RFC 3339 UTC.
    pub from: String,
    /// End of the range (exclusive), RFC 3339 UTC.
    pub to: String,
    /// `day` or `hour`.
    pub granularity: String,
    /// The plan's currency; amounts are in its minor units (cents for usd).
    pub currency: String,
    /// Per meter: every meter of the plan, and any other meter with usage in the range.
    pub meters: BTreeMap<String, UsageMeter>,
    /// The current period's cost so far: base + seats + priced overage. Absent only if the
    /// plan cannot price the usage.
    #[oai(skip_serializing_if_is_none)]
    pub cost_to_date: Option<u64>,
    /// Base + seats + the usage part projected linearly to the end of the period.
    #[oai(skip_serializing_if_is_none)]
    pub projected_cost: Option<u64>,
    /// Absent when the account has no earlier period (created in the current one).
    #[oai(skip_serializing_if_is_none)]
    pub previous_period: Option<PreviousPeriodUsage>,
    /// Per meter: the current period to date against the previous period (against zero when
    /// there is none).
    pub change: BTreeMap<String, UsageChange>,
}

#[derive(ApiResponse)]
pub enum UsageResponse {
    #[oai(status = 200)]
    Json(Json<Box<UsageReport>>),
    /// `format=csv`: `meter,start,units,billable`, one row per bucket per meter. A cell a
    /// spreadsheet would read as a formula (`=`, `+`, `-`, `@`, tab or CR first; not a plain
    /// number) starts with `'`.
    #[oai(status = 200, content_type = "text/csv; charset=utf-8")]
    Csv(PlainText<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Granularity {
    Day,
    Hour,
}

impl Granularity {
    fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        match raw {
            None | Some("day") => Ok(Granularity::Day),
            Some("hour") => Ok(Granularity::Hour),
            Some(other) => Err(ApiError::invalid(format!(
                "`granularity` must be day or hour, not `{other}`"
            ))),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Granularity::Day => "day",
            Granularity::Hour => "hour",
        }
    }

    fn ms(self) -> i64 {
        match self {
            Granularity::Day => DAY_MS,
            Granularity::Hour => HOUR_MS,
        }
    }

    fn max_buckets(self) -> i64 {
        match self {
            Granularity::Day => MAX_DAY_BUCKETS,
            Granularity::Hour => MAX_HOUR_BUCKETS,
        }
    }
}

fn time_param(name: &str, raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    raw.map(|s| {
        parse_rfc3339(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "`{name}`: `{s}` is not an RFC 3339 UTC time such as 2026-03-01T00:00:00Z"
            ))
        })
    })
    .transpose()
}

/// The buckets of a request: `count` buckets of `size` ms starting at `first`.
#[derive(Debug, Clone, Copy)]
struct Buckets {
    first: UnixMs,
    size: i64,
    count: usize,
}

impl Buckets {
    /// Buckets aligned to UTC boundaries that cover `[from, to)`; `from < to`.
    fn covering(from: UnixMs, to: UnixMs, g: Granularity) -> Result<Self, ApiError> {
        let size = g.ms();
        let first = from.div_euclid(size) * size;
        // `to` is at most year 9999 (or now), so neither step can overflow.
        let end = to.saturating_add(size - 1).div_euclid(size) * size;
        let n = (end - first) / size;
        if n > g.max_buckets() {
            return Err(ApiError::invalid(format!(
                "the range from `from` to `to` spans {n} {} buckets; at most {} are allowed",
                g.as_str(),
                g.max_buckets()
            )));
        }
        Ok(Buckets {
            first,
            size,
            count: usize::try_from(n).unwrap_or(0),
        })
    }

    fn index(&self, at: UnixMs) -> Option<usize> {
        usize::try_from((at - self.first).div_euclid(self.size))
            .ok()
            .filter(|i| *i < self.count)
    }
}

/// What one pass over the ledger yields.
#[derive(Debug, Default)]
struct Scan {
    /// Per meter, per bucket: (units, billable).
    series: BTreeMap<String, Vec<(u64, u64)>>,
    /// The period the latest rollover into the current period came from, and the units the
    /// ledger recorded in it.
    rolled_from: Option<(Period, BTreeMap<String, u64>)>,
    /// Units with their time inside the fallback previous period (the calendar month before
    /// the current period), for accounts whose rollover has not been written yet.
    fallback_units: BTreeMap<String, u64>,
}

struct ScanArgs {
    id: AccountId,
    durable: u64,
    from: UnixMs,
    to: UnixMs,
    buckets: Buckets,
    current_start: UnixMs,
    fallback: Period,
}

fn add(map: &mut BTreeMap<String, u64>, meter: &str, units: u64) {
    let slot = map.entry(meter.to_owned()).or_default();
    *slot = slot.saturating_add(units);
}

/// Reads the account's ledger from its first entry to `durable`, in pages of [`PAGE`].
/// Linear in the length of the account's ledger; memory is bounded by meters × buckets.
fn scan(store: &StoreReader, a: &ScanArgs) -> Result<Scan, AccountError> {
    let mut out = Scan::default();
    // Allowed units since the latest rollover (or since the account began): the usage the
    // ledger counted in the period that the next rollover closes.
    let mut segment: BTreeMap<String, u64> = BTreeMap::new();
    let mut after = 0u64;
    'pages: loop {
        let page = store.entries_after(&a.id, after, PAGE)?;
        let full = page.len() == PAGE;
        for e in page {
            if e.seq > a.durable {
                break 'pages;
            }
            after = e.seq;
            match &e.kind {
                EntryKind::PeriodRolled { from, to } => {
                    let closed = std::mem::take(&mut segment);
                    if to.start_ms == a.current_start {
                        out.rolled_from = Some((*from, closed));
                    }
                }
                EntryKind::Consume(c) if c.outcome == Outcome::Allowed => {
                    add(&mut segment, &c.meter, c.quantity);
                    if a.fallback.contains(e.at_ms) {
                        add(&mut out.fallback_units, &c.meter, c.quantity);
                    }
                    if a.from <= e.at_ms
                        && e.at_ms < a.to
                        && let Some(i) = a.buckets.index(e.at_ms)
                    {
                        let series = out
                            .series
                            .entry(c.meter.clone())
                            .or_insert_with(|| vec![(0, 0); a.buckets.count]);
                        if let Some(b) = series.get_mut(i) {
                            b.0 = b.0.saturating_add(c.quantity);
                            b.1 = b.1.saturating_add(c.billable);
                        }
                    }
                }
                _ => {}
            }
        }
        if !full {
            break;
        }
    }
    Ok(out)
}

fn change(current: u64, previous: u64) -> UsageChange {
    let delta = i128::from(current) - i128::from(previous);
    let clamp = |v: i128| i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX });
    UsageChange {
        units: clamp(delta),
        // Integer division in Rust rounds toward zero.
        percent: (previous > 0).then(|| clamp(delta * 100 / i128::from(previous))),
    }
}

fn usage_csv(meters: &BTreeMap<String, UsageMeter>) -> Result<String, ApiError> {
    let rows = meters.iter().flat_map(|(meter, m)| {
        m.series.iter().map(move |b| {
            [
                meter.clone(),
                b.start.clone(),
                b.units.to_string(),
                b.billable.to_string(),
            ]
        })
    });
    csv_table(&["meter", "start", "units", "billable"], rows)
}

fn previous_period(
    view: &AccountView,
    scan: &mut Scan,
    fallback: Period,
) -> Option<(Period, BTreeMap<String, u64>)> {
    if let Some(p) = scan.rolled_from.take() {
        return Some(p);
    }
    // No rollover into the current period is on disk: either the account began in this
    // period, or it has not been used since the period changed (the view rolls over in
    // memory only). In the latter case the calendar month before is the previous period.
    (view.profile.created_at_ms < view.period.start_ms)
        .then(|| (fallback, std::mem::take(&mut scan.fallback_units)))
}

#[OpenApi(tag = "UsageTags::Usage")]
impl UsageApi {
    /// Usage over time per meter, cost to date and projected, and the change against the
    /// previous billing period (`app` or `admin` key).
    ///
    /// Only allowed consumption counts; denials are recorded but consume nothing. Every
    /// bucket overlapping `[from, to)` appears, zeros included. Everything returned is
    /// durable. `format=csv` returns `meter,start,units,billable`, one row per bucket per
    /// meter.
    ///
    /// Cost: this reads the account's whole ledger once (a linear scan, in pages of 1,000
    /// entries), so its time grows with the account's history, not with the range asked for.
    #[oai(path = "/v1/accounts/:id/usage", method = "get")]
    async fn usage(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
        /// Start of the range, RFC 3339 UTC such as 2026-03-01T00:00:00Z (default: the start
        /// of the current billing period).
        from: Query<Option<String>>,
        /// End of the range (exclusive), RFC 3339 UTC (default: 1 ms after now, so everything
        /// recorded so far counts).
        to: Query<Option<String>>,
        /// `day` (default) or `hour`; buckets are aligned to UTC days or hours. At most 366
        /// day buckets or 744 hour buckets.
        granularity: Query<Option<String>>,
        /// `json` (default) or `csv`.
        format: Query<Option<String>>,
    ) -> Result<UsageResponse, ApiError> {
        let id = account_id(&id)?;
        let granularity = Granularity::parse(granularity.0.as_deref())?;
        let csv = match format.0.as_deref() {
            None | Some("json") => false,
            Some("csv") => true,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "`format` must be json or csv, not `{other}`"
                )));
            }
        };
        let from_param = time_param("from", from.0.as_deref())?;
        let to_param = time_param("to", to.0.as_deref())?;

        // Existence and durability: the actor answers after a flush, so every entry up to
        // `last_seq` is on disk. Later entries are left for the next read.
        let view = self.accounts.get(&id).await?;
        let from = from_param.unwrap_or(view.period.start_ms);
        // The default end is exclusive and just after now, so everything recorded so far
        // (what `cost_to_date` counts) is in the range.
        let to = to_param.unwrap_or(view.as_of_ms.saturating_add(1));
        if from >= to {
            return Err(ApiError::invalid(format!(
                "`from` ({}) must be before `to` ({})",
                format_rfc3339(from),
                format_rfc3339(to)
            )));
        }
        let buckets = Buckets::covering(from, to, granularity)?;
        let fallback = Period::calendar_month(view.period.start_ms - 1);

        let args = ScanArgs {
            id: id.clone(),
            durable: view.last_seq,
            from,
            to,
            buckets,
            current_start: view.period.start_ms,
            fallback,
        };
        let store = self.store.clone();
        let mut scanned = tokio::task::spawn_blocking(move || scan(&store, &args))
            .await
            .map_err(|e| ApiError::from(AccountError::Unavailable(e.to_string())))?
            .map_err(ApiError::from)?;

        // Every meter of the plan appears, with zeros if unused.
        for m in &view.meters {
            scanned
                .series
                .entry(m.meter.clone())
                .or_insert_with(|| vec![(0, 0); buckets.count]);
        }
        let meters: BTreeMap<String, UsageMeter> = scanned
            .series
            .iter()
            .map(|(meter, series)| {
                let series: Vec<UsageBucket> = series
                    .iter()
                    .zip(0i64..)
                    .map(|(&(units, billable), i)| UsageBucket {
                        start: format_rfc3339(buckets.first + i * buckets.size),
                        units,
                        billable,
                    })
                    .collect();
                let total = series.iter().fold(0u64, |a, b| a.saturating_add(b.units));
                (meter.clone(), UsageMeter { total, series })
            })
            .collect();
        if csv {
            return Ok(UsageResponse::Csv(PlainText(usage_csv(&meters)?)));
        }

        let cost = account_result(&view).cost;
        let previous = previous_period(&view, &mut scanned, fallback);
        let previous_units = previous
            .as_ref()
            .map(|(_, units)| units.clone())
            .unwrap_or_default();
        let current_units: BTreeMap<String, u64> = view
            .meters
            .iter()
            .map(|m| (m.meter.clone(), m.used))
            .collect();
        let mut change_map = BTreeMap::new();
        for meter in current_units.keys().chain(previous_units.keys()) {
            let cur = current_units.get(meter).copied().unwrap_or(0);
            let prev = previous_units.get(meter).copied().unwrap_or(0);
            change_map.insert(meter.clone(), change(cur, prev));
        }
        let previous_period = previous.map(|(period, units)| {
            let pricing = plan_pricing(&view.plan, &view.profile);
            // Only priced meters cost anything, as for the current period.
            let priced: BTreeMap<String, u64> = units
                .iter()
                .filter(|(m, _)| pricing.meters.contains_key(*m))
                .map(|(m, u)| (m.clone(), *u))
                .collect();
            PreviousPeriodUsage {
                start: format_rfc3339(period.start_ms),
                end: format_rfc3339(period.end_ms),
                cost: period_cost(&pricing, view.profile.seats, &priced)
                    .ok()
                    .map(|c| c.total),
                units,
            }
        });

        Ok(UsageResponse::Json(Json(Box::new(UsageReport {
            account_id: id.to_string(),
            from: format_rfc3339(from),
            to: format_rfc3339(to),
            granularity: granularity.as_str().to_owned(),
            currency: view.plan.currency.clone(),
            meters,
            cost_to_date: cost.as_ref().map(|c| c.total),
            projected_cost: cost.as_ref().map(|c| c.projected_total),
            previous_period,
            change: change_map,
        }))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_align_to_utc_boundaries() {
        // 2026-03-10T05:30Z to 2026-03-12T01:00Z: Mar 10, 11, 12.
        let t = 1_773_100_800_000 + 5 * HOUR_MS + HOUR_MS / 2;
        let b = Buckets::covering(t, t + DAY_MS + 19 * HOUR_MS + HOUR_MS / 2, Granularity::Day)
            .unwrap();
        assert_eq!((b.first, b.count), (1_773_100_800_000, 3));
        assert_eq!(b.index(t), Some(0));
        assert_eq!(b.index(b.first + 3 * DAY_MS), None);
        // An aligned end adds no bucket.
        let b = Buckets::covering(b.first, b.first + DAY_MS, Granularity::Hour).unwrap();
        assert_eq!(b.count, 24);
        assert!(Buckets::covering(0, 745 * HOUR_MS, Granularity::Hour).is_err());
        assert!(Buckets::covering(0, 744 * HOUR_MS, Granularity::Hour).is_ok());
        assert!(Buckets::covering(0, 367 * DAY_MS, Granularity::Day).is_err());
    }

    #[test]
    fn change_is_integer_and_rounds_toward_zero() {
        let c = change(16, 60);
        assert_eq!((c.units, c.percent), (-44, Some(-73)));
        let c = change(70, 60);
        assert_eq!((c.units, c.percent), (10, Some(16)));
        let c = change(5, 0);
        assert_eq!((c.units, c.percent), (5, None));
    }
}
