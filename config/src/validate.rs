//! Validation: TOML text into a [`Config`], every problem collected with its place and key.
//!
//! The main file is validated first; the drop-ins its `include` patterns (and
//! `LoadOptions::config_dirs`) match are then validated one by one against its `[superserver]`
//! settings, and last come the checks across files: listen-address clashes, and the rule that
//! a configuration without an enabled service needs `allow_no_services`. In each file, three
//! passes, each reporting everything it finds before the next runs:
//! 1. TOML syntax: only the first syntax error is reported, and nothing else is checked.
//! 2. Shape (serde into `raw` types): unknown keys are reported (with a "did you mean") and
//!    removed; if the table still does not fit, each key is deserialized on its own, so every
//!    wrong type of a table is reported at once and removed.
//! 3. Meaning: addresses, programs, users, ranges, mode rules, and clashes between services.
//!
//! A check whose input was removed in pass 2 is skipped, so one mistake is reported once.
//! Every pass is linear in the size of the file: positions come from a line index, clashes
//! from hash maps, and no table is deserialized more than three times.

use std::ffi::CString;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::{Uid, User};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use crate::LoadOptions;
use crate::error::{ConfigError, ConfigErrors};
use crate::model::*;
use crate::raw::*;
use crate::values::*;

/// Variables a service gets when `pass_env` is not given.
pub const DEFAULT_PASS_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ", "RUST_LOG"];

/// The most sockets a wait-mode service may have: all of them are handed to one process as
/// fd 3, 4, … in one `LISTEN_FDS`, and more could not be handed over.
pub const MAX_WAIT_SOCKETS: usize = 256;

/// The most sockets any one service may have (nowait included): more is surely a mistake, and
/// the superserver numbers a service's sockets in 16 bits.
pub const MAX_SOCKETS: usize = 4096;

/// The longest `shutdown_grace` (one hour). Longer values are refused: they would overflow the
/// deadline computed from them.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);

/// The longest `restart_backoff_min` / `restart_backoff_max` (one day).
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// One shared copy of the default pass-list (a thousand services need not hold a thousand).
fn default_pass_env() -> Arc<[String]> {
    static DEFAULT: std::sync::OnceLock<Arc<[String]>> = std::sync::OnceLock::new();
    DEFAULT
        .get_or_init(|| DEFAULT_PASS_ENV.iter().map(|s| s.to_string()).collect())
        .clone()
}

/// The longest `max_duration` (one day).
pub const MAX_SERVICE_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The longest `proxy_timeout`: a balancer sends its header at once.
pub const MAX_PROXY_TIMEOUT: Duration = Duration::from_secs(60);

/// The most `instances` a wait-mode service may run.
pub const MAX_WAIT_INSTANCES: u32 = 256;

/// Parse and validate `text` and the drop-ins it includes; `origin` names the main file in
/// every error, and relative `include` patterns are relative to its directory.
pub(crate) fn parse(text: &str, origin: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        report: Report::new(origin, text.into()),
        done: Vec::new(),
        opts,
        seen: Vec::new(),
        names: HashMap::new(),
        socket_dirs: HashMap::new(),
        programs: HashMap::new(),
    };
    let config = v.run();
    v.finish_file();
    let errors: Vec<ConfigError> = v.done.into_iter().flat_map(Report::finish).collect();
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ if errors.is_empty() => unreachable!("validation failed without saying why"),
        _ => Err(ConfigErrors(errors)),
    }
}

/// The error for bytes that are not UTF-8: the line and column (in characters) of the first
/// invalid byte.
pub(crate) fn not_utf8(bytes: &[u8], origin: &Path, e: std::str::Utf8Error) -> ConfigError {
    let at = e.valid_up_to();
    let (line, column) = LineIndex::new(bytes).position(bytes, at);
    ConfigError {
        file: origin.to_path_buf(),
        line,
        column,
        key: String::new(),
        message: format!(
            "not valid UTF-8 (byte 0x{:02x}); the file must be UTF-8 text",
            bytes[at]
        ),
    }
}

/// One file's errors collected so far, each with the byte offset it is sorted by.
struct Report {
    origin: Arc<Path>,
    text: Rc<str>,
    lines: LineIndex,
    errors: Vec<(usize, ConfigError)>,
}

impl Report {
    fn new(origin: &Path, text: Rc<str>) -> Self {
        Report {
            origin: origin.into(),
            lines: LineIndex::new(text.as_bytes()),
            text,
            errors: Vec::new(),
        }
    }

    fn error(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push((
            span.start,
            ConfigError {
                file: self.origin.to_path_buf(),
                line,
                column,
                key: escape_controls(&key.into()),
                message: escape_controls(&message.into()),
            },
        ));
    }

    /// An error about the whole file (no line), sorted first.
    fn file_error(&mut self, message: impl Into<String>) {
        self.errors.push((
            0,
            ConfigError {
                file: self.origin.to_path_buf(),
                line: 0,
                column: 0,
                key: String::new(),
                message: escape_controls(&message.into()),
            },
        ));
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        self.lines.position(self.text.as_bytes(), offset)
    }

    /// The text of the line holding `offset` (without its newline), and its 1-based number.
    fn line_at(&self, offset: usize) -> (&str, usize) {
        let (line, _) = self.position(offset);
        (self.line_text(line), line)
    }

    /// The text of 1-based line `line`, without its newline.
    fn line_text(&self, line: usize) -> &str {
        let start = self.lines.starts[line - 1];
        let end = self
            .lines
            .starts
            .get(line)
            .map_or(self.text.len(), |&e| e - 1);
        self.text[start..end].trim_end_matches('\r')
    }

    fn count(&self) -> usize {
        self.errors.len()
    }

    /// The errors in file order (errors at the same place keep the order they were found in).
    fn finish(mut self) -> Vec<ConfigError> {
        self.errors.sort_by_key(|(offset, _)| *offset);
        self.errors.into_iter().map(|(_, e)| e).collect()
    }
}

/// Where each line starts, computed once, so that a position costs a binary search rather than
/// a scan from the start of the file.
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(text: &[u8]) -> Self {
        let mut starts = vec![0];
        starts.extend(
            text.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { starts }
    }

    /// 1-based line and column of byte `offset` of `text`; the column counts characters (the
    /// bytes of the line before `offset` are valid UTF-8 up to where the caller says).
    pub(crate) fn position(&self, text: &[u8], offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line - 1];
        let before = &text[start..offset];
        let chars = String::from_utf8_lossy(before).chars().count();
        (line, chars + 1)
    }
}

/// Control characters (newline, tab, escape, …) written as Rust escapes, so that a message
/// built from user text stays one line. Text without control characters is returned as is.
pub(crate) fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A listen address seen so far, for clash checks across services and files.
struct Seen {
    service: String,
    key: String,
    addr: ListenAddr,
    /// Index of the file (into `Validator::done`).
    file: usize,
    span: Range<usize>,
}

/// What one file holds, shaped but not yet validated.
struct Document<'i> {
    /// `[superserver]` (main file only) and the keys removed from it.
    global: Option<(RawGlobal, Vec<String>)>,
    /// Each `[service.NAME]`: its name, key path, and the table (`None`: not a table).
    services: Vec<RawEntry<'i>>,
    /// `Some(span)` of the `service` value, `None` when there is none.
    service_key: Option<Range<usize>>,
}

type RawEntry<'i> = (
    Spanned<std::borrow::Cow<'i, str>>,
    String,
    Option<(RawService, Vec<String>)>,
);

struct Validator<'a> {
    /// The file being validated.
    report: Report,
    /// The files validated before it: the main file first.
    done: Vec<Report>,
    opts: &'a LoadOptions,
    seen: Vec<Seen>,
    /// Every service name so far: (file index, line).
    names: HashMap<String, (usize, usize)>,
    /// Unix socket directories checked so far, with the outcome (ten thousand sockets in one
    /// directory are one `stat`).
    socket_dirs: HashMap<PathBuf, Result<(), String>>,
    /// Programs resolved so far (`exec[0]` as written), with the outcome: one copy of each
    /// path, shared by every service that runs it, and one lookup.
    programs: HashMap<String, Result<Arc<Path>, String>>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.report.error(span, key, message);
    }

    /// Move the current file to `done`; an empty placeholder takes its place until the next
    /// file (the last placeholder, pushed by `parse`, holds no error).
    fn finish_file(&mut self) {
        let next = Report::new(Path::new(""), "".into());
        let report = std::mem::replace(&mut self.report, next);
        self.done.push(report);
    }

    /// The index the current file will have in `done`.
    fn file_index(&self) -> usize {
        self.done.len()
    }

    /// Errors found so far, in every file.
    fn total_errors(&self) -> usize {
        self.report.count() + self.done.iter().map(Report::count).sum::<usize>()
    }

    /// The main file, then every drop-in, then the checks across files.
    fn run(&mut self) -> Option<Config> {
        let text = self.report.text.clone();
        let main = self.document(&text, true)?;
        let (raw_global, removed) = main.global.unwrap_or_default();
        // `allow_no_services` with a wrong type was reported: do not add a second error.
        let allowed_empty = raw_global.allow_no_services == Some(true)
            || removed.iter().any(|k| k == "allow_no_services");
        let include = raw_global.include.clone();
        let global = self.global(raw_global);
        let mut services = Vec::new();
        let mut defined = main.services.len();
        let mut enabled = self.services(main.services, &global, &mut services);
        let main_service_key = main.service_key;
        let mut files = vec![self.report.origin.to_path_buf()];
        self.finish_file();

        for path in self.drop_ins(include.as_ref()) {
            files.push(path.clone());
            let text: Rc<str> = match std::fs::read(&path) {
                Err(e) => {
                    let mut r = Report::new(&path, "".into());
                    r.file_error(format!("cannot read: {}", e));
                    self.done.push(r);
                    continue;
                }
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(t) => t.into(),
                    Err(e) => {
                        let mut r = Report::new(&path, "".into());
                        r.errors
                            .push((0, not_utf8(e.as_bytes(), &path, e.utf8_error())));
                        self.done.push(r);
                        continue;
                    }
                },
            };
            self.report = Report::new(&path, text.clone());
            if let Some(doc) = self.document(&text, false) {
                defined += doc.services.len();
                enabled += self.services(doc.services, &global, &mut services);
            }
            self.finish_file();
        }

        self.clashes();
        // A configuration without services is refused unless it says so: a half-written or
        // truncated file read on SIGHUP would otherwise stop every service. Reported only when
        // nothing else is wrong: with other errors it is refused anyway.
        if enabled == 0 && !allowed_empty && self.total_errors() == 0 {
            const WHAT: &str = "a file without services would stop every running service; add a \
                                [service.NAME] table, or set allow_no_services = true in \
                                [superserver] if no service is intended";
            let main = &mut self.done[0];
            match main_service_key {
                _ if defined > 0 => main.file_error(
                    "no enabled service: every [service.NAME] table has enable = false, and a \
                     configuration without services would stop every running service; enable \
                     one, or set allow_no_services = true in [superserver] if no service is \
                     intended",
                ),
                // `service` that is not a table was reported above.
                Some(span) => main.error(span, "service", format!("no service defined: {WHAT}")),
                None => main.file_error(format!("no [service.NAME] table: {WHAT}")),
            }
        }

        Some(Config {
            global,
            services,
            files,
        })
    }

    /// Parse `text` (the current file) and shape its tables. `None` after a syntax error.
    /// A drop-in (`main == false`) holds `service` only.
    fn document<'i>(&mut self, text: &'i str, main: bool) -> Option<Document<'i>> {
        let (doc, syntax) = DeTable::parse_recoverable(text);
        // Only the first syntax error: the parser's recovery guesses, and what follows the
        // first error is often the same mistake seen again.
        if let Some(e) = syntax.first() {
            let span = e.span().unwrap_or(0..0);
            let message = self.syntax_message(span.clone(), &one_line(e.message()));
            self.error(span, "", message);
            return None;
        }
        let mut out = Document {
            global: None,
            services: Vec::new(),
            service_key: None,
        };
        for (key, value) in in_file_order(doc.into_inner()) {
            match key.get_ref().as_ref() {
                "superserver" if main => {
                    out.global = self.table::<RawGlobal>("superserver", key.span(), value);
                }
                "service" => {
                    let span = value.span();
                    out.service_key = Some(span.clone());
                    match value.into_inner() {
                        DeValue::Table(t) => {
                            for (name, table) in in_file_order(t) {
                                let path = format!("service.{}", key_segment(name.get_ref()));
                                let raw = self.table::<RawService>(&path, name.span(), table);
                                out.services.push((name, path, raw));
                            }
                        }
                        _ => self.error(
                            span,
                            "service",
                            "must be a table of services, e.g. [service.echo]",
                        ),
                    }
                }
                "superserver" => {
                    let main = self.done.first().map(|r| r.origin.display().to_string());
                    self.error(
                        key.span(),
                        "superserver",
                        format!(
                            "only the main file may have a [superserver] table; a drop-in \
                             holds [service.NAME] tables only (move these settings to {})",
                            main.unwrap_or_default()
                        ),
                    );
                }
                other if main => self.error(
                    key.span(),
                    key_segment(other),
                    unknown_key(other, TOP_LEVEL_KEYS),
                ),
                other => self.error(
                    key.span(),
                    key_segment(other),
                    unknown_key(other, DROP_IN_KEYS)
                        + "; a drop-in holds [service.NAME] tables only",
                ),
            }
        }
        Some(out)
    }

    /// Validate the services of the current file into `out`; returns how many of them are
    /// enabled (a table that failed to read counts as enabled: it was reported anyway).
    fn services(
        &mut self,
        raw: Vec<RawEntry<'_>>,
        global: &Global,
        out: &mut Vec<Service>,
    ) -> usize {
        let file = self.file_index();
        let mut enabled = 0;
        for (name, path, raw) in raw {
            let name_span = name.span();
            let name = name.into_inner().into_owned();
            let before = self.report.count();
            if let Err(msg) = check_service_name(&name) {
                self.error(name_span.clone(), &path, msg);
            }
            let (line, _) = self.report.position(name_span.start);
            // Within one file the TOML parser refuses a table defined twice.
            match self.names.entry(name.clone()) {
                Entry::Vacant(e) => {
                    e.insert((file, line));
                }
                Entry::Occupied(e) => {
                    let (other, other_line) = *e.get();
                    let other = self.done[other].origin.display().to_string();
                    self.error(
                        name_span.clone(),
                        &path,
                        format!(
                            "service {name:?} is already defined in {other}:{other_line}; service \
                             names are unique across the main file and its drop-ins"
                        ),
                    );
                }
            }
            if raw.as_ref().is_none_or(|(r, _)| r.enable != Some(false)) {
                enabled += 1;
            }
            let Some((raw, removed)) = raw else { continue };
            let svc = Svc {
                name: &name,
                path: &path,
                span: name_span,
                removed: &removed,
            };
            let service = self.service(&svc, raw, global);
            if self.report.count() == before {
                out.extend(service);
            }
        }
        enabled
    }

    /// The drop-in files to read, in order: each `include` pattern's matches, then
    /// `DIR/*.toml` for each of `LoadOptions::config_dirs`. Called with the main file in
    /// `done[0]`; errors about a pattern go there, at the pattern.
    fn drop_ins(&mut self, include: Option<&Spanned<Vec<Spanned<String>>>>) -> Vec<PathBuf> {
        let main = self.done[0].origin.clone();
        let mut seen: HashSet<PathBuf> = HashSet::new();
        seen.insert(std::fs::canonicalize(&main).unwrap_or(main.to_path_buf()));
        let mut out = Vec::new();
        let base = main.parent().unwrap_or(Path::new(""));
        for item in include.map(|l| l.get_ref().as_slice()).unwrap_or_default() {
            let pattern = item.get_ref();
            let key = "superserver.include";
            if pattern.is_empty() {
                self.done[0].error(
                    item.span(),
                    key,
                    "must not be empty: give a glob pattern such as \"superserver.d/*.toml\"",
                );
                continue;
            }
            // Checked alone, so that a position in the message is one in what was written.
            if let Err(e) = glob::Pattern::new(pattern) {
                self.done[0].error(
                    item.span(),
                    key,
                    format!(
                        "{pattern:?}: invalid glob pattern: {} (at character {})",
                        e.msg,
                        e.pos + 1
                    ),
                );
                continue;
            }
            let full = if Path::new(pattern).is_absolute() {
                pattern.clone()
            } else {
                let dir = glob::Pattern::escape(&base.to_string_lossy());
                if dir.is_empty() {
                    pattern.clone()
                } else {
                    format!("{}/{pattern}", dir.trim_end_matches('/'))
                }
            };
            match matches(&full) {
                Err(m) => self.done[0].error(item.span(), key, format!("{pattern:?}: {m}")),
                Ok(found) => {
                    for m in found {
                        match m {
                            Ok(path) => read_once(path, &mut seen, &mut out),
                            Err(m) => self.done[0].error(item.span(), key, m),
                        }
                    }
                }
            }
        }
        for dir in &self.opts.config_dirs {
            let standalone = |path: &Path, message: String| {
                let mut r = Report::new(path, "".into());
                r.file_error(message);
                r
            };
            let found = match std::fs::metadata(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Ok(m) if !m.is_dir() => {
                    Err("not a directory (given as a configuration directory)".to_owned())
                }
                _ => matches(&format!(
                    "{}/*.toml",
                    glob::Pattern::escape(&dir.to_string_lossy()).trim_end_matches('/')
                )),
            };
            match found {
                Err(m) => {
                    let r = standalone(dir, m);
                    self.done.push(r);
                }
                Ok(found) => {
                    for m in found {
                        match m {
                            Ok(path) => read_once(path, &mut seen, &mut out),
                            Err(m) => {
                                let r = standalone(dir, m);
                                self.done.push(r);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Deserialize one table into `T`, reporting every key that does not fit. Returns the value
    /// and the keys that were removed to get it, or `None` when `value` is not a table at all.
    ///
    /// Unknown keys are found by name; if the rest still does not fit, each key is tried alone
    /// (every field of a raw table is optional), so the cost is linear in the table's size.
    fn table<T: RawTable>(
        &mut self,
        path: &str,
        key_span: Range<usize>,
        value: Spanned<DeValue<'_>>,
    ) -> Option<(T, Vec<String>)> {
        let span = value.span();
        let DeValue::Table(mut table) = value.into_inner() else {
            self.error(
                span,
                path,
                "must be a table, e.g. [".to_owned() + path + "]",
            );
            return None;
        };
        let mut removed = Vec::new();
        let unknown: Vec<String> = table
            .iter()
            .filter(|(k, _)| !T::KEYS.contains(&k.get_ref().as_ref()))
            .map(|(k, _)| k.get_ref().to_string())
            .collect();
        for name in unknown {
            let (k, _) = table.remove_entry(name.as_str()).expect("key just listed");
            let key = format!("{path}.{}", key_segment(&name));
            self.error(k.span(), key, unknown_key(&name, T::KEYS));
            removed.push(name);
        }
        fn as_value<'i>(span: &Range<usize>, t: DeTable<'i>) -> ValueDeserializer<'i> {
            ValueDeserializer::from(Spanned::new(span.clone(), DeValue::Table(t)))
        }
        if let Ok(t) = T::deserialize(as_value(&span, table.clone())) {
            return Some((t, removed));
        }
        let names: Vec<String> = table.iter().map(|(k, _)| k.get_ref().to_string()).collect();
        for name in names {
            let (k, v) = table.remove_entry(name.as_str()).expect("key just listed");
            let mut alone = DeTable::new();
            alone.insert(k.clone(), v.clone());
            let err = match T::deserialize(as_value(&span, alone)) {
                Ok(_) => {
                    table.insert(k, v);
                    continue;
                }
                Err(e) => e,
            };
            let at = err.span().unwrap_or_else(|| k.span());
            let key = key_path(format!("{path}.{}", key_segment(&name)), &v, at.start);
            let mut message = clean_serde_message(err.message());
            if let (true, DeValue::String(text)) =
                (ARRAY_KEYS.contains(&name.as_str()), v.get_ref())
            {
                message += &format!("; write {name} = [{:?}]", text.as_ref());
            }
            self.error(at, key, message);
            removed.push(name);
        }
        match T::deserialize(as_value(&span, table)) {
            Ok(t) => Some((t, removed)),
            Err(err) => {
                let at = err.span().unwrap_or(key_span);
                self.error(at, path, clean_serde_message(err.message()));
                None
            }
        }
    }

    /// A TOML syntax error's message, with a hint for the common mistakes: an address or other
    /// value written without quotes, and a table or key defined twice (named, with the line
    /// of the first definition when it can be found).
    fn syntax_message(&self, span: Range<usize>, message: &str) -> String {
        let (line_text, line) = self.report.line_at(span.start);
        if message.starts_with("duplicate key") {
            return self.duplicate_message(span, line_text, line);
        }
        let Some((key, value)) = line_text.split_once('=') else {
            return message.to_owned();
        };
        let value = value.split(" #").next().unwrap_or("").trim();
        let key = key.trim();
        let looks_like_address = !value.is_empty()
            && !key.starts_with('[')
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".:[]/_+-".contains(c))
            && (value.contains(':') || value.matches('.').count() > 1 || value.contains('/'))
            && (!value.starts_with('[') || value.contains("]:"));
        if looks_like_address {
            format!("{message}; quote the value: {key} = {value:?}")
        } else {
            message.to_owned()
        }
    }

    fn duplicate_message(&self, span: Range<usize>, line_text: &str, line: usize) -> String {
        let token = self.report.text.get(span).unwrap_or("").trim();
        let trimmed = line_text.trim_start();
        if trimmed.starts_with('[') {
            let header = header_name(trimmed);
            let first = (1..line).find(|&l| {
                let t = self.report.line_text(l).trim_start();
                t.starts_with('[') && header_name(t) == header
            });
            return match first {
                Some(first) => format!(
                    "duplicate key: table [{header}] is defined twice (lines {first} and \
                     {line}); merge them into one table"
                ),
                None => format!(
                    "duplicate key: [{header}] is already defined earlier in the file; define \
                     each table once"
                ),
            };
        }
        // A `key = value` line: look for the first definition back to the table's header.
        let defines = |l: &str| {
            l.trim_start()
                .strip_prefix(token)
                .is_some_and(|rest| rest.trim_start().starts_with(['=', '.']))
        };
        let first = (1..line)
            .rev()
            .map(|l| (l, self.report.line_text(l)))
            .take_while(|(_, t)| !t.trim_start().starts_with('['))
            .filter(|(_, t)| defines(t))
            .last()
            .map(|(l, _)| l);
        let token = token.escape_debug();
        match first {
            Some(first) => format!(
                "duplicate key: `{token}` is defined twice in this table (lines {first} and \
                 {line}); keep one"
            ),
            None => format!("duplicate key: `{token}` is defined twice in this table; keep one"),
        }
    }

    fn global(&mut self, raw: RawGlobal) -> Global {
        let mut g = Global {
            shutdown_grace: Duration::from_secs(10),
            backlog: 4096,
            restart_backoff_min: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(30),
            control: Control::Default,
            control_group: None,
            metrics: None,
            agent: None,
        };
        if let Some(c) = &raw.control {
            g.control = match c.get_ref() {
                RawControl::Switch(true) => Control::Default,
                RawControl::Switch(false) => Control::Off,
                RawControl::Path(p) if Path::new(p).is_absolute() => {
                    Control::Path(PathBuf::from(crate::normalize_path(p)))
                }
                RawControl::Path(p) => {
                    self.error(
                        c.span(),
                        "superserver.control",
                        format!(
                            "{:?} is not an absolute path; write e.g. control = \"/run/superserver/control\", or false",
                            p
                        ),
                    );
                    Control::Default
                }
            };
        }
        if let Some(gr) = &raw.control_group {
            match crate::values::resolve_group(gr.get_ref()) {
                Ok(gid) => g.control_group = Some(gid.as_raw()),
                Err(m) => self.error(gr.span(), "superserver.control_group", m),
            }
        }
        if let Some(m) = &raw.metrics {
            g.metrics = self.tcp_address(
                m,
                "superserver.metrics",
                "a TCP address such as \"127.0.0.1:9100\" (Prometheus scrapes over HTTP)",
            );
        }
        if let Some(a) = &raw.agent {
            g.agent = self.tcp_address(
                a,
                "superserver.agent",
                "a TCP address such as \"10.0.0.2:9999\" (HAProxy's agent-check connects over \
                 TCP)",
            );
        }
        if let Some(d) = &raw.shutdown_grace {
            g.shutdown_grace = self
                .duration(d, "superserver.shutdown_grace", MAX_SHUTDOWN_GRACE)
                .unwrap_or(g.shutdown_grace);
        }
        if let Some(b) = &raw.backlog {
            g.backlog = self
                .int_in(b, "superserver.backlog", 1, 65535)
                .map_or(g.backlog, |b| b as u32);
        }
        let min = raw
            .restart_backoff_min
            .as_ref()
            .and_then(|d| self.duration(d, "superserver.restart_backoff_min", MAX_RESTART_BACKOFF));
        if let (Some(min), Some(d)) = (min, &raw.restart_backoff_min) {
            if min.is_zero() {
                self.error(
                    d.span(),
                    "superserver.restart_backoff_min",
                    "must be greater than 0 (a failing service would be restarted in a busy loop)",
                );
            }
        }
        let max = raw
            .restart_backoff_max
            .as_ref()
            .and_then(|d| self.duration(d, "superserver.restart_backoff_max", MAX_RESTART_BACKOFF));
        g.restart_backoff_min = min.unwrap_or(g.restart_backoff_min);
        g.restart_backoff_max = max.unwrap_or(g.restart_backoff_max);
        if g.restart_backoff_max < g.restart_backoff_min {
            let (span, key) = match (&raw.restart_backoff_max, &raw.restart_backoff_min) {
                (Some(d), _) => (d.span(), "superserver.restart_backoff_max"),
                (None, Some(d)) => (d.span(), "superserver.restart_backoff_min"),
                (None, None) => unreachable!("defaults are ordered"),
            };
            self.error(
                span,
                key,
                format!(
                    "restart_backoff_max ({}) must be at least restart_backoff_min ({})",
                    humantime::format_duration(g.restart_backoff_max),
                    humantime::format_duration(g.restart_backoff_min),
                ),
            );
        }
        g
    }

    fn service(&mut self, s: &Svc, raw: RawService, global: &Global) -> Option<Service> {
        let mode_known = !s.removed("mode");
        let mode = match raw.mode.as_ref().map(|m| *m.get_ref()) {
            Some(RawMode::Nowait) => Mode::Nowait,
            _ => Mode::Wait,
        };
        let nowait = mode == Mode::Nowait;

        // nowait-only keys.
        if mode_known && !nowait {
            let spans = [
                (
                    "max_per_source",
                    raw.max_per_source.as_ref().map(Spanned::span),
                ),
                (
                    "source_prefix_v4",
                    raw.source_prefix_v4.as_ref().map(Spanned::span),
                ),
                (
                    "source_prefix_v6",
                    raw.source_prefix_v6.as_ref().map(Spanned::span),
                ),
                ("overflow", raw.overflow.as_ref().map(Spanned::span)),
                ("connection", raw.connection.as_ref().map(Spanned::span)),
                ("max_duration", raw.max_duration.as_ref().map(Spanned::span)),
            ];
            if let Some(p) = &raw.proxy_protocol {
                self.error(
                    p.span(),
                    s.key("proxy_protocol"),
                    "only for mode = \"nowait\": a wait-mode service accepts its own \
                     connections, so it reads the header itself (small-services \
                     --proxy-protocol v2 --proxy-from CIDR, or the small_services::proxy \
                     library)",
                );
            }
            for (key, span) in spans {
                if let Some(span) = span {
                    self.error(
                        span,
                        s.key(key),
                        "only for mode = \"nowait\"; remove it or set mode = \"nowait\"",
                    );
                }
            }
        }
        // wait-only keys.
        if mode_known && nowait {
            let spans = [
                (
                    "instances",
                    raw.instances.as_ref().map(Spanned::span),
                    "a nowait service starts one child per connection, up to max_instances; \
                     use max_instances",
                ),
                (
                    "handoff",
                    raw.handoff.as_ref().map(Spanned::span),
                    "a nowait child gets the accepted connection, passed as connection says; \
                     use connection = \"stdio\" or \"listen-fds\"",
                ),
            ];
            for (key, span, hint) in spans {
                if let Some(span) = span {
                    self.error(
                        span,
                        s.key(key),
                        format!("only for mode = \"wait\": {hint}"),
                    );
                }
            }
        }

        let argv_program = self.exec(s, raw.exec);
        let enabled = raw.enable.unwrap_or(true);
        let listen = self.listen(s, raw.listen, mode_known.then_some(mode), enabled);

        let backlog = raw
            .backlog
            .as_ref()
            .and_then(|b| self.int_in(b, &s.key("backlog"), 1, 65535))
            .map_or(global.backlog, |b| b as u32);

        let max_instances = match (&raw.max_instances, mode_known, nowait) {
            (None, _, true) => Some(64),
            (None, _, false) => Some(1),
            (Some(m), _, true) => self.int_in(m, &s.key("max_instances"), 1, 65536),
            (Some(m), true, false) => {
                if *m.get_ref() != 1 {
                    self.error(
                        m.span(),
                        s.key("max_instances"),
                        "mode = \"wait\" runs one process for all connections; \
                         remove max_instances or set mode = \"nowait\"",
                    );
                }
                Some(1)
            }
            (Some(_), false, false) => None,
        };
        let max_instances = max_instances.map(|m| m as u32);

        let mut per_source = None;
        if !(mode_known && nowait) {
            // Reported above as nowait-only, or the mode is unknown.
        } else if let Some(m) = &raw.max_per_source {
            let hi = max_instances.map_or(65536, i64::from);
            let max = self.int_in(m, &s.key("max_per_source"), 1, hi);
            let v4 = match &raw.source_prefix_v4 {
                Some(p) => self.int_in(p, &s.key("source_prefix_v4"), 0, 32),
                None => Some(32),
            };
            let v6 = match &raw.source_prefix_v6 {
                Some(p) => self.int_in(p, &s.key("source_prefix_v6"), 0, 128),
                None => Some(128),
            };
            if let (Some(max), Some(v4), Some(v6)) = (max, v4, v6) {
                per_source = Some(PerSource {
                    max: max as u32,
                    prefix_v4: v4 as u8,
                    prefix_v6: v6 as u8,
                });
            }
        } else if !s.removed("max_per_source") {
            for (key, p) in [
                ("source_prefix_v4", &raw.source_prefix_v4),
                ("source_prefix_v6", &raw.source_prefix_v6),
            ] {
                if let Some(p) = p {
                    self.error(
                        p.span(),
                        s.key(key),
                        "has no effect without max_per_source; add max_per_source or remove it",
                    );
                }
            }
        }

        let instances = match &raw.instances {
            Some(n) if !nowait => self
                .int_in(n, &s.key("instances"), 1, i64::from(MAX_WAIT_INSTANCES))
                .map(|n| n as u32),
            _ => Some(1),
        };
        let max_duration = match &raw.max_duration {
            Some(d) if mode_known && nowait => self.positive_duration(
                d,
                &s.key("max_duration"),
                MAX_SERVICE_DURATION,
                "must be greater than 0; remove it for no limit",
            ),
            _ => None,
        };
        let handoff = match &raw.handoff {
            Some(h) if *h.get_ref() == RawHandoff::Stdin && !nowait => {
                self.stdin_handoff(s, h.span(), listen.as_deref());
                Handoff::Stdin
            }
            _ => Handoff::ListenFds,
        };
        let proxy = self.proxy(
            s,
            raw.proxy_protocol.as_ref(),
            raw.proxy_from.as_ref(),
            raw.proxy_timeout.as_ref(),
            listen.as_deref(),
            mode_known && nowait,
        );
        let log_peer = match raw.log_peer.map(Spanned::into_inner) {
            Some(RawLogPeer::Masked) => LogPeer::Masked,
            Some(RawLogPeer::None) => LogPeer::None,
            _ => LogPeer::Full,
        };

        let overflow = match raw.overflow.map(Spanned::into_inner) {
            Some(RawOverflow::Close) => Overflow::Close,
            _ => Overflow::Hold,
        };
        let connection = match raw.connection.map(Spanned::into_inner) {
            Some(RawConnection::ListenFds) => ConnectionPassing::ListenFds,
            _ => ConnectionPassing::Stdio,
        };

        let rate = raw.rate.as_ref().and_then(|r| {
            parse_rate(r.get_ref())
                .map_err(|m| self.error(r.span(), s.key("rate"), m))
                .ok()
        });

        let mut access = AccessRules::default();
        let unix_only = listen
            .as_ref()
            .is_some_and(|l| l.iter().all(|l| matches!(l.addr, ListenAddr::Unix(_))));
        for (key, list, out) in [
            ("allow", &raw.allow, &mut access.allow),
            ("deny", &raw.deny, &mut access.deny),
        ] {
            let Some(list) = list else { continue };
            if unix_only && !list.get_ref().is_empty() {
                self.error(
                    list.span(),
                    s.key(key),
                    "has no effect: every socket of this service is unix:, and a unix: peer has \
                     no IP address; remove it",
                );
                continue;
            }
            for item in list.get_ref() {
                match parse_net(item.get_ref()) {
                    Ok(net) => out.push(net),
                    Err(m) => self.report.error(item.span(), s.key(key), m),
                }
            }
        }

        // `user_if_root` is `user` for a root superserver; an unprivileged one runs the
        // service as itself (it could not switch anyway).
        let user = match (&raw.user, &raw.user_if_root) {
            (Some(_), Some(u)) => {
                self.error(
                    u.span(),
                    s.key("user_if_root"),
                    "user and user_if_root exclude each other; keep one",
                );
                raw.user.as_ref()
            }
            (None, Some(u)) => self.opts.running_as_root.then_some(u),
            (u, None) => u.as_ref(),
        };
        let credentials = self.credentials(s, user, raw.group.as_ref());
        let allow_root = raw.allow_root.unwrap_or(false);
        if let Some(credentials) = &credentials {
            let as_root = credentials.as_ref().is_none_or(|c| c.uid == 0);
            if self.opts.running_as_root && as_root && !allow_root && !s.removed("allow_root") {
                let (span, key) = match user {
                    Some(u) => (u.span(), s.key("user")),
                    None => (s.span.clone(), s.path.to_owned()),
                };
                self.error(
                    span,
                    key,
                    "refusing to run service as root; set user = \"nobody\" (or another user), \
                     user_if_root = \"nobody\" (that user when the superserver is root, itself \
                     otherwise) or allow_root = true",
                );
            }
        }

        let unix_socket = self.unix_socket(
            s,
            raw.socket_mode.as_ref(),
            raw.socket_user.as_ref(),
            raw.socket_group.as_ref(),
            listen.as_deref(),
        );

        let mut env = std::collections::BTreeMap::new();
        for (name, value) in raw.env.map(|e| e.0).into_iter().flatten() {
            let key = s.key(&format!("env.{}", key_segment(name.get_ref())));
            if let Err(m) = check_env_name(name.get_ref()) {
                self.error(name.span(), key, m);
            } else if value.get_ref().contains('\0') {
                self.error(value.span(), key, "value must not contain a NUL character");
            } else {
                env.insert(name.into_inner(), value.into_inner());
            }
        }
        let pass_env: Arc<[String]> = match raw.pass_env {
            None => default_pass_env(),
            Some(list) => {
                let mut out = Vec::new();
                for name in list {
                    match check_env_name(name.get_ref()) {
                        Ok(()) => out.push(name.into_inner()),
                        Err(m) => self.error(name.span(), s.key("pass_env"), m),
                    }
                }
                out.into()
            }
        };

        let working_directory = raw.working_directory.as_ref().and_then(|d| {
            check_directory(d.get_ref())
                .map_err(|m| self.error(d.span(), s.key("working_directory"), m))
                .ok()
        });
        let umask = raw
            .umask
            .as_ref()
            .and_then(|u| self.octal(u, &s.key("umask")));
        let limits = Limits {
            nofile: raw
                .limit_nofile
                .as_ref()
                .and_then(|l| self.int_in(l, &s.key("limit_nofile"), 1, i64::MAX))
                .map(|l| l as u64),
            nproc: raw
                .limit_nproc
                .as_ref()
                .and_then(|l| self.int_in(l, &s.key("limit_nproc"), 1, i64::MAX))
                .map(|l| l as u64),
        };

        let (program, argv) = argv_program?;
        Some(Service {
            name: s.name.to_owned(),
            file: self.report.origin.clone(),
            enabled,
            mode,
            program,
            argv: argv.into(),
            listen: listen?.into(),
            backlog,
            max_instances: max_instances?,
            instances: instances?,
            overflow,
            credentials: credentials?.map(Box::new),
            allow_root,
            no_new_privs: raw.no_new_privs.unwrap_or(false),
            pass_env,
            connection,
            handoff,
            log_peer,
            extra: Extra {
                max_duration,
                per_source,
                rate,
                access,
                env,
                working_directory,
                umask,
                limits,
                unix_socket,
            }
            .boxed(),
            proxy,
        })
    }

    /// `proxy_protocol`, `proxy_from`, `proxy_timeout` (nowait; the mode was checked).
    fn proxy(
        &mut self,
        s: &Svc,
        version: Option<&Spanned<RawProxyVersion>>,
        proxy_from: Option<&Spanned<Vec<Spanned<String>>>>,
        proxy_timeout: Option<&Spanned<String>>,
        listen: Option<&[Listen]>,
        nowait: bool,
    ) -> Option<Box<ProxyProtocol>> {
        let Some(version) = version else {
            if !s.removed("proxy_protocol") {
                for (key, span) in [
                    ("proxy_from", proxy_from.map(Spanned::span)),
                    ("proxy_timeout", proxy_timeout.map(Spanned::span)),
                ] {
                    if let Some(span) = span {
                        self.error(
                            span,
                            s.key(key),
                            "has no effect without proxy_protocol; add proxy_protocol = \"v2\" \
                             (or \"v1\", \"any\") or remove it",
                        );
                    }
                }
            }
            return None;
        };
        if !nowait {
            return None;
        }
        let key = s.key("proxy_protocol");
        if let Some(l) =
            listen.and_then(|l| l.iter().find(|l| !matches!(l.addr, ListenAddr::Tcp(_))))
        {
            self.error(
                version.span(),
                key.clone(),
                format!(
                    "needs TCP listeners: the balancers are trusted by their IP address, and {} \
                     has none; serve the PROXY protocol on a TCP address",
                    l.addr
                ),
            );
        }
        let mut from = Vec::new();
        match proxy_from {
            None => self.error(
                version.span(),
                key,
                "needs proxy_from, the balancers trusted to send the header, e.g. proxy_from = \
                 [\"10.0.0.2\"]: a header from anyone else would let a client pick the address \
                 every rule and log sees",
            ),
            Some(list) if list.get_ref().is_empty() => self.error(
                list.span(),
                s.key("proxy_from"),
                "is empty, so every connection would be refused; name the balancers, e.g. \
                 [\"10.0.0.2\"]",
            ),
            Some(list) => {
                for item in list.get_ref() {
                    match parse_net(item.get_ref()) {
                        Ok(net) => from.push(net),
                        Err(m) => self.report.error(item.span(), s.key("proxy_from"), m),
                    }
                }
            }
        }
        let timeout = proxy_timeout
            .and_then(|d| {
                self.positive_duration(
                    d,
                    &s.key("proxy_timeout"),
                    MAX_PROXY_TIMEOUT,
                    "must be greater than 0 (the spec asks for 3s)",
                )
            })
            .unwrap_or(Duration::from_secs(3));
        let version = match version.get_ref() {
            RawProxyVersion::V1 => ProxyVersion::V1,
            RawProxyVersion::V2 => ProxyVersion::V2,
            RawProxyVersion::Any => ProxyVersion::Any,
        };
        Some(Box::new(ProxyProtocol {
            version,
            from,
            timeout,
        }))
    }

    /// `handoff = "stdin"`: exactly one socket, TCP or UDP (`listen` is `None` when it was
    /// reported already).
    fn stdin_handoff(&mut self, s: &Svc, span: Range<usize>, listen: Option<&[Listen]>) {
        let Some(listen) = listen else { return };
        if listen.len() != 1 {
            self.error(
                span,
                s.key("handoff"),
                format!(
                    "handoff = \"stdin\" puts one socket on stdin and stdout, and this service \
                     has {}; listen on one address, or use handoff = \"listen-fds\"",
                    listen.len()
                ),
            );
        } else if let ListenAddr::Unix(_) = listen[0].addr {
            self.error(
                span,
                s.key("handoff"),
                format!(
                    "handoff = \"stdin\" takes a tcp:// or udp:// socket (the inetd wait \
                     protocol), not {}; use handoff = \"listen-fds\"",
                    listen[0].addr
                ),
            );
        }
    }

    /// `exec`: the argv and the resolved program.
    fn exec(
        &mut self,
        s: &Svc,
        exec: Option<Spanned<Vec<Spanned<String>>>>,
    ) -> Option<(Arc<Path>, Vec<String>)> {
        let Some(exec) = exec else {
            if !s.removed("exec") {
                self.error(
                    s.span.clone(),
                    s.path,
                    "exec is required: the program and its arguments, e.g. exec = [\"/bin/cat\"]",
                );
            }
            return None;
        };
        let span = exec.span();
        let argv = exec.into_inner();
        let Some(first) = argv.first() else {
            self.error(
                span,
                s.key("exec"),
                "must not be empty: give the program and its arguments, e.g. exec = [\"/bin/cat\"]",
            );
            return None;
        };
        let mut ok = true;
        for arg in &argv {
            if arg.get_ref().contains('\0') {
                self.error(
                    arg.span(),
                    s.key("exec"),
                    "arguments must not contain a NUL character",
                );
                ok = false;
            }
        }
        let resolved = match self.programs.get(first.get_ref()) {
            Some(known) => known.clone(),
            None => {
                let path = std::env::var_os("PATH");
                let resolved = resolve_program(
                    first.get_ref(),
                    self.opts.exe_dir.as_deref(),
                    path.as_deref(),
                )
                .map(Arc::from);
                self.programs
                    .insert(first.get_ref().clone(), resolved.clone());
                resolved
            }
        };
        let program = match resolved {
            Ok(p) => Some(p),
            Err(m) => {
                self.error(first.span(), s.key("exec"), m);
                None
            }
        };
        // Fresh copies, exactly sized, rather than the parser's strings: these live as long as
        // the service, and the parser's are scattered among what it frees when it is done.
        let argv = argv
            .iter()
            .map(|a| a.get_ref().as_str().to_owned())
            .collect();
        Some((program?, argv)).filter(|_| ok)
    }

    /// `listen`: the sockets in file order. `mode` is `None` when it could not be read.
    fn listen(
        &mut self,
        s: &Svc,
        listen: Option<Spanned<RawListen>>,
        mode: Option<Mode>,
        enabled: bool,
    ) -> Option<Vec<Listen>> {
        let Some(listen) = listen else {
            if !s.removed("listen") {
                self.error(
                    s.span.clone(),
                    s.path,
                    "no socket to listen on: add e.g. listen = \"127.0.0.1:7000\"",
                );
            }
            return None;
        };
        let outer = listen.span();
        let key = s.key("listen");
        // (fd name, its key path, address text with span)
        let mut items: Vec<(String, String, Spanned<String>)> = Vec::new();
        let mut names = 0;
        let before = self.report.count();
        match listen.into_inner() {
            RawListen::Unnamed(list) => {
                names = 1;
                for a in list {
                    items.push((s.name.to_owned(), key.clone(), with_span(a, &outer)));
                }
            }
            RawListen::Named(entries) => {
                for (fd, addrs) in entries {
                    names += 1;
                    let fd_key = format!("{key}.{}", key_segment(fd.get_ref()));
                    if let Err(m) = check_fd_name(fd.get_ref()) {
                        self.error(fd.span(), &fd_key, m);
                    }
                    let span = addrs.span();
                    let addrs = addrs.into_inner().0;
                    if addrs.is_empty() {
                        self.error(span.clone(), &fd_key, "no address given for this fd name");
                    }
                    for a in addrs {
                        items.push((fd.get_ref().clone(), fd_key.clone(), with_span(a, &span)));
                    }
                }
            }
        }
        if items.is_empty() && self.report.count() == before {
            self.error(
                outer.clone(),
                &key,
                "no socket to listen on: give at least one address",
            );
        }
        if items.len() > MAX_SOCKETS {
            self.error(
                outer.clone(),
                &key,
                format!(
                    "{} sockets; a service may have at most {MAX_SOCKETS}: split it into \
                     several services",
                    items.len()
                ),
            );
        } else if mode == Some(Mode::Wait) && items.len() > MAX_WAIT_SOCKETS {
            self.error(
                outer.clone(),
                &key,
                format!(
                    "mode = \"wait\" hands all sockets to one process, at most \
                     {MAX_WAIT_SOCKETS}, and this service has {}; split it into several services",
                    items.len()
                ),
            );
        }
        if mode == Some(Mode::Nowait) && names > 1 {
            self.error(
                outer,
                &key,
                "mode = \"nowait\" takes one fd name: the child gets only the accepted connection; \
                 list all addresses under one name",
            );
        }
        let mut out = Vec::new();
        for (name, key, text) in items {
            let addr = match parse_listen_addr(text.get_ref()) {
                Ok(a) => a,
                Err(m) => {
                    self.error(text.span(), &key, m);
                    continue;
                }
            };
            if let ListenAddr::Unix(path) = &addr {
                let dir = path.parent().unwrap_or(path);
                let checked = match self.socket_dirs.get(dir) {
                    Some(outcome) => outcome.clone(),
                    None => {
                        let outcome = check_socket_directory(path);
                        self.socket_dirs.insert(dir.to_path_buf(), outcome.clone());
                        outcome
                    }
                };
                if let Err(m) = checked {
                    self.error(text.span(), &key, m);
                }
            }
            if mode == Some(Mode::Nowait) && !addr.is_stream() {
                self.error(
                    text.span(),
                    &key,
                    format!(
                        "{addr}: mode = \"nowait\" needs stream sockets (tcp:// or unix:), \
                         a UDP socket has no connection to accept; use mode = \"wait\""
                    ),
                );
            }
            // A disabled service binds nothing: its addresses clash with none.
            if enabled {
                self.seen.push(Seen {
                    service: s.name.to_owned(),
                    key: key.clone(),
                    addr: addr.clone(),
                    file: self.file_index(),
                    span: text.span(),
                });
            }
            out.push(Listen { name, addr });
        }
        Some(out).filter(|_| self.report.count() == before)
    }

    /// `user` / `group`. `None`: an error was reported (or the input was unreadable);
    /// `Some(None)`: run as the superserver's own user.
    fn credentials(
        &mut self,
        s: &Svc,
        user: Option<&Spanned<NameOrId>>,
        group: Option<&Spanned<NameOrId>>,
    ) -> Option<Option<Credentials>> {
        if s.removed("user") || s.removed("group") {
            return None;
        }
        let gid = match group {
            Some(g) => match resolve_group(g.get_ref()) {
                Ok(gid) => Some(gid),
                Err(m) => {
                    self.error(g.span(), s.key("group"), m);
                    None
                }
            },
            None => None,
        };
        let (pw, written) = match user {
            Some(u) => match resolve_user(u.get_ref()) {
                Ok(pw) => {
                    let written = match u.get_ref() {
                        NameOrId::Name(n) => n.clone(),
                        NameOrId::Id(_) => pw.name.clone(),
                    };
                    (pw, written)
                }
                Err(m) => {
                    self.error(u.span(), s.key("user"), m);
                    return None;
                }
            },
            None => {
                let Some(g) = group else { return Some(None) };
                // A group alone: the superserver's own user with another primary group.
                match User::from_uid(Uid::current()) {
                    Ok(Some(pw)) => {
                        let name = pw.name.clone();
                        (pw, name)
                    }
                    _ => {
                        self.error(
                            g.span(),
                            s.key("group"),
                            format!(
                                "the superserver's uid {} has no passwd entry; set user as well",
                                Uid::current()
                            ),
                        );
                        return None;
                    }
                }
            }
        };
        if group.is_some() && gid.is_none() {
            return None;
        }
        let gid = gid.unwrap_or(pw.gid);
        let groups = CString::new(pw.name.clone())
            .ok()
            .and_then(|n| nix::unistd::getgrouplist(&n, gid).ok());
        let Some(groups) = groups else {
            let span = user.or(group).map(Spanned::span).unwrap_or(s.span.clone());
            self.error(
                span,
                s.key("user"),
                format!("cannot list the groups of user {:?}", pw.name),
            );
            return None;
        };
        let mut list: Vec<u32> = vec![gid.as_raw()];
        for g in groups {
            if !list.contains(&g.as_raw()) {
                list.push(g.as_raw());
            }
        }
        Some(Some(Credentials {
            user: written,
            uid: pw.uid.as_raw(),
            gid: gid.as_raw(),
            groups: list,
            home: pw.dir,
        }))
    }

    /// `socket_mode`, `socket_user`, `socket_group`.
    fn unix_socket(
        &mut self,
        s: &Svc,
        mode: Option<&Spanned<Octal>>,
        user: Option<&Spanned<NameOrId>>,
        group: Option<&Spanned<NameOrId>>,
        listen: Option<&[Listen]>,
    ) -> UnixSocketOptions {
        let mut out = UnixSocketOptions::default();
        let has_unix =
            listen.is_none_or(|l| l.iter().any(|l| matches!(l.addr, ListenAddr::Unix(_))));
        let spans = [
            ("socket_mode", mode.map(Spanned::span)),
            ("socket_user", user.map(Spanned::span)),
            ("socket_group", group.map(Spanned::span)),
        ];
        if !has_unix {
            for (key, span) in spans {
                if let Some(span) = span {
                    self.error(
                        span,
                        s.key(key),
                        "has no effect: the service has no unix: listener",
                    );
                }
            }
        }
        if let Some(m) = mode {
            out.mode = self.octal(m, &s.key("socket_mode"));
        }
        if let Some(u) = user {
            match resolve_user(u.get_ref()) {
                Ok(pw) => out.uid = Some(pw.uid.as_raw()),
                Err(m) => self.error(u.span(), s.key("socket_user"), m),
            }
        }
        if let Some(g) = group {
            match resolve_group(g.get_ref()) {
                Ok(gid) => out.gid = Some(gid.as_raw()),
                Err(m) => self.error(g.span(), s.key("socket_group"), m),
            }
        }
        out
    }

    /// Listen addresses used twice, or a wildcard and a specific address on the same port,
    /// across every file (all of them in `done`). Each error goes to the file of the later
    /// address and names the place of the earlier one.
    fn clashes(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        let addrs: Vec<&ListenAddr> = seen.iter().map(|s| &s.addr).collect();
        for (this, clash) in seen.iter().zip(first_clashes(&addrs)) {
            let Some((other, what)) = clash else { continue };
            let other = &seen[other];
            let whose = if other.service == this.service && other.file == this.file {
                "earlier in this service".to_owned()
            } else {
                format!("by service {:?}", other.service)
            };
            let (line, _) = self.done[other.file].position(other.span.start);
            let place = if other.file == this.file {
                format!("line {line}")
            } else {
                format!("{}:{line}", self.done[other.file].origin.display())
            };
            let msg = match what {
                Clash::Same => format!("{} is already used {whose} ({place})", this.addr),
                Clash::Overlap => format!(
                    "{} overlaps {} used {whose} ({place}): a wildcard and a specific \
                     address on the same port and protocol cannot both be bound",
                    this.addr, other.addr
                ),
            };
            self.done[this.file].error(this.span.clone(), &this.key, msg);
        }
    }

    /// A humantime duration of at most `max`.
    /// A `"HOST:PORT"` TCP address (`hint` says what to write when it is another kind).
    fn tcp_address(
        &mut self,
        v: &Spanned<String>,
        key: &str,
        hint: &str,
    ) -> Option<std::net::SocketAddr> {
        match crate::parse_listen_addr(v.get_ref()) {
            Ok(ListenAddr::Tcp(sa)) => Some(sa),
            Ok(_) => {
                self.error(v.span(), key.to_owned(), hint);
                None
            }
            Err(e) => {
                self.error(v.span(), key.to_owned(), e);
                None
            }
        }
    }

    /// A duration that must not be zero (`why` says so when it is).
    fn positive_duration(
        &mut self,
        d: &Spanned<String>,
        key: &str,
        max: Duration,
        why: &str,
    ) -> Option<Duration> {
        match self.duration(d, key, max) {
            Some(v) if v.is_zero() => {
                self.error(d.span(), key.to_owned(), why);
                None
            }
            v => v,
        }
    }

    fn duration(&mut self, d: &Spanned<String>, key: &str, max: Duration) -> Option<Duration> {
        let text = d.get_ref();
        match humantime::parse_duration(text) {
            Err(e) => {
                self.error(
                    d.span(),
                    key,
                    format!("invalid duration {text:?} ({e}); write e.g. \"10s\" or \"500ms\""),
                );
                None
            }
            Ok(v) if v > max => {
                self.error(
                    d.span(),
                    key,
                    format!(
                        "duration {text:?} is too long: must be at most {}",
                        humantime::format_duration(max)
                    ),
                );
                None
            }
            Ok(v) => Some(v),
        }
    }

    fn int_in(&mut self, v: &Spanned<i64>, key: &str, lo: i64, hi: i64) -> Option<i64> {
        let n = *v.get_ref();
        if (lo..=hi).contains(&n) {
            return Some(n);
        }
        let msg = if hi == i64::MAX {
            format!("must be at least {lo}, got {n}")
        } else {
            format!("must be between {lo} and {hi}, got {n}")
        };
        self.error(v.span(), key, msg);
        None
    }

    /// A mode or umask: an octal string, or an integer written in TOML's octal (`0o022`). A
    /// decimal integer other than 0 is refused: TOML reads `22` as twenty-two, which is not
    /// what anyone writing a umask means.
    fn octal(&mut self, v: &Spanned<Octal>, key: &str) -> Option<u32> {
        let n = match v.get_ref() {
            Octal::Int(i) => {
                let written = self
                    .report
                    .text
                    .get(v.span())
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                let digits = written.trim_start_matches('+').replace('_', "");
                if !written.starts_with("0o") && *i != 0 {
                    let hint = if !digits.is_empty()
                        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
                    {
                        let d = digits.trim_start_matches('0');
                        format!("write \"0{d}\" (a string) or 0o{d:0>3}")
                    } else {
                        "write an octal string such as \"022\" or TOML's 0o022".to_owned()
                    };
                    self.error(
                        v.span(),
                        key,
                        format!(
                            "{written} is a decimal number in TOML ({i:#o}), not octal; {hint}"
                        ),
                    );
                    return None;
                }
                Some(*i)
            }
            Octal::Text(t) => {
                let digits = t.strip_prefix("0o").unwrap_or(t);
                i64::from_str_radix(digits, 8)
                    .ok()
                    .filter(|_| !digits.starts_with(['+', '-']))
            }
        };
        match n {
            Some(n) if (0..=0o777).contains(&n) => Some(n as u32),
            Some(n) => {
                self.error(
                    v.span(),
                    key,
                    format!("{n:#o} is out of range: must be at most 0o777"),
                );
                None
            }
            None => {
                let Octal::Text(t) = v.get_ref() else {
                    unreachable!()
                };
                self.error(
                    v.span(),
                    key,
                    format!("invalid octal mode {t:?}; write e.g. \"022\""),
                );
                None
            }
        }
    }
}

/// The service being validated.
struct Svc<'a> {
    name: &'a str,
    /// `service.NAME`
    path: &'a str,
    /// Span of the name in the table header.
    span: Range<usize>,
    /// Keys that failed to deserialize (already reported).
    removed: &'a [String],
}

impl Svc<'_> {
    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    fn removed(&self, key: &str) -> bool {
        self.removed.iter().any(|k| k == key)
    }
}

/// The paths matching a glob pattern, in lexical order, each a regular file or the error
/// naming the path that cannot be read or is not a regular file. `Err`: a bad pattern.
fn matches(pattern: &str) -> Result<Vec<Result<PathBuf, String>>, String> {
    // A leading dot must be written: editors' lock and backup files (`.#x.toml`) are skipped.
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let paths = glob::glob_with(pattern, opts).map_err(|e| {
        format!(
            "invalid glob pattern: {} (at character {})",
            e.msg,
            e.pos + 1
        )
    })?;
    let mut out = Vec::new();
    let mut found = Vec::new();
    for p in paths {
        match p {
            Ok(p) => found.push(p),
            Err(e) => out.push(Err(format!(
                "{}: cannot read: {}",
                e.path().display(),
                e.error()
            ))),
        }
    }
    found.sort();
    for p in found {
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => out.push(Ok(p)),
            Ok(_) => out.push(Err(format!(
                "{}: not a regular file; a drop-in must be a TOML file",
                p.display()
            ))),
            Err(e) => out.push(Err(format!("{}: cannot read: {e}", p.display()))),
        }
    }
    Ok(out)
}

/// A lone string (span 0..0, see `raw`) takes the span of its parent value.
fn with_span(s: Spanned<String>, parent: &Range<usize>) -> Spanned<String> {
    if s.span() == (0..0) {
        Spanned::new(parent.clone(), s.into_inner())
    } else {
        s
    }
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

/// The dotted key path of the innermost key at `offset` under `value`.
fn key_path(prefix: String, value: &Spanned<DeValue<'_>>, offset: usize) -> String {
    match value.get_ref() {
        DeValue::Table(t) => {
            for (k, v) in t.iter() {
                let path = format!("{prefix}.{}", key_segment(k.get_ref()));
                if contains(&k.span(), offset) {
                    return path;
                }
                if contains(&v.span(), offset) {
                    return key_path(path, v, offset);
                }
            }
            prefix
        }
        DeValue::Array(a) => a
            .iter()
            .find(|v| contains(&v.span(), offset))
            .map_or_else(|| prefix.clone(), |v| key_path(prefix.clone(), v, offset)),
        _ => prefix,
    }
}

/// A key as written in a dotted path: bare if it can be, else quoted.
fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_owned()
    } else {
        format!("\"{}\"", key.escape_debug())
    }
}

/// Keys whose value is an array of strings: a lone string there gets a hint to bracket it.
const ARRAY_KEYS: &[&str] = &["exec", "allow", "deny", "pass_env", "include", "proxy_from"];

/// "unknown key `listn` (did you mean `listen`?), expected one of `mode`, `exec`, …".
fn unknown_key(name: &str, keys: &[&str]) -> String {
    let list = keys
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let shown = name.escape_debug();
    match did_you_mean(name, keys) {
        Some(k) => format!("unknown key `{shown}` (did you mean `{k}`?), expected one of {list}"),
        None => format!("unknown key `{shown}`, expected one of {list}"),
    }
}

/// The accepted key closest to `name`, if it is close enough to be a typo: at most one edit
/// for short keys, up to a third of the length for longer ones (case ignored).
fn did_you_mean<'k>(name: &str, keys: &[&'k str]) -> Option<&'k str> {
    let longest = keys.iter().map(|k| k.len()).max().unwrap_or(0);
    // No typo of a key is much longer than the key (and a huge name would make this slow).
    if name.len() > 2 * longest {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    let limit = (name.chars().count() / 3).max(1);
    keys.iter()
        .map(|k| (strsim::damerau_levenshtein(&lower, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The name of a table header, `[ service . "a b" ]` → `service."a b"`: brackets and the
/// whitespace outside quotes removed, for comparing two headers.
fn header_name(line: &str) -> String {
    let inner = line.trim().trim_start_matches('[');
    let inner = inner.split(']').next().unwrap_or("");
    let mut out = String::new();
    let mut quote = None;
    for c in inner.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => continue,
            _ => {}
        }
        out.push(c);
    }
    out
}

/// Entries of a TOML table in the order they were written.
fn in_file_order<'i>(
    table: DeTable<'i>,
) -> Vec<(Spanned<std::borrow::Cow<'i, str>>, Spanned<DeValue<'i>>)> {
    let mut v: Vec<_> = table.into_iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

fn one_line(msg: &str) -> String {
    msg.trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// serde's words for TOML's: "field" is a key, "sequence" an array, "map" a table.
fn clean_serde_message(msg: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("unknown field", "unknown key"),
        ("invalid type: sequence", "invalid type: array"),
        ("invalid type: map", "invalid type: table"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
        ("expected i64", "expected an integer"),
        ("expected struct RawGlobal", "expected a table"),
        ("expected struct RawService", "expected a table"),
    ];
    let mut msg = one_line(msg);
    for (from, to) in WORDS {
        msg = msg.replace(from, to);
    }
    msg
}

/// Add a matched drop-in to the files to read, unless it is already there (compared by
/// canonical path: a file matched twice, or the main file, is read once).
fn read_once(path: PathBuf, seen: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>) {
    if seen.insert(std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone())) {
        out.push(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters() {
        let r = Report::new(Path::new("f"), "a\nxé = 1\n".into());
        assert_eq!(r.position(0), (1, 1));
        assert_eq!(r.position(2), (2, 1));
        assert_eq!(r.position(5), (2, 3)); // after the two-byte 'é'
    }
}
