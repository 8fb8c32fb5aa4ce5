use pgvector::Vector;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::Value;

use super::tests::fresh_database;
use super::*;
use crate::run::store::IdType;

const DIMENSIONS: usize = 1536;

fn source() -> SourceSettings {
    SourceSettings {
        table: "knowledge_chunks".to_owned(),
        id_column: "id".to_owned(),
        id_type: IdType::Uuid,
        text_column: "content".to_owned(),
        embedding_column: "embedding".to_owned(),
        family_column: "equipment_family_id".to_owned(),
        family_table: None,
        scope_sql: None,
        content_hash_column: None,
    }
}

/// The default schema with `n_rows` chunks of `content_len`-ish characters, analyzed.
/// Returns (id, content sha256) in id order.
async fn load_chunks(client: &Client, n_rows: i32, content_len: i32) -> Vec<(String, String)> {
    client
        .batch_execute(crate::pg::source::DEFAULT_SCHEMA_SQL)
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO equipment_families VALUES ('00000000-0000-0000-0000-000000000001', 'f')",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO knowledge_chunks (id, equipment_family_id, content)
                 SELECT md5(i::text)::uuid, '00000000-0000-0000-0000-000000000001',
                        left('chunk ' || i || ' ' || repeat(md5(i::text) || ' ', ($2 / 33) + 1), $2)
                 FROM generate_series(1, $1) AS i",
            &[&n_rows, &content_len],
        )
        .await
        .unwrap();
    client
        .batch_execute("ANALYZE knowledge_chunks")
        .await
        .unwrap();
    client
        .query(
            "SELECT id::text, encode(sha256(convert_to(content, 'UTF8')), 'hex')
                 FROM knowledge_chunks ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

fn random_vectors(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            (0..DIMENSIONS)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect()
        })
        .collect()
}

/// Every (node type, relation) of the plan the server makes for the write statement with
/// these parameters (EXPLAIN without ANALYZE: nothing is written).
async fn plan_nodes(
    client: &Client,
    overwrite: bool,
    chunks: &[&(String, String)],
    vectors: &[Vec<f32>],
) -> Vec<(String, Option<String>)> {
    let sql = format!(
        "EXPLAIN (FORMAT JSON) {}",
        write_sql(&source(), overwrite, None)
    );
    let ids: Vec<&str> = chunks.iter().map(|(id, _)| id.as_str()).collect();
    let hashes: Vec<&str> = chunks.iter().map(|(_, h)| h.as_str()).collect();
    let vectors: Vec<Vector> = vectors
        .iter()
        .take(chunks.len())
        .map(|v| Vector::from(v.clone()))
        .collect();
    let row = client
        .query_one(&sql, &[&ids, &vectors, &hashes])
        .await
        .unwrap_or_else(|e| panic!("explain: {e:?}"));
    let plan: Value = row.get(0);
    let mut nodes = Vec::new();
    collect_nodes(&plan, &mut nodes);
    nodes
}

fn collect_nodes(value: &Value, nodes: &mut Vec<(String, Option<String>)>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(node_type)) = map.get("Node Type") {
                let relation = map
                    .get("Relation Name")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                nodes.push((node_type.clone(), relation));
            }
            map.values().for_each(|v| collect_nodes(v, nodes));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_nodes(v, nodes)),
        _ => {}
    }
}

fn scans_chunks_sequentially(nodes: &[(String, Option<String>)]) -> bool {
    nodes
        .iter()
        .any(|(node, rel)| node == "Seq Scan" && rel.as_deref() == Some("knowledge_chunks"))
}

/// On a large table each of the statement's rows must be found through the primary key,
/// not by scanning the table. Chunks of ~1 KB of text, as real chunks are; with rows much
/// shorter a 20,000-row table is small enough on disk that a scan is the cheaper plan.
/// Also times 20,000 vectors of 1536 dimensions through `write` (printed, not checked).
#[tokio::test(flavor = "multi_thread")]
async fn plan_stays_an_index_lookup_on_a_large_table() {
    const N_CHUNKS: usize = 20_000;
    let mut client = fresh_database().await;
    let chunks = load_chunks(&client, N_CHUNKS as i32, 1000).await;
    let vectors = random_vectors(Sink::MAX_ROWS_PER_STATEMENT, 1);
    // Spread over the whole table, like the ids of one batch among other families' chunks.
    let step = N_CHUNKS / Sink::MAX_ROWS_PER_STATEMENT;
    let picked: Vec<&(String, String)> = chunks.iter().step_by(step).collect();
    assert_eq!(picked.len(), Sink::MAX_ROWS_PER_STATEMENT);
    for overwrite in [false, true] {
        let nodes = plan_nodes(&client, overwrite, &picked, &vectors).await;
        assert!(
            !scans_chunks_sequentially(&nodes),
            "overwrite {overwrite}: {nodes:?}"
        );
        assert!(
            nodes
                .iter()
                .any(|(node, rel)| node == "Index Scan"
                    && rel.as_deref() == Some("knowledge_chunks")),
            "overwrite {overwrite}: {nodes:?}"
        );
    }

    // After five executions a prepared statement may switch to its generic plan, which
    // knows nothing of the arrays' lengths (EXPLAIN (GENERIC_PLAN) needs Postgres 16).
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if version >= 160_000 {
        for overwrite in [false, true] {
            let sql = format!(
                "EXPLAIN (GENERIC_PLAN, FORMAT JSON) {}",
                write_sql(&source(), overwrite, None)
            );
            let messages = client.simple_query(&sql).await.unwrap();
            let text = messages
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
                    _ => None,
                })
                .unwrap();
            let plan: Value = serde_json::from_str(text).unwrap();
            let mut nodes = Vec::new();
            collect_nodes(&plan, &mut nodes);
            assert!(!scans_chunks_sequentially(&nodes), "generic: {nodes:?}");
        }
    }

    // Every chunk through `write`: statements of 500 rows, transactions of 2,000.
    let sink = Sink::prepare(&client, &source(), false).await.unwrap();
    let all_vectors = random_vectors(2_000, 2);
    let started = Instant::now();
    for (tx_idx, tx_chunks) in chunks.chunks(2_000).enumerate() {
        let tx = client.transaction().await.unwrap();
        for (stmt_idx, stmt_chunks) in tx_chunks.chunks(Sink::MAX_ROWS_PER_STATEMENT).enumerate() {
            let offset = stmt_idx * Sink::MAX_ROWS_PER_STATEMENT;
            let rows: Vec<VectorRow> = stmt_chunks
                .iter()
                .zip(&all_vectors[offset..])
                .map(|((id, hash), vector)| VectorRow {
                    id,
                    vector,
                    content_sha256: hash,
                })
                .collect();
            let outcomes = sink.write(&tx, &rows).await.unwrap();
            assert!(
                outcomes.iter().all(|&o| o == RowOutcome::Written),
                "transaction {tx_idx}: {outcomes:?}"
            );
        }
        tx.commit().await.unwrap();
    }
    eprintln!(
        "sink: {N_CHUNKS} vectors of {DIMENSIONS} dimensions written in {:.2?}",
        started.elapsed()
    );
    let missing: i64 = client
        .query_one(
            "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(missing, 0);
}
