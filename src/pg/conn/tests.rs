use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres::config::SslMode as TpSslMode;

use super::*;

const PASSWORD: &str = "s3cr3t-pw";

/// A CA, a second unrelated CA, and a leaf for DNS name `localhost` signed by the first
/// (ECDSA P-256, valid 2000–2100), made once with `openssl ca`.
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBaDCCAQ6gAwIBAgICEAAwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPZW1iYXRj
aCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAaMRgw
FgYDVQQDDA9lbWJhdGNoIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AAQerPtSIimXWxgz0DjYTY4rBUFky48stujDL8Obt2bWf7r9BjTDB/Ai8lHgyUgL
tSPvm4yFxHw9+MYD84sB4+K8o0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB
/wQEAwIBBjAdBgNVHQ4EFgQUwp6G22rlgDqE/Esxyui/J74Dlz4wCgYIKoZIzj0E
AwIDSAAwRQIhAPbXa8Dc8ahoTR857Qhc05vYetn4k7rN9GTLVkxEvVyzAiAmyx+U
XMfBItJB7Bm36KnI4koowwFlEhhJedOQDBDmmg==
-----END CERTIFICATE-----
";
const OTHER_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBajCCARCgAwIBAgICEAEwCgYIKoZIzj0EAwIwGzEZMBcGA1UEAwwQZW1iYXRj
aCBvdGhlciBDQTAgFw0wMDAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAwMFowGzEZ
MBcGA1UEAwwQZW1iYXRjaCBvdGhlciBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABFzdH6hU9ivRj7wcSTyRL+UwGaXrUYxeEaoVfBVkupWazJZwAUWi3B43Lq42
nFmeEmLNlTP6VzyMRIldCuDhuaijQjBAMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0P
AQH/BAQDAgEGMB0GA1UdDgQWBBTTc566wp89kQ78NskTfZpMEeflXzAKBggqhkjO
PQQDAgNIADBFAiEA/n31yU0oC5cm/U7108fARd3rfeOvEnE9qVGwzuN8afQCIG+9
Qn+cqRvsV3Bb5k2WZwRW8o144Pi/5xHg56l336I9
-----END CERTIFICATE-----
";
const LEAF_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBrTCCAVOgAwIBAgICEAIwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPZW1iYXRj
aCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAUMRIw
EAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATwH1+/
gheEuvVr33vEKUF2G0WGbR/QzSAbLyDD0qm3AwiG4rKfn7LcK0qwQXeLhRHEPQJO
xeKvrN8Hx4fjuxLAo4GMMIGJMBQGA1UdEQQNMAuCCWxvY2FsaG9zdDAMBgNVHRMB
Af8EAjAAMA4GA1UdDwEB/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDATAfBgNV
HSMEGDAWgBTCnobbauWAOoT8SzHK6L8nvgOXPjAdBgNVHQ4EFgQUAQzjssBUkwsV
xoqlTZMcCCla0MwwCgYIKoZIzj0EAwIDSAAwRQIgW+aFex7ZinqzWqFUcW4J/DVa
MdBGcFj/Ui/b7GqkdGgCIQDnI2Bb2BEsoX211KkrOpa23XqppYwMym5d/5lsCa6f
6Q==
-----END CERTIFICATE-----
";
const LEAF_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgc1sZtNa3ordLd6wy
v+Hgo+/TNAuRu9rOCcSFSUvWauuhRANCAATwH1+/gheEuvVr33vEKUF2G0WGbR/Q
zSAbLyDD0qm3AwiG4rKfn7LcK0qwQXeLhRHEPQJOxeKvrN8Hx4fjuxLA
-----END PRIVATE KEY-----
";

/// A home folder without `~/.postgresql/root.crt`, and no PG* variables.
struct Env {
    home: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn defaults(&self) -> Defaults {
        Defaults {
            sslmode: None,
            sslrootcert: None,
            home: Some(self.home.path().to_owned()),
            os_user: Some("osuser".to_owned()),
        }
    }

    fn parse(&self, url: &str) -> Result<DbTarget, DbError> {
        DbTarget::parse_with(url, &self.defaults())
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.home.path().join(name);
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(&path, contents).unwrap();
        path
    }
}

fn assert_no_password(error: DbError) {
    let shown = error.to_string();
    let debug = format!("{error:?}");
    let wrapped = format!(
        "{:#}",
        anyhow::Error::new(error).context("opening the database")
    );
    for text in [&shown, &debug, &wrapped] {
        assert!(!text.contains(PASSWORD), "password leaked: {text}");
    }
}

#[test]
fn url_form_strips_and_records_tls_params() {
    let env = Env::new();
    let target = env
            .parse(&format!(
                "postgres://alice:{PASSWORD}@db.example.com:6543/app?sslmode=require&sslrootcert=%2Fetc%2Fmy%20ca.pem&application_name=embatch"
            ))
            .unwrap();
    assert_eq!(target.ssl_mode(), SslMode::Require);
    assert_eq!(
        target.root_cert,
        RootCert::File {
            path: PathBuf::from("/etc/my ca.pem"),
            explicit: true
        }
    );
    assert_eq!(target.config.get_password(), Some(PASSWORD.as_bytes()));
    assert_eq!(target.config.get_application_name(), Some("embatch"));
    assert_eq!(target.config.get_ssl_mode(), TpSslMode::Require);
    assert_eq!(target.database_name(), Some("app"));
    assert_eq!(target.display_safe(), "alice@db.example.com:6543/app");
    assert!(!format!("{target:?}").contains(PASSWORD));
}

#[test]
fn url_password_may_hold_question_mark_and_encoded_chars() {
    let env = Env::new();
    let target = env
        .parse("postgresql://bob:p%40ss?w0rd@h/db?sslmode=disable")
        .unwrap();
    assert_eq!(target.config.get_password(), Some("p@ss?w0rd".as_bytes()));
    assert_eq!(target.ssl_mode(), SslMode::Disable);
    assert_eq!(target.display_safe(), "bob@h:5432/db");
}

#[test]
fn key_value_form_strips_tls_params_and_keeps_quoted_values() {
    let env = Env::new();
    let target = env
            .parse(
                r"host = db.example.com port=5433 user=bob password='s3cr3t-pw it\'s' dbname=x sslmode=verify-full sslrootcert='/tmp/my ca.pem' application_name=a\ b",
            )
            .unwrap();
    assert_eq!(target.ssl_mode(), SslMode::VerifyFull);
    assert_eq!(
        target.root_cert,
        RootCert::File {
            path: PathBuf::from("/tmp/my ca.pem"),
            explicit: true
        }
    );
    assert_eq!(
        target.config.get_password(),
        Some("s3cr3t-pw it's".as_bytes())
    );
    assert_eq!(target.config.get_application_name(), Some("a b"));
    assert_eq!(target.display_safe(), "bob@db.example.com:5433/x");
}

#[test]
fn key_value_parser_follows_libpq() {
    let pairs = parse_keyword_values(r"a=1  b = 'x y' c='' d=\'q e='\\'").unwrap();
    let expected = [
        ("a", "1"),
        ("b", "x y"),
        ("c", ""),
        ("d", "'q"),
        ("e", "\\"),
    ];
    assert_eq!(
        pairs,
        expected.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec()
    );
    for bad in ["a", "a=1 b", "=1", "a='open"] {
        assert!(parse_keyword_values(bad).is_err(), "{bad}");
    }
    // What we hand to tokio-postgres reads back the same.
    let tricky = r"it's \ a\b";
    let config = Config::from_str(&format!("password={}", quote_value(tricky))).unwrap();
    assert_eq!(config.get_password(), Some(tricky.as_bytes()));
}

#[test]
fn unix_socket_hosts_in_both_url_spellings() {
    let env = Env::new();
    for url in [
        "postgresql://postgres@%2Ftmp%2Fsock/db",
        "postgresql://postgres@/db?host=/tmp/sock",
        "postgresql://postgres@/db?host=%2Ftmp%2Fsock&sslmode=verify-full",
        "host=/tmp/sock user=postgres dbname=db sslmode=require",
    ] {
        let target = env.parse(url).unwrap();
        assert_eq!(
            target.config.get_hosts(),
            [Host::Unix(PathBuf::from("/tmp/sock"))],
            "{url}"
        );
        // libpq ignores sslmode on unix sockets.
        assert_eq!(target.config.get_ssl_mode(), TpSslMode::Disable, "{url}");
        assert_eq!(target.display_safe(), "postgres@/tmp/sock:5432/db");
    }
}

#[test]
fn mixing_unix_and_tcp_hosts_is_refused_only_when_tls_is_required() {
    let env = Env::new();
    let mixed = "host=/tmp/sock,db.example.com user=u";
    assert_eq!(
        env.parse(mixed).unwrap().config.get_ssl_mode(),
        TpSslMode::Prefer
    );
    let error = env.parse(&format!("{mixed} sslmode=require")).unwrap_err();
    assert!(
        error.to_string().contains("unix-socket and tcp hosts"),
        "{error}"
    );
}

#[test]
fn defaults_follow_libpq() {
    let env = Env::new();
    let target = env.parse("postgres://db.example.com").unwrap();
    assert_eq!(target.ssl_mode(), SslMode::Prefer);
    assert_eq!(target.config.get_ssl_mode(), TpSslMode::Prefer);
    assert_eq!(target.config.get_user(), Some("osuser"));
    assert_eq!(target.database_name(), Some("osuser"));
    assert_eq!(target.display_safe(), "osuser@db.example.com:5432/osuser");
    assert_eq!(
        target.root_cert,
        RootCert::File {
            path: env.home.path().join(".postgresql/root.crt"),
            explicit: false
        }
    );

    let mut defaults = env.defaults();
    defaults.sslmode = Some("verify-ca".to_owned());
    defaults.sslrootcert = Some("/etc/ca.pem".to_owned());
    let from_env = DbTarget::parse_with("host=h user=u", &defaults).unwrap();
    assert_eq!(from_env.ssl_mode(), SslMode::VerifyCa);
    assert!(matches!(
        from_env.root_cert,
        RootCert::File { explicit: true, .. }
    ));
    let url_wins = DbTarget::parse_with("host=h user=u sslmode=disable", &defaults).unwrap();
    assert_eq!(url_wins.ssl_mode(), SslMode::Disable);

    defaults.sslmode = Some("bogus".to_owned());
    let error = DbTarget::parse_with("host=h user=u", &defaults).unwrap_err();
    assert!(error.to_string().contains("in PGSSLMODE"), "{error}");
}

#[test]
fn sslrootcert_system_means_verify_full() {
    let env = Env::new();
    let target = env.parse("postgres://u@h/db?sslrootcert=system").unwrap();
    assert_eq!(target.ssl_mode(), SslMode::VerifyFull);
    assert_eq!(target.root_cert, RootCert::System);
    let error = env
        .parse("postgres://u@h/db?sslrootcert=system&sslmode=require")
        .unwrap_err();
    assert!(
        error.to_string().contains("use sslmode=verify-full"),
        "{error}"
    );
}

#[test]
fn hostaddr_alone_becomes_the_host() {
    let env = Env::new();
    let target = env
        .parse("hostaddr=10.0.0.5 user=u sslmode=require")
        .unwrap();
    assert_eq!(
        target.config.get_hosts(),
        [Host::Tcp("10.0.0.5".to_owned())]
    );
    assert_eq!(target.display_safe(), "u@10.0.0.5:5432/u");
}

#[test]
fn invalid_sslmode_lists_the_valid_ones() {
    let env = Env::new();
    for url in [
        "postgres://u@h/db?sslmode=verify_full",
        "host=h user=u sslmode=Require",
    ] {
        let error = env.parse(url).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("disable, allow, prefer, require, verify-ca, verify-full"),
            "{text}"
        );
        assert!(text.starts_with("invalid sslmode"), "{text}");
    }
}

#[test]
fn unsupported_and_ignored_ssl_params() {
    let env = Env::new();
    for (param, what) in [
        ("sslcert=/c.pem", "client certificates"),
        ("sslkey=/k.pem", "client certificates"),
        ("sslcrl=/crl.pem", "revocation"),
        ("gssencmode=require", "gssapi"),
        ("ssl_max_protocol_version=TLSv1.1", "before TLSv1.2"),
    ] {
        let error = env
            .parse(&format!("postgres://u:{PASSWORD}@h/db?{param}"))
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("not supported yet") && text.contains(what),
            "{text}"
        );
        assert_no_password(error);
    }
    let target = env
            .parse(&format!(
                "host=h user=u sslcompression=0 sslpassword={PASSWORD} gssencmode=disable sslcert='' sslsni=0 ssl_min_protocol_version=TLSv1.3 channel_binding=require"
            ))
            .unwrap();
    assert_eq!(
        target.tls_options,
        TlsOptions {
            sni: false,
            tls12: false,
            tls13: true
        }
    );
    assert!(!format!("{target:?}").contains(PASSWORD));
}

#[test]
fn parse_errors_never_show_the_password() {
    let env = Env::new();
    for url in [
        format!("postgres://u:{PASSWORD}@h:notaport/db"),
        format!("postgres://u:{PASSWORD}@h/db?nosuchoption=1"),
        format!("postgres://u:{PASSWORD}@h/db?sslmode"),
        format!("mysql://u:{PASSWORD}@h/db"),
        format!("host=h user=u password='{PASSWORD}"),
        format!("host=h user=u password={PASSWORD} x"),
        format!("host=h user=u password={PASSWORD} port=x"),
    ] {
        let error = env.parse(&url).unwrap_err();
        assert!(matches!(error, DbError::Invalid { .. }), "{url}: {error}");
        assert_no_password(error);
    }
    assert!(matches!(env.parse("  "), Err(DbError::Empty)));
}

#[tokio::test]
async fn verify_full_without_a_root_certificate_fails_clearly() {
    let env = Env::new();
    for url in [
        "postgres://u@127.0.0.1:1/db?sslmode=verify-full",
        "postgres://u@127.0.0.1:1/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
    ] {
        let error = env.parse(url).unwrap().connect().await.unwrap_err();
        assert!(matches!(error, DbError::RootCertMissing { .. }), "{error}");
        let text = error.to_string();
        assert!(
            text.starts_with("root certificate file does not exist"),
            "{text}"
        );
        assert!(text.contains("change sslmode"), "{text}");
    }
    // No home folder at all: still the same clear error.
    let mut defaults = env.defaults();
    defaults.home = None;
    let target = DbTarget::parse_with(
        "host=127.0.0.1 port=1 user=u sslmode=verify-full",
        &defaults,
    )
    .unwrap();
    assert!(matches!(
        target.connect().await,
        Err(DbError::RootCertMissing { .. })
    ));
}

#[test]
fn require_with_a_root_file_checks_the_chain_as_libpq_does() {
    let env = Env::new();
    let target = env.parse("host=h user=u sslmode=require").unwrap();
    assert!(matches!(target.verification(), Ok(Verification::AcceptAny)));
    env.write(".postgresql/root.crt", CA_PEM);
    assert!(matches!(
        target.verification(),
        Ok(Verification::ChainOnly(_))
    ));

    let garbage = env.write("garbage.pem", "not a certificate");
    let target = env
        .parse(&format!(
            "host=h user=u sslmode=verify-ca sslrootcert={}",
            garbage.display()
        ))
        .unwrap();
    let error = target.verification().err().unwrap();
    assert!(
        matches!(error, DbError::RootCertUnreadable { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("garbage.pem"), "{error}");
}

#[tokio::test]
async fn connect_to_a_closed_port_names_the_target_not_the_password() {
    let env = Env::new();
    for mode in ["disable", "prefer", "require"] {
        let target = env
            .parse(&format!(
                "postgres://alice:{PASSWORD}@127.0.0.1:1/app?sslmode={mode}"
            ))
            .unwrap();
        let error = target.connect().await.unwrap_err();
        assert!(matches!(error, DbError::Connect { .. }), "{error}");
        assert!(error.is_retryable());
        let text = error.to_string();
        assert!(
            text.starts_with("could not connect to the database at alice@127.0.0.1:1/app: "),
            "{text}"
        );
        assert!(
            text.ends_with("; check DATABASE_URL and that the server is running"),
            "{text}"
        );
        assert_no_password(error);
    }
}

// A stand-in server: answers the SSLRequest, optionally does TLS with the test leaf
// certificate, then accepts any login and says ready. Enough for tokio-postgres's connect.

#[derive(Debug, Default)]
struct Seen {
    tls: bool,
    sni: Option<String>,
    user: Option<String>,
}

const SSL_REQUEST_CODE: u32 = 80_877_103;

fn read_message(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0; 4];
    stream.read_exact(&mut len)?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize - 4];
    stream.read_exact(&mut body)?;
    Ok(body)
}

/// Reads the startup message, logs in, and waits for the client to hang up.
fn accept_login(stream: &mut (impl Read + Write), seen: &mut Seen) {
    let Ok(startup) = read_message(stream) else {
        return;
    };
    let fields: Vec<&[u8]> = startup[4..].split(|&b| b == 0).collect();
    seen.user = fields
        .chunks(2)
        .find(|pair| pair[0] == b"user")
        .map(|pair| String::from_utf8_lossy(pair[1]).into_owned());
    let auth_ok = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];
    let ready = [b'Z', 0, 0, 0, 5, b'I'];
    if stream.write_all(&auth_ok).is_err() || stream.write_all(&ready).is_err() {
        return;
    }
    let _ = stream.flush();
    let mut sink = [0; 256];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

fn fake_server(tls: bool) -> (u16, JoinHandle<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let mut seen = Seen::default();
        let (mut tcp, _) = listener.accept().unwrap();
        let Ok(first) = read_message(&mut tcp) else {
            return seen;
        };
        assert_eq!(
            first,
            SSL_REQUEST_CODE.to_be_bytes(),
            "expected an SSLRequest"
        );
        if !tls {
            tcp.write_all(b"N").unwrap();
            accept_login(&mut tcp, &mut seen);
            return seen;
        }
        tcp.write_all(b"S").unwrap();
        let leaf = CertificateDer::from_pem_slice(LEAF_PEM.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(LEAF_KEY_PEM.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf], key)
        .unwrap();
        let connection = rustls::ServerConnection::new(Arc::new(config)).unwrap();
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        seen.tls = true;
        accept_login(&mut stream, &mut seen);
        seen.sni = stream.conn.server_name().map(str::to_owned);
        seen
    });
    (port, handle)
}

async fn connect_to_fake(env: &Env, tls: bool, url_rest: &str) -> Result<Seen, DbError> {
    let (port, server) = fake_server(tls);
    let target = env
        .parse(&format!("port={port} user=u {url_rest}"))
        .unwrap();
    let client = target.connect().await?;
    drop(client);
    // Blocking join off the runtime, so the connection task can hang up meanwhile.
    Ok(tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap())
}

#[tokio::test]
async fn tls_modes_against_a_tls_server() {
    let env = Env::new();
    let ca = env.write("ca.pem", CA_PEM);
    let other_ca = env.write("other-ca.pem", OTHER_CA_PEM);
    let ca = ca.display();
    let other_ca = other_ca.display();

    // require: any certificate, TLS used, SNI sent for a DNS name.
    let seen = connect_to_fake(&env, true, "host=localhost sslmode=require")
        .await
        .unwrap();
    assert!(seen.tls);
    assert_eq!(seen.sni.as_deref(), Some("localhost"));
    assert_eq!(seen.user.as_deref(), Some("u"));
    // prefer: TLS when offered.
    let seen = connect_to_fake(&env, true, "host=localhost").await.unwrap();
    assert!(seen.tls);
    // sslsni=0 sends no name.
    let seen = connect_to_fake(&env, true, "host=localhost sslmode=require sslsni=0")
        .await
        .unwrap();
    assert_eq!(seen.sni, None);

    // verify-full: chain and name.
    let seen = connect_to_fake(
        &env,
        true,
        &format!("host=localhost sslmode=verify-full sslrootcert={ca}"),
    )
    .await
    .unwrap();
    assert!(seen.tls);
    let error = connect_to_fake(
        &env,
        true,
        &format!("host=127.0.0.1 sslmode=verify-full sslrootcert={ca}"),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, DbError::Tls { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("tls handshake with the database at u@127.0.0.1:"),
        "{error}"
    );

    // verify-ca: chain only, so the address that is not in the certificate is fine...
    connect_to_fake(
        &env,
        true,
        &format!("host=127.0.0.1 sslmode=verify-ca sslrootcert={ca}"),
    )
    .await
    .unwrap();
    // ...but not a chain to another CA.
    let error = connect_to_fake(
        &env,
        true,
        &format!("host=localhost sslmode=verify-ca sslrootcert={other_ca}"),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, DbError::Tls { .. }), "{error}");
    assert!(!error.is_retryable());

    // require with libpq's default root file behaves as verify-ca.
    env.write(".postgresql/root.crt", OTHER_CA_PEM);
    let error = connect_to_fake(&env, true, "host=localhost sslmode=require")
        .await
        .unwrap_err();
    assert!(matches!(error, DbError::Tls { .. }), "{error}");
}

#[tokio::test]
async fn tls_modes_against_a_plain_server() {
    let env = Env::new();
    let seen = connect_to_fake(&env, false, "host=localhost sslmode=prefer")
        .await
        .unwrap();
    assert!(!seen.tls);
    assert_eq!(seen.user.as_deref(), Some("u"));
    let error = connect_to_fake(&env, false, "host=localhost sslmode=require")
        .await
        .unwrap_err();
    assert!(matches!(error, DbError::Tls { .. }), "{error}");
    assert!(
        error.to_string().contains("server does not support TLS"),
        "{error}"
    );
}

#[tokio::test]
async fn unix_socket_never_asks_for_tls() {
    let env = Env::new();
    let folder = env.home.path().join("sock");
    fs_err::create_dir_all(&folder).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(folder.join(".s.PGSQL.5432")).unwrap();
    let server = std::thread::spawn(move || {
        let mut seen = Seen::default();
        let (mut stream, _) = listener.accept().unwrap();
        let mut len = [0; 4];
        stream.read_exact(&mut len).unwrap();
        let mut code = [0; 4];
        stream.read_exact(&mut code).unwrap();
        // Not an SSLRequest: the startup message itself. Feed the rest to accept_login.
        assert_ne!(code, SSL_REQUEST_CODE.to_be_bytes());
        let mut rest = vec![0; u32::from_be_bytes(len) as usize - 8];
        stream.read_exact(&mut rest).unwrap();
        let mut message = len.to_vec();
        message.extend_from_slice(&code);
        message.extend_from_slice(&rest);
        let mut replay = std::io::Cursor::new(message).chain(stream.try_clone().unwrap());
        let mut both = ReadWrite {
            read: &mut replay,
            write: &mut stream,
        };
        accept_login(&mut both, &mut seen);
        seen
    });
    let target = env
        .parse(&format!(
            "host={} user=u sslmode=verify-full",
            folder.display()
        ))
        .unwrap();
    let client = target.connect().await.unwrap();
    drop(client);
    let seen = tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    assert_eq!(seen.user.as_deref(), Some("u"));
    assert!(!seen.tls);
}

struct ReadWrite<'a, R, W> {
    read: &'a mut R,
    write: &'a mut W,
}

impl<R: Read, W> Read for ReadWrite<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read.read(buf)
    }
}

impl<R, W: Write> Write for ReadWrite<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.write.flush()
    }
}
