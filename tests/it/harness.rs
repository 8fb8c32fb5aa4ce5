//! `TestEnv`: a temp folder, a fresh database with the default schema on the shared throwaway
//! Postgres, and the real binary. A change of the CLI touches this file, not every test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use embatch::emulator::{Emulator, EmulatorConfig};
use embatch::testkit::pgtemp::ThrowawayPostgres;
use tokio_postgres::Client;
use uuid::Uuid;

pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub runs_dir: PathBuf,
    pub db_url: String,
    pub client: Client,
    /// The in-process OpenAI emulator the binary talks to (see [`TestEnv::with_emulator`]).
    pub emulator: Option<Emulator>,
}

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Killed by a signal (the crash points use SIGKILL).
    pub fn killed(&self) -> bool {
        self.code == -1
    }

    pub fn from_output(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The run folder a successful plan printed as its only stdout line.
    pub fn run_dir(&self) -> PathBuf {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stdout line: {self:#?}");
        PathBuf::from(lines[0])
    }

    /// Asserts a failure with exit code 1 whose message contains `needle`, and no panic.
    #[track_caller]
    pub fn assert_error(&self, needle: &str) {
        assert_eq!(self.code, 1, "expected exit 1: {self:#?}");
        assert!(self.stdout.is_empty(), "stdout should be empty: {self:#?}");
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:#?}"
        );
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        assert!(!self.stderr.contains("RUST_BACKTRACE"), "{self:#?}");
    }
}

impl TestEnv {
    /// A fresh database with the default schema (DESIGN.md §1).
    pub async fn new() -> TestEnv {
        let env = TestEnv::empty().await;
        env.client
            .batch_execute(embatch::pg::source::DEFAULT_SCHEMA_SQL)
            .await
            .expect("create the default schema");
        env
    }

    /// A fresh database with only the vector extension.
    pub async fn empty() -> TestEnv {
        let pg = ThrowawayPostgres::shared().expect("start the throwaway Postgres");
        let db_url = pg.create_database().await.expect("create a test database");
        let (client, connection) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        let dir = tempfile::tempdir().expect("temp dir");
        let runs_dir = dir.path().join("batches");
        TestEnv {
            dir,
            runs_dir,
            db_url,
            client,
            emulator: None,
        }
    }

    /// Starts the emulator on 127.0.0.1 (a free port); the binary is pointed at it.
    pub async fn with_emulator(mut self, config: EmulatorConfig) -> TestEnv {
        self.emulator = Some(Emulator::start(config).await.expect("start the emulator"));
        self
    }

    pub fn emu(&self) -> &Emulator {
        self.emulator
            .as_ref()
            .expect("this test started no emulator")
    }

    /// Runs the binary without blocking the runtime (the in-process emulator must keep
    /// answering while the child runs).
    pub async fn exec(&self, args: &[&str]) -> Run {
        let mut cmd = tokio::process::Command::from(self.command());
        let out = cmd.args(args).output().await.expect("run embatch");
        Run::from_output(out)
    }

    /// Like [`TestEnv::exec`] with extra environment variables.
    pub async fn exec_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = tokio::process::Command::from(self.command());
        for (key, value) in env {
            cmd.env(key, value);
        }
        let out = cmd.args(args).output().await.expect("run embatch");
        Run::from_output(out)
    }

    /// The real binary, in the temp folder (so no stray `.env` is read), with the database
    /// and runs dir of this env and no API key from the developer's environment.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_embatch"));
        cmd.current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db_url)
            .env("EMBATCH_RUNS_DIR", &self.runs_dir);
        if let Some(emu) = &self.emulator {
            cmd.env("OPENAI_BASE_URL", emu.base_url())
                .env("OPENAI_API_KEY", emu.api_key());
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out = self.command().args(args).output().expect("run embatch");
        Run::from_output(out)
    }

    /// `embatch plan --family-id <family> <extra…>`.
    pub fn plan(&self, family: Uuid, extra: &[&str]) -> Run {
        let family = family.to_string();
        let mut args = vec!["plan", "--family-id", family.as_str()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    pub async fn add_family(&self, n: u128) -> Uuid {
        let id = Uuid::from_u128(n << 64);
        self.client
            .execute(
                "INSERT INTO equipment_families (id, name) VALUES ($1, $2)",
                &[&id, &format!("family {n}")],
            )
            .await
            .expect("insert family");
        id
    }

    /// Inserts chunks with ids `family + 1, family + 2, …` (so id order is insertion order).
    pub async fn add_chunks(&self, family: Uuid, contents: &[&str]) -> Vec<Uuid> {
        let base = family.as_u128();
        let ids: Vec<Uuid> = (1..=contents.len() as u128)
            .map(|i| Uuid::from_u128(base + i))
            .collect();
        let contents: Vec<String> = contents.iter().map(|s| s.to_string()).collect();
        self.client
            .execute(
                "INSERT INTO knowledge_chunks (id, equipment_family_id, content)
                 SELECT i, $2, c FROM unnest($1::uuid[], $3::text[]) AS u(i, c)",
                &[&ids, &family, &contents],
            )
            .await
            .expect("insert chunks");
        ids
    }

    /// Every folder under the runs dir that is a run (or a partial one): what a family
    /// folder holds but its `plan.lock`.
    pub fn run_folders(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let Ok(families) = fs_err::read_dir(&self.runs_dir) else {
            return found;
        };
        for family in families.filter_map(Result::ok) {
            if let Ok(runs) = fs_err::read_dir(family.path()) {
                found.extend(
                    runs.filter_map(Result::ok)
                        .filter(|e| e.file_name() != embatch::run::layout::PLAN_LOCK_FILE)
                        .map(|e| e.path()),
                );
            }
        }
        found
    }
}

/// The insta settings every snapshot uses: all snapshots live in the top-level `snapshots/`.
pub fn snapshot_settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings
}

/// Reads a file of a run folder as text.
pub fn read(path: impl AsRef<Path>) -> String {
    fs_err::read_to_string(path.as_ref()).expect("read file")
}

/// A family `n_family` with `n` chunks of distinct text; returns the family and chunk ids.
pub async fn family_of(env: &TestEnv, n_family: u128, n: usize) -> (Uuid, Vec<Uuid>) {
    let family = env.add_family(n_family).await;
    let texts: Vec<String> = (0..n)
        .map(|i| format!("Family {n_family} chunk {i}: grease bearing {i} every 200 hours."))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = env.add_chunks(family, &refs).await;
    (family, ids)
}

/// How many chunks of `family` hold an embedding; panics if any holds a vector other than the
/// emulator's for its current content.
pub async fn count_embedded_exactly(env: &TestEnv, family: Uuid, dims: usize) -> usize {
    let rows = env
        .client
        .query(
            "SELECT id, content, embedding FROM knowledge_chunks
             WHERE equipment_family_id = $1 AND embedding IS NOT NULL",
            &[&family],
        )
        .await
        .expect("read embeddings");
    for row in &rows {
        let id: Uuid = row.get(0);
        let content: String = row.get(1);
        let stored: pgvector::Vector = row.get(2);
        assert_emulator_vector(id, stored.as_slice(), &content, dims);
    }
    rows.len()
}

/// Panics unless `stored` is, bit for bit, the emulator's vector of `content`.
#[track_caller]
pub fn assert_emulator_vector(
    id: impl std::fmt::Display,
    stored: &[f32],
    content: &str,
    dims: usize,
) {
    let want = embatch::emulator::vectors::embedding(content, dims);
    let same = stored.len() == want.len()
        && stored
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same,
        "chunk {id} does not hold the emulator's vector of its content"
    );
}

/// Every file and folder under `dir`, `dir` included.
/// `dir` and every folder and file below it.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for entry in fs_err::read_dir(dir)
        .expect("read folder")
        .filter_map(Result::ok)
    {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The bytes of a file, or `None` when it does not exist.
pub fn bytes_of(path: impl AsRef<Path>) -> Option<Vec<u8>> {
    fs_err::read(path.as_ref()).ok()
}

// ------------------------------------------------------------------------------------------
// The realtime path: `embatch serve` as a child process, and reading vectors back.

/// A running `embatch serve` child. Killed when dropped.
pub struct ServeProcess {
    pub child: tokio::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// Everything the server wrote on stderr so far (drained in the background).
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServeProcess {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// `POST /api/v1/embed/chunk/{id}` with an optional bearer token and query.
    pub async fn embed(
        &self,
        http: &reqwest::Client,
        chunk_id: &str,
        token: Option<&str>,
        query: &str,
    ) -> (u16, serde_json::Value) {
        let mut request = http.post(self.url(&format!("/api/v1/embed/chunk/{chunk_id}{query}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .expect("send the request to embatch serve");
        let status = response.status().as_u16();
        let body = response.json().await.expect("a JSON body");
        (status, body)
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("the server is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl TestEnv {
    /// Starts `embatch serve --listen 127.0.0.1:0 <extra…>` with `env`, and waits for its
    /// "listening on" line. Panics with the server's stderr if it does not come up.
    pub async fn serve(&self, extra: &[&str], env: &[(&str, &str)]) -> ServeProcess {
        match self.try_serve(extra, env).await {
            Ok(server) => server,
            Err(stderr) => panic!("embatch serve did not start:\n{stderr}"),
        }
    }

    /// Like [`TestEnv::serve`], but a server that exits before listening gives back its
    /// stderr (and exit code, on the first line) instead of panicking.
    pub async fn try_serve(
        &self,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ServeProcess, String> {
        use tokio::io::AsyncBufReadExt as _;

        let mut cmd = tokio::process::Command::from(self.command());
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            cmd.env(key, value);
        }
        let mut child = cmd.spawn().expect("spawn embatch serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let collected = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let base_url = loop {
            let line = tokio::time::timeout_at(deadline, lines.next_line()).await;
            match line {
                Ok(Ok(Some(line))) => {
                    collected.lock().unwrap().push_str(&format!("{line}\n"));
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let url = rest.split_whitespace().next().unwrap_or_default();
                        break url.to_owned();
                    }
                }
                _ => {
                    let status = child.wait().await.ok().and_then(|s| s.code());
                    let text = collected.lock().unwrap().clone();
                    return Err(format!("exit code {status:?}\n{text}"));
                }
            }
        };
        let sink = std::sync::Arc::clone(&collected);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut text) = sink.lock() {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        Ok(ServeProcess {
            child,
            base_url,
            stderr: collected,
        })
    }

    /// The stored embedding of a chunk of the default table, `None` while NULL.
    pub async fn embedding_of(&self, id: Uuid) -> Option<Vec<f32>> {
        let row = self
            .client
            .query_one(
                "SELECT embedding FROM knowledge_chunks WHERE id = $1",
                &[&id],
            )
            .await
            .expect("read the embedding");
        row.get::<_, Option<pgvector::Vector>>(0)
            .map(|v| v.to_vec())
    }
}

impl TestEnv {
    /// Drops this env's database (best effort, `WITH (FORCE)`), for tests such as the fault
    /// campaign that create many databases in one process.
    pub async fn drop_database(self) {
        let Ok(row) = self
            .client
            .query_one("SELECT current_database()", &[])
            .await
        else {
            return;
        };
        let name: String = row.get(0);
        drop(self.client);
        let Ok(pg) = ThrowawayPostgres::shared() else {
            return;
        };
        let Ok((admin, connection)) =
            tokio_postgres::connect(&pg.admin_url(), tokio_postgres::NoTls).await
        else {
            return;
        };
        tokio::spawn(connection);
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
            .await;
    }
}
