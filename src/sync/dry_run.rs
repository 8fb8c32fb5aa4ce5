//! `sync --dry-run`: what each family's plan would hold (chunks, tokens, cost), read from the
//! database and the runs dir without writing anything — no run folder, no lock file, no API
//! call. The runs it would advance are reported by the caller as they stand.

use crate::config::{Global, SyncConfig};
use crate::models;
use crate::pg::source::Source;
use crate::plan::tokens::{MAX_INPUT_TOKENS, count_tokens};
use crate::run::folders::{self, HeldChunks};
use crate::run::layout;
use crate::run::store::OnTooLong;

/// What a family's plan would do.
pub enum DryPlan {
    /// Nothing to send (every pending chunk held, skipped or empty).
    Nothing,
    /// A run of this many chunks and tokens, at this estimated cost.
    Would {
        chunks: u64,
        tokens: u64,
        cost: Option<f64>,
    },
    /// It would wait for a later call, for this reason.
    Waits(String),
    /// It would fail, with this message.
    Failed(String),
}

/// For each family in `order`, what its plan would write, within `--max-cost`.
pub async fn plan_families(
    global: &Global,
    cfg: &SyncConfig,
    source: &Source,
    order: &[String],
) -> anyhow::Result<Vec<(String, DryPlan)>> {
    let mut client = global.database()?.connect().await?;
    let price = models::price_per_million(&cfg.plan.model, cfg.plan.usd_per_million_tokens);
    let mut cost_left = cfg.plan.max_cost_usd;
    let mut plans = Vec::with_capacity(order.len());
    for family in order {
        let held = if cfg.plan.force {
            Ok(HeldChunks::default())
        } else {
            folders::held_chunks(&[layout::family_dir(&global.runs_dir, family)])
        };
        let held = match held {
            Ok(held) => held,
            Err(err) => {
                plans.push((family.clone(), DryPlan::Failed(format!("{err:#}"))));
                continue;
            }
        };
        let (mut chunks, mut tokens) = (0u64, 0u64);
        let streamed = source
            .stream_pending(&mut client, family, cfg.plan.reembed, None, |row| {
                if cfg.plan.limit.is_some_and(|limit| chunks >= limit)
                    || held.holder(row.id()?).is_some()
                {
                    return Ok(());
                }
                let Some(content) = row.content()?.filter(|c| !c.trim().is_empty()) else {
                    return Ok(());
                };
                let n = count_tokens(content);
                let n = match (n > MAX_INPUT_TOKENS, cfg.plan.on_too_long) {
                    (false, _) | (true, OnTooLong::Fail) => n,
                    (true, OnTooLong::Truncate) => MAX_INPUT_TOKENS,
                    (true, OnTooLong::Skip) => return Ok(()),
                };
                chunks += 1;
                tokens += n as u64;
                Ok(())
            })
            .await;
        if let Err(err) = streamed {
            plans.push((family.clone(), DryPlan::Failed(format!("{err:#}"))));
            continue;
        }
        if chunks == 0 {
            plans.push((family.clone(), DryPlan::Nothing));
            continue;
        }
        let cost = price.map(|p| models::estimate_cost(tokens, p));
        if let (Some(left), Some(cost)) = (cost_left, cost) {
            if cost > left {
                plans.push((
                    family.clone(),
                    DryPlan::Waits(format!(
                        "its plan (${cost:.4}) would be over what is left of --max-cost (${left:.4}); a later sync would plan it"
                    )),
                ));
                continue;
            }
            cost_left = Some(left - cost);
        }
        plans.push((
            family.clone(),
            DryPlan::Would {
                chunks,
                tokens,
                cost,
            },
        ));
    }
    Ok(plans)
}
