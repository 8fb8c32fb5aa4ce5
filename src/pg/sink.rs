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

use crate::pg::source::{HashKind, content_hash_kind, quote_ident, quote_qualified};
use crate::run::store::SourceSettings;

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
                None => crate::pg::conn::connection_lost(source),
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
    /// `SinkError::Db` when the server rejects the statement (no such table or column, wrong types).
    pub async fn prepare(
        client: &Client,
        source: &SourceSettings,
        overwrite: bool,
    ) -> Result<Sink, SinkError> {
        // With `--content-hash-column`, its kind decides how the hash is written.
        let hash = match &source.content_hash_column {
            Some(column) => Some((
                column.as_str(),
                content_hash_kind(client, &source.table, column)
                    .await
                    .map_err(|err| SinkError::Invalid(err.to_string()))?,
            )),
            None => None,
        };
        let sql = write_sql(source, overwrite, hash);
        let statement = client.prepare(&sql).await.map_err(db(format!(
            "could not prepare the vector update for table {} (id {}, text {}, embedding {}); check that the table and columns exist and that the embedding column is a pgvector vector",
            source.table, source.id_column, source.text_column, source.embedding_column
        )))?;
        let diagnose = client
            .prepare(&diagnose_sql(source, hash))
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

/// The write statement. `$1` ids as text, `$2` vectors, `$3` planned content hashes; returns
/// the input id of every row it wrote. Ids are cast on the `unnest` side so the primary-key
/// index on the table's id column stays usable. Every identifier is quoted; the cast is one of
/// three fixed type names.
///
/// It is a plain `UPDATE … FROM unnest(…)` on purpose. An earlier form that also reported on
/// the rows it did not write (a data-modifying CTE joined back to the table) cost the server
/// 4 × more per row, and 10 × more once the prepared statement switched to its generic plan;
/// rows not written are rare, so [`diagnose_sql`] asks about them separately.
fn write_sql(source: &SourceSettings, overwrite: bool, hash: Option<(&str, HashKind)>) -> String {
    let id_type = source.id_type.as_str();
    let table = quote_qualified(&source.table);
    let id = quote_ident(&source.id_column);
    let text = quote_ident(&source.text_column);
    let emb = quote_ident(&source.embedding_column);
    // With a content hash column, the hash of the content embedded is written by the same
    // statement: `u.h`, which the stale guard below proves is the hash of the row's content
    // as this very statement sees it. A row is then "missing" its vector also when its
    // stored hash is not that content's (it was edited after its last embedding).
    let (set_hash, only_missing) = match hash {
        Some((column, kind)) => {
            let column = quote_ident(column);
            let planned = kind.from_hex("u.h");
            (
                format!(", {column} = {planned}"),
                if overwrite {
                    String::new()
                } else {
                    format!("\n  AND (t.{emb} IS NULL OR t.{column} IS DISTINCT FROM {planned})")
                },
            )
        }
        None => (
            String::new(),
            if overwrite {
                String::new()
            } else {
                format!("\n  AND t.{emb} IS NULL")
            },
        ),
    };
    format!(
        "UPDATE {table} AS t SET {emb} = u.v{set_hash}
FROM unnest($1::text[], $2::vector[], $3::text[]) AS u(id, v, h)
WHERE t.{id} = u.id::{id_type}{only_missing}
  AND encode(sha256(convert_to(t.{text}, 'UTF8')), 'hex') = u.h
RETURNING u.id"
    )
}

/// What the table says about rows the write statement did not write (same parameters as
/// [`write_sql`]): whether each exists, still has the planned content, has an embedding, and
/// whether that embedding is the vector sent. Reads only.
fn diagnose_sql(source: &SourceSettings, hash: Option<(&str, HashKind)>) -> String {
    let id_type = source.id_type.as_str();
    let table = quote_qualified(&source.table);
    let id = quote_ident(&source.id_column);
    let text = quote_ident(&source.text_column);
    let emb = quote_ident(&source.embedding_column);
    // With a content hash column, an embedding counts as present only when it is this
    // content's (the stored hash is the planned one).
    let has_embedding = match hash {
        Some((column, kind)) => format!(
            "coalesce(t.{emb} IS NOT NULL AND t.{} IS NOT DISTINCT FROM {}, false)",
            quote_ident(column),
            kind.from_hex("u.h")
        ),
        None => format!("t.{emb} IS NOT NULL"),
    };
    format!(
        "SELECT u.id,
       t.{id} IS NOT NULL,
       coalesce(encode(sha256(convert_to(t.{text}, 'UTF8')), 'hex') = u.h, false),
       {has_embedding},
       coalesce(t.{emb} = u.v, false)
FROM unnest($1::text[], $2::vector[], $3::text[]) AS u(id, v, h)
LEFT JOIN {table} AS t ON t.{id} = u.id::{id_type}"
    )
}

/// An approximate-nearest-neighbour index on the embedding column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnIndex {
    /// The index's schema (an index lives in its table's schema).
    pub schema: String,
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
            "SELECT n.nspname::text, i.relname::text, am.amname::text
             FROM pg_index x
             JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_namespace n ON n.oid = i.relnamespace
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
            schema: row.get(0),
            name: row.get(1),
            method: row.get(2),
        })
        .collect())
}

impl AnnIndex {
    /// The index's name as SQL takes it, schema-qualified: `public.knowledge_hnsw`, with
    /// quotes only where a name needs them (`"My Schema".idx`).
    pub fn qualified_name(&self) -> String {
        let plain = |name: &str| {
            let mut chars = name.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        let shown = |name: &str| {
            if plain(name) {
                name.to_owned()
            } else {
                quote_ident(name)
            }
        };
        format!("{}.{}", shown(&self.schema), shown(&self.name))
    }

    /// The warning `plan` and `advance` give before writing into a column with this index.
    pub fn slow_write_warning(&self, table: &str, column: &str) -> String {
        format!(
            "{table}.{column} has the {} index {}: vector writes run about 100 times slower with it; drop it before the backfill and build it afterwards (`DROP INDEX {}` … `CREATE INDEX … USING {}`)",
            self.method,
            self.qualified_name(),
            self.qualified_name(),
            self.method
        )
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod plan_tests;
