//! The source side: where the chunks live, checked against the catalog, and the stream of
//! pending chunks read from it (DESIGN.md §1).
//!
//! Owns the SQL that reads chunks; every identifier from a flag is quoted here, never pasted.
//! Rows are streamed from one query inside one READ ONLY transaction (tokio-postgres stops
//! reading the socket while rows wait to be handled), so the family is never held in memory
//! whole and `--scope-sql` cannot change data. It does not tokenize, shard or write files (the
//! plan does).

use std::error::Error as _;

use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, IsolationLevel};

use crate::run::store::{DatabaseIdentity, IdType, SourceSettings};

/// The default schema of DESIGN.md §1 (what the demo and the tests create).
pub const DEFAULT_SCHEMA_SQL: &str = "
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE equipment_families (id uuid PRIMARY KEY, name text NOT NULL);
CREATE TABLE knowledge_chunks (
  id                  uuid PRIMARY KEY,
  equipment_family_id uuid NOT NULL REFERENCES equipment_families(id),
  content             text NOT NULL,
  embedding           vector(1536)
);
CREATE INDEX knowledge_chunks_family ON knowledge_chunks (equipment_family_id);
";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Invalid(String),
    #[error("{context}")]
    Db {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn invalid(message: impl Into<String>) -> SourceError {
    SourceError::Invalid(message.into())
}

fn db(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::Db { context, source }
}

/// Quotes an identifier as Postgres does (`"` doubled), whatever it contains.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes `schema.table` as two identifiers when the name has exactly one dot, else as one.
pub fn quote_qualified(name: &str) -> String {
    match name.split_once('.') {
        Some((schema, table))
            if !schema.is_empty() && !table.is_empty() && !table.contains('.') =>
        {
            format!("{}.{}", quote_ident(schema), quote_ident(table))
        }
        _ => quote_ident(name),
    }
}

/// Where the chunks live (DESIGN.md §1). Names are raw identifiers: always quoted when used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    pub table: String,
    pub id_column: String,
    pub text_column: String,
    pub embedding_column: String,
    pub family_column: String,
    /// `None` when `--family-table none`: no check that the family exists.
    pub family_table: Option<String>,
    pub scope_sql: Option<String>,
    /// `--content-hash-column`: where every write of a vector also stores the sha256 of the
    /// content embedded (`bytea`: the digest, `text`: its lowercase hex); a row whose stored
    /// hash differs from its content's is pending again (DESIGN.md §9).
    pub content_hash_column: Option<String>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            table: "knowledge_chunks".to_owned(),
            id_column: "id".to_owned(),
            text_column: "content".to_owned(),
            embedding_column: "embedding".to_owned(),
            family_column: "equipment_family_id".to_owned(),
            family_table: Some("equipment_families".to_owned()),
            scope_sql: None,
            content_hash_column: None,
        }
    }
}

/// How a `--content-hash-column` holds the sha256 of a chunk's content (UTF-8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// `bytea`: the 32-byte digest.
    Bytea,
    /// `text` (or varchar): the lowercase hex of the digest.
    Text,
}

impl HashKind {
    /// The kind a catalog type name (`format_type` without modifiers) stands for.
    pub fn from_catalog(type_name: &str) -> Option<HashKind> {
        match type_name {
            "bytea" => Some(HashKind::Bytea),
            "text" | "character varying" => Some(HashKind::Text),
            _ => None,
        }
    }

    /// SQL for the hash of the text expression `text`, as this kind stores it.
    pub fn of_content(self, text: &str) -> String {
        match self {
            HashKind::Bytea => format!("sha256(convert_to({text}, 'UTF8'))"),
            HashKind::Text => format!("encode(sha256(convert_to({text}, 'UTF8')), 'hex')"),
        }
    }

    /// SQL turning `hex` (an expression holding the lowercase hex digest) into this kind.
    pub fn from_hex(self, hex: &str) -> String {
        match self {
            HashKind::Bytea => format!("decode({hex}, 'hex')"),
            HashKind::Text => hex.to_owned(),
        }
    }
}

/// The `--content-hash-column` of `table` and its kind, read from the catalog; an error saying
/// what to do when the column is missing or of another type.
pub async fn content_hash_kind(
    client: &Client,
    table: &str,
    column: &str,
) -> Result<HashKind, SourceError> {
    let table_sql = quote_qualified(table);
    let row = client
        .query_opt(
            "SELECT format_type(atttypid, NULL) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attname = $2::text AND attnum > 0 AND NOT attisdropped",
            &[&table_sql, &column],
        )
        .await
        .map_err(db(format!("could not read the columns of {table_sql}")))?;
    let Some(row) = row else {
        return Err(invalid(format!(
            "table {table_sql} has no column {col}; add it (`ALTER TABLE {table_sql} ADD COLUMN {col} bytea`) or check --content-hash-column",
            col = quote_ident(column)
        )));
    };
    let type_name: String = row.get(0);
    HashKind::from_catalog(&type_name).ok_or_else(|| {
        invalid(format!(
            "content hash column {} is {type_name}; it must be bytea (the sha256 digest) or text (its lowercase hex); check --content-hash-column",
            quote_ident(column)
        ))
    })
}

/// The id type a catalog type name stands for: `integer` ids are read as bigint and
/// `character varying` as text; anything else is not an id type embatch handles.
fn id_type_from_catalog(type_name: &str) -> Option<IdType> {
    match type_name {
        "uuid" => Some(IdType::Uuid),
        "text" | "character varying" => Some(IdType::Text),
        "bigint" | "integer" => Some(IdType::Bigint),
        _ => None,
    }
}

/// `ORDER BY` suffix: text ids sort by bytes (`COLLATE "C"`), stable across locales.
pub fn order_suffix(id_type: IdType) -> &'static str {
    match id_type {
        IdType::Text => " COLLATE \"C\"",
        IdType::Uuid | IdType::Bigint => "",
    }
}

/// A value bound to a parameter whose type Postgres inferred (family ids may be uuid, text or
/// integers, depending on the schema).
#[derive(Debug, Clone)]
pub enum SqlParam {
    Uuid(uuid::Uuid),
    Int8(i64),
    Int4(i32),
    Text(String),
}

impl SqlParam {
    /// Parses `raw` for a parameter of type `ty`; the error says what was expected.
    pub fn for_type(ty: &Type, raw: &str) -> Result<SqlParam, String> {
        match *ty {
            Type::UUID => uuid::Uuid::parse_str(raw)
                .map(SqlParam::Uuid)
                .map_err(|_| format!("`{raw}` is not a valid uuid")),
            Type::INT8 => raw
                .parse()
                .map(SqlParam::Int8)
                .map_err(|_| format!("`{raw}` is not a valid bigint")),
            Type::INT4 => raw
                .parse()
                .map(SqlParam::Int4)
                .map_err(|_| format!("`{raw}` is not a valid integer")),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                Ok(SqlParam::Text(raw.to_owned()))
            }
            ref other => Err(format!(
                "ids of type {other} are not supported (use uuid, text or bigint)"
            )),
        }
    }
}

impl ToSql for SqlParam {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            SqlParam::Uuid(v) => v.to_sql(ty, out),
            SqlParam::Int8(v) => v.to_sql(ty, out),
            SqlParam::Int4(v) => v.to_sql(ty, out),
            SqlParam::Text(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        // Built by `for_type` for the very type Postgres asked for.
        true
    }

    to_sql_checked!();
}

/// The source after checking it against the catalog.
#[derive(Debug, Clone)]
pub struct Source {
    pub config: SourceConfig,
    pub id_type: IdType,
    /// The embedding column's declared `vector(N)`.
    pub dimensions: u32,
    /// The table as the catalog names it, schema-qualified and quoted (`"public"."chunks"`):
    /// the same whichever search path or spelling found it.
    pub table_identity: String,
    /// The family column's type (`format_type`, without modifiers), when the table has one.
    pub family_column_type: Option<String>,
    /// The `--content-hash-column`'s kind, when one is given.
    pub content_hash: Option<HashKind>,
}

struct ColumnInfo {
    name: String,
    type_name: String,
    typmod: i32,
}

impl Source {
    /// Checks that the table and columns exist with usable types.
    pub async fn inspect(client: &Client, config: &SourceConfig) -> Result<Source, SourceError> {
        Source::inspect_columns(client, config, true).await
    }

    /// Like [`Source::inspect`] but without the family column, which the realtime path
    /// (`embed`, `serve`) never reads: it looks chunks up by id.
    pub async fn inspect_chunks(
        client: &Client,
        config: &SourceConfig,
    ) -> Result<Source, SourceError> {
        Source::inspect_columns(client, config, false).await
    }

    async fn inspect_columns(
        client: &Client,
        config: &SourceConfig,
        needs_family_column: bool,
    ) -> Result<Source, SourceError> {
        let has_pgvector: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')",
                &[],
            )
            .await
            .map_err(db("could not read the database's extensions"))?
            .get(0);
        if !has_pgvector {
            return Err(invalid(
                "this database has no pgvector: install pgvector: `CREATE EXTENSION vector` (on a hosted Postgres, enable the vector extension in its console first), then give the embedding column the type vector(N)",
            ));
        }
        let table_sql = quote_qualified(&config.table);
        let row = client
            .query_opt(
                "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
                &[&table_sql],
            )
            .await
            .map_err(db(format!("could not look up table {}", config.table)))?;
        let oid: Option<u32> = row.as_ref().map(|r| r.get(0));
        let table_identity = row
            .as_ref()
            .map(|r| format!("{}.{}", quote_ident(r.get(1)), quote_ident(r.get(2))))
            .unwrap_or_default();
        let Some(oid) = oid else {
            return Err(invalid(format!(
                "table {table_sql} does not exist in this database; check --table (and the schema in DATABASE_URL's search_path)"
            )));
        };
        let columns: Vec<ColumnInfo> = client
            .query(
                "SELECT attname::text, format_type(atttypid, NULL), atttypmod \
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await
            .map_err(db(format!("could not read the columns of {table_sql}")))?
            .into_iter()
            .map(|r| ColumnInfo {
                name: r.get(0),
                type_name: r.get(1),
                typmod: r.get(2),
            })
            .collect();
        let find = |name: &str, flag: &str| {
            columns.iter().find(|c| c.name == name).ok_or_else(|| {
                let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                invalid(format!(
                    "table {table_sql} has no column {}; check {flag} (its columns: {})",
                    quote_ident(name),
                    names.join(", ")
                ))
            })
        };
        let id_col = find(&config.id_column, "--id-column")?;
        let id_type = id_type_from_catalog(&id_col.type_name).ok_or_else(|| {
            invalid(format!(
                "id column {} is {}; embatch supports uuid, text and bigint ids",
                quote_ident(&id_col.name),
                id_col.type_name
            ))
        })?;
        let text_col = find(&config.text_column, "--text-column")?;
        if !matches!(text_col.type_name.as_str(), "text" | "character varying") {
            return Err(invalid(format!(
                "text column {} is {}, not text; check --text-column",
                quote_ident(&text_col.name),
                text_col.type_name
            )));
        }
        let emb_col = find(&config.embedding_column, "--embedding-column")?;
        let is_vector = emb_col.type_name == "vector" || emb_col.type_name.ends_with(".vector");
        if !is_vector {
            return Err(invalid(format!(
                "column {} is {}, not a pgvector vector(N); check --embedding-column",
                quote_ident(&emb_col.name),
                emb_col.type_name
            )));
        }
        // pgvector stores the declared dimension as the type modifier.
        let Ok(dimensions @ 1..) = u32::try_from(emb_col.typmod) else {
            return Err(invalid(format!(
                "column {} is a vector without a declared dimension; declare it as vector(N), e.g. `ALTER TABLE {table_sql} ALTER COLUMN {} TYPE vector(1536)`",
                quote_ident(&emb_col.name),
                quote_ident(&emb_col.name)
            )));
        };
        let family_column_type = if needs_family_column && config.scope_sql.is_none() {
            Some(
                find(&config.family_column, "--family-column")?
                    .type_name
                    .clone(),
            )
        } else {
            columns
                .iter()
                .find(|c| c.name == config.family_column)
                .map(|c| c.type_name.clone())
        };
        let content_hash = match &config.content_hash_column {
            Some(column) => Some(content_hash_kind(client, &config.table, column).await?),
            None => None,
        };
        Ok(Source {
            config: config.clone(),
            id_type,
            dimensions,
            table_identity,
            family_column_type,
            content_hash,
        })
    }

    /// Checks that `family_id` is in `--family-table` (unless that check is off).
    pub async fn check_family(&self, client: &Client, family_id: &str) -> Result<(), SourceError> {
        let Some(family_table) = &self.config.family_table else {
            return Ok(());
        };
        let table_sql = quote_qualified(family_table);
        let sql = format!("SELECT 1 FROM {table_sql} WHERE id = $1 LIMIT 1");
        let statement = client.prepare(&sql).await.map_err(|err| {
            if err.as_db_error().is_some() {
                invalid(format!(
                    "cannot read families from {table_sql} ({}); check --family-table, or pass --family-table none to skip the check",
                    err.as_db_error().map(|e| e.message()).unwrap_or_default()
                ))
            } else {
                db(format!("could not query {table_sql}"))(err)
            }
        })?;
        let param = bind_family(&statement, family_id, "the family table's id")?;
        let found = client
            .query_opt(&statement, &[&param])
            .await
            .map_err(db(format!("could not query {table_sql}")))?;
        if found.is_none() {
            return Err(invalid(format!(
                "unknown family {family_id}: it is not in {table_sql}; check --family-id (or --family-table)"
            )));
        }
        Ok(())
    }

    /// How the database reads this source's family ids (see [`FamilyIdType`]): without
    /// `--scope-sql`, as the family column's type; with it, as the type Postgres infers for
    /// its `$1`; with a `--scope-sql` that takes no `$1`, as the family table's `id` (or as
    /// given, without a family table).
    pub async fn family_id_type(&self, client: &Client) -> Result<FamilyIdType, SourceError> {
        let c = &self.config;
        if c.scope_sql.is_none() {
            return Ok(FamilyIdType::new(
                self.family_column_type.clone(),
                format!("the family column {}", quote_ident(&c.family_column)),
            ));
        }
        // Prepared (never run) in a read-only transaction, as the scope always runs.
        client
            .batch_execute("BEGIN READ ONLY")
            .await
            .map_err(db("could not start a read-only transaction"))?;
        let prepared = client.prepare(&self.select_sql(false, None)).await;
        let _ = client.batch_execute("ROLLBACK").await;
        let statement = prepared.map_err(|err| self.query_error(err))?;
        if let Some(ty) = statement.params().first() {
            let row = client
                .query_one("SELECT format_type($1::oid, NULL)", &[&ty.oid()])
                .await
                .map_err(db("could not read the type of --scope-sql's $1"))?;
            return Ok(FamilyIdType::new(row.get(0), "--scope-sql's $1".to_owned()));
        }
        let Some(family_table) = &c.family_table else {
            return Ok(FamilyIdType::new(None, "--scope-sql".to_owned()));
        };
        let row = client
            .query_opt(
                "SELECT format_type(atttypid, NULL) FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attname = 'id' AND NOT attisdropped",
                &[&quote_qualified(family_table)],
            )
            .await
            .map_err(db(format!("could not read the columns of {family_table}")))?;
        Ok(FamilyIdType::new(
            row.map(|r| r.get(0)),
            format!("the id of {}", quote_qualified(family_table)),
        ))
    }

    /// The SELECT that yields `(id::text, content)` of the pending chunks, in id order.
    pub fn select_sql(&self, reembed: bool, limit: Option<u64>) -> String {
        let c = &self.config;
        let table = quote_qualified(&c.table);
        let id = format!("t.{}", quote_ident(&c.id_column));
        let text = format!("t.{}", quote_ident(&c.text_column));
        let mut sql = format!("SELECT {id}::text, {text} FROM {table} AS t WHERE ");
        match &c.scope_sql {
            Some(scope) => sql.push_str(&format!(
                "{id} IN (SELECT scope.chunk_id FROM ({scope}\n) AS scope(chunk_id))"
            )),
            None => sql.push_str(&format!("t.{} = $1", quote_ident(&c.family_column))),
        }
        if !reembed {
            sql.push_str(&format!(" AND {}", self.pending_sql()));
        }
        sql.push_str(&format!(" ORDER BY {id}{}", order_suffix(self.id_type)));
        // A number we formatted ourselves: a literal keeps $1 the only parameter, which a
        // --scope-sql may or may not use.
        if let Some(limit) = limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        sql
    }

    /// The condition that makes a row of `t` pending: no embedding, or (with
    /// `--content-hash-column`) a stored hash that is not its content's.
    pub fn pending_sql(&self) -> String {
        let c = &self.config;
        let embedding = format!("t.{}", quote_ident(&c.embedding_column));
        match (&c.content_hash_column, self.content_hash) {
            (Some(column), Some(kind)) => format!(
                "({embedding} IS NULL OR t.{} IS DISTINCT FROM {})",
                quote_ident(column),
                kind.of_content(&format!("t.{}", quote_ident(&c.text_column)))
            ),
            _ => format!("{embedding} IS NULL"),
        }
    }

    /// The families with pending chunks, as `(family id as text, pending chunks)`, by family:
    /// the distinct values of the family column among pending rows. Without `--scope-sql`
    /// only (with it, a family is reached through joins: see [`Source::count_pending`]).
    /// Runs in a READ ONLY transaction.
    pub async fn families_with_pending(
        &self,
        client: &mut Client,
    ) -> Result<Vec<(String, u64)>, SourceError> {
        let c = &self.config;
        let family = format!("t.{}", quote_ident(&c.family_column));
        let sql = format!(
            "SELECT {family}::text, count(*) FROM {table} AS t WHERE {family} IS NOT NULL AND {pending} GROUP BY 1 ORDER BY 1",
            table = quote_qualified(&c.table),
            pending = self.pending_sql(),
        );
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(db("could not start a read-only transaction"))?;
        let rows = tx
            .query(&sql, &[])
            .await
            .map_err(|err| self.query_error(err))?;
        let _ = tx.commit().await;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), u64::try_from(row.get::<_, i64>(1)).unwrap_or(0)))
            .collect())
    }

    /// The family ids `--families-sql` returns (its first column, as text), in a READ ONLY
    /// transaction.
    pub async fn families_from_sql(
        &self,
        client: &mut Client,
        families_sql: &str,
    ) -> Result<Vec<String>, SourceError> {
        let sql = format!(
            "SELECT DISTINCT f.family::text FROM ({families_sql}\n) AS f(family) WHERE f.family IS NOT NULL ORDER BY 1"
        );
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(db("could not start a read-only transaction"))?;
        let rows = tx.query(&sql, &[]).await.map_err(|err| match err.as_db_error() {
            Some(dbe) => invalid(format!(
                "--families-sql failed: {} (it runs read-only and must return one column of family ids)",
                dbe.message()
            )),
            None => db("--families-sql failed")(err),
        })?;
        let _ = tx.commit().await;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// How many chunks of `family_id` are pending (the plan's own selection, counted).
    pub async fn count_pending(
        &self,
        client: &mut Client,
        family_id: &str,
    ) -> Result<u64, SourceError> {
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(db("could not start a read-only transaction"))?;
        let sql = format!(
            "SELECT count(*) FROM ({}) AS pending",
            self.select_sql(false, None)
        );
        let statement = tx
            .prepare(&sql)
            .await
            .map_err(|err| self.query_error(err))?;
        let family = bind_family(&statement, family_id, "the family")?;
        let params: Vec<&(dyn ToSql + Sync)> = if statement.params().is_empty() {
            Vec::new()
        } else {
            vec![&family]
        };
        let row = tx
            .query_one(&statement, &params)
            .await
            .map_err(|err| self.query_error(err))?;
        let _ = tx.commit().await;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// Streams the pending chunks of `family_id` in id order, calling `each` per row.
    ///
    /// Runs in one REPEATABLE READ, READ ONLY transaction: a consistent snapshot, and a
    /// `--scope-sql` that tries to write fails instead of changing data.
    pub async fn stream_pending(
        &self,
        client: &mut Client,
        family_id: &str,
        reembed: bool,
        limit: Option<u64>,
        mut each: impl FnMut(PendingRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db("could not start a read-only transaction"))?;
        let sql = self.select_sql(reembed, limit);
        let statement = tx
            .prepare(&sql)
            .await
            .map_err(|err| self.query_error(err))?;
        let family = bind_family(&statement, family_id, "the family")?;
        let params: Vec<&(dyn ToSql + Sync)> = if statement.params().is_empty() {
            Vec::new()
        } else {
            vec![&family]
        };
        // One unlimited Execute, read as a stream: tokio-postgres stops reading the socket
        // while a batch of rows waits to be handled, so memory stays bounded, and unlike a
        // portal fetched in pages the server may sort with parallel workers.
        let rows = tx
            .query_raw(&statement, params)
            .await
            .map_err(|err| self.query_error(err))?;
        let mut rows = std::pin::pin!(rows);
        let mut n_rows = 0u64;
        while let Some(row) = futures_util::StreamExt::next(&mut rows).await {
            let row = row.map_err(|err| self.query_error(err))?;
            n_rows += 1;
            each(PendingRow(row))?;
        }
        tx.commit()
            .await
            .map_err(db("could not end the read-only transaction"))?;
        Ok(n_rows)
    }

    fn query_error(&self, err: tokio_postgres::Error) -> SourceError {
        match (err.as_db_error(), &self.config.scope_sql) {
            (Some(dbe), Some(_)) => invalid(format!(
                "--scope-sql failed: {} (it runs read-only, takes $1 = the family id and must return one column of chunk ids)",
                dbe.message()
            )),
            (Some(dbe), None) => invalid(format!("reading the chunks failed: {}", dbe.message())),
            _ => db("reading the chunks failed")(err),
        }
    }

    pub fn settings(&self) -> SourceSettings {
        let c = &self.config;
        SourceSettings {
            table: c.table.clone(),
            id_column: c.id_column.clone(),
            id_type: self.id_type,
            text_column: c.text_column.clone(),
            embedding_column: c.embedding_column.clone(),
            family_column: c.family_column.clone(),
            family_table: c.family_table.clone(),
            scope_sql: c.scope_sql.clone(),
            content_hash_column: c.content_hash_column.clone(),
        }
    }
}

/// The type the database reads a family id as. Its canonical text (`$1::text::<type>::text`:
/// lower-case hyphenated uuids, integers without leading zeros or signs) is the family's one
/// identity: every spelling of a family maps to one runs folder, one set of held chunks and
/// one plan lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyIdType {
    /// The SQL type (`format_type`'s spelling, safe to paste); `None` when the id is taken as
    /// given: text types, whose canonical text is the id itself.
    sql_type: Option<String>,
    /// Where the type comes from, for messages.
    origin: String,
}

impl FamilyIdType {
    fn new(sql_type: Option<String>, origin: String) -> FamilyIdType {
        // Casting to text-like types changes nothing (`varchar(n)` is read without its
        // modifier here, as a comparison reads it); `unknown` cannot be cast to.
        let sql_type =
            sql_type.filter(|t| !matches!(t.as_str(), "text" | "character varying" | "unknown"));
        FamilyIdType { sql_type, origin }
    }

    /// True when every id is its own canonical text.
    pub fn is_verbatim(&self) -> bool {
        self.sql_type.is_none()
    }

    /// For the types whose canonical text is known here without asking (uuid, integers):
    /// true when `id` is already canonical, so no other spelling can be the same id.
    pub fn is_surely_canonical(&self, id: &str) -> bool {
        match self.sql_type.as_deref() {
            None => true,
            // Only the exact canonical forms: Postgres 16 also reads `0x1A` or `1_000` as
            // integers, and those are asked about.
            Some("uuid") => {
                crate::run::folders::parse_pg_uuid(id).is_some_and(|u| u.to_string() == id)
            }
            Some("bigint" | "integer" | "smallint") => {
                crate::run::folders::parse_decimal_int(id).as_deref() == Some(id)
            }
            Some(_) => false,
        }
    }

    /// The canonical text of `raw`, or an error saying it is not a valid id of the type.
    pub async fn canonical(&self, client: &Client, raw: &str) -> Result<String, SourceError> {
        match self.try_canonical(client, raw).await? {
            Some(canonical) => Ok(canonical),
            None => Err(invalid(format!(
                "family id `{raw}` is not a valid {ty} ({} is {ty}); check --family-id",
                self.origin,
                ty = self.sql_type.as_deref().unwrap_or("text"),
            ))),
        }
    }

    /// The canonical text of `raw`; `None` when the database does not read it as this type.
    pub async fn try_canonical(
        &self,
        client: &Client,
        raw: &str,
    ) -> Result<Option<String>, SourceError> {
        let Some(ty) = &self.sql_type else {
            return Ok(Some(raw.to_owned()));
        };
        let sql = format!("SELECT $1::text::{ty}::text");
        match client.query_one(&sql, &[&raw]).await {
            Ok(row) => Ok(Some(row.get(0))),
            // Class 22, data exception: invalid input syntax, out of range, bad encoding.
            Err(err) if err.code().is_some_and(|c| c.code().starts_with("22")) => Ok(None),
            Err(err) => Err(db(format!("could not read the family id `{raw}` as {ty}"))(
                err,
            )),
        }
    }
}

fn bind_family(
    statement: &tokio_postgres::Statement,
    family_id: &str,
    what: &str,
) -> Result<SqlParam, SourceError> {
    let ty = statement.params().first().cloned().unwrap_or(Type::TEXT);
    SqlParam::for_type(&ty, family_id).map_err(|why| {
        invalid(format!(
            "family id {why} ({what} is {ty}); check --family-id"
        ))
    })
}

/// A row of [`Source::stream_pending`], as the server sent it: its text is read in place
/// (no copy) by whichever thread prepares it.
pub struct PendingRow(tokio_postgres::Row);

impl PendingRow {
    /// The id as text: the request's `custom_id`.
    pub fn id(&self) -> anyhow::Result<&str> {
        self.0
            .try_get(0)
            .map_err(|err| anyhow::anyhow!("reading a chunk's id failed: {err}"))
    }

    /// The content; `None` for SQL NULL.
    pub fn content(&self) -> anyhow::Result<Option<&str>> {
        self.0
            .try_get(1)
            .map_err(|err| anyhow::anyhow!("reading a chunk's text failed: {err}"))
    }
}

/// One chunk as read from the database, copied out of its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRow {
    /// The id as text: the request's `custom_id`.
    pub id: String,
    pub content: Option<String>,
}

/// The table `table` (as a flag or `run.json` names it) as the catalog names it, quoted and
/// schema-qualified (as [`Source::table_identity`]); `None` when there is no such table.
pub async fn table_identity(client: &Client, table: &str) -> Result<Option<String>, SourceError> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
            &[&quote_qualified(table)],
        )
        .await
        .map_err(db(format!("could not look up table {table}")))?;
    Ok(row.map(|r| format!("{}.{}", quote_ident(r.get(0)), quote_ident(r.get(1)))))
}

/// The database's identity, recorded at plan time so `advance` never writes elsewhere.
pub async fn database_identity(client: &Client) -> Result<DatabaseIdentity, SourceError> {
    let row = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(db("could not read the database name"))?;
    let database: String = row.get(0);
    // Reading the control data may be denied to unprivileged roles on hosted Postgres: the
    // database name alone then identifies it.
    let system_identifier = match client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(row) => row.get::<_, Option<String>>(0),
        Err(err) if err.as_db_error().is_some() => None,
        Err(err) => {
            return Err(SourceError::Db {
                context: format!(
                    "could not read the database identity{}",
                    err.source().map(|s| format!(": {s}")).unwrap_or_default()
                ),
                source: err,
            });
        }
    };
    Ok(DatabaseIdentity {
        system_identifier,
        database,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_never_pasted() {
        assert_eq!(
            quote_ident("x\"; DROP TABLE y; --"),
            "\"x\"\"; DROP TABLE y; --\""
        );
        assert_eq!(quote_qualified("public.chunks"), "\"public\".\"chunks\"");
        assert_eq!(quote_qualified("a.b.c"), "\"a.b.c\"");
    }

    #[test]
    fn family_ids_bind_by_inferred_type() {
        assert!(matches!(
            SqlParam::for_type(&Type::INT8, "42"),
            Ok(SqlParam::Int8(42))
        ));
        let err = SqlParam::for_type(&Type::UUID, "nope").unwrap_err();
        assert!(err.contains("not a valid uuid"), "{err}");
    }
}
