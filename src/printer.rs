//! The one printer: data to stdout, everything else to stderr.
//!
//! Progress bars come from here and hide when stderr is not a terminal, with `--no-progress`
//! or `--quiet`. `-q` leaves only errors on stderr (errors are printed by `main`).

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How much the terminal is told: what `--quiet`, `--verbose` and `--no-progress` chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputSettings {
    pub quiet: bool,
    pub verbose: bool,
    /// Progress bars wanted (they still hide when stderr is not a terminal).
    pub progress: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Printer {
    settings: OutputSettings,
    bars: bool,
    colour: bool,
}

impl Printer {
    pub fn new(settings: OutputSettings) -> Printer {
        let stderr_tty = std::io::stderr().is_terminal();
        Printer {
            settings,
            bars: settings.progress && !settings.quiet && stderr_tty,
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    /// One line of data on stdout.
    pub fn data(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) is not worth failing the command for.
        let _ = writeln!(out, "{line}");
    }

    /// A message for the person at the terminal (stderr), unless `-q`.
    pub fn info(&self, message: &str) {
        if !self.settings.quiet {
            eprintln!("{message}");
        }
    }

    /// Extra detail with `-v`.
    pub fn verbose(&self, message: &str) {
        if self.settings.verbose && !self.settings.quiet {
            eprintln!("{message}");
        }
    }

    pub fn warn(&self, message: &str) {
        if !self.settings.quiet {
            eprintln!("warning: {message}");
        }
    }

    /// Whether stdout is a terminal that takes colours (tables colour only there).
    pub fn colour(&self) -> bool {
        self.colour
    }

    /// The width tables fit on stdout: `COLUMNS` when set to a number, else the terminal's
    /// width (the `terminal_size` crate, which clap's help wrapping uses too); `None` when
    /// stdout is not a terminal (a file or a pipe gets every column).
    pub fn width(&self) -> Option<usize> {
        if let Some(columns) = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.trim().parse::<usize>().ok())
            .filter(|&c| c > 0)
        {
            return Some(columns);
        }
        terminal_size::terminal_size_of(std::io::stdout())
            .map(|(terminal_size::Width(w), _)| usize::from(w))
    }

    /// A counter of rows with no known total (a spinner with a count and rate).
    pub fn row_counter(&self, message: &'static str) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg}: {human_pos} rows ({rows_per_sec}, {elapsed})",
            )
            .map(|style| style.with_key("rows_per_sec", rows_per_sec))
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(message);
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    }

    /// A one-line live display (a spinner with a message), for `--wait`: the time shown counts
    /// from `waited` (the whole wait so far), not from this poll.
    pub fn waiting_line(&self, message: String, waited: std::time::Duration) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        // Three columns short of the terminal: a line drawn to the last column leaves the cursor
        // past the edge, where the terminal's echo of a ctrl-c (`^C`) wraps to a new line, and the
        // bar could no longer be cleared from there.
        let bar = ProgressBar::with_draw_target(
            None,
            ProgressDrawTarget::term_like_with_hz(Box::new(StderrShortOfEdge), 20),
        )
        .with_elapsed(waited);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {wide_msg} (waited {elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(message);
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    }

    /// A bar over a known number of rows.
    pub fn row_bar(&self, message: &'static str, total: u64) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {human_pos}/{human_len} rows ({rows_per_sec}, eta {eta})",
            )
            .map(|style| style.with_key("rows_per_sec", rows_per_sec))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(message);
        bar
    }

    /// A bar over bytes (upload, download); `total` when known.
    pub fn byte_bar(&self, message: String, total: Option<u64>) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
        let template = if total.is_some() {
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta})"
        } else {
            "{spinner} {msg} {binary_bytes} ({binary_bytes_per_sec})"
        };
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(message);
        bar
    }
}

/// stderr as indicatif draws on it, but three columns narrower than the terminal (see
/// [`Printer::waiting_line`]).
#[derive(Debug)]
struct StderrShortOfEdge;

impl StderrShortOfEdge {
    fn write(&self, text: &str) -> std::io::Result<()> {
        std::io::stderr().lock().write_all(text.as_bytes())
    }
}

impl indicatif::TermLike for StderrShortOfEdge {
    fn width(&self) -> u16 {
        terminal_size::terminal_size_of(std::io::stderr())
            .map(|(terminal_size::Width(w), _)| w.saturating_sub(3).max(1))
            .unwrap_or(79)
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.write(&format!("\x1b[{n}A"))
        }
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.write(&format!("\x1b[{n}B"))
        }
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.write(&format!("\x1b[{n}C"))
        }
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.write(&format!("\x1b[{n}D"))
        }
    }

    fn write_line(&self, line: &str) -> std::io::Result<()> {
        self.write(&format!("{line}\n"))
    }

    fn write_str(&self, text: &str) -> std::io::Result<()> {
        self.write(text)
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.write("\r\x1b[2K")
    }

    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The rate of a row bar as the rest of the output writes numbers: `24,928 rows/s` (indicatif's
/// own `{per_sec}` writes `24928.1999/s`).
fn rows_per_sec(state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write) {
    let _ = write!(out, "{} rows/s", number(state.per_sec().max(0.0) as u64));
}

/// A count as every message and table writes it: `950,000` (thousands separated by commas).
pub fn number(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 chunk`, `2 chunks`, `1,000 chunks`: a count and its noun, in the right number. `plural`
/// is the plural form (`batches`).
pub fn count(n: u64, singular: &str, plural: &str) -> String {
    format!("{} {}", number(n), if n == 1 { singular } else { plural })
}

#[cfg(test)]
mod tests {
    use super::{count, number};

    #[test]
    fn numbers_have_thousands_separators_and_nouns_agree() {
        assert_eq!(number(0), "0");
        assert_eq!(number(999), "999");
        assert_eq!(number(1_000), "1,000");
        assert_eq!(number(950_000), "950,000");
        assert_eq!(number(12_345_678), "12,345,678");
        assert_eq!(count(1, "chunk", "chunks"), "1 chunk");
        assert_eq!(count(2, "batch", "batches"), "2 batches");
        assert_eq!(count(1_000, "chunk", "chunks"), "1,000 chunks");
    }
}
