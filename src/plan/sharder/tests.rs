use super::*;
use proptest::prelude::*;

fn item(tokens: u64, line_bytes: u64) -> ItemSize {
    ItemSize { tokens, line_bytes }
}

fn limits(max_requests: u32, max_bytes: u64) -> BatchLimits {
    BatchLimits {
        max_requests,
        max_bytes,
        max_tokens: None,
        max_enqueued_tokens: None,
    }
}

/// The item indexes of each batch, too-large items left out.
fn batch_members(sharding: &Sharding) -> Vec<Vec<usize>> {
    sharding
        .batches
        .iter()
        .map(|batch| {
            batch
                .items
                .clone()
                .filter(|idx| !sharding.too_large.iter().any(|(t, _)| t == idx))
                .collect()
        })
        .collect()
}

/// The limit check written out again from DESIGN §6, independent of `BatchLimits::allows`,
/// so a mistake there cannot hide in the oracle too.
fn within_limits(limits: &BatchLimits, members: &[ItemSize]) -> bool {
    let requests = members.len() as u128;
    let bytes: u128 = members.iter().map(|m| u128::from(m.line_bytes)).sum();
    let tokens: u128 = members.iter().map(|m| u128::from(m.tokens)).sum();
    let estimate = tokens.max(bytes.div_ceil(4));
    requests <= u128::from(limits.max_requests)
        && bytes <= u128::from(limits.max_bytes)
        && limits
            .max_tokens
            .is_none_or(|cap| tokens <= u128::from(cap))
        && limits
            .max_enqueued_tokens
            .is_none_or(|cap| estimate <= u128::from(cap))
}

#[test]
fn empty_stream_makes_no_batch() {
    let sharder = Sharder::new(BatchLimits::default());
    assert_eq!(sharder.batch_count(), 0);
    assert_eq!(sharder.finish(), None);
    assert_eq!(shard_all(BatchLimits::default(), &[]), Sharding::default());
}

#[test]
fn only_too_large_items_make_no_batch() {
    let mut sharder = Sharder::new(limits(10, 5));
    assert_eq!(
        sharder.place(item(1, 6)),
        Placement::TooLarge(LimitKind::Bytes)
    );
    assert_eq!(sharder.batch_count(), 0);
    assert_eq!(sharder.finish(), None);
}

#[test]
fn exactly_at_byte_limit_fits() {
    let mut sharder = Sharder::new(limits(10, 100));
    assert_eq!(sharder.place(item(1, 60)), Placement::Current);
    assert_eq!(sharder.place(item(1, 40)), Placement::Current);
    assert_eq!(
        sharder.place(item(1, 1)),
        Placement::StartsNew {
            sealed: BatchTally {
                requests: 2,
                bytes: 100,
                tokens: 2
            }
        }
    );
    // A single item of exactly the byte limit is sendable.
    assert_eq!(
        sharder.place(item(1, 100)),
        Placement::StartsNew {
            sealed: BatchTally {
                requests: 1,
                bytes: 1,
                tokens: 1
            }
        }
    );
    assert_eq!(
        sharder.place(item(1, 101)),
        Placement::TooLarge(LimitKind::Bytes)
    );
    assert_eq!(sharder.batch_count(), 3);
}

#[test]
fn exactly_at_token_limits_fits() {
    let capped = BatchLimits {
        max_tokens: Some(10),
        max_enqueued_tokens: Some(12),
        ..BatchLimits::default()
    };
    let sharding = shard_all(capped, &[item(4, 4), item(6, 4), item(1, 1)]);
    assert_eq!(batch_members(&sharding), vec![vec![0, 1], vec![2]]);
    assert_eq!(sharding.batches[0].tally.tokens, 10);

    // 48 bytes estimate as 12 enqueued tokens: exactly at the cap.
    let sharding = shard_all(capped, &[item(1, 24), item(1, 24), item(1, 1)]);
    assert_eq!(batch_members(&sharding), vec![vec![0, 1], vec![2]]);
    assert_eq!(sharding.batches[0].tally.enqueued_estimate(), 12);
}

#[test]
fn fifty_thousand_requests_exactly() {
    let items = vec![item(1, 10); 50_001];
    let sharding = shard_all(BatchLimits::default(), &items);
    assert_eq!(sharding.batches.len(), 2);
    assert_eq!(sharding.batches[0].items, 0..50_000);
    assert_eq!(
        sharding.batches[0].tally.requests,
        BatchLimits::MAX_REQUESTS
    );
    assert_eq!(sharding.batches[1].items, 50_000..50_001);
    assert!(sharding.too_large.is_empty());
}

#[test]
fn too_large_item_neither_seals_nor_joins() {
    let capped = BatchLimits {
        max_tokens: Some(100),
        ..limits(3, 1000)
    };
    let items = [
        item(10, 10),
        item(101, 10),
        item(10, 10),
        item(10, 10),
        item(10, 10),
    ];
    let sharding = shard_all(capped, &items);
    assert_eq!(sharding.too_large, vec![(1, LimitKind::Tokens)]);
    assert_eq!(batch_members(&sharding), vec![vec![0, 2, 3], vec![4]]);
    assert_eq!(sharding.batches[0].items, 0..4);
}

#[test]
fn enqueued_estimate_is_byte_based_when_bytes_dominate() {
    let tally = BatchTally {
        requests: 1,
        bytes: 4001,
        tokens: 10,
    };
    assert_eq!(tally.enqueued_estimate(), 1001);
    let tally = BatchTally {
        tokens: 2000,
        ..tally
    };
    assert_eq!(tally.enqueued_estimate(), 2000);

    let capped = BatchLimits {
        max_enqueued_tokens: Some(1000),
        ..BatchLimits::default()
    };
    let mut sharder = Sharder::new(capped);
    assert_eq!(
        sharder.place(item(10, 4001)),
        Placement::TooLarge(LimitKind::EnqueuedTokens)
    );
    assert_eq!(sharder.place(item(10, 4000)), Placement::Current);
}

#[test]
fn validate_refuses_impossible_limits() {
    assert_eq!(BatchLimits::default().validate(), Ok(()));
    let max = limits(BatchLimits::MAX_REQUESTS, 1);
    assert_eq!(max.validate(), Ok(()));
    assert_eq!(
        limits(0, 1).validate(),
        Err(LimitsError::Requests { value: 0 })
    );
    assert_eq!(
        limits(50_001, 1).validate(),
        Err(LimitsError::Requests { value: 50_001 })
    );
    assert_eq!(limits(1, 0).validate(), Err(LimitsError::ZeroBytes));
    let zero_tokens = BatchLimits {
        max_tokens: Some(0),
        ..max
    };
    assert_eq!(zero_tokens.validate(), Err(LimitsError::ZeroTokens));
    let zero_enqueued = BatchLimits {
        max_enqueued_tokens: Some(0),
        ..max
    };
    assert_eq!(
        zero_enqueued.validate(),
        Err(LimitsError::ZeroEnqueuedTokens)
    );
    assert_eq!(
        limits(0, 1).validate().unwrap_err().to_string(),
        "--max-requests-per-batch must be between 1 and 50000, got 0"
    );
}

#[test]
fn zero_request_cap_makes_every_item_too_large() {
    let mut sharder = Sharder::new(limits(0, 100));
    assert_eq!(
        sharder.place(item(1, 1)),
        Placement::TooLarge(LimitKind::Requests)
    );
    assert_eq!(sharder.finish(), None);
}

#[test]
fn limits_round_trip_through_json() {
    let limits = BatchLimits {
        max_tokens: Some(1_000_000),
        ..BatchLimits::default()
    };
    let json = serde_json::to_string(&limits).unwrap();
    assert_eq!(serde_json::from_str::<BatchLimits>(&json).unwrap(), limits);
}

/// Limits valid by construction, often tiny so that many batches form and items are often
/// too large, sometimes the defaults.
fn arb_limits() -> impl Strategy<Value = BatchLimits> {
    let max_requests = prop_oneof![
        4 => 1u32..=6,
        1 => 1u32..=BatchLimits::MAX_REQUESTS,
        1 => Just(BatchLimits::MAX_REQUESTS),
    ];
    let max_bytes = prop_oneof![
        4 => 1u64..=2_000,
        1 => Just(BatchLimits::DEFAULT_MAX_BYTES),
    ];
    let max_tokens = prop::option::of(1u64..=2_000);
    let max_enqueued_tokens = prop::option::of(1u64..=2_000);
    (max_requests, max_bytes, max_tokens, max_enqueued_tokens).prop_map(
        |(max_requests, max_bytes, max_tokens, max_enqueued_tokens)| BatchLimits {
            max_requests,
            max_bytes,
            max_tokens,
            max_enqueued_tokens,
        },
    )
}

/// Item sizes around the tiny limits above, with now and then one far too large. A JSONL
/// line is never empty (it has at least its newline); an input may count zero tokens.
/// Real lines carry ~100 bytes of JSON around text of ~4 bytes per token, so the byte-based
/// enqueued estimate often dominates: half the items are drawn that way so the
/// `div_ceil(4)` edge gets exercised, not only the token count.
fn arb_item() -> impl Strategy<Value = ItemSize> {
    prop_oneof![
        4 => (0u64..=400, 1u64..=600),
        4 => (0u64..=150, 0u64..=3, 80u64..=120).prop_map(|(tokens, jitter, overhead)| {
            (tokens, overhead + 4 * tokens + jitter)
        }),
        1 => (0u64..=10_000, 1u64..=10_000),
    ]
    .prop_map(|(tokens, line_bytes)| ItemSize { tokens, line_bytes })
}

fn arb_items() -> impl Strategy<Value = Vec<ItemSize>> {
    prop::collection::vec(arb_item(), 0..120)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_deterministic(limits in arb_limits(), items in arb_items()) {
        prop_assert_eq!(shard_all(limits, &items), shard_all(limits, &items));
    }

    #[test]
    fn prop_batches_are_ordered_nonempty_ranges(
        limits in arb_limits(),
        items in arb_items(),
    ) {
        let sharding = shard_all(limits, &items);
        for pair in sharding.batches.windows(2) {
            prop_assert!(pair[0].items.end <= pair[1].items.start);
        }
        for (batch, members) in sharding.batches.iter().zip(batch_members(&sharding)) {
            prop_assert!(batch.items.end <= items.len());
            // A range starts and ends on one of the batch's own items.
            prop_assert_eq!(members.first(), Some(&batch.items.start));
            prop_assert_eq!(members.last(), Some(&(batch.items.end - 1)));
        }
        let too_large_idxs: Vec<usize> =
            sharding.too_large.iter().map(|(idx, _)| *idx).collect();
        prop_assert!(too_large_idxs.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn prop_every_placeable_item_in_exactly_one_batch(
        limits in arb_limits(),
        items in arb_items(),
    ) {
        let sharding = shard_all(limits, &items);
        let members = batch_members(&sharding);
        for (item_idx, item) in items.iter().enumerate() {
            let n_batches = members.iter().filter(|m| m.contains(&item_idx)).count();
            let placeable = within_limits(&limits, &[*item]);
            let marked_too_large =
                sharding.too_large.iter().any(|(idx, _)| *idx == item_idx);
            prop_assert_eq!(marked_too_large, !placeable, "item {}", item_idx);
            prop_assert_eq!(n_batches, usize::from(placeable), "item {}", item_idx);
        }
    }

    #[test]
    fn prop_too_large_names_a_limit_the_item_breaks(
        limits in arb_limits(),
        items in arb_items(),
    ) {
        for (item_idx, kind) in shard_all(limits, &items).too_large {
            let item = items[item_idx];
            let breaks = match kind {
                LimitKind::Requests => limits.max_requests < 1,
                LimitKind::Bytes => item.line_bytes > limits.max_bytes,
                LimitKind::Tokens => limits.max_tokens.is_some_and(|cap| item.tokens > cap),
                LimitKind::EnqueuedTokens => limits.max_enqueued_tokens.is_some_and(|cap| {
                    item.tokens.max(item.line_bytes.div_ceil(4)) > cap
                }),
            };
            prop_assert!(breaks, "item {} reported {:?}", item_idx, kind);
        }
    }

    #[test]
    fn prop_no_batch_breaks_a_limit_and_tallies_are_sums(
        limits in arb_limits(),
        items in arb_items(),
    ) {
        let sharding = shard_all(limits, &items);
        for (batch, members) in sharding.batches.iter().zip(batch_members(&sharding)) {
            let sizes: Vec<ItemSize> = members.iter().map(|&idx| items[idx]).collect();
            prop_assert!(within_limits(&limits, &sizes), "batch {:?}", batch);
            let expected = BatchTally {
                requests: u32::try_from(sizes.len()).unwrap(),
                bytes: sizes.iter().map(|s| s.line_bytes).sum(),
                tokens: sizes.iter().map(|s| s.tokens).sum(),
            };
            prop_assert_eq!(batch.tally, expected);
        }
    }

    #[test]
    fn prop_every_batch_but_the_last_is_full(
        limits in arb_limits(),
        items in arb_items(),
    ) {
        let sharding = shard_all(limits, &items);
        let members = batch_members(&sharding);
        for pair in members.windows(2) {
            let mut grown: Vec<ItemSize> = pair[0].iter().map(|&idx| items[idx]).collect();
            grown.push(items[pair[1][0]]);
            prop_assert!(
                !within_limits(&limits, &grown),
                "batch {:?} could also have taken item {}", pair[0], pair[1][0]
            );
        }
    }

    #[test]
    fn prop_streaming_agrees_with_shard_all(
        limits in arb_limits(),
        items in arb_items(),
    ) {
        let sharding = shard_all(limits, &items);
        let mut sharder = Sharder::new(limits);
        let mut sealed_tallies = Vec::new();
        let mut too_large = Vec::new();
        let mut batch_of_item = Vec::new();
        for (item_idx, item) in items.iter().enumerate() {
            match sharder.place(*item) {
                Placement::Current => batch_of_item.push((item_idx, sharder.batch_count() - 1)),
                Placement::StartsNew { sealed } => {
                    sealed_tallies.push(sealed);
                    batch_of_item.push((item_idx, sharder.batch_count() - 1));
                }
                Placement::TooLarge(kind) => too_large.push((item_idx, kind)),
            }
            prop_assert_eq!(sharder.batch_count(), sealed_tallies.len() + usize::from(!batch_of_item.is_empty()));
        }
        let n_batches = sharder.batch_count();
        sealed_tallies.extend(sharder.finish());
        prop_assert_eq!(n_batches, sharding.batches.len());
        let expected_tallies: Vec<BatchTally> =
            sharding.batches.iter().map(|b| b.tally).collect();
        prop_assert_eq!(sealed_tallies, expected_tallies);
        prop_assert_eq!(too_large, sharding.too_large.clone());
        let members = batch_members(&sharding);
        for (item_idx, batch_idx) in batch_of_item {
            prop_assert!(members[batch_idx].contains(&item_idx));
        }
    }
}
