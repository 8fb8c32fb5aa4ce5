//! The `embatch` binary: parse, run, and turn the outcome into the exit code — the only place
//! that decides it.

use std::process::ExitCode;

use embatch::ExitStatus;
use embatch::interrupt::Interrupted;
use embatch::run::lock::LockError;

fn main() -> ExitCode {
    // Run folders hold private text: whatever we create is the owner's only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // `.env` of the working folder only; it never overrides the environment, and flags beat
    // both (clap reads the env). A broken one is a configuration error: exit 2.
    if let Err(message) = embatch::cli::load_dotenv(std::path::Path::new(".")) {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    let parsed = match embatch::cli::parse(std::env::args_os()) {
        Ok(parsed) => parsed,
        // Help and version exit 0; usage errors exit 2.
        Err(err) => err.exit(),
    };
    if parsed.api_key_on_command_line && !parsed.config.global.output.quiet {
        eprintln!(
            "warning: --api-key on the command line shows in the process list; set OPENAI_API_KEY in the environment or .env instead"
        );
    }
    if parsed.database_password_on_command_line && !parsed.config.global.output.quiet {
        eprintln!(
            "warning: --database-url with a password on the command line shows in the process list; set DATABASE_URL in the environment or .env instead"
        );
    }
    let runtime = match embatch::runtime(&parsed.config.command) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(embatch::run(parsed.config)) {
        Ok(ExitStatus::Done) => ExitCode::SUCCESS,
        Ok(ExitStatus::NotYet) => ExitCode::from(75),
        Err(err) => {
            eprintln!("error: {err:#}");
            if let Some(interrupted) = err.downcast_ref::<Interrupted>() {
                ExitCode::from(interrupted.exit_code())
            } else if err
                .downcast_ref::<LockError>()
                .is_some_and(LockError::is_held)
            {
                ExitCode::from(75)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
