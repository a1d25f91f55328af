//! Pricing: what a quantity of a meter, and a plan's whole period, costs in minor units.
//!
//! This module owns the price vocabulary ([`Decimal`], [`PriceModel`], [`Tier`],
//! [`PlanPricing`]), its validation, and the arithmetic that turns usage into money. Money is
//! always an integer number of minor units (cents); fractional unit prices are exact
//! fixed-point decimals. Totals are computed exactly and rounded once per [`cost`] call, half
//! up, so the result is exact to the minor unit.
//!
//! This module is pure: no I/O, no clock, no actor, no file format. It never uses floating
//! point, and it never wraps or saturates an amount that is billed: an amount that does not
//! fit is [`PricingError::Overflow`]. The daemon's config layer builds these types through
//! their constructors, which return a message a config error can show.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Digits after the decimal point a [`Decimal`] keeps.
pub const FRACTION_DIGITS: usize = 12;
/// Digits before the decimal point a [`Decimal`] accepts.
pub const INTEGER_DIGITS: usize = 15;
/// One minor unit in a [`Decimal`]'s fixed-point representation: 10^12.
const SCALE: u128 = 1_000_000_000_000;
/// The first value too large for a [`Decimal`]: 10^15 minor units.
const DECIMAL_LIMIT: u128 = 1_000_000_000_000_000 * SCALE;

/// Why a price is refused or a cost cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// A price, tier list or plan that is not valid; the message says which rule it breaks.
    #[error("{0}")]
    Invalid(String),
    /// The amount does not fit in 64-bit minor units (or an intermediate exact total does not
    /// fit in 128 bits).
    #[error("the amount is too large to compute (it does not fit in 64-bit minor units)")]
    Overflow,
    /// Usage was reported for a meter the plan has no price for. Refused rather than dropped,
    /// so billable usage is never silently left off.
    #[error("meter `{0}` has usage but no price in this plan")]
    MeterNotPriced(String),
}

impl PricingError {
    fn invalid(msg: impl Into<String>) -> Self {
        PricingError::Invalid(msg.into())
    }
}

/// A non-negative amount of minor units with up to 12 fractional digits, such as `"50"`,
/// `"0.2"` or `"0.0125"` (a fraction of a cent). Stored exactly as an integer scaled by 10^12.
///
/// Displays canonically (no trailing fractional zeros, no point for whole amounts), and the
/// display parses back to the same value.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Decimal(u128);

impl Decimal {
    pub const ZERO: Decimal = Decimal(0);

    /// Parses digits with an optional fractional part: at most 15 digits before the point and
    /// at most 12 after it. Signs, exponents, commas, whitespace, and a point without digits
    /// on both sides are refused.
    pub fn parse(raw: &str) -> Result<Self, PricingError> {
        let malformed = || {
            PricingError::invalid(format!(
                "`{raw}` is not a price: expected a non-negative decimal number of minor units \
                 such as 50, 0.2 or 0.0125"
            ))
        };
        let (int, frac) = match raw.split_once('.') {
            Some((int, frac)) => (int, Some(frac)),
            None => (raw, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
            return Err(malformed());
        }
        if int.len() > INTEGER_DIGITS {
            return Err(PricingError::invalid(format!(
                "`{raw}` is not a price: at most {INTEGER_DIGITS} digits are allowed before the \
                 decimal point"
            )));
        }
        let frac = frac.unwrap_or("");
        if frac.len() > FRACTION_DIGITS {
            return Err(PricingError::invalid(format!(
                "`{raw}` is not a price: at most {FRACTION_DIGITS} digits are allowed after the \
                 decimal point"
            )));
        }
        // At most 27 digits in all, so neither accumulation below can overflow a u128.
        let digits_value = |s: &str| {
            s.bytes()
                .fold(0u128, |acc, b| acc * 10 + u128::from(b - b'0'))
        };
        let mut frac_scaled = digits_value(frac);
        for _ in frac.len()..FRACTION_DIGITS {
            frac_scaled *= 10;
        }
        Ok(Decimal(digits_value(int) * SCALE + frac_scaled))
    }

    /// A whole number of minor units; refused above the 15-digit limit [`Decimal::parse`]
    /// enforces, so every `Decimal` displays as something that parses.
    pub fn from_minor(units: u64) -> Result<Self, PricingError> {
        let scaled = u128::from(units) * SCALE;
        if scaled >= DECIMAL_LIMIT {
            return Err(PricingError::invalid(format!(
                "`{units}` is not a price: at most {INTEGER_DIGITS} digits are allowed"
            )));
        }
        Ok(Decimal(scaled))
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The exact value times 10^12.
    pub fn scaled(self) -> u128 {
        self.0
    }
}

impl FromStr for Decimal {
    type Err = PricingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Decimal::parse(s)
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let int = self.0 / SCALE;
        let frac = self.0 % SCALE;
        if frac == 0 {
            return write!(f, "{int}");
        }
        let digits = format!("{frac:0width$}", width = FRACTION_DIGITS);
        write!(f, "{int}.{}", digits.trim_end_matches('0'))
    }
}

impl fmt::Debug for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Decimal({self})")
    }
}

/// One tier of a tiered price: the units up to and including `up_to` (and above the previous
/// tier's `up_to`), priced at `unit_price` each, plus `flat_fee` once if the tier applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Inclusive upper bound in units; `None` is infinity and is allowed only on the last
    /// tier, which must have it.
    pub up_to: Option<u64>,
    pub unit_price: Decimal,
    /// Minor units charged once when any unit falls in this tier ([`PriceModel::Graduated`])
    /// or when the total falls in it ([`PriceModel::Volume`]).
    pub flat_fee: u64,
}

impl Tier {
    /// A tier; the list it goes in is validated by [`PriceModel::graduated`] and
    /// [`PriceModel::volume`].
    pub fn new(up_to: Option<u64>, unit_price: Decimal, flat_fee: u64) -> Self {
        Self {
            up_to,
            unit_price,
            flat_fee,
        }
    }
}

/// How a quantity of one meter is priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceModel {
    /// Every unit at `unit_price`.
    PerUnit { unit_price: Decimal },
    /// `package_price` per started package of `package_size` units (at least 1).
    Package {
        package_size: u64,
        package_price: u64,
    },
    /// Each unit at the price of the tier it falls in, plus the flat fee of every tier that
    /// holds at least one unit (Stripe's graduated tiers).
    Graduated { tiers: Vec<Tier> },
    /// Every unit at the price of the tier the total quantity falls in, plus that tier's flat
    /// fee (Stripe's volume tiers). Not monotonic: a cheaper tier can make more units cost
    /// less.
    Volume { tiers: Vec<Tier> },
}

impl PriceModel {
    /// Every unit at `unit_price`, given as a decimal string of minor units.
    pub fn per_unit(unit_price: &str) -> Result<Self, PricingError> {
        Ok(PriceModel::PerUnit {
            unit_price: Decimal::parse(unit_price)?,
        })
    }

    /// `package_price` minor units per started package of `package_size` units.
    pub fn package(package_size: u64, package_price: u64) -> Result<Self, PricingError> {
        let model = PriceModel::Package {
            package_size,
            package_price,
        };
        model.validate()?;
        Ok(model)
    }

    pub fn graduated(tiers: Vec<Tier>) -> Result<Self, PricingError> {
        validate_tiers(&tiers)?;
        Ok(PriceModel::Graduated { tiers })
    }

    pub fn volume(tiers: Vec<Tier>) -> Result<Self, PricingError> {
        validate_tiers(&tiers)?;
        Ok(PriceModel::Volume { tiers })
    }

    /// Checks the rules the constructors enforce; [`cost`] checks them too, because the
    /// variants can be built directly.
    pub fn validate(&self) -> Result<(), PricingError> {
        match self {
            // Every Decimal is within its limits by construction.
            PriceModel::PerUnit { .. } => Ok(()),
            PriceModel::Package { package_size, .. } => {
                if *package_size == 0 {
                    return Err(PricingError::invalid("package_size must be at least 1"));
                }
                Ok(())
            }
            PriceModel::Graduated { tiers } | PriceModel::Volume { tiers } => validate_tiers(tiers),
        }
    }
}

/// At least one tier; `up_to` at least 1 and strictly increasing; only the last tier, and
/// always the last tier, is unbounded, so every quantity has a price.
fn validate_tiers(tiers: &[Tier]) -> Result<(), PricingError> {
    let Some((last, bounded)) = tiers.split_last() else {
        return Err(PricingError::invalid("at least one tier is required"));
    };
    let mut previous = 0u64;
    for (i, tier) in bounded.iter().enumerate() {
        let n = i + 1;
        let Some(up_to) = tier.up_to else {
            return Err(PricingError::invalid(format!(
                "tier {n}: only the last tier may have no up_to (unbounded)"
            )));
        };
        if up_to == 0 {
            return Err(PricingError::invalid(format!(
                "tier {n}: up_to must be at least 1"
            )));
        }
        if up_to <= previous {
            return Err(PricingError::invalid(format!(
                "tier {n}: up_to {up_to} must be greater than the previous tier's {previous}"
            )));
        }
        previous = up_to;
    }
    if last.up_to.is_some() {
        return Err(PricingError::invalid(format!(
            "tier {}: the last tier must have no up_to (unbounded), so every quantity is priced",
            tiers.len()
        )));
    }
    Ok(())
}

/// An exact running total in minor units × 10^12.
#[derive(Default)]
struct Exact(u128);

impl Exact {
    /// Adds `units × price`.
    fn add_units(&mut self, units: u64, price: Decimal) -> Result<(), PricingError> {
        let amount = u128::from(units)
            .checked_mul(price.0)
            .ok_or(PricingError::Overflow)?;
        self.0 = self.0.checked_add(amount).ok_or(PricingError::Overflow)?;
        Ok(())
    }

    /// Adds a whole number of minor units.
    fn add_minor(&mut self, minor: u64) -> Result<(), PricingError> {
        // u64::MAX × 10^12 < 2^104: the product always fits.
        self.0 = self
            .0
            .checked_add(u128::from(minor) * SCALE)
            .ok_or(PricingError::Overflow)?;
        Ok(())
    }

    /// Rounds to whole minor units, half up.
    fn round(self) -> Result<u64, PricingError> {
        u64::try_from(div_round_half_up(self.0, SCALE)).map_err(|_| PricingError::Overflow)
    }
}

/// `n / d` rounded half up, without overflow. `d` must not be 0.
fn div_round_half_up(n: u128, d: u128) -> u128 {
    let quotient = n / d;
    let remainder = n % d;
    // remainder < d, so d - remainder cannot underflow; "remainder ≥ d / 2" without halving.
    if remainder >= d - remainder {
        quotient + 1
    } else {
        quotient
    }
}

/// What `quantity` units cost under `model`, in minor units.
///
/// Exact to the minor unit: totals are computed exactly and rounded once, half up (0.5 of a
/// minor unit rounds up). Quantity 0 costs 0, flat fees included. An amount that does not fit
/// in a `u64` is [`PricingError::Overflow`], never wrapped or saturated; an invalid model is
/// [`PricingError::Invalid`].
pub fn cost(model: &PriceModel, quantity: u64) -> Result<u64, PricingError> {
    model.validate()?;
    if quantity == 0 {
        return Ok(0);
    }
    let mut total = Exact::default();
    match model {
        PriceModel::PerUnit { unit_price } => total.add_units(quantity, *unit_price)?,
        PriceModel::Package {
            package_size,
            package_price,
        } => {
            let packages = quantity.div_ceil(*package_size);
            let amount = packages
                .checked_mul(*package_price)
                .ok_or(PricingError::Overflow)?;
            total.add_minor(amount)?;
        }
        PriceModel::Graduated { tiers } => {
            let mut below = 0u64;
            for tier in tiers {
                if quantity <= below {
                    break;
                }
                let top = tier.up_to.map_or(quantity, |up_to| up_to.min(quantity));
                total.add_units(top - below, tier.unit_price)?;
                total.add_minor(tier.flat_fee)?;
                match tier.up_to {
                    Some(up_to) => below = up_to,
                    None => break,
                }
            }
        }
        PriceModel::Volume { tiers } => {
            // Validation guarantees an unbounded last tier, so a tier is always found.
            if let Some(tier) = tiers
                .iter()
                .find(|t| t.up_to.is_none_or(|up_to| quantity <= up_to))
            {
                total.add_units(quantity, tier.unit_price)?;
                total.add_minor(tier.flat_fee)?;
            }
        }
    }
    total.round()
}

/// How one meter's usage is priced within a plan: `included` units are free, and only the
/// overage beyond them is priced under `model` (the model's first unit is the first unit of
/// overage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterPricing {
    pub included: u64,
    pub model: PriceModel,
}

impl MeterPricing {
    pub fn new(included: u64, model: PriceModel) -> Result<Self, PricingError> {
        model.validate()?;
        Ok(Self { included, model })
    }
}

/// A plan's prices for one billing period, in minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanPricing {
    pub base_price: u64,
    pub seat_price: u64,
    /// Seats billed at least, whatever the account has.
    pub min_seats: u32,
    pub meters: BTreeMap<String, MeterPricing>,
}

impl PlanPricing {
    pub fn new(
        base_price: u64,
        seat_price: u64,
        min_seats: u32,
        meters: BTreeMap<String, MeterPricing>,
    ) -> Result<Self, PricingError> {
        let plan = Self {
            base_price,
            seat_price,
            min_seats,
            meters,
        };
        plan.validate()?;
        Ok(plan)
    }

    /// Checks every meter's model; the message names the meter.
    pub fn validate(&self) -> Result<(), PricingError> {
        for (name, meter) in &self.meters {
            meter.model.validate().map_err(|e| match e {
                PricingError::Invalid(msg) => {
                    PricingError::Invalid(format!("meters.{name}: {msg}"))
                }
                other => other,
            })?;
        }
        Ok(())
    }
}

/// One meter's line in a [`PeriodCost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterCost {
    pub used: u64,
    pub included: u64,
    /// `used - included`, or 0 when usage stays within the included units.
    pub billable_units: u64,
    /// The cost of `billable_units` under the meter's model, in minor units.
    pub amount: u64,
}

/// What one billing period costs, line by line, in minor units. `total` is the sum of `base`,
/// `seats` and every meter's `amount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodCost {
    pub base: u64,
    /// `seat_price × max(seats, min_seats)`.
    pub seats: u64,
    pub meters: BTreeMap<String, MeterCost>,
    pub total: u64,
}

/// The cost of a period: the base price, `seat_price × max(seats, min_seats)`, and for every
/// meter of the plan the [`cost`] of its overage beyond `included`.
///
/// Each meter's amount is rounded once, half up, by [`cost`]; the total is the exact sum of
/// the rounded lines, as on an invoice. A meter the plan does not price is
/// [`PricingError::MeterNotPriced`] if it has usage and ignored if its usage is 0. Every
/// meter of the plan gets a line, with `used` 0 when `usage` does not mention it.
pub fn period_cost(
    p: &PlanPricing,
    seats: u32,
    usage: &BTreeMap<String, u64>,
) -> Result<PeriodCost, PricingError> {
    p.validate()?;
    if let Some((name, _)) = usage
        .iter()
        .find(|(name, used)| **used > 0 && !p.meters.contains_key(*name))
    {
        return Err(PricingError::MeterNotPriced(name.clone()));
    }
    let seat_amount = p
        .seat_price
        .checked_mul(u64::from(seats.max(p.min_seats)))
        .ok_or(PricingError::Overflow)?;
    let mut total = p
        .base_price
        .checked_add(seat_amount)
        .ok_or(PricingError::Overflow)?;
    let mut meters = BTreeMap::new();
    for (name, meter) in &p.meters {
        let used = usage.get(name).copied().unwrap_or(0);
        let billable_units = used.saturating_sub(meter.included);
        let amount = cost(&meter.model, billable_units)?;
        total = total.checked_add(amount).ok_or(PricingError::Overflow)?;
        meters.insert(
            name.clone(),
            MeterCost {
                used,
                included: meter.included,
                billable_units,
                amount,
            },
        );
    }
    Ok(PeriodCost {
        base: p.base_price,
        seats: seat_amount,
        meters,
        total,
    })
}

/// A linear projection of `cost_to_date` over the whole period:
/// `cost_to_date × period_ms / elapsed_ms`, in integers, rounded half up.
///
/// When nothing has elapsed (`elapsed_ms ≤ 0`), the period is empty, or the period is over
/// (`elapsed_ms ≥ period_ms`), the projection is `cost_to_date`. A projection is an estimate
/// and is never billed, so one too large for a `u64` saturates at `u64::MAX`. Fixed fees and
/// tiered prices do not scale linearly: callers project the usage-dependent part, or project
/// the quantity and price it with [`cost`].
pub fn projected(cost_to_date: u64, elapsed_ms: i64, period_ms: i64) -> u64 {
    if elapsed_ms <= 0 || period_ms <= 0 || elapsed_ms >= period_ms {
        return cost_to_date;
    }
    // Both are positive here. (2^64 - 1) × (2^63 - 1) < 2^127: the product fits.
    let elapsed = u128::from(elapsed_ms.unsigned_abs());
    let period = u128::from(period_ms.unsigned_abs());
    let scaled = u128::from(cost_to_date) * period;
    u64::try_from(div_round_half_up(scaled, elapsed)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    fn per_unit(price: &str) -> PriceModel {
        PriceModel::per_unit(price).unwrap()
    }

    fn tier(up_to: Option<u64>, price: &str) -> Tier {
        Tier::new(up_to, d(price), 0)
    }

    fn seed_tiers() -> Vec<Tier> {
        vec![
            tier(Some(10_000), "10"),
            tier(Some(50_000), "5"),
            tier(None, "2"),
        ]
    }

    fn plan(
        base_price: u64,
        seat_price: u64,
        min_seats: u32,
        meters: &[(&str, u64, PriceModel)],
    ) -> PlanPricing {
        let meters = meters
            .iter()
            .map(|(name, included, model)| {
                (
                    (*name).to_owned(),
                    MeterPricing::new(*included, model.clone()).unwrap(),
                )
            })
            .collect();
        PlanPricing::new(base_price, seat_price, min_seats, meters).unwrap()
    }

    fn usage(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
        entries
            .iter()
            .map(|(name, used)| ((*name).to_owned(), *used))
            .collect()
    }

    #[test]
    fn decimal_parses_and_displays_canonically() {
        for (raw, canonical) in [
            ("50", "50"),
            ("0.2", "0.2"),
            ("0.0125", "0.0125"),
            ("12.5", "12.5"),
            ("0", "0"),
            ("1.500", "1.5"),
            ("2.000000000000", "2"),
            ("007", "7"),
            ("0.000000000001", "0.000000000001"),
            (
                "999999999999999.999999999999",
                "999999999999999.999999999999",
            ),
        ] {
            let value = d(raw);
            assert_eq!(value.to_string(), canonical, "{raw}");
            assert_eq!(d(canonical), value, "{raw}");
            assert_eq!(raw.parse::<Decimal>().unwrap(), value);
        }
        assert_eq!(d("0.0125").scaled(), 12_500_000_000);
        assert_eq!(Decimal::from_minor(50).unwrap(), d("50"));
        assert!(Decimal::from_minor(1_000_000_000_000_000).is_err());
        assert!(Decimal::ZERO.is_zero());
    }

    #[test]
    fn decimal_rejects_malformed_input() {
        for raw in [
            "",
            "-1",
            "+1",
            "1.",
            ".5",
            ".",
            "1e3",
            "1,5",
            " 1",
            "1 ",
            "1 000",
            "1.2.3",
            "0x10",
            "½",
            "1000000000000000",
            "0.0000000000001",
        ] {
            let err = Decimal::parse(raw).unwrap_err();
            assert!(
                matches!(&err, PricingError::Invalid(msg) if msg.contains("is not a price")),
                "{raw:?}: {err:?}"
            );
        }
        assert!(
            Decimal::parse("0.0000000000001")
                .unwrap_err()
                .to_string()
                .contains("at most 12 digits")
        );
        assert!(
            Decimal::parse("1000000000000000")
                .unwrap_err()
                .to_string()
                .contains("at most 15 digits")
        );
    }

    #[test]
    fn per_unit_seed_examples() {
        // 50,000 units at one cent = $500.00.
        assert_eq!(cost(&per_unit("1"), 50_000), Ok(50_000));
        // Pay-as-you-go: $0.50 a token, 37 tokens = $18.50.
        assert_eq!(cost(&per_unit("50"), 37), Ok(1_850));
        assert_eq!(cost(&per_unit("50"), 0), Ok(0));
    }

    #[test]
    fn fractional_prices_round_once_half_up() {
        assert_eq!(cost(&per_unit("0.2"), 7), Ok(1)); // 1.4
        assert_eq!(cost(&per_unit("0.2"), 8), Ok(2)); // 1.6
        assert_eq!(cost(&per_unit("0.5"), 1), Ok(1)); // 0.5, half up
        assert_eq!(cost(&per_unit("0.5"), 3), Ok(2)); // 1.5, half up
        assert_eq!(cost(&per_unit("0.4999"), 1), Ok(0));
        assert_eq!(cost(&per_unit("0.0125"), 1_000_000), Ok(12_500));
        // Rounded once for the whole quantity, not per unit (per unit would give 0).
        assert_eq!(cost(&per_unit("0.0125"), 40), Ok(1)); // 0.5
    }

    #[test]
    fn graduated_seed_examples() {
        let model = PriceModel::graduated(seed_tiers()).unwrap();
        assert_eq!(cost(&model, 0), Ok(0));
        assert_eq!(cost(&model, 1), Ok(10));
        assert_eq!(cost(&model, 10_000), Ok(100_000));
        assert_eq!(cost(&model, 10_001), Ok(100_005));
        assert_eq!(cost(&model, 50_000), Ok(300_000));
        assert_eq!(cost(&model, 60_000), Ok(320_000));
    }

    #[test]
    fn volume_seed_examples() {
        let model = PriceModel::volume(seed_tiers()).unwrap();
        assert_eq!(cost(&model, 0), Ok(0));
        assert_eq!(cost(&model, 10_000), Ok(100_000));
        // Crossing into a cheaper tier reprices every unit: volume pricing is not monotonic.
        assert_eq!(cost(&model, 10_001), Ok(50_005));
        assert_eq!(cost(&model, 60_000), Ok(120_000));
    }

    #[test]
    fn tier_flat_fees() {
        let tiers = vec![
            Tier::new(Some(10), d("1"), 100),
            Tier::new(None, d("0.5"), 1_000),
        ];
        let graduated = PriceModel::graduated(tiers.clone()).unwrap();
        assert_eq!(cost(&graduated, 0), Ok(0));
        assert_eq!(cost(&graduated, 1), Ok(101));
        assert_eq!(cost(&graduated, 10), Ok(110));
        assert_eq!(cost(&graduated, 11), Ok(1_111)); // 110 + 1000 + 0.5, half up
        let volume = PriceModel::volume(tiers).unwrap();
        assert_eq!(cost(&volume, 0), Ok(0));
        assert_eq!(cost(&volume, 10), Ok(110));
        assert_eq!(cost(&volume, 11), Ok(1_006)); // 1000 + 5.5, half up
    }

    #[test]
    fn package_pricing() {
        let model = PriceModel::package(100, 500).unwrap();
        assert_eq!(cost(&model, 0), Ok(0));
        assert_eq!(cost(&model, 1), Ok(500));
        assert_eq!(cost(&model, 100), Ok(500));
        assert_eq!(cost(&model, 101), Ok(1_000));
        assert_eq!(
            PriceModel::package(0, 500),
            Err(PricingError::invalid("package_size must be at least 1"))
        );
    }

    #[test]
    fn overflow_is_an_error() {
        let huge = per_unit("999999999999999");
        assert_eq!(cost(&huge, u64::MAX), Err(PricingError::Overflow));
        // Fits in the exact total but not in u64 minor units.
        assert_eq!(cost(&per_unit("2"), u64::MAX), Err(PricingError::Overflow));
        assert_eq!(cost(&per_unit("1"), u64::MAX), Ok(u64::MAX));
        assert_eq!(
            cost(&PriceModel::package(1, u64::MAX).unwrap(), 2),
            Err(PricingError::Overflow)
        );
        let fees = PriceModel::graduated(vec![
            Tier::new(Some(1), Decimal::ZERO, u64::MAX),
            Tier::new(None, Decimal::ZERO, 1),
        ])
        .unwrap();
        assert_eq!(cost(&fees, 1), Ok(u64::MAX));
        assert_eq!(cost(&fees, 2), Err(PricingError::Overflow));
        let p = plan(u64::MAX, 1, 1, &[]);
        assert_eq!(
            period_cost(&p, 1, &BTreeMap::new()),
            Err(PricingError::Overflow)
        );
        let p = plan(0, u64::MAX, 0, &[]);
        assert_eq!(
            period_cost(&p, 2, &BTreeMap::new()),
            Err(PricingError::Overflow)
        );
    }

    #[test]
    fn tier_validation() {
        let err = |tiers: Vec<Tier>| match PriceModel::graduated(tiers.clone()) {
            Err(PricingError::Invalid(msg)) => {
                assert_eq!(
                    PriceModel::volume(tiers),
                    Err(PricingError::Invalid(msg.clone()))
                );
                msg
            }
            other => panic!("expected a validation error, got {other:?}"),
        };
        assert_eq!(err(vec![]), "at least one tier is required");
        assert_eq!(
            err(vec![tier(Some(10), "1")]),
            "tier 1: the last tier must have no up_to (unbounded), so every quantity is priced"
        );
        assert_eq!(
            err(vec![tier(None, "1"), tier(None, "1")]),
            "tier 1: only the last tier may have no up_to (unbounded)"
        );
        assert_eq!(
            err(vec![
                tier(Some(10), "1"),
                tier(Some(10), "1"),
                tier(None, "1")
            ]),
            "tier 2: up_to 10 must be greater than the previous tier's 10"
        );
        assert_eq!(
            err(vec![
                tier(Some(10), "1"),
                tier(Some(5), "1"),
                tier(None, "1")
            ]),
            "tier 2: up_to 5 must be greater than the previous tier's 10"
        );
        assert_eq!(
            err(vec![tier(Some(0), "1"), tier(None, "1")]),
            "tier 1: up_to must be at least 1"
        );
        assert!(PriceModel::graduated(vec![tier(None, "1")]).is_ok());
        // A model built directly is still checked before it is priced.
        let direct = PriceModel::Volume { tiers: vec![] };
        assert!(matches!(cost(&direct, 1), Err(PricingError::Invalid(_))));
        let direct = PriceModel::Package {
            package_size: 0,
            package_price: 1,
        };
        assert!(matches!(cost(&direct, 1), Err(PricingError::Invalid(_))));
    }

    #[test]
    fn plan_validation_names_the_meter() {
        let meters = BTreeMap::from([(
            "tokens".to_owned(),
            MeterPricing {
                included: 0,
                model: PriceModel::Graduated { tiers: vec![] },
            },
        )]);
        assert_eq!(
            PlanPricing::new(0, 0, 0, meters),
            Err(PricingError::invalid(
                "meters.tokens: at least one tier is required"
            ))
        );
    }

    #[test]
    fn seed_plans() {
        // Base $99 with 10,000 included, overage at 2 cents: 15,000 units = $199.00.
        let p = plan(9_900, 0, 0, &[("requests", 10_000, per_unit("2"))]);
        let c = period_cost(&p, 1, &usage(&[("requests", 15_000)])).unwrap();
        assert_eq!(c.total, 19_900);
        assert_eq!(
            c.meters["requests"],
            MeterCost {
                used: 15_000,
                included: 10_000,
                billable_units: 5_000,
                amount: 10_000,
            }
        );
        // Within the included units only the base is due.
        let c = period_cost(&p, 1, &usage(&[("requests", 9_000)])).unwrap();
        assert_eq!((c.meters["requests"].billable_units, c.total), (0, 9_900));

        // Pay-as-you-go at $0.50 a token.
        let p = plan(0, 0, 0, &[("tokens", 0, per_unit("50"))]);
        let c = period_cost(&p, 1, &usage(&[("tokens", 37)])).unwrap();
        assert_eq!(c.total, 1_850);

        // Pro: flat $29, no meters.
        let p = plan(2_900, 0, 0, &[]);
        assert_eq!(period_cost(&p, 1, &BTreeMap::new()).unwrap().total, 2_900);

        // Team: $19 a seat, at least 2 seats.
        let p = plan(0, 1_900, 2, &[]);
        let one = period_cost(&p, 1, &BTreeMap::new()).unwrap();
        assert_eq!((one.seats, one.total), (3_800, 3_800));
        let five = period_cost(&p, 5, &BTreeMap::new()).unwrap();
        assert_eq!((five.seats, five.total), (9_500, 9_500));
    }

    #[test]
    fn period_cost_meters_lines() {
        let p = plan(
            100,
            0,
            0,
            &[("a", 5, per_unit("1")), ("b", 0, per_unit("1"))],
        );
        // A plan meter without usage still gets a line; an unpriced meter with 0 usage is fine.
        let c = period_cost(&p, 0, &usage(&[("a", 7), ("other", 0)])).unwrap();
        assert_eq!(c.meters.len(), 2);
        assert_eq!(c.meters["b"].used, 0);
        assert_eq!(c.total, 102);
        assert_eq!(
            period_cost(&p, 0, &usage(&[("other", 1)])),
            Err(PricingError::MeterNotPriced("other".to_owned()))
        );
    }

    #[test]
    fn projection() {
        assert_eq!(projected(1_000, 10, 30), 3_000);
        assert_eq!(projected(100, 3, 10), 333); // 333.33
        assert_eq!(projected(100, 6, 10), 167); // 166.67
        assert_eq!(projected(1, 2, 5), 3); // 2.5, half up
        assert_eq!(projected(1_000, 0, 30), 1_000);
        assert_eq!(projected(1_000, -5, 30), 1_000);
        assert_eq!(projected(1_000, 30, 30), 1_000);
        assert_eq!(projected(1_000, 40, 30), 1_000);
        assert_eq!(projected(1_000, 10, 0), 1_000);
        assert_eq!(projected(0, 1, 30), 0);
        assert_eq!(projected(u64::MAX, 1, i64::MAX), u64::MAX);
    }

    /// A decimal below 10^6 minor units, biased towards few fraction digits so prices stay
    /// realistic and the costs in these tests fit.
    fn decimal() -> impl Strategy<Value = Decimal> {
        prop_oneof![
            (0u128..10_000).prop_map(|c| Decimal(c * SCALE)),
            (0u128..1_000_000).prop_map(|c| Decimal(c * (SCALE / 10_000))),
            (0u128..1_000_000 * SCALE).prop_map(Decimal),
        ]
    }

    /// Any valid decimal at all, up to the 15-digit limit.
    fn any_decimal() -> impl Strategy<Value = Decimal> {
        prop_oneof![decimal(), (0u128..DECIMAL_LIMIT).prop_map(Decimal)]
    }

    /// A valid tier list: 0 to 3 bounded tiers, then the unbounded one.
    fn tiers() -> impl Strategy<Value = Vec<Tier>> {
        (
            proptest::collection::vec((1u64..5_000, decimal(), 0u64..10_000), 0..4),
            decimal(),
            0u64..10_000,
        )
            .prop_map(|(bounded, last_price, last_fee)| {
                let mut up_to = 0;
                let mut tiers: Vec<Tier> = bounded
                    .into_iter()
                    .map(|(gap, price, fee)| {
                        up_to += gap;
                        Tier::new(Some(up_to), price, fee)
                    })
                    .collect();
                tiers.push(Tier::new(None, last_price, last_fee));
                tiers
            })
    }

    /// Volume tiers whose unit prices and flat fees never fall, the case in which volume
    /// pricing is monotonic.
    fn rising_volume() -> impl Strategy<Value = PriceModel> {
        tiers().prop_map(|mut tiers| {
            let mut price = Decimal::ZERO;
            let mut fee = 0;
            for t in &mut tiers {
                price = price.max(t.unit_price);
                fee = fee.max(t.flat_fee);
                t.unit_price = price;
                t.flat_fee = fee;
            }
            PriceModel::Volume { tiers }
        })
    }

    fn monotonic_model() -> impl Strategy<Value = PriceModel> {
        prop_oneof![
            decimal().prop_map(|unit_price| PriceModel::PerUnit { unit_price }),
            (1u64..1_000, 0u64..100_000).prop_map(|(package_size, package_price)| {
                PriceModel::Package {
                    package_size,
                    package_price,
                }
            }),
            tiers().prop_map(|tiers| PriceModel::Graduated { tiers }),
            rising_volume(),
        ]
    }

    proptest! {
        #[test]
        fn decimal_display_round_trips(value in any_decimal()) {
            let shown = value.to_string();
            prop_assert_eq!(Decimal::parse(&shown), Ok(value));
            prop_assert!(!shown.ends_with('0') || !shown.contains('.'));
        }

        /// Extreme values (issue 11): up to 100 tiers with bounds anywhere in `u64`, any
        /// quantity. The cost is a number or `Overflow`, never a panic or a wrapped value; and
        /// for graduated tiers, once a quantity overflows every larger one does too, so a cap
        /// check that refuses on `Overflow` stays refused.
        #[test]
        fn extreme_tiers_and_quantities_never_wrap(
            gaps in proptest::collection::vec(1u64..=u64::MAX / 128, 0..100),
            prices in proptest::collection::vec(any_decimal(), 101),
            fees in proptest::collection::vec(any::<u64>(), 101),
            q in prop_oneof![any::<u64>(), Just(u64::MAX), Just(1u64 << 53)],
            more in any::<u64>(),
        ) {
            let mut up_to = 0u64;
            let mut tiers = Vec::new();
            for (i, gap) in gaps.iter().enumerate() {
                up_to = up_to.saturating_add(*gap);
                if tiers.last().is_some_and(|t: &Tier| t.up_to == Some(up_to)) || up_to == u64::MAX {
                    break;
                }
                tiers.push(Tier::new(Some(up_to), prices[i], fees[i] % 1_000_000));
            }
            tiers.push(Tier::new(None, prices[100], fees[100] % 1_000_000));
            let graduated = PriceModel::graduated(tiers.clone()).unwrap();
            let volume = PriceModel::volume(tiers).unwrap();
            let larger = q.saturating_add(more);
            let at_q = cost(&graduated, q);
            prop_assert!(matches!(at_q, Ok(_) | Err(PricingError::Overflow)), "{at_q:?}");
            let at_larger = cost(&graduated, larger);
            if at_q == Err(PricingError::Overflow) {
                prop_assert_eq!(at_larger, Err(PricingError::Overflow));
            } else if let (Ok(a), Ok(b)) = (at_q, at_larger) {
                prop_assert!(a <= b);
            }
            let v = cost(&volume, q);
            prop_assert!(matches!(v, Ok(_) | Err(PricingError::Overflow)), "{v:?}");
        }

        /// Every model whose tiers do not get cheaper costs at least as much for more units.
        #[test]
        fn cost_is_monotonic(model in monotonic_model(), a in 0u64..30_000, b in 0u64..30_000) {
            let (low, high) = (a.min(b), a.max(b));
            prop_assert!(cost(&model, low)? <= cost(&model, high)?);
            prop_assert!(cost(&model, high)? <= cost(&model, high + 1)?);
        }

        /// Volume pricing is monotonic within one tier even when later tiers are cheaper.
        #[test]
        fn volume_is_monotonic_within_a_tier(tiers in tiers(), q in 1u64..30_000) {
            let model = PriceModel::volume(tiers.clone()).unwrap();
            let same_tier = tiers.iter().all(|t| t.up_to != Some(q));
            if same_tier {
                prop_assert!(cost(&model, q)? <= cost(&model, q + 1)?);
            }
        }

        /// Tiers that all charge the same unit price and no fees are just a per-unit price.
        #[test]
        fn equal_graduated_tiers_are_per_unit(
            tiers in tiers(),
            price in decimal(),
            q in 0u64..1_000_000,
        ) {
            let tiers: Vec<Tier> = tiers
                .into_iter()
                .map(|t| Tier::new(t.up_to, price, 0))
                .collect();
            let per_unit = PriceModel::PerUnit { unit_price: price };
            prop_assert_eq!(
                cost(&PriceModel::Graduated { tiers: tiers.clone() }, q),
                cost(&per_unit, q)
            );
            prop_assert_eq!(cost(&PriceModel::Volume { tiers }, q), cost(&per_unit, q));
        }

        /// An integer price is exact: q × p, or Overflow exactly when that does not fit.
        #[test]
        fn integer_per_unit_is_exact(p in 0u64..1_000_000_000_000_000, q in any::<u64>()) {
            let model = PriceModel::PerUnit { unit_price: Decimal::from_minor(p).unwrap() };
            prop_assert_eq!(cost(&model, q), q.checked_mul(p).ok_or(PricingError::Overflow));
        }

        /// The total is the sum of the lines, and each line is the cost of its overage.
        #[test]
        fn period_total_is_the_sum_of_its_parts(
            base in 0u64..1_000_000,
            seat_price in 0u64..100_000,
            min_seats in 0u32..20,
            seats in 0u32..50,
            meters in proptest::collection::btree_map(
                "[a-d]",
                (0u64..10_000, monotonic_model(), 0u64..50_000),
                0..4,
            ),
        ) {
            let usage: BTreeMap<String, u64> =
                meters.iter().map(|(name, (_, _, used))| (name.clone(), *used)).collect();
            let pricing = PlanPricing::new(
                base,
                seat_price,
                min_seats,
                meters
                    .into_iter()
                    .map(|(name, (included, model, _))| (name, MeterPricing { included, model }))
                    .collect(),
            )?;
            let c = period_cost(&pricing, seats, &usage)?;
            let lines: u64 = c.meters.values().map(|m| m.amount).sum();
            prop_assert_eq!(c.total, c.base + c.seats + lines);
            prop_assert_eq!(c.base, base);
            prop_assert_eq!(c.seats, seat_price * u64::from(seats.max(min_seats)));
            for (name, line) in &c.meters {
                let meter = &pricing.meters[name];
                prop_assert_eq!(line.billable_units, line.used.saturating_sub(meter.included));
                prop_assert_eq!(Ok(line.amount), cost(&meter.model, line.billable_units));
            }
        }
    }
}
