//! Validation: TOML text into a [`Config`], every problem collected with its place and key.
//!
//! Three passes, each reporting everything it finds before the next runs:
//! 1. TOML syntax: only the first syntax error is reported, and nothing else is checked.
//! 2. Shape (serde into `raw` types): a failing key is reported and removed, and the table is
//!    deserialized again, so every unknown key or wrong type of a table is reported at once.
//! 3. Meaning: addresses, programs, users, ranges, mode rules, and clashes between services.
//!
//! A check whose input was removed in pass 2 is skipped, so one mistake is reported once.

use std::ffi::CString;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::{Uid, User};
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use std::sync::Arc;

use crate::LoadOptions;
use crate::error::{ConfigError, ConfigErrors};
use crate::model::*;
use crate::raw::*;
use crate::values::*;

/// Variables a service gets when `pass_env` is not given.
pub const DEFAULT_PASS_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ", "RUST_LOG"];

/// One shared copy of the default pass-list (a thousand services need not hold a thousand).
fn default_pass_env() -> Arc<[String]> {
    static DEFAULT: std::sync::OnceLock<Arc<[String]>> = std::sync::OnceLock::new();
    DEFAULT
        .get_or_init(|| DEFAULT_PASS_ENV.iter().map(|s| s.to_string()).collect())
        .clone()
}

/// Parse and validate `text`; `origin` names the file in every error.
pub(crate) fn parse(text: &str, origin: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        report: Report::new(origin, text),
        opts,
        seen: Vec::new(),
    };
    let config = v.document(text);
    let errors = v.report.finish();
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ if errors.is_empty() => unreachable!("validation failed without saying why"),
        _ => Err(ConfigErrors(errors)),
    }
}

/// Errors collected so far, each with the byte offset it is sorted by.
struct Report<'a> {
    origin: &'a Path,
    text: &'a str,
    errors: Vec<(usize, ConfigError)>,
}

impl<'a> Report<'a> {
    fn new(origin: &'a Path, text: &'a str) -> Self {
        Report {
            origin,
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
                key: key.into(),
                message: message.into(),
            },
        ));
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        (line, before[line_start..].chars().count() + 1)
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

/// A listen address seen so far, for clash checks across services.
struct Seen {
    service: String,
    key: String,
    addr: ListenAddr,
    span: Range<usize>,
}

struct Validator<'a> {
    report: Report<'a>,
    opts: &'a LoadOptions,
    seen: Vec<Seen>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.report.error(span, key, message);
    }

    fn document(&mut self, text: &str) -> Option<Config> {
        let (doc, syntax) = DeTable::parse_recoverable(text);
        // Only the first syntax error: the parser's recovery guesses, and what follows the
        // first error is often the same mistake seen again.
        if let Some(e) = syntax.first() {
            self.error(e.span().unwrap_or(0..0), "", one_line(e.message()));
            return None;
        }
        let mut raw_global = None;
        let mut raw_services = Vec::new();
        for (key, value) in in_file_order(doc.into_inner()) {
            match key.get_ref().as_ref() {
                "superserver" => {
                    raw_global = self.table::<RawGlobal>("superserver", key.span(), value);
                }
                "service" => {
                    let span = value.span();
                    match value.into_inner() {
                        DeValue::Table(t) => {
                            for (name, table) in in_file_order(t) {
                                let path = format!("service.{}", key_segment(name.get_ref()));
                                let raw = self.table::<RawService>(&path, name.span(), table);
                                raw_services.push((name, path, raw));
                            }
                        }
                        _ => self.error(
                            span,
                            "service",
                            "must be a table of services, e.g. [service.echo]",
                        ),
                    }
                }
                other => self.error(
                    key.span(),
                    key_segment(other),
                    format!(
                        "unknown key `{other}`, expected one of {}",
                        list_keys(TOP_LEVEL_KEYS)
                    ),
                ),
            }
        }

        let global = self.global(raw_global.map(|(g, _)| g).unwrap_or_default());
        let mut services = Vec::new();
        for (name, path, raw) in raw_services {
            let name_span = name.span();
            let name = name.into_inner().into_owned();
            let before = self.report.count();
            if let Err(msg) = check_service_name(&name) {
                self.error(name_span.clone(), &path, msg);
            }
            let Some((raw, removed)) = raw else { continue };
            let svc = Svc {
                name: &name,
                path: &path,
                span: name_span,
                removed: &removed,
            };
            let service = self.service(&svc, raw, &global);
            if self.report.count() == before {
                services.extend(service);
            }
        }
        self.clashes();
        Some(Config { global, services })
    }

    /// Deserialize one table into `T`, reporting every key that does not fit. Returns the value
    /// and the keys that were removed to get it, or `None` when `value` is not a table at all.
    fn table<T: DeserializeOwned>(
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
        loop {
            let whole = Spanned::new(span.clone(), DeValue::Table(table.clone()));
            let err = match T::deserialize(ValueDeserializer::from(whole)) {
                Ok(t) => return Some((t, removed)),
                Err(e) => e,
            };
            let at = err.span().unwrap_or_else(|| key_span.clone());
            let culprit = table
                .iter()
                .find(|(k, v)| contains(&k.span(), at.start) || contains(&v.span(), at.start))
                .map(|(k, _)| k.get_ref().to_string());
            let Some(name) = culprit else {
                self.error(at, path, clean_serde_message(err.message()));
                return None;
            };
            let (_, v) = table.remove_entry(name.as_str()).expect("key just found");
            let key = key_path(format!("{path}.{}", key_segment(&name)), &v, at.start);
            self.error(at, key, clean_serde_message(err.message()));
            removed.push(name);
        }
    }

    fn global(&mut self, raw: RawGlobal) -> Global {
        let mut g = Global {
            shutdown_grace: Duration::from_secs(10),
            backlog: 4096,
            restart_backoff_min: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(30),
        };
        if let Some(d) = &raw.shutdown_grace {
            g.shutdown_grace = self
                .duration(d, "superserver.shutdown_grace")
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
            .and_then(|d| self.duration(d, "superserver.restart_backoff_min"));
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
            .and_then(|d| self.duration(d, "superserver.restart_backoff_max"));
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
            ];
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

        let argv_program = self.exec(s, raw.exec);
        let listen = self.listen(s, raw.listen, mode_known.then_some(mode));

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
        for (key, list, out) in [
            ("allow", &raw.allow, &mut access.allow),
            ("deny", &raw.deny, &mut access.deny),
        ] {
            for item in list.iter().flatten() {
                match parse_net(item.get_ref()) {
                    Ok(net) => out.push(net),
                    Err(m) => self.report.error(item.span(), s.key(key), m),
                }
            }
        }

        let credentials = self.credentials(s, raw.user.as_ref(), raw.group.as_ref());
        let allow_root = raw.allow_root.unwrap_or(false);
        if let Some(credentials) = &credentials {
            let as_root = credentials.as_ref().is_none_or(|c| c.uid == 0);
            if self.opts.running_as_root && as_root && !allow_root && !s.removed("allow_root") {
                let (span, key) = match &raw.user {
                    Some(u) => (u.span(), s.key("user")),
                    None => (s.span.clone(), s.path.to_owned()),
                };
                self.error(
                    span,
                    key,
                    "refusing to run service as root; set user = \"nobody\" (or another user) \
                     or allow_root = true",
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
            mode,
            program,
            argv,
            listen: listen?,
            backlog,
            max_instances: max_instances?,
            per_source,
            overflow,
            rate,
            access,
            credentials: credentials?.map(Box::new),
            allow_root,
            env,
            pass_env,
            working_directory,
            umask,
            limits,
            connection,
            unix_socket,
        })
    }

    /// `exec`: the argv and the resolved program.
    fn exec(
        &mut self,
        s: &Svc,
        exec: Option<Spanned<Vec<Spanned<String>>>>,
    ) -> Option<(PathBuf, Vec<String>)> {
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
        let path = std::env::var_os("PATH");
        let program = match resolve_program(
            first.get_ref(),
            self.opts.exe_dir.as_deref(),
            path.as_deref(),
        ) {
            Ok(p) => Some(p),
            Err(m) => {
                self.error(first.span(), s.key("exec"), m);
                None
            }
        };
        let argv = argv.into_iter().map(Spanned::into_inner).collect();
        Some((program?, argv)).filter(|_| ok)
    }

    /// `listen`: the sockets in file order. `mode` is `None` when it could not be read.
    fn listen(
        &mut self,
        s: &Svc,
        listen: Option<Spanned<RawListen>>,
        mode: Option<Mode>,
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
            self.seen.push(Seen {
                service: s.name.to_owned(),
                key: key.clone(),
                addr: addr.clone(),
                span: text.span(),
            });
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
                format!("cannot list the groups of user \"{}\"", pw.name),
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

    /// Listen addresses used twice, or a wildcard and a specific address on the same port.
    fn clashes(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        for (i, this) in seen.iter().enumerate() {
            for other in &seen[..i] {
                let Some(what) = clash(&this.addr, &other.addr) else {
                    continue;
                };
                let whose = if other.service == this.service {
                    "earlier in this service".to_owned()
                } else {
                    format!("by service \"{}\"", other.service)
                };
                let (line, _) = self.report.position(other.span.start);
                let msg = match what {
                    Clash::Same => format!("{} is already used {whose} (line {line})", this.addr),
                    Clash::Overlap => format!(
                        "{} overlaps {} used {whose} (line {line}): a wildcard and a specific \
                         address on the same port and protocol cannot both be bound",
                        this.addr, other.addr
                    ),
                };
                self.error(this.span.clone(), &this.key, msg);
                break;
            }
        }
    }

    fn duration(&mut self, d: &Spanned<String>, key: &str) -> Option<Duration> {
        humantime::parse_duration(d.get_ref())
            .map_err(|e| {
                self.error(
                    d.span(),
                    key,
                    format!(
                        "invalid duration \"{}\" ({e}); write e.g. \"10s\" or \"500ms\"",
                        d.get_ref()
                    ),
                )
            })
            .ok()
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

    fn octal(&mut self, v: &Spanned<Octal>, key: &str) -> Option<u32> {
        let n = match v.get_ref() {
            Octal::Int(i) => Some(*i),
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
                    format!("invalid octal mode \"{t}\"; write e.g. \"022\""),
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

fn list_keys(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters() {
        let r = Report::new(Path::new("f"), "a\nxé = 1\n");
        assert_eq!(r.position(0), (1, 1));
        assert_eq!(r.position(2), (2, 1));
        assert_eq!(r.position(5), (2, 3)); // after the two-byte 'é'
    }
}
