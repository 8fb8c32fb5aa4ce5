//! Connecting to Postgres: reads `DATABASE_URL` (URL or libpq `key=value` form) into a
//! [`DbTarget`] and opens a `tokio_postgres::Client` with the TLS behaviour libpq gives
//! `sslmode` and `sslrootcert`. tokio-postgres knows only `disable`, `prefer` and `require` and
//! rejects `verify-ca`, `verify-full` and `sslrootcert`, so this module takes the TLS parameters
//! out of the string, hands the rest to `tokio_postgres::Config`, and builds the rustls client
//! configuration itself. It owns the redaction rule too: nothing it prints or returns names the
//! password. It does not own queries, the database's identity, pooling or retries: callers get a
//! plain client, and [`DbError::is_retryable`] tells them whether trying again can help.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use rustls::RootCertStore;
use tokio_postgres::config::{Host, SslNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{
    self, MakeTls, TlsError, TlsOptions, Verification, error_chain, load_root_file,
    load_system_roots,
};

/// The modes of libpq's `sslmode`, with libpq's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// libpq tries a plain connection first and TLS only if the server insists. tokio-postgres
    /// cannot start plain and then retry with TLS, so `allow` is treated as `prefer`: TLS when
    /// the server offers it, plain otherwise. That never encrypts less than libpq would.
    Allow,
    /// TLS without certificate checks when the server offers it, plain otherwise (libpq's
    /// default). Unlike libpq, a failed TLS handshake is an error rather than a reason to retry
    /// in plain text.
    Prefer,
    /// TLS, the certificate not checked, unless a root certificate file exists (given by
    /// `sslrootcert` or libpq's default `~/.postgresql/root.crt`): then as `verify-ca`.
    Require,
    /// TLS, the certificate chain checked against the root certificates; the host name is not.
    VerifyCa,
    /// TLS, the chain checked and the host name matched against the certificate.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The spelling libpq uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the connection must be encrypted (libpq refuses plain text from `require` on).
    fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    fn to_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Tp;
        match self {
            SslMode::Disable => Tp::Disable,
            SslMode::Allow | SslMode::Prefer => Tp::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Tp::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = DbError;

    fn from_str(value: &str) -> Result<SslMode, DbError> {
        SslMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == value)
            .ok_or_else(|| DbError::InvalidSslMode {
                value: value.to_owned(),
                origin: "DATABASE_URL",
            })
    }
}

/// Why parsing `DATABASE_URL` or connecting failed. No message contains the password.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "the database url is empty; set DATABASE_URL to a connection string such as postgres://user:password@host:5432/dbname"
    )]
    Empty,

    /// The string could not be read; `reason` says what to change and never quotes a value.
    #[error("the database url is not valid: {reason}")]
    Invalid { reason: String },

    #[error(
        "invalid sslmode \"{value}\" in {origin}; use one of disable, allow, prefer, require, verify-ca, verify-full"
    )]
    InvalidSslMode { value: String, origin: &'static str },

    #[error("{param} in the database url is not supported yet ({what}); remove it")]
    Unsupported { param: String, what: &'static str },

    #[error(
        "root certificate file does not exist: sslmode={mode} checks the server certificate against {path}; either provide the file (or point sslrootcert=/path/to/ca.pem at one), use sslrootcert=system for the system's trusted roots, or change sslmode"
    )]
    RootCertMissing { mode: SslMode, path: String },

    #[error(
        "could not read root certificates from {path}: {reason}; point sslrootcert at a PEM file of CA certificates"
    )]
    RootCertUnreadable { path: String, reason: String },

    #[error(
        "could not load the system's trusted root certificates (sslrootcert=system): {reason}; install the CA certificates package or give sslrootcert=/path/to/ca.pem"
    )]
    SystemRootCerts { reason: String },

    #[error(
        "could not set up TLS for the database connection: {reason}; check ssl_min_protocol_version and ssl_max_protocol_version in DATABASE_URL"
    )]
    TlsSetup { reason: String },

    /// The server could not be reached, or closed the connection before the login finished.
    #[error(
        "could not connect to the database at {target}: {}; check DATABASE_URL and that the server is running",
        error_chain(.error)
    )]
    Connect {
        target: String,
        error: tokio_postgres::Error,
    },

    #[error(
        "tls handshake with the database at {target} failed: {}; check that the server offers TLS and that sslmode and sslrootcert in DATABASE_URL fit its certificate",
        error_chain(.error)
    )]
    Tls {
        target: String,
        error: tokio_postgres::Error,
    },

    #[error(
        "the database at {target} refused the login: {}; check the user and password in DATABASE_URL",
        error_chain(.error)
    )]
    Login {
        target: String,
        error: tokio_postgres::Error,
    },

    /// The server answered with an error other than a failed login (no such database, too many
    /// connections, starting up, ...).
    #[error(
        "the database at {target} refused the connection: {}; check the database name in DATABASE_URL and the server's state",
        error_chain(.error)
    )]
    Refused {
        target: String,
        error: tokio_postgres::Error,
    },
}

impl From<TlsError> for DbError {
    fn from(error: TlsError) -> DbError {
        match error {
            TlsError::RootCertUnreadable { path, reason } => {
                DbError::RootCertUnreadable { path, reason }
            }
            TlsError::SystemRootCerts { reason } => DbError::SystemRootCerts { reason },
            TlsError::TlsSetup { reason } => DbError::TlsSetup { reason },
        }
    }
}

impl DbError {
    /// Whether the same attempt may succeed later without anyone changing the configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            DbError::Connect { .. } => true,
            DbError::Refused { error, .. } => error.code().is_some_and(|code| {
                *code == SqlState::TOO_MANY_CONNECTIONS
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || code.code().starts_with("08")
            }),
            _ => false,
        }
    }
}

/// Whether an error without a server answer means the connection is gone (closed, or cut by
/// an I/O error). Any other such error is ours (a value that cannot be encoded): permanent.
pub fn connection_lost(error: &tokio_postgres::Error) -> bool {
    error.is_closed()
        || error
            .source()
            .is_some_and(|cause| cause.is::<std::io::Error>())
}

/// What a database error means to a command that can be run again from its saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbFault {
    /// Gone by itself if tried again on a new connection: the connection was lost or closed
    /// (a terminated backend, a restart, a network cut), the server is starting or shutting
    /// down, or a transaction lost a serialization conflict or a deadlock. Says what happened.
    Transient(String),
    /// The server could not be reached at all. Transient only for a caller that reached it
    /// before: a wrong `DATABASE_URL` looks exactly like this.
    Unreachable(String),
    /// `statement_timeout` cancelled a statement: it will again, until someone raises it.
    StatementTimeout,
}

impl DbFault {
    /// The fault one error of a chain stands for: a `tokio_postgres::Error` or a [`DbError`].
    /// `None` for any other error, and for permanent database errors (permission denied, no
    /// such column, bad data…).
    pub fn of(error: &(dyn StdError + 'static)) -> Option<DbFault> {
        if let Some(error) = error.downcast_ref::<tokio_postgres::Error>() {
            return DbFault::of_postgres(error);
        }
        if let Some(error) = error.downcast_ref::<DbError>() {
            return match error {
                DbError::Connect { .. } => Some(DbFault::Unreachable(error.to_string())),
                _ => error
                    .is_retryable()
                    .then(|| DbFault::Transient(error.to_string())),
            };
        }
        None
    }

    fn of_postgres(error: &tokio_postgres::Error) -> Option<DbFault> {
        let Some(db_error) = error.as_db_error() else {
            return connection_lost(error).then(|| {
                DbFault::Transient(if error.is_closed() {
                    "the connection was closed".to_owned()
                } else {
                    error_chain(error)
                })
            });
        };
        let code = db_error.code();
        if *code == SqlState::QUERY_CANCELED && db_error.message().contains("statement timeout") {
            return Some(DbFault::StatementTimeout);
        }
        let transient = *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::TOO_MANY_CONNECTIONS
            || code.code().starts_with("08");
        transient.then(|| DbFault::Transient(format!("{} ({})", db_error.message(), code.code())))
    }
}

/// A parsed `DATABASE_URL`: the tokio-postgres configuration without the TLS parameters, plus
/// what libpq would do about TLS.
#[derive(Debug, Clone)]
pub struct DbTarget {
    /// Holds the password; its `Debug` redacts it.
    config: Config,
    ssl_mode: SslMode,
    root_cert: RootCert,
    tls_options: TlsOptions,
}

/// Where the root certificates for checking the server come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootCert {
    /// `sslrootcert=<path>`, or libpq's default `~/.postgresql/root.crt` (`explicit: false`).
    File { path: PathBuf, explicit: bool },
    /// `sslrootcert=system`: the operating system's trusted roots.
    System,
    /// No `sslrootcert` and no home directory to find the default file in.
    Unknown,
}

/// What libpq takes from the process when the connection string does not say.
#[derive(Debug, Clone, Default)]
struct Defaults {
    /// `PGSSLMODE`.
    sslmode: Option<String>,
    /// `PGSSLROOTCERT`.
    sslrootcert: Option<String>,
    /// `$HOME`, else the passwd entry's home: where `~/.postgresql/root.crt` lives.
    home: Option<PathBuf>,
    /// The effective user's login name: the user when the string names none.
    os_user: Option<String>,
}

impl Defaults {
    fn from_process() -> Defaults {
        let non_empty_var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let passwd_entry = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten();
        let home = non_empty_var("HOME")
            .map(PathBuf::from)
            .or_else(|| passwd_entry.as_ref().map(|user| user.dir.clone()));
        Defaults {
            sslmode: non_empty_var("PGSSLMODE"),
            sslrootcert: non_empty_var("PGSSLROOTCERT"),
            home,
            os_user: passwd_entry.map(|user| user.name),
        }
    }
}

/// The libpq TLS parameters taken out of the connection string.
#[derive(Debug, Default)]
struct SslParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslsni: Option<String>,
    min_protocol: Option<String>,
    max_protocol: Option<String>,
}

/// Parameters this module reads or refuses instead of tokio-postgres, which would reject
/// most of them as unknown. `sslnegotiation` is not among them: tokio-postgres supports it.
fn is_ssl_param(key: &str) -> bool {
    matches!(
        key,
        "sslmode"
            | "sslrootcert"
            | "sslsni"
            | "ssl_min_protocol_version"
            | "ssl_max_protocol_version"
            | "sslcompression"
            | "sslpassword"
            | "sslcert"
            | "sslkey"
            | "sslcertmode"
            | "sslcrl"
            | "sslcrldir"
            | "sslkeylogfile"
            | "gssencmode"
    )
}

impl SslParams {
    /// Records one parameter for which `is_ssl_param` holds. Values are never quoted in
    /// errors: `sslpassword` is a secret.
    fn take(&mut self, key: &str, value: String) -> Result<(), DbError> {
        let unsupported = |what| {
            Err(DbError::Unsupported {
                param: key.to_owned(),
                what,
            })
        };
        match key {
            "sslmode" => self.sslmode = Some(value),
            "sslrootcert" => self.sslrootcert = Some(value),
            "sslsni" => self.sslsni = Some(value),
            "ssl_min_protocol_version" => self.min_protocol = Some(value),
            "ssl_max_protocol_version" => self.max_protocol = Some(value),
            // libpq ignores sslcompression nowadays; sslpassword only unlocks an sslkey.
            "sslcompression" | "sslpassword" => {}
            // An empty value means "not set" to libpq.
            "sslcert" | "sslkey" if value.is_empty() => {}
            "sslcert" | "sslkey" => return unsupported("client certificates"),
            "sslcertmode" => match value.as_str() {
                // No client certificate is ever sent, which is what both of these allow.
                "" | "disable" | "allow" => {}
                _ => return unsupported("client certificates"),
            },
            "sslcrl" | "sslcrldir" if value.is_empty() => {}
            "sslcrl" | "sslcrldir" => return unsupported("certificate revocation lists"),
            "sslkeylogfile" if value.is_empty() => {}
            "sslkeylogfile" => return unsupported("tls key logging"),
            "gssencmode" => match value.as_str() {
                // Without GSSAPI, libpq treats prefer like disable.
                "" | "disable" | "prefer" => {}
                _ => return unsupported("gssapi encryption"),
            },
            _ => {}
        }
        Ok(())
    }

    fn tls_options(&self) -> Result<TlsOptions, DbError> {
        let sni = match self.sslsni.as_deref() {
            None | Some("" | "1") => true,
            Some("0") => false,
            Some(_) => return Err(invalid("sslsni must be 0 or 1")),
        };
        // rustls speaks TLS 1.2 and 1.3; libpq's default minimum is 1.2 as well.
        let min = parse_protocol_version(self.min_protocol.as_deref(), "ssl_min_protocol_version")?
            .unwrap_or(2);
        let max = parse_protocol_version(self.max_protocol.as_deref(), "ssl_max_protocol_version")?
            .unwrap_or(3);
        if max < 2 {
            return Err(DbError::Unsupported {
                param: "ssl_max_protocol_version".to_owned(),
                what: "tls versions before TLSv1.2",
            });
        }
        if min > max {
            return Err(invalid(
                "ssl_min_protocol_version is above ssl_max_protocol_version; lower the one or raise the other",
            ));
        }
        let tls12 = min <= 2;
        let tls13 = max >= 3;
        Ok(TlsOptions { sni, tls12, tls13 })
    }
}

/// libpq's `TLSv1` .. `TLSv1.3` (any case), as the minor version: 0 ..= 3.
fn parse_protocol_version(value: Option<&str>, param: &str) -> Result<Option<u8>, DbError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let minor = match value.to_ascii_lowercase().as_str() {
        "tlsv1" => 0,
        "tlsv1.1" => 1,
        "tlsv1.2" => 2,
        "tlsv1.3" => 3,
        _ => {
            return Err(invalid(&format!(
                "{param} must be one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"
            )));
        }
    };
    Ok(Some(minor))
}

fn invalid(reason: &str) -> DbError {
    DbError::Invalid {
        reason: reason.to_owned(),
    }
}

/// For a string that is not a connection string at all: shows the two shapes it may take.
fn syntax_error(reason: &str) -> DbError {
    invalid(&format!(
        "{reason}; write it as postgres://user:password@host:port/dbname?sslmode=require or as key=value pairs such as host=localhost user=postgres dbname=mydb"
    ))
}

impl DbTarget {
    /// Reads a connection string in URL form
    /// (`postgres://user:pw@host:port/db?sslmode=require&sslrootcert=/path`) or libpq
    /// `key=value` form (`host=/tmp/sock user=postgres dbname=x sslmode=disable`). As libpq,
    /// it falls back to `PGSSLMODE` and `PGSSLROOTCERT`, and to the login name for the user.
    pub fn parse(url: &str) -> Result<DbTarget, DbError> {
        DbTarget::parse_with(url, &Defaults::from_process())
    }

    fn parse_with(url: &str, defaults: &Defaults) -> Result<DbTarget, DbError> {
        let url = url.trim();
        if url.is_empty() {
            return Err(DbError::Empty);
        }
        let (rest, ssl_params) = split_ssl_params(url)?;
        let tls_options = ssl_params.tls_options()?;
        // tokio-postgres's messages name options and positions, never values.
        let mut config =
            Config::from_str(&rest).map_err(|error| syntax_error(&error_chain(&error)))?;

        if config.get_hosts().is_empty() {
            if config.get_hostaddrs().is_empty() {
                return Err(invalid(
                    "it names no host; add one, e.g. postgres://user@localhost:5432/dbname or host=/var/run/postgresql",
                ));
            }
            // tokio-postgres uses the host as the TLS server name and cannot do TLS without
            // one; the address itself is the name libpq would check against.
            let hostaddrs = config.get_hostaddrs().to_vec();
            for hostaddr in hostaddrs {
                config.host(hostaddr.to_string());
            }
        }
        if config.get_user().is_none() {
            let Some(os_user) = &defaults.os_user else {
                return Err(invalid(
                    "it names no user and the current login name is unknown; add one, e.g. postgres://user@host/dbname",
                ));
            };
            config.user(os_user.clone());
        }

        let root_cert = match ssl_params
            .sslrootcert
            .filter(|v| !v.is_empty())
            .or_else(|| defaults.sslrootcert.clone())
        {
            Some(value) if value == "system" => RootCert::System,
            Some(path) => RootCert::File {
                path: PathBuf::from(path),
                explicit: true,
            },
            None => match &defaults.home {
                Some(home) => RootCert::File {
                    path: home.join(".postgresql").join("root.crt"),
                    explicit: false,
                },
                None => RootCert::Unknown,
            },
        };

        let ssl_mode = match (ssl_params.sslmode, &defaults.sslmode) {
            (Some(value), _) => SslMode::from_str(&value)?,
            (None, Some(value)) => {
                SslMode::from_str(value).map_err(|_| DbError::InvalidSslMode {
                    value: value.clone(),
                    origin: "PGSSLMODE",
                })?
            }
            // libpq: the system's roots only make sense with host name checks, so they make
            // verify-full the default.
            (None, None) if root_cert == RootCert::System => SslMode::VerifyFull,
            (None, None) => SslMode::Prefer,
        };
        if root_cert == RootCert::System && ssl_mode != SslMode::VerifyFull {
            return Err(invalid(&format!(
                "weak sslmode={ssl_mode} may not be used with sslrootcert=system; use sslmode=verify-full"
            )));
        }

        // libpq never uses TLS on a unix socket, whatever sslmode says.
        let unix_hosts = config
            .get_hosts()
            .iter()
            .filter(|host| matches!(host, Host::Unix(_)))
            .count();
        let unix_only = unix_hosts == config.get_hosts().len() && config.get_hostaddrs().is_empty();
        if unix_only {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        } else if unix_hosts > 0 && ssl_mode.requires_tls() {
            // tokio-postgres has one sslmode for all hosts, and a unix socket would refuse
            // the TLS that this mode makes mandatory.
            return Err(invalid(&format!(
                "it mixes unix-socket and tcp hosts, which is not supported with sslmode={ssl_mode}; list only tcp hosts"
            )));
        } else {
            config.ssl_mode(ssl_mode.to_tokio_postgres());
        }

        Ok(DbTarget {
            config,
            ssl_mode,
            root_cert,
            tls_options,
        })
    }

    /// The `sslmode` asked for (`prefer` when the string and `PGSSLMODE` say nothing).
    /// The user the connection logs in as, when the string names one.
    pub fn user(&self) -> Option<&str> {
        self.config.get_user()
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The database the server will open: `dbname`, or else the user name, as Postgres
    /// defaults it.
    pub fn database_name(&self) -> Option<&str> {
        self.config.get_dbname().or(self.config.get_user())
    }

    /// "user@host:port/dbname" — for messages. NEVER includes the password.
    ///
    /// Several hosts are joined with commas; a unix socket shows as its folder.
    pub fn display_safe(&self) -> String {
        let user = self.config.get_user().unwrap_or_default();
        let ports = self.config.get_ports();
        let hosts = self
            .config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match host {
                    Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                    Host::Tcp(name) => format!("{name}:{port}"),
                    Host::Unix(folder) => format!("{}:{port}", folder.display()),
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        let database = self.database_name().unwrap_or_default();
        format!("{user}@{hosts}/{database}")
    }

    /// Connects and spawns the connection's task on the current tokio runtime. TLS, when the
    /// mode asks for it, is rustls with the ring provider.
    pub async fn connect(&self) -> Result<Client, DbError> {
        let target = self.display_safe();
        if self.config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
            return connect_with(&self.config, NoTls, target).await;
        }
        let tls = MakeTls(MakeRustlsConnect::new(self.client_tls_config()?));
        connect_with(&self.config, tls, target).await
    }

    /// Asks the server to cancel the query running on the connection `token` came from,
    /// over a new connection made as [`DbTarget::connect`] makes it (TLS included).
    pub async fn cancel_query(&self, token: &tokio_postgres::CancelToken) -> Result<(), DbError> {
        let target = self.display_safe();
        let result = if self.config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
            token.cancel_query(NoTls).await
        } else {
            let tls = MakeTls(MakeRustlsConnect::new(self.client_tls_config()?));
            token.cancel_query(tls).await
        };
        result.map_err(|error| classify_connect_error(target, error))
    }

    /// How the server's certificate will be checked, with the root certificates loaded.
    fn verification(&self) -> Result<Verification, DbError> {
        match self.ssl_mode {
            // A check that libpq would fall back from (to plain text) protects nothing.
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => Ok(Verification::AcceptAny),
            SslMode::Require => match &self.root_cert {
                // libpq, for compatibility: a root certificate file makes require verify-ca.
                RootCert::File { path, .. } if path.exists() => {
                    Ok(Verification::ChainOnly(load_root_file(path)?))
                }
                // Refused at parse time, but the system roots are the safe reading.
                RootCert::System => Ok(Verification::ChainOnly(load_system_roots()?)),
                RootCert::File { .. } | RootCert::Unknown => Ok(Verification::AcceptAny),
            },
            SslMode::VerifyCa => Ok(Verification::ChainOnly(self.required_roots()?)),
            SslMode::VerifyFull => Ok(Verification::Full(self.required_roots()?)),
        }
    }

    fn required_roots(&self) -> Result<RootCertStore, DbError> {
        match &self.root_cert {
            RootCert::File { path, .. } if path.exists() => Ok(load_root_file(path)?),
            RootCert::File { path, explicit } => Err(DbError::RootCertMissing {
                mode: self.ssl_mode,
                path: if *explicit {
                    path.display().to_string()
                } else {
                    format!(
                        "{} (libpq's default when sslrootcert is not given)",
                        path.display()
                    )
                },
            }),
            RootCert::System => Ok(load_system_roots()?),
            RootCert::Unknown => Err(DbError::RootCertMissing {
                mode: self.ssl_mode,
                path: "~/.postgresql/root.crt (no home directory found)".to_owned(),
            }),
        }
    }

    fn client_tls_config(&self) -> Result<rustls::ClientConfig, DbError> {
        // Direct TLS (PostgreSQL 17) needs the ALPN name; the classic SSLRequest does not,
        // and some TLS-terminating proxies refuse names they do not know.
        let alpn = self.config.get_ssl_negotiation() == SslNegotiation::Direct;
        Ok(tls::client_config(
            self.verification()?,
            self.tls_options,
            alpn,
        )?)
    }
}

/// Takes the libpq TLS parameters out of either syntax; returns the rest for tokio-postgres.
fn split_ssl_params(url: &str) -> Result<(String, SslParams), DbError> {
    let mut ssl_params = SslParams::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let rest = split_url_query(url, &mut ssl_params)?;
        return Ok((rest, ssl_params));
    }
    if let Some((scheme, _)) = url.split_once("://")
        && !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Err(invalid(&format!(
            "the scheme \"{scheme}://\" is not postgres:// or postgresql://; start it with postgres://"
        )));
    }
    let mut rest = Vec::new();
    for (key, value) in parse_keyword_values(url)? {
        if is_ssl_param(&key) {
            ssl_params.take(&key, value)?;
        } else {
            rest.push(format!("{key}={}", quote_value(&value)));
        }
    }
    Ok((rest.join(" "), ssl_params))
}

/// Edits the query string of the URL form. tokio-postgres reads the credentials up to the
/// first '@' (so a password may hold '?'), then the query from the next '?'.
fn split_url_query(url: &str, ssl_params: &mut SslParams) -> Result<String, DbError> {
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(query_start) = url[after_credentials..]
        .find('?')
        .map(|i| i + after_credentials)
    else {
        return Ok(url.to_owned());
    };
    let decode = |raw: &str| {
        percent_decode_str(raw)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|_| syntax_error("a query parameter is not valid utf-8 once percent-decoded"))
    };
    let mut kept = Vec::new();
    for part in url[query_start + 1..].split('&') {
        if part.is_empty() {
            continue;
        }
        let Some((raw_key, raw_value)) = part.split_once('=') else {
            return Err(syntax_error("a query parameter has no \"=\""));
        };
        let key = decode(raw_key)?;
        if is_ssl_param(&key) {
            ssl_params.take(&key, decode(raw_value)?)?;
        } else {
            kept.push(part);
        }
    }
    let mut rest = url[..query_start].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(rest)
}

/// libpq's `isspace` in the C locale.
fn is_libpq_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

const UNTERMINATED_QUOTE: &str =
    "a quoted value has no closing quote; end it with ' and write a quote inside as \\'";

/// Reads libpq's `key=value` syntax: spaces around '=' allowed, a value either single-quoted
/// or ending at a space, a backslash taking the next character literally in both.
fn parse_keyword_values(s: &str) -> Result<Vec<(String, String)>, DbError> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.next_if(|&c| is_libpq_space(c)).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && !is_libpq_space(c)) {
            key.push(c);
        }
        skip_spaces(&mut chars);
        // The keyword is not quoted: when '=' is missing it may be a piece of a password
        // that should have been quoted.
        if key.is_empty() || chars.next() != Some('=') {
            return Err(invalid(
                "a keyword has no \"=\" after it; write key=value pairs and quote values with spaces as key='a b'",
            ));
        }
        skip_spaces(&mut chars);
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(invalid(UNTERMINATED_QUOTE));
                    }
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(escaped) => value.push(escaped),
                        None => {
                            return Err(invalid(UNTERMINATED_QUOTE));
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|&c| !is_libpq_space(c)) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Quotes a value for tokio-postgres's `key=value` parser, which reads libpq's escapes.
fn quote_value(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

async fn connect_with<T>(config: &Config, tls: T, target: String) -> Result<Client, DbError>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = match config.connect(tls).await {
        Ok(pair) => pair,
        Err(error) => return Err(classify_connect_error(target, error)),
    };
    tokio::spawn(async move {
        // Queries on the client fail with "connection closed" when this ends; the cause is
        // only here. `target` names no password, and tokio-postgres's errors name none.
        if let Err(error) = connection.await {
            eprintln!(
                "warning: the connection to the database at {target} failed: {}",
                error_chain(&error)
            );
        }
    });
    Ok(client)
}

fn classify_connect_error(target: String, error: tokio_postgres::Error) -> DbError {
    if let Some(code) = error.code() {
        if code.code().starts_with("28") {
            return DbError::Login { target, error };
        }
        return DbError::Refused { target, error };
    }
    if is_tls_error(&error) {
        return DbError::Tls { target, error };
    }
    // The server asked for a password the string does not give: a login problem, not a
    // reason to try again later.
    if error_chain(&error).ends_with("password missing") {
        return DbError::Login { target, error };
    }
    DbError::Connect { target, error }
}

/// tokio-postgres's error kinds are private: its TLS errors display as this text, and
/// rustls's errors reach it wrapped in an `io::Error`.
fn is_tls_error(error: &tokio_postgres::Error) -> bool {
    if error.to_string() == "error performing TLS handshake" {
        return true;
    }
    let mut cause: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(current) = cause {
        if current.is::<rustls::Error>() {
            return true;
        }
        if let Some(io_error) = current.downcast_ref::<std::io::Error>()
            && io_error
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        cause = current.source();
    }
    false
}

#[cfg(test)]
mod tests;
