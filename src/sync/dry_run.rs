//! `sync --dry-run`: what each family's plan would hold (chunks, tokens, cost), read from the
//! database and the runs dir without writing anything — no run folder, no lock file, no API
//! call. The runs it would advance are reported by the caller as they stand.

use std::collections::BTreeMap;

use crate::config::{Global, SyncConfig};
use crate::models;
use crate::pg::source::Source;
use crate::plan::tokens::{MAX_INPUT_TOKENS, count_tokens};
use crate::run::folders::{self, HeldChunks};
use crate::run::layout;
use crate::run::store::OnTooLong;
use crate::sync::{FamilyReport, Planned, family_entry};

/// Fills in, for each family in `order`, the run its plan would write, within `--max-cost`.
pub(super) async fn plan_families(
    global: &Global,
    cfg: &SyncConfig,
    source: &Source,
    order: &[String],
    families: &mut BTreeMap<String, FamilyReport>,
) -> anyhow::Result<()> {
    let mut client = global.database()?.connect().await?;
    let price = models::price_per_million(&cfg.plan.model, cfg.plan.usd_per_million_tokens);
    let mut cost_left = cfg.plan.max_cost_usd;
    for family in order {
        let report = family_entry(families, family);
        let held = if cfg.plan.force {
            Ok(HeldChunks::default())
        } else {
            folders::held_chunks(&[layout::family_dir(&global.runs_dir, family)])
        };
        let held = match held {
            Ok(held) => held,
            Err(err) => {
                report.error = Some(format!("{err:#}"));
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
            report.error = Some(format!("{err:#}"));
            continue;
        }
        if chunks == 0 {
            continue;
        }
        let cost = price.map(|p| models::estimate_cost(tokens, p));
        if let (Some(left), Some(cost)) = (cost_left, cost) {
            if cost > left {
                report.waits = Some(format!(
                    "its plan (${cost:.4}) would be over what is left of --max-cost (${left:.4}); a later sync would plan it"
                ));
                continue;
            }
            cost_left = Some(left - cost);
        }
        report.planned = Some(Planned {
            run_dir: None,
            chunks,
            tokens,
            estimated_cost_usd: cost,
        });
    }
    Ok(())
}
