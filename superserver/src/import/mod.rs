//! `superserver import`: read an inetd.conf or xinetd configuration and write the equivalent
//! superserver TOML on stdout.
//!
//! Both readers produce [`Service`]s, one per inetd line or xinetd `service` block; this module
//! names them uniquely, merges IPv4/IPv6 twins, gathers internal services into one
//! small-services table and writes the TOML. Nothing is looked up on the network: service
//! names come from `/etc/services` (under `--root` when given), host names are never resolved.

mod inetd;
mod services;
mod toml_out;
mod xinetd;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use self::services::Services;

/// Which peer's format to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// OpenBSD/Debian inetd.conf: one line per service.
    Inetd,
    /// xinetd.conf and xinetd.d: `service NAME { attr = value … }`.
    Xinetd,
}

/// What to import.
#[derive(Debug, Clone)]
pub struct Request {
    /// `None`: detected per path (a directory, or a file with `service NAME` then `{`, is xinetd).
    pub from: Option<Format>,
    /// Absolute paths inside the files (`include`, `includedir`) and `/etc/services` are read
    /// under this directory: the configuration of another system, mounted.
    pub root: Option<PathBuf>,
    pub paths: Vec<PathBuf>,
}

/// Why nothing was written. `usage` errors are the caller's (exit 2); the others name the
/// file and line that could not be read or parsed (exit 3).
#[derive(Debug)]
pub struct ImportError {
    pub path: Option<PathBuf>,
    pub line: Option<usize>,
    pub message: String,
    pub usage: bool,
}

impl ImportError {
    pub(crate) fn at(path: &Path, line: usize, message: impl Into<String>) -> ImportError {
        ImportError {
            path: Some(path.to_path_buf()),
            line: Some(line),
            message: message.into(),
            usage: false,
        }
    }

    pub(crate) fn file(path: &Path, message: impl Into<String>) -> ImportError {
        ImportError {
            path: Some(path.to_path_buf()),
            line: None,
            message: message.into(),
            usage: false,
        }
    }

    fn usage(message: impl Into<String>) -> ImportError {
        ImportError {
            path: None,
            line: None,
            message: message.into(),
            usage: true,
        }
    }
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.line) {
            (Some(p), Some(l)) => write!(f, "{}:{l}: {}", p.display(), self.message),
            (Some(p), None) => write!(f, "{}: {}", p.display(), self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

/// One imported service (an inetd line or an xinetd block), in terms of the TOML schema.
#[derive(Debug, Clone, Default)]
pub(crate) struct Service {
    /// `FILE:LINE` it came from.
    pub origin: String,
    /// The table name before sanitising (inetd: the service field; xinetd: `id`).
    pub name: String,
    /// The protocol label for a collision suffix: `tcp`, `udp`, `tcp6`, `unix` …
    pub proto: String,
    /// Internal service: the protocol name (`echo`, `daytime`, …).
    pub internal: Option<String>,
    /// `tcp://…`, `udp://…` or `unix:/…`.
    pub listen: Vec<String>,
    pub wait: bool,
    pub exec: Vec<String>,
    /// `None`: the peer ran it as itself, i.e. root.
    pub user: Option<String>,
    pub group: Option<String>,
    pub enable: bool,
    /// Further `key = value` lines, the value already TOML.
    pub keys: Vec<(String, String)>,
    /// `# not imported: …` lines (without the `# not imported: `).
    pub notes: Vec<String>,
    /// Other comment lines above the table.
    pub comments: Vec<String>,
    /// Why the table is written commented out (it cannot work as imported).
    pub unusable: Option<String>,
}

impl Service {
    pub fn key(&mut self, k: &str, v: String) {
        self.keys.push((k.to_string(), v));
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }
}

/// A listening address for `ip` (v4, or v6 in brackets) and `port`.
pub(crate) fn socket_url(scheme: &str, ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("{scheme}://{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("{scheme}://[{a}]:{port}"),
    }
}

/// The protocols small-services serves under an inetd internal service's name.
const SMALL: &[&str] = &["echo", "discard", "chargen", "daytime", "time"];

/// Imports every path of `req` and returns the TOML text. `Err` on the first file that cannot
/// be read or parsed; nothing is written then.
pub fn run(req: &Request) -> Result<String, ImportError> {
    if req.paths.is_empty() {
        return Err(ImportError::usage("import: name at least one FILE or DIR"));
    }
    let root = req.root.as_deref();
    let services_path = rooted(root, Path::new("/etc/services"));
    let mut services: Option<Services> = None;
    let mut all = Vec::new();
    let mut header_notes = Vec::new();
    let mut origins = Vec::new();
    for path in &req.paths {
        let format = match req.from {
            Some(f) => f,
            None => detect(path)?,
        };
        if format == Format::Inetd && path.is_dir() {
            return Err(ImportError::usage(format!(
                "import: {} is a directory; --from inetd reads one inetd.conf file",
                path.display()
            )));
        }
        if services.is_none() {
            services = Some(Services::load(&services_path)?);
        }
        let services = services.as_ref().expect("loaded above");
        let (mut found, notes) = match format {
            Format::Inetd => (inetd::read(path, services)?, Vec::new()),
            Format::Xinetd => xinetd::read(path, root, services)?,
        };
        origins.push(format!(
            "{} ({})",
            path.display(),
            match format {
                Format::Inetd => "inetd.conf",
                Format::Xinetd => "xinetd",
            }
        ));
        all.append(&mut found);
        header_notes.extend(notes);
    }
    Ok(render(&origins, &header_notes, all))
}

fn rooted(root: Option<&Path>, p: &Path) -> PathBuf {
    match root {
        Some(r) if p.is_absolute() => r.join(p.strip_prefix("/").unwrap_or(p)),
        _ => p.to_path_buf(),
    }
}

/// xinetd for a directory or a file holding `service NAME` followed by `{`; inetd otherwise.
fn detect(path: &Path) -> Result<Format, ImportError> {
    if path.is_dir() {
        return Ok(Format::Xinetd);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ImportError::file(path, format!("cannot read: {e}")))?;
    let words: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .collect();
    let xinetd = words.windows(3).any(|w| w[0] == "service" && w[2] == "{")
        || words
            .windows(2)
            .any(|w| w[0] == "service" && w[1].ends_with('{'))
        || words.windows(2).any(|w| w[0] == "defaults" && w[1] == "{")
        || words.first().is_some_and(|w| *w == "includedir");
    Ok(if xinetd {
        Format::Xinetd
    } else {
        Format::Inetd
    })
}

/// `[A-Za-z0-9_.-]`, 1 to 64 characters.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(56)
        .collect();
    if s.is_empty() { "service".into() } else { s }
}

/// Merges nowait services that differ only in their addresses (the `tcp` and `tcp6` lines of
/// one service). Wait services are kept apart: each gets its one socket on stdin.
fn merge_twins(list: Vec<Service>) -> Vec<Service> {
    let mut out: Vec<Service> = Vec::new();
    for s in list {
        let twin = out.iter_mut().find(|o| {
            !s.wait
                && !o.wait
                && o.internal.is_none()
                && s.internal.is_none()
                && o.unusable.is_none()
                && s.unusable.is_none()
                && o.name == s.name
                && o.exec == s.exec
                && o.user == s.user
                && o.group == s.group
                && o.enable == s.enable
                && o.keys == s.keys
                && o.notes == s.notes
        });
        match twin {
            Some(o) => {
                o.origin = format!("{}, {}", o.origin, s.origin);
                for l in s.listen {
                    if !o.listen.contains(&l) {
                        o.listen.push(l);
                    }
                }
            }
            None => out.push(s),
        }
    }
    out
}

fn render(origins: &[String], header_notes: &[String], all: Vec<Service>) -> String {
    let mut out = String::new();
    out.push_str("# Imported by `superserver import` from:\n");
    for o in origins {
        out.push_str(&format!("#   {}\n", toml_out::comment(o)));
    }
    out.push_str(
        "# Review it, then check it before use: superserver --check FILE\n\
         # Wait-mode services get the listening socket on stdin (handoff = \"stdin\"), as inetd did.\n",
    );
    for n in header_notes {
        out.push_str(&format!("# not imported: {}\n", toml_out::comment(n)));
    }

    let (internal, external): (Vec<Service>, Vec<Service>) =
        all.into_iter().partition(|s| s.internal.is_some());
    let external = merge_twins(external);
    if internal.is_empty() && external.is_empty() {
        out.push_str("# no services found: every entry is commented out or absent\n");
    }
    // A configuration that serves nothing is refused unless it says so: say so when the
    // imported files switched every service off (Debian's xinetd ships them that way).
    let serves = internal
        .iter()
        .chain(&external)
        .any(|s| s.enable && s.unusable.is_none());
    if !serves {
        out.push_str(
            "\n# Every imported service is disabled or cannot be used as written: enable one\n\
             # (delete its `enable = false`) and remove allow_no_services.\n\
             [superserver]\nallow_no_services = true\n",
        );
    }
    let mut used: Vec<String> = Vec::new();
    let small = render_small(&internal, &mut out, &mut used);
    if let Some(small) = small {
        out.push('\n');
        out.push_str(&small);
    }
    for s in &external {
        let name = unique(&s.name, &s.proto, &mut used);
        out.push('\n');
        out.push_str(&render_one(&name, s));
    }
    out
}

/// A name not yet used: `NAME`, else `NAME-PROTO`, else `NAME-2`, `NAME-3` …
fn unique(raw: &str, proto: &str, used: &mut Vec<String>) -> String {
    let base = sanitize(raw);
    let mut candidates = vec![base.clone()];
    if !proto.is_empty() {
        candidates.push(format!("{base}-{}", sanitize(proto)));
    }
    let name = candidates
        .into_iter()
        .chain((2..).map(|n| format!("{base}-{n}")))
        .find(|c| !used.contains(c))
        .expect("an unbounded sequence has an unused name");
    used.push(name.clone());
    name
}

fn render_one(name: &str, s: &Service) -> String {
    let mut head = String::new();
    head.push_str(&format!("# from {}\n", toml_out::comment(&s.origin)));
    for c in &s.comments {
        head.push_str(&format!("# {}\n", toml_out::comment(c)));
    }
    for n in &s.notes {
        head.push_str(&format!("# not imported: {}\n", toml_out::comment(n)));
    }
    let mut body = String::new();
    body.push_str(&format!("[service.{}]\n", toml_out::key(name)));
    if !s.enable {
        body.push_str("enable = false\n");
    }
    body.push_str(&format!(
        "mode = \"{}\"\n",
        if s.wait { "wait" } else { "nowait" }
    ));
    body.push_str(&format!("exec = {}\n", toml_out::array(&s.exec)));
    body.push_str(&format!("listen = {}\n", toml_out::one_or_array(&s.listen)));
    if s.wait {
        body.push_str("handoff = \"stdin\"\n");
    }
    let user = s.user.as_deref().unwrap_or("root");
    if user == "root" || user == "0" {
        head.push_str(
            "# the original ran as root: allow_root keeps that; a dedicated user is safer \
             (e.g. user = \"nobody\")\n",
        );
        body.push_str(&format!(
            "user = {}\nallow_root = true\n",
            toml_out::string(user)
        ));
    } else {
        body.push_str(&format!("user = {}\n", toml_out::string(user)));
    }
    if let Some(g) = &s.group {
        body.push_str(&format!("group = {}\n", toml_out::string(g)));
    }
    for (k, v) in &s.keys {
        body.push_str(&format!("{k} = {v}\n"));
    }
    match &s.unusable {
        None => head + &body,
        Some(why) => {
            head.push_str(&format!(
                "# not imported: this service, written commented out: {}\n",
                toml_out::comment(why)
            ));
            let commented: String = body.lines().map(|l| format!("# {l}\n")).collect();
            head + &commented
        }
    }
}

/// The one `[service.small]` table for every internal service (small-services, wait mode,
/// fd names = protocol names). `None` when there are no internal services.
fn render_small(internal: &[Service], out: &mut String, used: &mut Vec<String>) -> Option<String> {
    if internal.is_empty() {
        return None;
    }
    let mut listen: BTreeMap<usize, (String, Vec<String>)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    let mut origins = Vec::new();
    let any_enabled = internal
        .iter()
        .any(|s| s.enable && SMALL.contains(&s.internal.as_deref().unwrap_or("")));
    for s in internal {
        let proto = s.internal.clone().unwrap_or_default();
        if !SMALL.contains(&proto.as_str()) {
            out.push_str(&format!(
                "# not imported: internal service {proto} from {} (small-services has no {proto})\n",
                toml_out::comment(&s.origin)
            ));
            continue;
        }
        if any_enabled && !s.enable {
            notes.push(format!(
                "{proto} {} from {} (disabled there)",
                s.listen.join(" "),
                s.origin
            ));
            continue;
        }
        if let Some(why) = &s.unusable {
            notes.push(format!("{proto} from {} ({why})", s.origin));
            continue;
        }
        for n in &s.notes {
            notes.push(format!("{n} on {proto}"));
        }
        for (k, v) in &s.keys {
            notes.push(format!(
                "{k} = {v} on {proto} (one small-services table serves every internal service; \
                 add it to [service.small] if it fits all of them)"
            ));
        }
        origins.push(s.origin.clone());
        let i = match order.iter().position(|p| *p == proto) {
            Some(i) => i,
            None => {
                order.push(proto.clone());
                order.len() - 1
            }
        };
        let entry = listen
            .entry(i)
            .or_insert_with(|| (proto.clone(), Vec::new()));
        for l in &s.listen {
            if !entry.1.contains(l) {
                entry.1.push(l.clone());
            }
        }
    }
    if listen.is_empty() {
        return None;
    }
    let name = unique("small", "", used);
    let mut t = String::new();
    t.push_str("# the internal services, served by small-services, from:\n");
    for file in dedup(origins) {
        t.push_str(&format!("#   {}\n", toml_out::comment(&file)));
    }
    for n in notes {
        t.push_str(&format!("# not imported: {}\n", toml_out::comment(&n)));
    }
    t.push_str(&format!("[service.{name}]\n"));
    if !any_enabled {
        t.push_str("enable = false\n");
    }
    t.push_str("mode = \"wait\"\nexec = [\"small-services\"]\n");
    let fds: Vec<String> = listen
        .values()
        .map(|(p, l)| format!("{} = {}", toml_out::key(p), toml_out::array(l)))
        .collect();
    t.push_str(&format!("listen = {{ {} }}\n", fds.join(", ")));
    t.push_str("user_if_root = \"nobody\"\nno_new_privs = true\n");
    Some(t)
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for x in v {
        let file = x.rsplit_once(':').map_or(x.clone(), |(f, _)| f.to_string());
        if !out.contains(&file) {
            out.push(file);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized_and_unique() {
        let mut used = Vec::new();
        assert_eq!(unique("ftp", "tcp", &mut used), "ftp");
        assert_eq!(unique("ftp", "tcp6", &mut used), "ftp-tcp6");
        assert_eq!(unique("ftp", "tcp6", &mut used), "ftp-2");
        assert_eq!(unique("a b/c", "", &mut used), "a_b_c");
    }
}
