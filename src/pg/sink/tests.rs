use pgvector::Vector;
use sha2::{Digest as _, Sha256};
use tokio_postgres::NoTls;

use super::*;
use crate::run::store::IdType;
use crate::testkit::pgtemp::ThrowawayPostgres;

async fn fresh_url() -> String {
    let postgres = ThrowawayPostgres::shared().unwrap_or_else(|e| panic!("postgres: {e:#}"));
    postgres
        .create_database()
        .await
        .unwrap_or_else(|e| panic!("create database: {e:#}"))
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(connection);
    client
}

pub(super) async fn fresh_database() -> Client {
    connect(&fresh_url().await).await
}

fn settings(table: &str, id_column: &str, id_type: IdType) -> SourceSettings {
    SourceSettings {
        table: table.to_owned(),
        id_column: id_column.to_owned(),
        id_type,
        text_column: "content".to_owned(),
        embedding_column: "embedding".to_owned(),
        family_column: "family".to_owned(),
        family_table: None,
        scope_sql: None,
        content_hash_column: None,
    }
}

fn sha(content: &str) -> String {
    hex::encode(Sha256::digest(content.as_bytes()))
}

async fn prepare(client: &Client, source: &SourceSettings, overwrite: bool) -> Sink {
    Sink::prepare(client, source, overwrite)
        .await
        .unwrap_or_else(|e| panic!("prepare: {e:#?}"))
}

/// Writes `rows` in one transaction and commits.
async fn write_committed(
    client: &mut Client,
    sink: &Sink,
    rows: &[VectorRow<'_>],
) -> Vec<RowOutcome> {
    let tx = client.transaction().await.unwrap();
    let outcomes = sink
        .write(&tx, rows)
        .await
        .unwrap_or_else(|e| panic!("write: {e:#?}"));
    tx.commit().await.unwrap();
    outcomes
}

/// The stored vector of one row (by id as text), `None` for NULL.
async fn stored(client: &Client, table_sql: &str, id_sql: &str, id: &str) -> Option<Vec<f32>> {
    let row = client
        .query_one(
            &format!("SELECT embedding FROM {table_sql} WHERE {id_sql}::text = $1"),
            &[&id],
        )
        .await
        .unwrap_or_else(|e| panic!("read back {id}: {e}"));
    row.get::<_, Option<Vector>>(0).map(|v| v.to_vec())
}

fn bits(vector: &[f32]) -> Vec<u32> {
    vector.iter().map(|x| x.to_bits()).collect()
}

const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";
const C: &str = "00000000-0000-0000-0000-00000000000c";
const D: &str = "00000000-0000-0000-0000-00000000000d";

/// a: no embedding yet; b: already embedded; c: content edited after plan; d: deleted.
async fn four_chunks(client: &Client) {
    client
        .batch_execute(&format!(
            "CREATE TABLE chunks (id uuid PRIMARY KEY, content text NOT NULL, embedding vector(3));
                 INSERT INTO chunks VALUES
                   ('{A}', 'alpha', NULL),
                   ('{B}', 'bravo', '[9,9,9]'),
                   ('{C}', 'charlie, edited after plan', NULL);"
        ))
        .await
        .unwrap();
}

// Values whose text forms round-trip badly: a subnormal, the largest float, a negative
// zero, and digits that a decimal print would round.
const TRICKY: [f32; 3] = [1.0e-45, f32::MAX, -0.0];
const PI_ISH: [f32; 3] = [std::f32::consts::PI, 0.1, -1.0 / 3.0];

#[tokio::test(flavor = "multi_thread")]
async fn writes_exact_vectors_and_classifies_every_row_in_input_order() {
    let mut client = fresh_database().await;
    four_chunks(&client).await;
    let source = settings("chunks", "id", IdType::Uuid);
    let sink = prepare(&client, &source, false).await;

    let (h_a, h_b, h_c, h_d) = (sha("alpha"), sha("bravo"), sha("charlie"), sha("delta"));
    let rows = [
        VectorRow {
            id: D,
            vector: &PI_ISH,
            content_sha256: &h_d,
        },
        VectorRow {
            id: A,
            vector: &TRICKY,
            content_sha256: &h_a,
        },
        VectorRow {
            id: C,
            vector: &PI_ISH,
            content_sha256: &h_c,
        },
        VectorRow {
            id: B,
            vector: &PI_ISH,
            content_sha256: &h_b,
        },
    ];
    let outcomes = write_committed(&mut client, &sink, &rows).await;
    assert_eq!(
        outcomes,
        [
            RowOutcome::Deleted,
            RowOutcome::Written,
            RowOutcome::Stale,
            RowOutcome::AlreadyPresent
        ]
    );
    let a = stored(&client, "chunks", "id", A).await.unwrap();
    assert_eq!(bits(&a), bits(&TRICKY), "{a:?}");
    assert_eq!(
        stored(&client, "chunks", "id", B).await,
        Some(vec![9.0, 9.0, 9.0])
    );
    assert_eq!(stored(&client, "chunks", "id", C).await, None);

    // A transaction redone after a crash: the same rows again change nothing, and the row
    // it wrote before counts as written, not as already present.
    let before = row_version(&client, A).await;
    let again = write_committed(&mut client, &sink, &rows).await;
    assert_eq!(again, outcomes);
    assert_eq!(
        row_version(&client, A).await,
        before,
        "the redo rewrote row a"
    );
    let a = stored(&client, "chunks", "id", A).await.unwrap();
    assert_eq!(bits(&a), bits(&TRICKY));

    // Also inside one transaction: the second statement sees the first one's write.
    client
        .execute(
            "UPDATE chunks SET embedding = NULL WHERE id = $1::text::uuid",
            &[&A],
        )
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    let first = sink.write(&tx, &rows[1..2]).await.unwrap();
    let second = sink.write(&tx, &rows[1..2]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (first, second),
        (vec![RowOutcome::Written], vec![RowOutcome::Written])
    );

    // A uuid in another spelling still maps back to its input row.
    let upper = A.to_uppercase();
    client
        .execute(
            "UPDATE chunks SET embedding = NULL WHERE id = $1::text::uuid",
            &[&A],
        )
        .await
        .unwrap();
    let outcome = write_committed(
        &mut client,
        &sink,
        &[VectorRow {
            id: &upper,
            vector: &PI_ISH,
            content_sha256: &h_a,
        }],
    )
    .await;
    assert_eq!(outcome, [RowOutcome::Written]);
    assert_eq!(
        empty_write(&mut client, &sink).await,
        Vec::<RowOutcome>::new()
    );
}

/// The row's tuple version: it changes whenever the row is updated, even to equal values.
async fn row_version(client: &Client, id: &str) -> String {
    client
        .query_one(
            "SELECT xmin::text FROM chunks WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

async fn empty_write(client: &mut Client, sink: &Sink) -> Vec<RowOutcome> {
    write_committed(client, sink, &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn overwrite_replaces_existing_vectors_but_never_a_stale_one() {
    let mut client = fresh_database().await;
    four_chunks(&client).await;
    let source = settings("chunks", "id", IdType::Uuid);
    let sink = prepare(&client, &source, true).await;

    let (h_a, h_b, h_c, h_d) = (sha("alpha"), sha("bravo"), sha("charlie"), sha("delta"));
    let rows = [
        VectorRow {
            id: A,
            vector: &PI_ISH,
            content_sha256: &h_a,
        },
        VectorRow {
            id: B,
            vector: &TRICKY,
            content_sha256: &h_b,
        },
        VectorRow {
            id: C,
            vector: &PI_ISH,
            content_sha256: &h_c,
        },
        VectorRow {
            id: D,
            vector: &PI_ISH,
            content_sha256: &h_d,
        },
    ];
    let outcomes = write_committed(&mut client, &sink, &rows).await;
    assert_eq!(
        outcomes,
        [
            RowOutcome::Written,
            RowOutcome::Written,
            RowOutcome::Stale,
            RowOutcome::Deleted
        ]
    );
    let b = stored(&client, "chunks", "id", B).await.unwrap();
    assert_eq!(bits(&b), bits(&TRICKY));
    assert_eq!(stored(&client, "chunks", "id", C).await, None);
    assert_eq!(write_committed(&mut client, &sink, &rows).await, outcomes);
}

/// Content edited by a transaction that commits while the write waits for its row lock:
/// the update re-checks the newest version and skips it; the row must come back Stale,
/// not AlreadyPresent, although the statement's snapshot still shows the old content.
#[tokio::test(flavor = "multi_thread")]
async fn content_changed_under_a_waiting_write_is_stale() {
    let url = fresh_url().await;
    let client = connect(&url).await;
    four_chunks(&client).await;
    let mut editor = connect(&url).await;

    let edit = editor.transaction().await.unwrap();
    edit.execute(
        "UPDATE chunks SET content = 'alpha, edited' WHERE id = $1::text::uuid",
        &[&A],
    )
    .await
    .unwrap();

    let source = settings("chunks", "id", IdType::Uuid);
    let writer = tokio::spawn(async move {
        let mut client = client;
        let sink = prepare(&client, &source, false).await;
        let h_a = sha("alpha");
        let row = VectorRow {
            id: A,
            vector: &PI_ISH,
            content_sha256: &h_a,
        };
        let outcome = write_committed(&mut client, &sink, &[row]).await;
        (client, outcome)
    });
    let watcher = connect(&url).await;
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    edit.commit().await.unwrap();
    let (client, outcome) = writer.await.unwrap();
    assert_eq!(outcome, [RowOutcome::Stale]);
    assert_eq!(stored(&client, "chunks", "id", A).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn null_content_is_stale() {
    let mut client = fresh_database().await;
    client
        .batch_execute(
            "CREATE TABLE chunks (id bigint PRIMARY KEY, content text, embedding vector(3));
                 INSERT INTO chunks VALUES (1, NULL, NULL);",
        )
        .await
        .unwrap();
    let sink = prepare(&client, &settings("chunks", "id", IdType::Bigint), false).await;
    let empty = sha("");
    let outcome = write_committed(
        &mut client,
        &sink,
        &[VectorRow {
            id: "1",
            vector: &PI_ISH,
            content_sha256: &empty,
        }],
    )
    .await;
    assert_eq!(outcome, [RowOutcome::Stale]);
    assert_eq!(stored(&client, "chunks", "id", "1").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_id_type_and_odd_identifiers() {
    let mut client = fresh_database().await;
    client
            .batch_execute(
                r#"CREATE SCHEMA "My Schema";
                   CREATE TABLE "My Schema"."odd ""table""" (
                     "my ""col""" text PRIMARY KEY,
                     "the text" text NOT NULL,
                     "emb.v" vector(3));
                   CREATE TABLE big (id bigint PRIMARY KEY, content text NOT NULL, embedding vector(3));
                   CREATE TABLE txt (id text PRIMARY KEY, content text NOT NULL, embedding vector(3));
                   CREATE TABLE uid (id uuid PRIMARY KEY, content text NOT NULL, embedding vector(3));"#,
            )
            .await
            .unwrap();
    let odd = SourceSettings {
        text_column: "the text".to_owned(),
        embedding_column: "emb.v".to_owned(),
        ..settings(r#"My Schema.odd "table""#, r#"my "col""#, IdType::Text)
    };
    let cases = [
        (
            settings("big", "id", IdType::Bigint),
            ["1", "9223372036854775807"],
        ),
        (
            settings("txt", "id", IdType::Text),
            ["a'; DROP TABLE txt; --", "ünïcödé"],
        ),
        (settings("uid", "id", IdType::Uuid), [A, B]),
        (odd, ["x", "y\"z"]),
    ];
    for (source, ids) in &cases {
        let table = quote_qualified(&source.table);
        let id_col = quote_ident(&source.id_column);
        let text_col = quote_ident(&source.text_column);
        let emb_col = quote_ident(&source.embedding_column);
        for id in ids {
            client
                .execute(
                    &format!(
                        "INSERT INTO {table} ({id_col}, {text_col}) \
                             VALUES ($1::text::{}, 'content of ' || $1)",
                        source.id_type.as_str()
                    ),
                    &[id],
                )
                .await
                .unwrap_or_else(|e| panic!("{table}: {e}"));
        }
        let sink = prepare(&client, source, false).await;
        let hashes: Vec<String> = ids
            .iter()
            .map(|id| sha(&format!("content of {id}")))
            .collect();
        let rows: Vec<VectorRow> = ids
            .iter()
            .zip(&hashes)
            .map(|(id, h)| VectorRow {
                id,
                vector: &TRICKY,
                content_sha256: h,
            })
            .collect();
        let outcomes = write_committed(&mut client, &sink, &rows).await;
        assert_eq!(outcomes, [RowOutcome::Written; 2], "{table}");
        for id in ids {
            let row = client
                .query_one(
                    &format!("SELECT {emb_col} FROM {table} WHERE {id_col}::text = $1"),
                    &[id],
                )
                .await
                .unwrap();
            assert_eq!(
                bits(&row.get::<_, Vector>(0).to_vec()),
                bits(&TRICKY),
                "{table} {id}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mistakes_come_back_clearly() {
    let mut client = fresh_database().await;
    four_chunks(&client).await;
    let source = settings("chunks", "id", IdType::Uuid);
    let sink = prepare(&client, &source, false).await;
    let h_a = sha("alpha");

    let tx = client.transaction().await.unwrap();
    let two_dims = [1.0, 2.0];
    let error = sink
        .write(
            &tx,
            &[VectorRow {
                id: A,
                vector: &two_dims,
                content_sha256: &h_a,
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(error, SinkError::Dimensions { .. }), "{error:?}");
    assert!(!error.is_retryable());
    let message = error.to_string();
    assert!(
        message.contains("expected 3 dimensions, not 2"),
        "{message}"
    );
    assert!(message.contains("column embedding of chunks"), "{message}");
    drop(tx);

    // Also into a row that would not be written (it has an embedding already).
    let tx = client.transaction().await.unwrap();
    let h_b = sha("bravo");
    let into_b = VectorRow {
        id: B,
        vector: &two_dims,
        content_sha256: &h_b,
    };
    let error = sink.write(&tx, &[into_b]).await.unwrap_err();
    assert!(matches!(error, SinkError::Dimensions { .. }), "{error}");
    drop(tx);

    // Postgres's own complaint comes back the same way (for a column whose dimensions
    // the sink did not know).
    let unchecked = Sink {
        dimensions: None,
        ..sink.clone()
    };
    let tx = client.transaction().await.unwrap();
    let into_a = VectorRow {
        id: A,
        vector: &two_dims,
        content_sha256: &h_a,
    };
    let error = unchecked.write(&tx, &[into_a]).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, SinkError::Dimensions { .. }), "{error:?}");
    assert!(
        message.contains(": expected 3 dimensions, not 2; check"),
        "{message}"
    );
    drop(tx);

    let tx = client.transaction().await.unwrap();
    let row = VectorRow {
        id: A,
        vector: &PI_ISH,
        content_sha256: &h_a,
    };
    let error = sink.write(&tx, &[row, row]).await.unwrap_err();
    assert!(error.to_string().contains("appears twice"), "{error}");
    let many = vec![row; Sink::MAX_ROWS_PER_STATEMENT + 1];
    let error = sink.write(&tx, &many).await.unwrap_err();
    assert!(
        error.to_string().contains("groups of at most 500"),
        "{error}"
    );
    let bad_id = VectorRow {
        id: "not-a-uuid",
        vector: &PI_ISH,
        content_sha256: &h_a,
    };
    let error = sink.write(&tx, &[bad_id]).await.unwrap_err();
    assert!(
        matches!(error, SinkError::Db { .. }) && !error.is_retryable(),
        "{error:?}"
    );
    drop(tx);

    let error = Sink::prepare(&client, &settings("nope", "id", IdType::Uuid), false)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("could not prepare the vector update for table nope")
    );
    // An id type embatch cannot write to is refused where run.json is read, before a sink
    // is ever prepared for it.
    let mut json = serde_json::to_value(settings("chunks", "id", IdType::Uuid)).unwrap();
    json["id_type"] = "int4".into();
    let error = serde_json::from_value::<SourceSettings>(json).unwrap_err();
    assert!(
        error.to_string().contains("must be uuid, text or bigint"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ann_indexes_find_hnsw_and_ivfflat_on_the_embedding_column_only() {
    let client = fresh_database().await;
    client
        .batch_execute(
            "CREATE TABLE plain (id uuid PRIMARY KEY, content text, embedding vector(3));
                 CREATE INDEX plain_content ON plain (content);
                 CREATE TABLE indexed (id uuid PRIMARY KEY, content text, embedding vector(3),
                                       other vector(3));
                 CREATE INDEX h ON indexed USING hnsw (embedding vector_cosine_ops);
                 CREATE INDEX i ON indexed USING ivfflat (embedding vector_l2_ops) WITH (lists = 1);
                 CREATE INDEX half ON indexed USING hnsw ((embedding::halfvec(3)) halfvec_l2_ops);
                 CREATE INDEX not_ours ON indexed USING hnsw (other vector_l2_ops);",
        )
        .await
        .unwrap();
    let found = ann_indexes(&client, &settings("indexed", "id", IdType::Uuid))
        .await
        .unwrap();
    let expect = |name: &str, method: &str| AnnIndex {
        schema: "public".to_owned(),
        name: name.to_owned(),
        method: method.to_owned(),
    };
    assert_eq!(
        found,
        [
            expect("h", "hnsw"),
            expect("half", "hnsw"),
            expect("i", "ivfflat")
        ]
    );
    assert_eq!(
        ann_indexes(&client, &settings("plain", "id", IdType::Uuid))
            .await
            .unwrap(),
        []
    );
    let error = ann_indexes(&client, &settings("missing", "id", IdType::Uuid))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("check that the table exists"),
        "{error}"
    );
}

#[test]
fn outcomes_follow_the_rules() {
    let facts = RowFacts {
        written: false,
        present: true,
        same_content: true,
        has_embedding: true,
        same_vector: false,
    };
    assert_eq!(facts.outcome(false), RowOutcome::AlreadyPresent);
    assert_eq!(
        RowFacts {
            same_vector: true,
            ..facts
        }
        .outcome(false),
        RowOutcome::Written
    );
    // Stale wins over holding this very vector.
    assert_eq!(
        RowFacts {
            same_content: false,
            same_vector: true,
            ..facts
        }
        .outcome(false),
        RowOutcome::Stale
    );
    assert_eq!(
        RowFacts {
            present: false,
            ..facts
        }
        .outcome(false),
        RowOutcome::Deleted
    );
    // Should have been written but was not: changed under a concurrent transaction.
    assert_eq!(facts.outcome(true), RowOutcome::Stale);
    assert_eq!(
        RowFacts {
            has_embedding: false,
            ..facts
        }
        .outcome(false),
        RowOutcome::Stale
    );
    assert_eq!(
        RowFacts {
            written: true,
            ..facts
        }
        .outcome(false),
        RowOutcome::Written
    );
}
