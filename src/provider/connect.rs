//! The configured provider: settings in, a client out. OpenAI is the only provider today.

use std::time::Duration;

use crate::provider::openai::{ApiClient, ClientOptions};

/// How to reach the OpenAI API. The key is a secret: never printed, never written.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub api_key: Option<String>,
    pub base_url: String,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Retries of a read, download or delete after a 429, 5xx or connection error.
    pub max_retries: usize,
}

/// The batch path's client for the configured settings, or a message saying what is missing.
pub fn batch_client(settings: &ApiSettings) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(client_options(settings)?)?)
}

/// The client options of the configured settings (the batch path's retry policy), or a
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

/// The realtime path's client. Its retry policy is the batch path's (429, 5xx and connection
/// errors, honouring `Retry-After`) with a shorter longest wait: someone is waiting for the
/// answer.
pub fn realtime_client(settings: &ApiSettings) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(ClientOptions {
        max_backoff: Duration::from_secs(10),
        ..client_options(settings)?
    })?)
}
