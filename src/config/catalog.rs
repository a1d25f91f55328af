//! The catalog: `[meters]`, `[plans]` with their meter rules and price models, and
//! `[[credit_packages]]`. (A plan's Stripe keys are checked with `[stripe]`, in
//! [`super::stripe`]. A plan's `kind`, a rule's `overage`, `spend_cap.action` and a package's
//! `credits`, at least 1, are typed, so serde checks them: see [`super::raw`].)

use std::collections::BTreeMap;

use meterd_actors::model::{
    Catalog, CreditPackage, DEFAULT_ALERT_THRESHOLDS, MeterRule, Overage, Plan, PlanKind, SpendCap,
};
use meterd_actors::pricing::{Decimal, PriceModel, Tier};

use super::raw::{
    RawCreditPackage, RawMeter, RawMeterRule, RawOverage, RawPlan, RawPrice, RawTier,
};
use super::{Invalid, invalid};

pub(super) fn build(
    meters: &BTreeMap<String, RawMeter>,
    plans: &BTreeMap<String, RawPlan>,
    credit_packages: &[RawCreditPackage],
) -> Result<Catalog, Invalid> {
    let mut catalog = Catalog::default();
    if meters.is_empty() {
        return Err(invalid("meters", "declare at least one meter"));
    }
    for (name, m) in meters {
        if !valid_name(name) {
            return Err(invalid(
                format!("meters.{name}"),
                "meter names are 1-64 characters of A-Z a-z 0-9 _ -",
            ));
        }
        catalog.meters.insert(name.clone(), m.description.clone());
    }
    for (name, p) in plans {
        catalog.plans.insert(name.clone(), plan(name, p, meters)?);
    }
    if catalog.plans.is_empty() {
        return Err(invalid("plans", "declare at least one plan"));
    }
    for (i, c) in credit_packages.iter().enumerate() {
        let key = format!("credit_packages[{i}]");
        if !valid_name(&c.name) {
            return Err(invalid(format!("{key}.name"), "invalid package name"));
        }
        validate_currency(&c.currency).map_err(|m| invalid(format!("{key}.currency"), m))?;
        catalog.credit_packages.push(CreditPackage {
            name: c.name.clone(),
            credits: c.credits.get(),
            price: c.price,
            currency: c.currency.clone(),
        });
    }
    Ok(catalog)
}

/// `[plans.<name>]`, on the meters declared under `[meters]`.
fn plan(name: &str, p: &RawPlan, meters: &BTreeMap<String, RawMeter>) -> Result<Plan, Invalid> {
    let key = format!("plans.{name}");
    if !valid_name(name) {
        return Err(invalid(
            key,
            "plan names are 1-64 characters of A-Z a-z 0-9 _ -",
        ));
    }
    if p.kind == PlanKind::Seat && p.min_seats == 0 {
        return Err(invalid(
            format!("{key}.min_seats"),
            "a seat plan needs min_seats of at least 1",
        ));
    }
    validate_currency(&p.currency).map_err(|m| invalid(format!("{key}.currency"), m))?;
    let mut rules = BTreeMap::new();
    for (meter, r) in &p.meters {
        let rkey = format!("{key}.meters.{meter}");
        if !meters.contains_key(meter) {
            return Err(invalid(
                rkey,
                format!("no meter `{meter}` is declared under [meters]"),
            ));
        }
        rules.insert(meter.clone(), meter_rule(&rkey, r)?);
    }
    let alert_thresholds = p
        .alert_thresholds
        .clone()
        .unwrap_or_else(|| DEFAULT_ALERT_THRESHOLDS.to_vec());
    if alert_thresholds.iter().any(|x| *x == 0 || *x > 100)
        || alert_thresholds.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(invalid(
            format!("{key}.alert_thresholds"),
            "percentages from 1 to 100 in increasing order",
        ));
    }
    Ok(Plan {
        alert_thresholds,
        low_credit_threshold: p.low_credit_threshold,
        monthly_credits: p.monthly_credits,
        monthly_credits_rollover_cap: p.monthly_credits_rollover_cap,
        spend_cap: p.spend_cap.as_ref().map(|c| SpendCap {
            amount: c.amount,
            action: c.action,
        }),
        name: name.to_owned(),
        kind: p.kind,
        currency: p.currency.clone(),
        base_price: p.base_price,
        seat_price: p.seat_price,
        min_seats: p.min_seats,
        features: p.features.clone(),
        meters: rules,
    })
}

/// `[plans.<p>.meters.<m>]` (its key is `rkey`): the overage, and a price exactly when the
/// overage is billed.
fn meter_rule(rkey: &str, r: &RawMeterRule) -> Result<MeterRule, Invalid> {
    let overage = match (r.overage, r.credits_per_unit) {
        (RawOverage::Block, None) => Overage::Block,
        (RawOverage::Bill, None) => Overage::Bill,
        (RawOverage::Unlimited, None) => Overage::Unlimited,
        (RawOverage::Credits, Some(n)) if n >= 1 => Overage::Credits {
            credits_per_unit: n,
        },
        (RawOverage::Credits, _) => {
            return Err(invalid(
                format!("{rkey}.credits_per_unit"),
                "overage = \"credits\" needs credits_per_unit of at least 1",
            ));
        }
        (RawOverage::Block | RawOverage::Bill | RawOverage::Unlimited, Some(_)) => {
            return Err(invalid(
                format!("{rkey}.credits_per_unit"),
                "only meaningful with overage = \"credits\"",
            ));
        }
    };
    let price = match (&r.unit_price, &r.price) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{rkey}.unit_price"),
                "give either unit_price or price, not both",
            ));
        }
        (Some(u), None) => Some(
            PriceModel::per_unit(u)
                .map_err(|e| invalid(format!("{rkey}.unit_price"), e.to_string()))?,
        ),
        (None, Some(p)) => Some(price(p).map_err(|m| invalid(format!("{rkey}.price"), m))?),
        (None, None) => None,
    };
    if price.is_some() && overage != Overage::Bill {
        return Err(invalid(
            format!("{rkey}.price"),
            "a price applies to billed overage: set overage = \"bill\"",
        ));
    }
    if overage == Overage::Bill && price.is_none() {
        return Err(invalid(
            format!("{rkey}.unit_price"),
            "overage = \"bill\" needs a price (unit_price or a price table)",
        ));
    }
    Ok(MeterRule {
        included: r.included,
        overage,
        price,
    })
}

/// A `price = { model = … }` table; an error names the tier it concerns.
fn price(raw: &RawPrice) -> Result<PriceModel, String> {
    let tiers = |ts: &[RawTier]| -> Result<Vec<Tier>, String> {
        ts.iter()
            .enumerate()
            .map(|(i, t)| {
                let p = Decimal::parse(&t.unit_price)
                    .map_err(|e| format!("tiers[{i}].unit_price: {e}"))?;
                Ok(Tier::new(t.up_to, p, t.flat_fee))
            })
            .collect()
    };
    let m = match raw {
        RawPrice::PerUnit { unit_price } => PriceModel::per_unit(unit_price),
        RawPrice::Package {
            package_size,
            package_price,
        } => PriceModel::package(*package_size, *package_price),
        RawPrice::Graduated { tiers: ts } => PriceModel::graduated(tiers(ts)?),
        RawPrice::Volume { tiers: ts } => PriceModel::volume(tiers(ts)?),
    };
    m.map_err(|e| e.to_string())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn validate_currency(c: &str) -> Result<(), String> {
    if c.len() == 3 && c.bytes().all(|b| b.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(format!(
            "`{c}` is not a lowercase ISO 4217 code such as usd"
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::EMBEDDED_DEFAULT;
    use crate::config::tests::parse;

    #[test]
    fn a_plan_cannot_reference_an_undeclared_meter() {
        let text = EMBEDDED_DEFAULT.replacen(
            "[plans.free.meters.tokens]",
            "[plans.free.meters.images]",
            1,
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("plans.free.meters.images"), "{err}");
    }

    #[test]
    fn price_tables_parse_and_bad_ones_name_their_key() {
        let tiers = r#"
[plans.tiered]
kind = "metered"
[plans.tiered.meters.tokens]
overage = "bill"
price = { model = "graduated", tiers = [
  { up_to = 10000, unit_price = "10" },
  { up_to = 50000, unit_price = "5" },
  { unit_price = "2" },
] }
[plans.pack]
kind = "metered"
[plans.pack.meters.tokens]
overage = "bill"
price = { model = "package", package_size = 100, package_price = 500 }
"#;
        let c = parse(&format!("{EMBEDDED_DEFAULT}{tiers}")).unwrap();
        let model = c.catalog.plans["tiered"].meters["tokens"]
            .price
            .clone()
            .unwrap();
        assert_eq!(
            meterd_actors::pricing::cost(&model, 60_000).unwrap(),
            320_000
        );
        let model = c.catalog.plans["pack"].meters["tokens"]
            .price
            .clone()
            .unwrap();
        assert_eq!(meterd_actors::pricing::cost(&model, 101).unwrap(), 1000);
        let bad = tiers.replace("{ unit_price = \"2\" },", "");
        let err = parse(&format!("{EMBEDDED_DEFAULT}{bad}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("plans.tiered.meters.tokens.price"), "{err}");
        let bad = EMBEDDED_DEFAULT.replacen("unit_price = \"50\"", "unit_price = \"0.5.0\"", 1);
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("plans.payg.meters.tokens.unit_price"), "{err}");
        let bad = EMBEDDED_DEFAULT.replacen("unit_price = \"50\"", "", 1);
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("needs a price"), "{err}");
    }
}
