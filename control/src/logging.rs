//! Log output of the relay's processes: where lines go (stderr), how they
//! look (text or JSON) and which levels pass (`RUST_LOG`, default `info`).
//!
//! Text lines are coloured only when stderr is a terminal and `NO_COLOR`
//! is unset or empty (<https://no-color.org>), so a log file, a pipe or
//! journald never gets escape bytes. JSON is one object per line, the
//! event's fields at the top level, for log shippers.
//!
//! relay-control uses this module from its library; relay-dataplane, which
//! does not link control, compiles this same file into its binary
//! (`#[path]` in its `main.rs`), so it may use only crates both have.

use std::ffi::OsStr;
use std::io::IsTerminal;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines look (`--log-format`, `[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Whether text lines get ANSI colours: only on a terminal, and not when
/// `NO_COLOR` holds a non-empty value.
pub fn colour_wanted(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// The subscriber writing `format` lines to `writer`, filtered by
/// `filter`; text is coloured when `colour` says so.
pub fn subscriber<W>(
    format: LogFormat,
    colour: bool,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(colour).finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).with_span_list(false).finish()),
    }
}

/// Installs the process's logger: `format` lines on stderr, `RUST_LOG`
/// levels (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = colour_wanted(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let _ = tracing::subscriber::set_global_default(subscriber(format, colour, filter, std::io::stderr));
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None), "a pipe, a file or journald");
        assert!(!colour_wanted(false, Some(OsStr::new("1"))));
    }

    /// Everything the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_of(format: LogFormat, colour: bool) -> String {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = subscriber(format, colour, EnvFilter::new("info"), move || sink.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("worker", worker = 3);
            let _in = span.enter();
            tracing::info!(conn = 7, flow = 12, "tunnel \"quoted\" ended");
            tracing::warn!("second line");
            tracing::debug!("filtered out");
        });
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn text_without_colour_has_no_escape_bytes() {
        let text = lines_of(LogFormat::Text, false);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(text.contains("worker=3") && text.contains("conn=7") && text.contains("flow=12"), "{text}");
        assert!(lines_of(LogFormat::Text, true).contains('\x1b'), "colour is escape sequences");
    }

    #[test]
    fn json_is_one_object_per_line_with_the_fields_on_top() {
        let text = lines_of(LogFormat::Json, true);
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(!text.contains('\x1b'), "JSON is never coloured");
        assert_eq!(lines[0]["message"], "tunnel \"quoted\" ended");
        assert_eq!((lines[0]["conn"].as_u64(), lines[0]["flow"].as_u64()), (Some(7), Some(12)));
        assert_eq!(lines[0]["span"]["worker"].as_u64(), Some(3));
        assert_eq!(lines[1]["level"], "WARN");
    }
}
