//! The configured provider: settings in, a client out. A run connects to the provider its
//! `run.json` records ([`run_provider`]); the realtime path to the one its `--provider` names
//! ([`realtime_client_for`]).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::models::Provider;
use crate::provider::BatchProvider;
use crate::provider::direct::{DirectOptions, DirectProvider};
use crate::provider::gemini::GeminiProvider;
use crate::provider::openai::{ApiClient, AuthHeader, ClientOptions};
use crate::provider::voyage::{BatchParams, VoyageProvider};
use crate::run::store::RunFile;

/// How to reach the providers. Keys are secrets: never printed, never written (`Debug` shows
/// whether a key is set, not the key).
#[derive(Clone)]
pub struct ApiSettings {
    /// OpenAI's key (`OPENAI_API_KEY`, `--api-key`).
    pub api_key: Option<String>,
    /// OpenAI's base URL (`OPENAI_BASE_URL`, `--base-url`).
    pub base_url: String,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Retries of a read, download or delete after a 429, 5xx or connection error.
    pub max_retries: usize,
    /// The server of `--provider direct`.
    pub direct: DirectEndpoint,
    /// Voyage's endpoint (`--provider voyage`): `--base-url` when given on the command line,
    /// else `VOYAGE_BASE_URL`, else Voyage's own; the key is `--api-key` when given on the
    /// command line, else `VOYAGE_API_KEY`. OpenAI's variables are never used for it.
    pub voyage: DirectEndpoint,
    /// The Gemini API (`--provider gemini`): `--base-url` when given on the command line, else
    /// `GEMINI_BASE_URL`, else Google's own; the key is `--api-key` when given on the command
    /// line, else `GEMINI_API_KEY`. OpenAI's variables are never used for it.
    pub gemini: DirectEndpoint,
}

impl fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSettings")
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("base_url", &self.base_url)
            .field("organization", &self.organization)
            .field("project", &self.project)
            .field("max_retries", &self.max_retries)
            .field("direct", &self.direct)
            .field("voyage", &self.voyage)
            .field("gemini", &self.gemini)
            .finish()
    }
}

/// Where `--provider direct` sends its requests: `--base-url` when given on the command line,
/// else `EMBATCH_DIRECT_BASE_URL`; the key is `--api-key` when given on the command line, else
/// `EMBATCH_DIRECT_API_KEY`, else none (many self-hosted servers want none). OpenAI's variables
/// are never used for it, so an OpenAI key never reaches another server.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DirectEndpoint {
    pub base_url: Option<String>,
    pub api_key: Option<String>,
}

// Written by hand so that the key never reaches a log line.
impl fmt::Debug for DirectEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectEndpoint")
            .field(
                "base_url",
                &self
                    .base_url
                    .as_deref()
                    .map(crate::provider::openai::redact_url),
            )
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// OpenAI's batch client for the configured settings, or a message saying what is missing.
pub fn batch_client(settings: &ApiSettings) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(client_options(settings)?)?)
}

/// OpenAI's client options of the configured settings (the batch path's retry policy), or a
/// message saying what is missing.
pub fn client_options(settings: &ApiSettings) -> anyhow::Result<ClientOptions> {
    let api_key = settings.api_key.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "no OpenAI API key; set OPENAI_API_KEY in the environment or in .env (to try embatch without one, run `embatch emulator` and point OPENAI_BASE_URL at it)"
        )
    })?;
    Ok(ClientOptions {
        base_url: settings.base_url.clone(),
        api_key,
        organization: settings.organization.clone(),
        project: settings.project.clone(),
        max_retries: settings.max_retries,
        ..ClientOptions::default()
    })
}

/// The client options of `provider`'s endpoint, or a message saying what is missing.
pub fn client_options_for(
    settings: &ApiSettings,
    provider: Provider,
) -> anyhow::Result<ClientOptions> {
    match provider {
        Provider::Openai => client_options(settings),
        Provider::Direct => {
            let base_url = settings.direct.base_url.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "no server for --provider direct; set EMBATCH_DIRECT_BASE_URL (in the environment or .env) or pass --base-url, to the root of its OpenAI-compatible API (for example http://127.0.0.1:8080/v1, which serves /v1/embeddings)"
                )
            })?;
            Ok(ClientOptions {
                base_url,
                api_key: settings.direct.api_key.clone().unwrap_or_default(),
                max_retries: settings.max_retries,
                provider: Provider::Direct,
                ..ClientOptions::default()
            })
        }
        Provider::Voyage => {
            let api_key = settings.voyage.api_key.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "no Voyage API key; set VOYAGE_API_KEY in the environment or in .env (to try embatch without one, run `embatch emulator --provider voyage` and point VOYAGE_BASE_URL at it)"
                )
            })?;
            Ok(ClientOptions {
                base_url: settings
                    .voyage
                    .base_url
                    .clone()
                    .unwrap_or_else(|| crate::models::VOYAGE_DEFAULT_BASE_URL.to_owned()),
                api_key,
                max_retries: settings.max_retries,
                provider: Provider::Voyage,
                ..ClientOptions::default()
            })
        }
        Provider::Gemini => {
            let api_key = settings.gemini.api_key.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "no Gemini API key; set GEMINI_API_KEY in the environment or in .env (to try embatch without one, run `embatch emulator --provider gemini` and point GEMINI_BASE_URL at it)"
                )
            })?;
            Ok(ClientOptions {
                base_url: settings
                    .gemini
                    .base_url
                    .clone()
                    .unwrap_or_else(|| crate::models::GEMINI_DEFAULT_BASE_URL.to_owned()),
                api_key,
                max_retries: settings.max_retries,
                provider: Provider::Gemini,
                auth_header: AuthHeader::GoogApiKey,
                ..ClientOptions::default()
            })
        }
    }
}

/// Fails now, before any work, when `provider` cannot be reached with these settings (no key,
/// no base URL, a base URL that is not one).
pub fn check(settings: &ApiSettings, provider: Provider) -> anyhow::Result<()> {
    ApiClient::new(client_options_for(settings, provider)?)?;
    Ok(())
}

/// The realtime path's OpenAI client. Its retry policy is the batch path's (429, 5xx and
/// connection errors, honouring `Retry-After`) with a shorter longest wait: someone is waiting
/// for the answer.
pub fn realtime_client(settings: &ApiSettings) -> anyhow::Result<ApiClient> {
    realtime_client_for(settings, Provider::Openai)
}

/// [`realtime_client`] for `provider`: every provider embatch knows serves an OpenAI-compatible
/// `/embeddings`.
pub fn realtime_client_for(
    settings: &ApiSettings,
    provider: Provider,
) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(ClientOptions {
        max_backoff: Duration::from_secs(10),
        ..client_options_for(settings, provider)?
    })?)
}

/// The realtime path's provider (`embed`, `serve`): [`realtime_client_for`] for the providers
/// that serve an OpenAI-compatible `/embeddings`, Gemini's `batchEmbedContents` for `gemini`.
pub fn realtime_provider_for(
    settings: &ApiSettings,
    provider: Provider,
) -> anyhow::Result<Box<dyn BatchProvider>> {
    if provider == Provider::Gemini {
        let options = ClientOptions {
            max_backoff: Duration::from_secs(10),
            ..client_options_for(settings, provider)?
        };
        return Ok(Box::new(GeminiProvider::realtime(options)?));
    }
    Ok(Box::new(realtime_client_for(settings, provider)?))
}

/// The provider of the run in `run_dir`, as its `run.json` records it. `direct` works on the
/// run's own folder, within `direct` (its limits, and whether this command may send requests).
pub fn run_provider(
    settings: &ApiSettings,
    run: &RunFile,
    run_dir: &Path,
    direct: &DirectOptions,
) -> anyhow::Result<Box<dyn BatchProvider>> {
    match run.settings.provider {
        Provider::Openai => Ok(Box::new(batch_client(settings)?)),
        Provider::Direct => {
            let options = client_options_for(settings, Provider::Direct)?;
            Ok(Box::new(DirectProvider::new(
                options,
                run,
                run_dir,
                direct.clone(),
            )?))
        }
        Provider::Voyage => {
            let options = client_options_for(settings, Provider::Voyage)?;
            Ok(Box::new(VoyageProvider::new(
                options,
                BatchParams::of_run(&run.settings),
            )?))
        }
        Provider::Gemini => {
            let options = client_options_for(settings, Provider::Gemini)?;
            Ok(Box::new(GeminiProvider::new(
                options,
                crate::provider::gemini::BatchParams::of_run(&run.settings),
            )?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_key() {
        let settings = ApiSettings {
            api_key: Some("sk-secret-openai".into()),
            base_url: "https://api.openai.com/v1".into(),
            organization: None,
            project: None,
            max_retries: 3,
            direct: DirectEndpoint {
                base_url: Some("http://127.0.0.1:8080/v1".into()),
                api_key: Some("direct-secret".into()),
            },
            voyage: DirectEndpoint {
                base_url: None,
                api_key: Some("voyage-secret".into()),
            },
            gemini: DirectEndpoint {
                base_url: None,
                api_key: Some("gemini-secret".into()),
            },
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("sk-secret-openai"), "{shown}");
        assert!(!shown.contains("direct-secret"), "{shown}");
        assert!(!shown.contains("voyage-secret"), "{shown}");
        assert!(!shown.contains("gemini-secret"), "{shown}");
        assert!(shown.contains("<set>"), "{shown}");
    }
}
