//! Logging to stderr, one line per event, level from `RUST_LOG` (default `info`); no
//! timestamps when journald reads our stderr (`JOURNAL_STREAM`), which adds its own, and then
//! syslog-style `<N>` priority prefixes so journald records the right level.

use std::io::Write;

/// Install the logger. Call once, first thing.
pub fn init() {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if journald {
        builder.format(|buf, record| {
            let prio = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{prio}>{}", record.args())
        });
    } else {
        builder.format(|buf, record| {
            let ts = buf.timestamp_millis();
            writeln!(buf, "{ts} {:<5} {}", record.level(), record.args())
        });
    }
    builder.init();
}

/// True when stderr is journald's stream (`JOURNAL_STREAM` names it).
pub fn journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}
