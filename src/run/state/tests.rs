use super::*;
use proptest::prelude::*;

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default()
}

fn snapshot(status: &str, errors: Vec<RemoteError>) -> RemoteSnapshot {
    RemoteSnapshot {
        status: status.into(),
        request_counts: RequestCounts::default(),
        output_file_id: Some("file-out".to_owned()),
        error_file_id: None,
        expires_at: None,
        errors,
    }
}

fn queue_error() -> RemoteError {
    RemoteError {
        code: Some("token_limit_exceeded".to_owned()),
        message: Some("Enqueued token limit reached".to_owned()),
        line: None,
    }
}

fn event_strategy() -> impl Strategy<Value = Event> {
    let status = prop_oneof![
        Just("validating"),
        Just("in_progress"),
        Just("finalizing"),
        Just("cancelling"),
        Just("completed"),
        Just("expired"),
        Just("cancelled"),
        Just("failed"),
    ];
    prop_oneof![
        Just(Event::FileUploaded {
            file_id: "file-in".to_owned(),
            at: t0(),
            file_expires_at: None
        }),
        Just(Event::FileExpired),
        Just(Event::UploadStarted { at: t0() }),
        Just(Event::CreateStarted { at: t0() }),
        Just(Event::CreateRejected { errors: vec![] }),
        (status.clone(), any::<bool>()).prop_map(|(s, q)| Event::BatchCreated {
            batch_id: "batch_1".to_owned(),
            at: t0(),
            remote: snapshot(s, if q { vec![queue_error()] } else { vec![] }),
        }),
        Just(Event::CreateRefused {
            reason: "token_limit_exceeded".to_owned(),
            now: t0()
        }),
        (status, any::<bool>()).prop_map(|(s, q)| Event::Polled(snapshot(
            s,
            if q { vec![queue_error()] } else { vec![] }
        ))),
        Just(Event::QueueReleased),
        (any::<bool>(), any::<bool>()).prop_map(|(o, e)| Event::FilesDownloaded {
            has_output: o,
            has_errors: e
        }),
        (0u64..3).prop_map(|n| Event::ResultsIngested {
            outcome: IngestOutcome {
                to_retry: n,
                ..IngestOutcome::default()
            }
        }),
        Just(Event::RetriesPlanned),
        Just(Event::RetriesDropped),
        Just(Event::RemoteFilesDeleted),
        (any::<bool>(), any::<bool>()).prop_map(|(o, e)| Event::IngestAgain {
            has_output: o,
            has_errors: e
        }),
        Just(Event::IngestCommitted {
            progress: IngestProgress {
                file: IngestFile::Output,
                offset: 10,
                counts: IngestCounts::default(),
                anomalies: LineAnomalies::default(),
                to_retry: 0,
                failed_file_len: 0,
            }
        }),
        Just(Event::CancelRequested),
    ]
}

proptest! {
    /// Whatever events arrive, the state only ever moves along the design's graph, an
    /// illegal event leaves it untouched, and every state survives a JSON round trip.
    #[test]
    fn transitions_follow_the_design_graph(events in proptest::collection::vec(event_strategy(), 0..40)) {
        let mut state = BatchState::Planned(Planned::default());
        for event in events {
            let before = state.clone();
            // Only the user's explicit `ingest --redownload` moves a done batch.
            let again = matches!(event, Event::IngestAgain { .. });
            match state.apply(event) {
                Ok(next) => {
                    // A (batch, submission) is created at most once: the count never
                    // goes back, whatever happens to the input file.
                    if let (Some(a), Some(b)) = (next_submission(&before), next_submission(&next)) {
                        prop_assert!(b >= a, "submission went back from {} to {}", a, b);
                    }
                    let (from, to) = (before.kind(), next.kind());
                    prop_assert!(
                        from == to || from.successors().contains(&to),
                        "{} -> {} is not in the design's graph", from.as_str(), to.as_str()
                    );
                    prop_assert!(
                        !before.is_done() || from == to || again,
                        "a done batch moved to another state"
                    );
                    state = next;
                }
                Err(illegal) => {
                    prop_assert_eq!(&*illegal.state, &before);
                    state = *illegal.state;
                }
            }
            let json = serde_json::to_string(&state).unwrap();
            let back: BatchState = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &state);
        }
    }
}

#[test]
fn every_state_serializes_under_its_design_name() {
    let done = RemoteDone {
        input_file_id: "file-in".to_owned(),
        batch_id: "batch_1".to_owned(),
        submission: 1,
        remote: snapshot("completed", vec![]),
    };
    let states = [
        BatchState::Planned(Planned::default()),
        BatchState::Planned(Planned::default())
            .apply(Event::FileUploaded {
                file_id: "file-in".to_owned(),
                at: t0(),
                file_expires_at: None,
            })
            .unwrap(),
        BatchState::Submitted(Submitted {
            input_file_id: "file-in".to_owned(),
            file_expires_at: None,
            batch_id: "batch_1".to_owned(),
            submission: 1,
            created_at: t0(),
            remote: snapshot("in_progress", vec![]),
        }),
        BatchState::Queued(Queued {
            input_file_id: "f".to_owned(),
            file_expires_at: None,
            submission: 2,
            reason: "r".to_owned(),
            not_before: t0(),
            refusals: 1,
            create_started: None,
        }),
        BatchState::Completed(done.clone()),
        BatchState::Expired(done.clone()),
        BatchState::Cancelled(Cancelled {
            input_file_id: None,
            done: None,
        }),
        BatchState::Failed(Failed {
            input_file_id: None,
            batch_id: None,
            errors: vec![],
        }),
        BatchState::Downloaded(Downloaded {
            terminal: Terminal::Completed,
            done: done.clone(),
            has_output: true,
            has_errors: false,
            progress: None,
            retries_planned: false,
        }),
        BatchState::Ingested(Ingested {
            terminal: Terminal::Completed,
            done: Some(done),
            counts: IngestCounts::default(),
            remote_files_deleted: false,
            anomalies: LineAnomalies::default(),
            to_retry: 0,
            retries_planned: true,
        }),
    ];
    for (state, kind) in states.iter().zip(StateKind::ALL) {
        assert_eq!(state.kind(), kind);
        let value = serde_json::to_value(state).unwrap();
        assert_eq!(value["state"], kind.as_str());
    }
}

#[test]
fn token_limit_failure_goes_to_queued_with_a_new_submission() {
    let sub = BatchState::Submitted(Submitted {
        input_file_id: "file-in".to_owned(),
        file_expires_at: None,
        batch_id: "batch_1".to_owned(),
        submission: 1,
        created_at: t0(),
        remote: snapshot("validating", vec![]),
    });
    let next = sub
        .apply(Event::Polled(snapshot("failed", vec![queue_error()])))
        .unwrap();
    match next {
        BatchState::Queued(q) => {
            assert_eq!(q.submission, 2);
            assert_eq!(q.not_before, t0() + chrono::Duration::minutes(10));
        }
        other => panic!("expected queued, got {other:?}"),
    }
}

#[test]
fn a_plain_failure_is_final() {
    let sub = BatchState::Uploaded(Uploaded {
        input_file_id: "f".to_owned(),
        uploaded_at: t0(),
        file_expires_at: None,
        submission: 1,
        create_started: None,
    });
    let bad_line = RemoteError {
        code: Some("invalid_request".to_owned()),
        message: Some("bad line".to_owned()),
        line: Some(3),
    };
    let next = sub
        .apply(Event::BatchCreated {
            batch_id: "b".to_owned(),
            at: t0(),
            remote: snapshot("failed", vec![bad_line]),
        })
        .unwrap();
    assert_eq!(next.kind(), StateKind::Failed);
    assert!(next.is_done());
}

/// The submission the batch's next creation carries (or carried, once submitted).
fn next_submission(state: &BatchState) -> Option<u32> {
    match state {
        BatchState::Planned(p) => Some(p.submission.unwrap_or(1)),
        BatchState::Uploaded(u) => Some(u.submission),
        BatchState::Queued(q) => Some(q.submission),
        BatchState::Submitted(s) => Some(s.submission),
        _ => None,
    }
}

/// Found by the fault campaign: a queued batch whose input file expired was uploaded
/// again as submission 1, a second remote batch with the metadata of the first.
#[test]
fn an_input_file_expired_while_queued_keeps_the_submission_count() {
    let queued = BatchState::Queued(Queued {
        input_file_id: "f".to_owned(),
        file_expires_at: Some(t0()),
        submission: 2,
        reason: "token_limit_exceeded".to_owned(),
        not_before: t0(),
        refusals: 1,
        create_started: None,
    });
    let uploaded = queued
        .apply(Event::FileExpired)
        .and_then(|s| s.apply(Event::UploadStarted { at: t0() }))
        .and_then(|s| {
            s.apply(Event::FileUploaded {
                file_id: "g".to_owned(),
                at: t0(),
                file_expires_at: None,
            })
        })
        .unwrap();
    match uploaded {
        BatchState::Uploaded(up) => assert_eq!(up.submission, 2),
        other => panic!("expected uploaded, got {other:?}"),
    }
}

/// A cancelled run gives up the retryable failures that have no retry batch yet: they
/// count as failed and the batch is done; failures already in a retry batch stay there.
#[test]
fn dropped_retries_count_as_failed_and_finish_the_batch() {
    let done = RemoteDone {
        input_file_id: "file-in".to_owned(),
        batch_id: "batch_1".to_owned(),
        submission: 1,
        remote: snapshot("expired", vec![]),
    };
    let outcome = IngestOutcome {
        counts: IngestCounts {
            ingested: 4,
            failed: 1,
            ..IngestCounts::default()
        },
        to_retry: 3,
        ..IngestOutcome::default()
    };
    let ingested = BatchState::Expired(done)
        .apply(Event::FilesDownloaded {
            has_output: true,
            has_errors: true,
        })
        .and_then(|s| s.apply(Event::ResultsIngested { outcome }))
        .unwrap();
    assert!(!ingested.is_done());
    let dropped = ingested.clone().apply(Event::RetriesDropped).unwrap();
    assert!(dropped.is_done());
    let BatchState::Ingested(i) = &dropped else {
        unreachable!()
    };
    assert_eq!((i.counts.ingested, i.counts.failed, i.to_retry), (4, 4, 0));
    let planned = ingested.apply(Event::RetriesPlanned).unwrap();
    assert!(planned.apply(Event::RetriesDropped).is_err());
}

/// `ingest --redownload` of an ingested batch ingests it again, and a retry batch
/// already planned for it is not planned a second time.
#[test]
fn an_ingested_batch_ingested_again_keeps_its_retries_planned() {
    let done = RemoteDone {
        input_file_id: "file-in".to_owned(),
        batch_id: "batch_1".to_owned(),
        submission: 1,
        remote: snapshot("completed", vec![]),
    };
    let ingested = |to_retry| IngestOutcome {
        to_retry,
        ..IngestOutcome::default()
    };
    let state = BatchState::Completed(done)
        .apply(Event::FilesDownloaded {
            has_output: true,
            has_errors: false,
        })
        .and_then(|s| {
            s.apply(Event::ResultsIngested {
                outcome: ingested(2),
            })
        })
        .and_then(|s| s.apply(Event::RetriesPlanned))
        .unwrap();
    assert!(state.is_done());
    let again = state
        .apply(Event::IngestAgain {
            has_output: true,
            has_errors: false,
        })
        .unwrap();
    assert_eq!(again.kind(), StateKind::Downloaded);
    let done_again = again
        .apply(Event::ResultsIngested {
            outcome: ingested(2),
        })
        .unwrap();
    match done_again {
        BatchState::Ingested(i) => assert!(i.retries_planned, "retries planned twice"),
        other => panic!("expected ingested, got {other:?}"),
    }
}

#[test]
fn backoff_doubles_to_two_hours() {
    let minutes: Vec<i64> = (1..=7).map(|n| queue_backoff(n).num_minutes()).collect();
    assert_eq!(minutes, [10, 20, 40, 80, 120, 120, 120]);
}

/// Every status word reads into its variant and writes back as the same word; an unknown word
/// is kept as it came.
#[test]
fn remote_status_keeps_the_providers_word() {
    for word in [
        "validating",
        "in_progress",
        "finalizing",
        "completed",
        "failed",
        "expired",
        "cancelling",
        "cancelled",
        "paused_by_provider",
    ] {
        let status = RemoteStatus::from(word);
        assert_eq!(status.as_str(), word);
        assert_eq!(String::from(status.clone()), word);
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(json, format!("\"{word}\""));
        assert_eq!(serde_json::from_str::<RemoteStatus>(&json).unwrap(), status);
    }
    assert_eq!(
        RemoteStatus::from("paused_by_provider"),
        RemoteStatus::Other("paused_by_provider".to_owned())
    );
}
