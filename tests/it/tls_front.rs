//! TLS against a real Postgres (issue 6, item 4). The throwaway Postgres is built without
//! OpenSSL and listens on a unix socket only, so this module puts a TLS-terminating front
//! before it: a TCP listener on 127.0.0.1 that answers the client's SSLRequest with `S`, does
//! the TLS handshake with rustls and a certificate made at test time (a CA and a leaf for
//! `localhost`, by rcgen), then relays the decrypted stream to the server's socket. It counts
//! the TLS sessions, so a test can tell TLS was really used. A front without TLS answers `N`.
//!
//! The tests run the real binary with `sslmode=require`, `verify-full` + `sslrootcert`, and
//! the refusals libpq would give.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use embatch::emulator::EmulatorConfig;
use embatch::run::store;
use embatch::testkit::pgtemp::ThrowawayPostgres;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Run, TestEnv, count_embedded_exactly, family_of};

/// The code of Postgres's SSLRequest (after the length 8).
const SSL_REQUEST_CODE: u32 = 80_877_103;

/// A certificate authority and a server certificate it signed for `localhost` only.
pub struct Pki {
    pub ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl Pki {
    pub fn for_localhost() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "embatch test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("leaf certificate");

        let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone(), ca_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server TLS config");
        Pki {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        }
    }

    /// A lone self-signed certificate for `localhost`, as many servers have: no CA at all.
    pub fn self_signed_localhost() -> Pki {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("self-signed certificate");
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .expect("server TLS config");
        Pki {
            ca_pem: cert.pem(),
            server: Arc::new(server),
        }
    }

    /// Writes the CA certificate to `dir/name` and returns its path.
    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        fs_err::write(&path, &self.ca_pem).expect("write the CA certificate");
        path
    }
}

/// A TCP front for the throwaway Postgres, on its own thread and runtime (so that tests may
/// run the binary blocking or not). Stops when dropped.
pub struct TlsFront {
    pub port: u16,
    tls_sessions: Arc<AtomicUsize>,
    plain_sessions: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsFront {
    /// A front that speaks TLS with `pki`'s certificate, or plain (answers `N`) with `None`.
    pub fn start(pki: Option<&Pki>) -> TlsFront {
        let socket = ThrowawayPostgres::shared()
            .expect("start the throwaway Postgres")
            .unix_socket()
            .expect("the TLS front needs the throwaway cluster, not EMBATCH_TEST_DATABASE_URL");
        let acceptor = pki.map(|p| tokio_rustls::TlsAcceptor::from(p.server.clone()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the front");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("front address").port();
        let tls_sessions = Arc::new(AtomicUsize::new(0));
        let plain_sessions = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let counters = (tls_sessions.clone(), plain_sessions.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("front runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { continue };
                            let socket = socket.clone();
                            let acceptor = acceptor.clone();
                            let counters = counters.clone();
                            tokio::spawn(async move {
                                // A client that gives up mid-handshake is part of the tests.
                                let _ = relay(tcp, &socket, acceptor, counters).await;
                            });
                        }
                    }
                }
            });
        });
        TlsFront {
            port,
            tls_sessions,
            plain_sessions,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Completed TLS handshakes so far.
    pub fn tls_sessions(&self) -> usize {
        self.tls_sessions.load(Ordering::SeqCst)
    }

    /// Connections relayed without TLS so far.
    pub fn plain_sessions(&self) -> usize {
        self.plain_sessions.load(Ordering::SeqCst)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One client: SSLRequest → `S` + TLS (or `N`), then bytes both ways to the server's socket.
async fn relay(
    mut tcp: tokio::net::TcpStream,
    socket: &Path,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    (tls_sessions, plain_sessions): (Arc<AtomicUsize>, Arc<AtomicUsize>),
) -> std::io::Result<()> {
    let mut head = [0u8; 8];
    tcp.read_exact(&mut head).await?;
    let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let mut server = tokio::net::UnixStream::connect(socket).await?;
    if length == 8 && code == SSL_REQUEST_CODE {
        match acceptor {
            Some(acceptor) => {
                tcp.write_all(b"S").await?;
                let mut tls = acceptor.accept(tcp).await?;
                tls_sessions.fetch_add(1, Ordering::SeqCst);
                tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
            }
            None => {
                tcp.write_all(b"N").await?;
                plain_sessions.fetch_add(1, Ordering::SeqCst);
                tokio::io::copy_bidirectional(&mut tcp, &mut server).await?;
            }
        }
    } else {
        // A startup message without an SSLRequest (sslmode=disable): pass it on as it is.
        plain_sessions.fetch_add(1, Ordering::SeqCst);
        server.write_all(&head).await?;
        tokio::io::copy_bidirectional(&mut tcp, &mut server).await?;
    }
    Ok(())
}

/// `postgres://user:password@host:port/db?query` for the test database of `env`, through a
/// front, as the password role `role_url` (a `create_password_role` string).
fn tcp_url(role_url: &str, host: &str, port: u16, query: &str) -> String {
    let config: tokio_postgres::Config = role_url.parse().expect("role connection string");
    let user = config.get_user().expect("user");
    let password = String::from_utf8(config.get_password().expect("password").to_vec()).unwrap();
    let database = config.get_dbname().expect("database");
    format!("postgres://{user}:{password}@{host}:{port}/{database}?{query}")
}

/// Runs the binary with `DATABASE_URL` and a private HOME (so no `~/.postgresql/root.crt`
/// of the machine changes what `require` means).
async fn exec_with_db(env: &TestEnv, url: &str, args: &[&str]) -> Run {
    let home = env.dir.path().to_str().unwrap();
    env.exec_env(args, &[("DATABASE_URL", url), ("HOME", home)])
        .await
}

#[tokio::test]
async fn plan_and_a_full_cycle_run_over_tls_to_a_real_postgres() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let pki = Pki::for_localhost();
    let ca = pki.write_ca(env.dir.path(), "ca.pem");
    let front = TlsFront::start(Some(&pki));
    let role_url = ThrowawayPostgres::shared()
        .unwrap()
        .create_password_role(&env.db_url, "tls-test-password")
        .await
        .unwrap();
    let (family, _) = family_of(&env, 1, 12).await;
    let family = family.to_string();

    // require: encrypted, the self-signed chain accepted as libpq does.
    let require = tcp_url(&role_url, "localhost", front.port, "sslmode=require");
    let plan = exec_with_db(&env, &require, &["plan", "--family-id", &family]).await;
    let run_dir = plan.run_dir();
    assert!(front.tls_sessions() >= 1, "plan did not use TLS");
    assert_eq!(front.plain_sessions(), 0);

    // require against a lone self-signed certificate: accepted, as libpq does.
    let self_signed = TlsFront::start(Some(&Pki::self_signed_localhost()));
    let require_self_signed = tcp_url(&role_url, "localhost", self_signed.port, "sslmode=require");
    let run = exec_with_db(
        &env,
        &require_self_signed,
        &["plan", "--family-id", &family, "--limit", "1"],
    )
    .await;
    // Every pending chunk is held by the first run, not submitted yet: nothing to plan (an
    // error naming that run), but connected.
    run.assert_error("planned but not submitted yet");
    assert!(self_signed.tls_sessions() >= 1, "{run:#?}");

    // verify-full with the CA: the chain and the name `localhost` check out. A whole cycle.
    let verify_full = tcp_url(
        &role_url,
        "localhost",
        front.port,
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let before = front.tls_sessions();
    let dir = run_dir.to_str().unwrap();
    let run = exec_with_db(&env, &verify_full, &["advance", "--run-dir", dir]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(store::load(&run_dir).unwrap().is_finished());
    assert!(front.tls_sessions() > before, "advance did not use TLS");
    assert_eq!(front.plain_sessions(), 0);
    assert_eq!(
        count_embedded_exactly(&env, family.parse().unwrap(), 1536).await,
        12
    );
}

#[tokio::test]
async fn tls_refusals_are_clear_and_leave_nothing_behind() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let pki = Pki::for_localhost();
    let ca = pki.write_ca(env.dir.path(), "ca.pem");
    let other_ca = Pki::for_localhost().write_ca(env.dir.path(), "other-ca.pem");
    let front = TlsFront::start(Some(&pki));
    let plain_front = TlsFront::start(None);
    let role_url = ThrowawayPostgres::shared()
        .unwrap()
        .create_password_role(&env.db_url, "tls-test-password")
        .await
        .unwrap();
    let (family, _) = family_of(&env, 1, 3).await;
    let family = family.to_string();
    let verify = |host: &str, ca: &Path| {
        tcp_url(
            &role_url,
            host,
            front.port,
            &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        )
    };

    let cases = [
        // The certificate names localhost only.
        (
            "verify-full against 127.0.0.1",
            verify("127.0.0.1", &ca),
            "tls handshake with the database at",
        ),
        // A chain to a CA we were not told to trust.
        (
            "verify-full with another CA",
            verify("localhost", &other_ca),
            "tls handshake with the database at",
        ),
        // No TLS on offer.
        (
            "require against a plain server",
            tcp_url(&role_url, "localhost", plain_front.port, "sslmode=require"),
            "server does not support TLS",
        ),
    ];
    for (what, url, needle) in &cases {
        let run = exec_with_db(&env, url, &["plan", "--family-id", &family]).await;
        run.assert_error(needle);
        assert_eq!(run.stderr.trim().lines().count(), 1, "{what}: {run:#?}");
        assert!(run.stderr.contains("sslmode"), "{what}: {run:#?}");
        assert!(
            !run.stderr.contains("tls-test-password"),
            "{what}: {run:#?}"
        );
        assert!(env.run_folders().is_empty(), "{what} left a run folder");
    }
    assert_eq!(
        plain_front.plain_sessions(),
        1,
        "require asked the plain front once"
    );

    // The same refusal on an existing run: the steps that need no database go ahead, the
    // ingest stops with the same clear error, and nothing is written.
    let run_dir = env.plan(family.parse().unwrap(), &[]).run_dir();
    let dir = run_dir.to_str().unwrap();
    let run = exec_with_db(&env, &cases[0].1, &["advance", "--run-dir", dir]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains(cases[0].2), "{run:#?}");
    assert_eq!(
        store::load(&run_dir).unwrap().batches[0].state.kind(),
        embatch::run::state::StateKind::Downloaded
    );
    assert_eq!(
        count_embedded_exactly(&env, family.parse().unwrap(), 1536).await,
        0
    );
    // With a good DATABASE_URL the run finishes.
    let run = env.exec(&["advance", "--run-dir", dir]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(
        count_embedded_exactly(&env, family.parse().unwrap(), 1536).await,
        3
    );
}
