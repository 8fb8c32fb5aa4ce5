//! The ingest sink: writes embedding vectors into the source table (DESIGN.md §5 "Ingest
//! streams…", §7 "Writes").
//!
//! Owns the one statement that writes vectors. It is set-based (up to
//! [`Sink::MAX_ROWS_PER_STATEMENT`] rows per round trip through `unnest`), binary (vectors
//! travel as `vector[]` in Postgres's binary format, never as `'[0.1,…]'` text) and stale-safe:
//! a row is written only where the chunk's content still hashes to what the plan recorded, and,
//! unless overwriting, only where the embedding is still NULL. So a transaction redone after a
//! crash changes nothing and still counts its rows as written. It also finds the HNSW/IVFFlat
//! indexes that make such writes slow. It does not parse output files, open transactions,
//! decide transaction sizes or report failures (ingest does).

use std::collections::{HashMap, HashSet};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Statement, Transaction};

use crate::source::{IdType, quote_ident, quote_qualified};
use crate::store::SourceSettings;

/// One vector to write: the chunk id (as text, the request's `custom_id`), its vector, and the
/// lowercase sha256 hex of the content it was computed from (recorded at plan time).
#[derive(Debug, Clone, Copy)]
pub struct VectorRow<'a> {
    pub id: &'a str,
    pub vector: &'a [f32],
    pub content_sha256: &'a str,
}

/// What became of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutcome {
    /// The chunk now holds this vector: written by this statement, or already holding exactly
    /// this vector (a transaction redone after a crash finds its own earlier write).
    Written,
    /// The chunk already had another embedding and overwriting was not asked for; kept.
    AlreadyPresent,
    /// The chunk's content changed since plan (or is NULL, or changed under a concurrent
    /// transaction while this statement ran); not written, so it never gets the old content's
    /// vector.
    Stale,
    /// The chunk no longer exists.
    Deleted,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A caller or configuration mistake: the same call will fail again.
    #[error("{0}")]
    Invalid(String),

    #[error(
        "the vectors do not fit column {column} of {table}: {message}; check that the model's dimensions match the column's vector(N) type"
    )]
    Dimensions {
        table: String,
        column: String,
        message: String,
    },

    #[error("{context}")]
    Db {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl SinkError {
    /// Whether the same write may succeed when tried again (in a new transaction) without
    /// anyone changing the data or the configuration: lost connections, serialization
    /// failures, deadlocks, a server shutting down or short of resources.
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Invalid(_) | SinkError::Dimensions { .. } => false,
            SinkError::Db { source, .. } => match source.code() {
                // No server error: a lost connection, or a value that could not be encoded
                // (which will not encode next time either).
                None => {
                    source.is_closed()
                        || std::error::Error::source(source)
                            .is_some_and(|cause| cause.is::<std::io::Error>())
                }
                Some(code) => {
                    let class = &code.code()[..2];
                    matches!(class, "08" | "40" | "53" | "57") && *code != SqlState::QUERY_CANCELED
                }
            },
        }
    }
}

fn db(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    let context = context.into();
    move |source| SinkError::Db { context, source }
}

/// The prepared write statement for one source table.
#[derive(Debug, Clone)]
pub struct Sink {
    statement: Statement,
    /// Asked only about the rows `statement` did not write.
    diagnose: Statement,
    overwrite: bool,
    /// The column's declared `vector(N)`, checked before sending: a mismatch must be an error
    /// even for rows that would not be written (pgvector compares vectors of different
    /// lengths without complaint). `None` for an unconstrained `vector` column.
    dimensions: Option<usize>,
    /// As configured (unquoted), for messages.
    table: String,
    embedding_column: String,
}

impl Sink {
    /// The most rows one statement should carry: few round trips, while the plan still looks
    /// each chunk up by primary key. Measured on Postgres 16 (custom plans, which see the
    /// arrays' lengths): 20,000 chunks of ~1 KB text stay index lookups up to 2,000 rows and
    /// flip to a table scan between 2,000 and 3,000; 200,000 chunks of 200 bytes stay index
    /// lookups at 5,000. Only a table small on disk (20,000 chunks of 200 bytes, ~670 pages)
    /// gets a scan at 250 rows, where scanning it is the cheaper plan anyway. The
    /// `plan_stays_an_index_lookup_on_a_large_table` test checks this size.
    pub const MAX_ROWS_PER_STATEMENT: usize = 500;

    /// Prepares the statement for this source; `overwrite` writes even where an embedding
    /// exists (still only where the content is unchanged since plan).
    ///
    /// # Errors
    /// `SinkError::Invalid` for an id type other than uuid, text or bigint; `SinkError::Db`
    /// when the server rejects the statement (no such table or column, wrong types).
    pub async fn prepare(
        client: &Client,
        source: &SourceSettings,
        overwrite: bool,
    ) -> Result<Sink, SinkError> {
        let sql = write_sql(source, overwrite)?;
        let statement = client.prepare(&sql).await.map_err(db(format!(
            "could not prepare the vector update for table {} (id {}, text {}, embedding {}); check that the table and columns exist and that the embedding column is a pgvector vector",
            source.table, source.id_column, source.text_column, source.embedding_column
        )))?;
        let diagnose = client
            .prepare(&diagnose_sql(source)?)
            .await
            .map_err(db(format!(
                "could not prepare the vector check for table {}",
                source.table
            )))?;
        let dimensions = declared_dimensions(client, source).await?;
        Ok(Sink {
            statement,
            diagnose,
            overwrite,
            dimensions,
            table: source.table.clone(),
            embedding_column: source.embedding_column.clone(),
        })
    }

    /// Writes `rows` (at most [`Sink::MAX_ROWS_PER_STATEMENT`], ids unique) in one statement,
    /// inside the caller's transaction, and returns one outcome per input row, in input order.
    /// The transaction must be on the client the sink was prepared with.
    ///
    /// # Errors
    /// `SinkError::Invalid` for too many rows or a repeated id (nothing sent);
    /// `SinkError::Dimensions` when a vector's length does not match the column;
    /// `SinkError::Db` when the statement fails (see [`SinkError::is_retryable`]). The
    /// transaction is then aborted and must be rolled back.
    pub async fn write(
        &self,
        tx: &Transaction<'_>,
        rows: &[VectorRow<'_>],
    ) -> Result<Vec<RowOutcome>, SinkError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if rows.len() > Self::MAX_ROWS_PER_STATEMENT {
            return Err(SinkError::Invalid(format!(
                "{} rows given to one vector update, more than the {} it takes; split them into groups of at most {}",
                rows.len(),
                Self::MAX_ROWS_PER_STATEMENT,
                Self::MAX_ROWS_PER_STATEMENT
            )));
        }
        let mut seen = HashSet::with_capacity(rows.len());
        if let Some(row) = rows.iter().find(|row| !seen.insert(row.id)) {
            return Err(SinkError::Invalid(format!(
                "chunk id {} appears twice in one vector update; give each id once (the first output line for a custom_id wins)",
                row.id
            )));
        }

        if let Some(expected) = self.dimensions
            && let Some(row) = rows.iter().find(|row| row.vector.len() != expected)
        {
            return Err(SinkError::Dimensions {
                table: self.table.clone(),
                column: self.embedding_column.clone(),
                message: format!(
                    "expected {expected} dimensions, not {} (chunk id {})",
                    row.vector.len(),
                    row.id
                ),
            });
        }

        let ids: Vec<&str> = rows.iter().map(|row| row.id).collect();
        let vectors: Vec<VectorParam> = rows.iter().map(|row| VectorParam(row.vector)).collect();
        let hashes: Vec<&str> = rows.iter().map(|row| row.content_sha256).collect();

        let written_rows = tx
            .query(&self.statement, &[&ids, &vectors, &hashes])
            .await
            .map_err(|source| self.write_error(source, rows.len()))?;
        let written: HashSet<&str> = written_rows.iter().map(|row| row.get(0)).collect();
        let mut by_id: HashMap<String, RowOutcome> = HashMap::new();
        if written.len() < rows.len() {
            // Rare (a redo after a crash, stale or deleted chunks): ask about the rest.
            let (mut ids, mut vectors, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
            for row in rows.iter().filter(|row| !written.contains(row.id)) {
                ids.push(row.id);
                vectors.push(VectorParam(row.vector));
                hashes.push(row.content_sha256);
            }
            let result = tx
                .query(&self.diagnose, &[&ids, &vectors, &hashes])
                .await
                .map_err(|source| self.write_error(source, ids.len()))?;
            for row in &result {
                let facts = RowFacts {
                    written: false,
                    present: row.get(1),
                    same_content: row.get(2),
                    has_embedding: row.get(3),
                    same_vector: row.get(4),
                };
                by_id.insert(row.get(0), facts.outcome(self.overwrite));
            }
        }
        rows.iter()
            .map(|row| {
                if written.contains(row.id) {
                    return Ok(RowOutcome::Written);
                }
                by_id.get(row.id).copied().ok_or_else(|| {
                    SinkError::Invalid(format!(
                        "the vector update of {} returned no outcome for chunk id {}; this is a bug in embatch, please report it",
                        self.table, row.id
                    ))
                })
            })
            .collect()
    }

    fn write_error(&self, source: tokio_postgres::Error, n_rows: usize) -> SinkError {
        if let Some(db_error) = source.as_db_error()
            && *db_error.code() == SqlState::DATA_EXCEPTION
            && db_error.message().contains("dimensions")
        {
            return SinkError::Dimensions {
                table: self.table.clone(),
                column: self.embedding_column.clone(),
                message: db_error.message().to_owned(),
            };
        }
        SinkError::Db {
            context: format!(
                "could not write {n_rows} vectors into {}.{}",
                self.table, self.embedding_column
            ),
            source,
        }
    }
}

/// A vector parameter sent from the caller's slice, in pgvector's binary format (the same
/// bytes as `pgvector::Vector`'s, without copying each 6 KB vector into an owned one first).
#[derive(Debug)]
struct VectorParam<'a>(&'a [f32]);

impl ToSql for VectorParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        // dim (int16), unused (int16), then the values as big-endian float4.
        out.put_u16(u16::try_from(self.0.len())?);
        out.put_u16(0);
        out.reserve(self.0.len() * 4);
        for value in self.0 {
            out.put_f32(*value);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "vector"
    }

    to_sql_checked!();
}

/// The `N` of the embedding column's `vector(N)`, or `None` when it is unconstrained (for
/// `vector`, the type modifier is the dimension count).
async fn declared_dimensions(
    client: &Client,
    source: &SourceSettings,
) -> Result<Option<usize>, SinkError> {
    let row = client
        .query_one(
            "SELECT atttypmod FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attname = $2::text AND NOT attisdropped",
            &[&quote_qualified(&source.table), &source.embedding_column],
        )
        .await
        .map_err(db(format!(
            "could not read the type of {}.{}",
            source.table, source.embedding_column
        )))?;
    let typmod: i32 = row.get(0);
    Ok(usize::try_from(typmod).ok().filter(|&n| n > 0))
}

/// What is known about one input row after the write statement. For a row it did not write,
/// the facts come from [`diagnose_sql`], a later statement in the same transaction: a newer
/// snapshot under read committed, which can only see a concurrent change sooner (the rules
/// below hold either way: `written` decides first, and no rule writes anything).
#[derive(Debug, Clone, Copy)]
struct RowFacts {
    /// The update wrote this row.
    written: bool,
    /// The row exists.
    present: bool,
    /// Its content hashes to the planned hash (false for NULL content).
    same_content: bool,
    /// It had an embedding before this statement.
    has_embedding: bool,
    /// That embedding equals the vector sent.
    same_vector: bool,
}

impl RowFacts {
    fn outcome(self, overwrite: bool) -> RowOutcome {
        if self.written {
            RowOutcome::Written
        } else if !self.present {
            RowOutcome::Deleted
        } else if !self.same_content {
            // Before same_vector: a changed chunk must never count as holding its vector.
            RowOutcome::Stale
        } else if self.same_vector {
            RowOutcome::Written
        } else if self.has_embedding && !overwrite {
            RowOutcome::AlreadyPresent
        } else {
            // The snapshot says the update should have written it, so a concurrent transaction
            // changed or deleted the row after the snapshot (read committed re-checks the
            // newest version). Stale sends it back to be planned from its current content.
            RowOutcome::Stale
        }
    }
}

/// One of our three fixed type names, never text from the user.
fn id_type(source: &SourceSettings) -> Result<IdType, SinkError> {
    match source.id_type.as_str() {
        "uuid" => Ok(IdType::Uuid),
        "text" => Ok(IdType::Text),
        "bigint" => Ok(IdType::Bigint),
        other => Err(SinkError::Invalid(format!(
            "id type {other:?} of {} is not one embatch can write to; the id column must be uuid, text or bigint (plan again to record it)",
            source.table
        ))),
    }
}

/// The write statement. `$1` ids as text, `$2` vectors, `$3` planned content hashes; returns
/// the input id of every row it wrote. Ids are cast on the `unnest` side so the primary-key
/// index on the table's id column stays usable. Every identifier is quoted; the cast is one of
/// three fixed type names.
///
/// It is a plain `UPDATE … FROM unnest(…)` on purpose. An earlier form that also reported on
/// the rows it did not write (a data-modifying CTE joined back to the table) cost the server
/// 4 × more per row, and 10 × more once the prepared statement switched to its generic plan;
/// rows not written are rare, so [`diagnose_sql`] asks about them separately.
fn write_sql(source: &SourceSettings, overwrite: bool) -> Result<String, SinkError> {
    let id_type = id_type(source)?.as_str();
    let table = quote_qualified(&source.table);
    let id = quote_ident(&source.id_column);
    let text = quote_ident(&source.text_column);
    let emb = quote_ident(&source.embedding_column);
    let only_missing = if overwrite {
        String::new()
    } else {
        format!("\n  AND t.{emb} IS NULL")
    };
    Ok(format!(
        "UPDATE {table} AS t SET {emb} = u.v
FROM unnest($1::text[], $2::vector[], $3::text[]) AS u(id, v, h)
WHERE t.{id} = u.id::{id_type}{only_missing}
  AND encode(sha256(convert_to(t.{text}, 'UTF8')), 'hex') = u.h
RETURNING u.id"
    ))
}

/// What the table says about rows the write statement did not write (same parameters as
/// [`write_sql`]): whether each exists, still has the planned content, has an embedding, and
/// whether that embedding is the vector sent. Reads only.
fn diagnose_sql(source: &SourceSettings) -> Result<String, SinkError> {
    let id_type = id_type(source)?.as_str();
    let table = quote_qualified(&source.table);
    let id = quote_ident(&source.id_column);
    let text = quote_ident(&source.text_column);
    let emb = quote_ident(&source.embedding_column);
    Ok(format!(
        "SELECT u.id,
       t.{id} IS NOT NULL,
       coalesce(encode(sha256(convert_to(t.{text}, 'UTF8')), 'hex') = u.h, false),
       t.{emb} IS NOT NULL,
       coalesce(t.{emb} = u.v, false)
FROM unnest($1::text[], $2::vector[], $3::text[]) AS u(id, v, h)
LEFT JOIN {table} AS t ON t.{id} = u.id::{id_type}"
    ))
}

/// An approximate-nearest-neighbour index on the embedding column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnIndex {
    pub name: String,
    /// `hnsw` or `ivfflat`.
    pub method: String,
}

/// HNSW and IVFFlat indexes on the embedding column, by name (ingest warns before writing
/// into an indexed column: updates run ~100× slower). An index counts when the column is one
/// of its keys or appears in one of its expressions (e.g. `(embedding::halfvec(1536))`).
///
/// # Errors
/// `SinkError::Db` when the table does not exist or the catalog cannot be read.
pub async fn ann_indexes(
    client: &Client,
    source: &SourceSettings,
) -> Result<Vec<AnnIndex>, SinkError> {
    // pg_depend records an index's dependency on every column it uses, in keys and in
    // expressions alike; indkey alone misses expression indexes.
    let rows = client
        .query(
            "SELECT i.relname::text, am.amname::text
             FROM pg_index x
             JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_am am ON am.oid = i.relam
             JOIN pg_attribute a ON a.attrelid = x.indrelid
             WHERE x.indrelid = $1::text::regclass
               AND a.attname = $2::text
               AND am.amname IN ('hnsw', 'ivfflat')
               AND (a.attnum = ANY (x.indkey::int2[])
                    OR EXISTS (SELECT 1 FROM pg_depend d
                               WHERE d.classid = 'pg_class'::regclass
                                 AND d.objid = x.indexrelid
                                 AND d.refclassid = 'pg_class'::regclass
                                 AND d.refobjid = x.indrelid
                                 AND d.refobjsubid = a.attnum))
             ORDER BY i.relname",
            &[&quote_qualified(&source.table), &source.embedding_column],
        )
        .await
        .map_err(db(format!(
            "could not look up the indexes on {}.{}; check that the table exists",
            source.table, source.embedding_column
        )))?;
    Ok(rows
        .iter()
        .map(|row| AnnIndex {
            name: row.get(0),
            method: row.get(1),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use pgvector::Vector;
    use sha2::{Digest as _, Sha256};
    use tokio_postgres::NoTls;

    use super::*;
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

    fn settings(table: &str, id_column: &str, id_type: &str) -> SourceSettings {
        SourceSettings {
            table: table.to_owned(),
            id_column: id_column.to_owned(),
            id_type: id_type.to_owned(),
            text_column: "content".to_owned(),
            embedding_column: "embedding".to_owned(),
            family_column: "family".to_owned(),
            family_table: None,
            scope_sql: None,
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
        let source = settings("chunks", "id", "uuid");
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
        let source = settings("chunks", "id", "uuid");
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

        let source = settings("chunks", "id", "uuid");
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
        let sink = prepare(&client, &settings("chunks", "id", "bigint"), false).await;
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
            ..settings(r#"My Schema.odd "table""#, r#"my "col""#, "text")
        };
        let cases = [
            (
                settings("big", "id", "bigint"),
                ["1", "9223372036854775807"],
            ),
            (
                settings("txt", "id", "text"),
                ["a'; DROP TABLE txt; --", "ünïcödé"],
            ),
            (settings("uid", "id", "uuid"), [A, B]),
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
                            source.id_type
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
        let source = settings("chunks", "id", "uuid");
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

        let error = Sink::prepare(&client, &settings("nope", "id", "uuid"), false)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("could not prepare the vector update for table nope")
        );
        let error = Sink::prepare(&client, &settings("chunks", "id", "int4"), false)
            .await
            .unwrap_err();
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
        let found = ann_indexes(&client, &settings("indexed", "id", "uuid"))
            .await
            .unwrap();
        let expect = |name: &str, method: &str| AnnIndex {
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
            ann_indexes(&client, &settings("plain", "id", "uuid"))
                .await
                .unwrap(),
            []
        );
        let error = ann_indexes(&client, &settings("missing", "id", "uuid"))
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
}

#[cfg(test)]
mod plan_tests {
    use pgvector::Vector;
    use std::time::Instant;

    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng as _};
    use serde_json::Value;

    use super::tests::fresh_database;
    use super::*;

    const DIMENSIONS: usize = 1536;

    fn source() -> SourceSettings {
        SourceSettings {
            table: "knowledge_chunks".to_owned(),
            id_column: "id".to_owned(),
            id_type: "uuid".to_owned(),
            text_column: "content".to_owned(),
            embedding_column: "embedding".to_owned(),
            family_column: "equipment_family_id".to_owned(),
            family_table: None,
            scope_sql: None,
        }
    }

    /// The default schema with `n_rows` chunks of `content_len`-ish characters, analyzed.
    /// Returns (id, content sha256) in id order.
    async fn load_chunks(client: &Client, n_rows: i32, content_len: i32) -> Vec<(String, String)> {
        client
            .batch_execute(crate::source::DEFAULT_SCHEMA_SQL)
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
            write_sql(&source(), overwrite).unwrap()
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
                nodes.iter().any(|(node, rel)| node == "Index Scan"
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
                    write_sql(&source(), overwrite).unwrap()
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
            for (stmt_idx, stmt_chunks) in
                tx_chunks.chunks(Sink::MAX_ROWS_PER_STATEMENT).enumerate()
            {
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
}
