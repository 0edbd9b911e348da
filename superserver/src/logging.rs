//! The logger: one line per event on stderr, written without ever blocking the event loop
//! (a bounded backlog in memory; when it is full, lines are dropped, counted and reported).
//!
//! **Format.** On a terminal, file or pipe: `2026-12-05T16:40:01.123Z INFO  message` (UTC,
//! milliseconds). Under journald (`JOURNAL_STREAM` names the `dev:ino` of our stderr, checked
//! with fstat(2) as systemd documents): `<N>message` with the syslog priority (3 error,
//! 4 warning, 6 info, 7 debug and trace) and no timestamp, journald adds its own. Control
//! characters in the message are escaped (`\n`, `\r`, `\t`, `\x1b`, `\u{85}` …), so a
//! user-controlled string can never split or forge a line.
//!
//! **Never blocking.** fd 2 itself is never switched to `O_NONBLOCK`: it is an open file
//! description shared with every child we start, which would then see `EAGAIN` on their own
//! stderr. Instead, at [`init`]:
//! - a socket (journald's stream) is written with `send(MSG_DONTWAIT | MSG_NOSIGNAL)`;
//! - a pipe, FIFO or terminal is opened anew through `/proc/self/fd/2` with `O_NONBLOCK`: on
//!   Linux that yields a *separate* open file description of the same pipe (or tty), whose
//!   non-blocking flag is ours alone;
//! - if that open fails (no `/proc`), writes are preceded by `poll(POLLOUT, 0)` and are at most
//!   `PIPE_BUF` bytes: on Linux a pipe reports `POLLOUT` only when at least one of its page
//!   slots is free (`pipe_poll`: `!pipe_full()`), and a free slot holds a whole page, which is
//!   at least `PIPE_BUF` (4096) bytes, so the write completes without sleeping (the test
//!   `pollout_on_a_pipe_means_pipe_buf_bytes_fit` checks it). The remaining race: a child
//!   writing to the same pipe between our poll and our write can still make it block;
//! - a regular file (or anything else) is written with ordinary writes, which do not wait for
//!   a reader.
//!
//! Writes are chunks of whole lines of at most `PIPE_BUF` bytes, so on a pipe our lines are
//! never interleaved with a child's output (a line longer than `PIPE_BUF` is the exception).
//!
//! **Backlog.** Lines that cannot be written now wait in a buffer of [`BACKLOG`] bytes. When a
//! line does not fit, it and every later line are dropped and counted until the backlog has
//! been written out completely; then the first line written is
//! `WARN  logging: N lines dropped (log reader too slow)`. The backlog is written on each new
//! line and by [`flush`], which the event loop calls after each iteration; while [`pending`]
//! is true the loop should wake up at least every [`FLUSH_INTERVAL`].

use std::ffi::CString;
use std::fmt::{self, Write as _};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Bytes of log lines kept in memory while the reader of stderr is not keeping up.
pub const BACKLOG: usize = 64 * 1024;

/// While [`pending`] is true, the event loop should call [`flush`] at least this often.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The most we hand to one write(2): atomic on a pipe, and guaranteed to fit after `POLLOUT`.
const CHUNK: usize = libc::PIPE_BUF;

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Install the logger on stderr, level from `RUST_LOG`. Call once, first thing; a second call
/// does nothing.
pub fn init() {
    let journal = stderr_is_journal();
    let style = if journal {
        Style::Journal
    } else {
        Style::Plain
    };
    let (filter, ignored) = Filter::parse(std::env::var("RUST_LOG").ok().as_deref());
    let logger = Logger {
        filter,
        journal,
        backlog: Mutex::new(Backlog::new(Box::new(Stderr::open()), style, BACKLOG)),
    };
    if LOGGER.set(logger).is_err() {
        return;
    }
    let logger = LOGGER.get().expect("just set");
    log::set_max_level(logger.filter.max());
    if log::set_logger(logger).is_ok() && !ignored.is_empty() {
        log::warn!("logging: ignored in RUST_LOG: {}", ignored.join(", "));
    }
}

/// True when stderr is the journald stream named by `JOURNAL_STREAM` (its `dev:ino` matches
/// fstat(2) of fd 2). Children should get `JOURNAL_STREAM` only then.
pub fn journald() -> bool {
    match LOGGER.get() {
        Some(l) => l.journal,
        None => stderr_is_journal(),
    }
}

/// True when lines wait in the backlog (or a dropped-lines notice is due): the event loop
/// should then wake up within [`FLUSH_INTERVAL`] and call [`flush`].
pub fn pending() -> bool {
    LOGGER.get().is_some_and(|l| l.lock().pending())
}

/// While `on`, lines are written a chunk (`PIPE_BUF`) at a time instead of one write per line:
/// for a burst of lines (one per service at start-up). Turning it off writes what is held.
pub fn coalesce(on: bool) {
    if let Some(l) = LOGGER.get() {
        let mut backlog = l.lock();
        backlog.coalesce = on;
        if !on {
            backlog.drain();
        }
    }
}

/// Write as much of the backlog as stderr takes now, without blocking. Cheap when nothing is
/// pending; call it after each iteration of the event loop.
pub fn flush() {
    if let Some(l) = LOGGER.get() {
        l.lock().drain();
    }
}

struct Logger {
    filter: Filter,
    /// What [`journald`] reports.
    journal: bool,
    backlog: Mutex<Backlog>,
}

impl Logger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Backlog> {
        // A panic while holding the lock cannot leave the backlog inconsistent for our use.
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.filter.level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut backlog = self.lock();
        let line = format_line(
            backlog.style,
            SystemTime::now(),
            record.level(),
            record.args(),
        );
        backlog.push(line.as_bytes());
    }

    fn flush(&self) {
        self.lock().drain();
    }
}

/// The two line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// `TIMESTAMP LEVEL message`.
    Plain,
    /// `<N>message` for journald.
    Journal,
}

/// One complete line, newline included, with control characters in `args` escaped.
fn format_line(style: Style, now: SystemTime, level: Level, args: &fmt::Arguments) -> String {
    let mut line = String::with_capacity(96);
    match style {
        Style::Plain => {
            write_timestamp(&mut line, now);
            let _ = write!(line, " {level:<5} ");
        }
        Style::Journal => {
            let prio = match level {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            let _ = write!(line, "<{prio}>");
        }
    }
    let mut escaper = Escaper(&mut line);
    let _ = fmt::write(&mut escaper, *args);
    line.push('\n');
    line
}

/// Appends text with control characters (C0, DEL, C1) and the Unicode line and paragraph
/// separators replaced by escapes.
struct Escaper<'a>(&'a mut String);

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                c if (c as u32) < 0x80 && c.is_control() => {
                    let _ = write!(self.0, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    let _ = write!(self.0, "\\u{{{:x}}}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC; times before 1970 print as 1970).
fn write_timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Levels from `RUST_LOG`: comma-separated `level` (the default) and `module=level` items
/// (the longest matching module path wins; a bare module name means `trace` for it). A
/// `/regex` suffix, accepted by env_logger, is ignored here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    default: LevelFilter,
    modules: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// The filter and the items that were not understood (to be logged once).
    fn parse(spec: Option<&str>) -> (Filter, Vec<String>) {
        let mut filter = Filter {
            default: LevelFilter::Info,
            modules: Vec::new(),
        };
        let mut ignored = Vec::new();
        let spec = spec.unwrap_or("").split('/').next().unwrap_or("");
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some((module, level)) => match level.trim().parse() {
                    Ok(level) if !module.trim().is_empty() => {
                        filter.modules.push((module.trim().to_string(), level))
                    }
                    _ => ignored.push(item.to_string()),
                },
                None => match item.parse() {
                    Ok(level) => filter.default = level,
                    Err(_)
                        if item
                            .chars()
                            .all(|c| c.is_alphanumeric() || "_:".contains(c)) =>
                    {
                        filter.modules.push((item.to_string(), LevelFilter::Trace))
                    }
                    Err(_) => ignored.push(item.to_string()),
                },
            }
        }
        (filter, ignored)
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        self.modules
            .iter()
            .filter(|(m, _)| {
                target == m
                    || target
                        .strip_prefix(m.as_str())
                        .is_some_and(|rest| rest.starts_with("::"))
            })
            .max_by_key(|(m, _)| m.len())
            .map_or(self.default, |(_, l)| *l)
    }

    fn max(&self) -> LevelFilter {
        self.modules
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, Ord::max)
    }
}

/// Where the lines go: one non-blocking write attempt at a time.
trait Sink: Send {
    /// Write a prefix of `buf` (at most `CHUNK` bytes are passed) without blocking: `Ok(n)`
    /// bytes were written; `Err(WouldBlock)` means "not now, try later"; any other error
    /// means the lines cannot be written at all.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
}

/// The bounded backlog between the log calls and the sink.
struct Backlog {
    sink: Box<dyn Sink>,
    style: Style,
    capacity: usize,
    /// Complete lines not yet written (the first may have been written in part).
    buf: Vec<u8>,
    /// Lines dropped since the backlog was last written out completely.
    dropped: u64,
    /// See [`coalesce`].
    coalesce: bool,
}

impl Backlog {
    fn new(sink: Box<dyn Sink>, style: Style, capacity: usize) -> Backlog {
        Backlog {
            sink,
            style,
            capacity,
            buf: Vec::new(),
            dropped: 0,
            coalesce: false,
        }
    }

    fn pending(&self) -> bool {
        !self.buf.is_empty() || self.dropped > 0
    }

    /// Write what can be written, then queue `line`, or drop and count it when it does not
    /// fit or while earlier lines are being dropped; then write again.
    fn push(&mut self, line: &[u8]) {
        if !self.coalesce {
            self.drain();
        }
        if self.dropped > 0 || self.buf.len() + line.len() > self.capacity {
            self.dropped += 1;
            return;
        }
        self.buf.extend_from_slice(line);
        if !self.coalesce || self.buf.len() >= CHUNK {
            self.drain();
        }
    }

    /// Write until the sink would block or the backlog is empty; once it is empty after
    /// drops, queue and write the dropped-lines notice.
    fn drain(&mut self) {
        loop {
            if self.buf.is_empty() {
                if self.dropped == 0 {
                    return;
                }
                let notice = format_line(
                    self.style,
                    SystemTime::now(),
                    Level::Warn,
                    &format_args!(
                        "logging: {} lines dropped (log reader too slow)",
                        self.dropped
                    ),
                );
                self.dropped = 0;
                self.buf.extend_from_slice(notice.as_bytes());
            }
            let chunk = chunk_len(&self.buf);
            match self.sink.write(&self.buf[..chunk]) {
                Ok(0) => return,
                Ok(n) => {
                    self.buf.drain(..n.min(chunk));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // Nobody can read these lines (EPIPE, EBADF, EIO): let them go.
                    self.buf.clear();
                    self.dropped = 0;
                    return;
                }
            }
        }
    }
}

/// The length of the next write: whole lines up to `CHUNK` bytes, or the first `CHUNK`
/// bytes of a longer line.
fn chunk_len(buf: &[u8]) -> usize {
    if buf.len() <= CHUNK {
        return buf.len();
    }
    match buf[..CHUNK].iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => CHUNK,
    }
}

/// fd 2, written the non-blocking way that fits what it is (see the module documentation).
enum Stderr {
    /// `send(MSG_DONTWAIT)` on fd 2.
    Socket,
    /// A separate, non-blocking open file description of the pipe or tty on fd 2.
    Reopened(OwnedFd),
    /// `poll(POLLOUT, 0)` on fd 2, then a write of at most `PIPE_BUF` bytes.
    PollFirst,
    /// Plain writes on fd 2 (regular files: they never wait for a reader).
    Plain,
}

impl Stderr {
    fn open() -> Stderr {
        let Some(st) = fstat(2) else {
            return Stderr::Plain;
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFSOCK => Stderr::Socket,
            libc::S_IFIFO | libc::S_IFCHR => match reopen_nonblocking(2) {
                Ok(fd) => Stderr::Reopened(fd),
                Err(_) => Stderr::PollFirst,
            },
            _ => Stderr::Plain,
        }
    }
}

impl Sink for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match self {
            // SAFETY: `buf` is valid for `buf.len()` bytes; fd 2 stays open for our lifetime.
            Stderr::Socket => unsafe {
                libc::send(
                    2,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            },
            // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is owned and open.
            Stderr::Reopened(fd) => unsafe {
                libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len())
            },
            Stderr::PollFirst => {
                if !writable_now(2)? {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let len = buf.len().min(libc::PIPE_BUF);
                // SAFETY: `buf` is valid for at least `len` bytes.
                unsafe { libc::write(2, buf.as_ptr().cast(), len) }
            }
            // SAFETY: `buf` is valid for `buf.len()` bytes.
            Stderr::Plain => unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) },
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn fstat(fd: RawFd) -> Option<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat(2) writes a `struct stat` into the buffer we pass.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat returned 0, so it filled the struct.
    Some(unsafe { st.assume_init() })
}

/// True when stderr is the journal stream: `JOURNAL_STREAM` is set and names fd 2's device
/// and inode (a child of a journald-logged process may have had its stderr redirected).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(st) = fstat(2) else {
        return false;
    };
    #[allow(
        clippy::unnecessary_cast,
        reason = "dev_t and ino_t are not u64 on every target"
    )]
    let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
    journal_stream_matches(&value.to_string_lossy(), dev, ino)
}

/// `JOURNAL_STREAM` is `DEVICE:INODE`, both decimal.
fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// Open `/proc/self/fd/<fd>` write-only with `O_NONBLOCK`: for a pipe, FIFO or tty this is a
/// new open file description of the same object, so the flag does not affect `fd` (nor the
/// children that share it). The new fd is close-on-exec and at least 3. Fails for sockets
/// (`ENXIO`), without `/proc`, or if what was opened is not what `fd` is.
fn reopen_nonblocking(fd: RawFd) -> io::Result<OwnedFd> {
    let path = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    let flags = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: open(2) with a valid C string.
    let raw = unsafe { libc::open(path.as_ptr(), flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just opened and is owned by nobody else.
    let mut new = unsafe { OwnedFd::from_raw_fd(raw) };
    if raw < 3 {
        // Never occupy 0, 1 or 2: they must stay free for stdin/stdout/stderr.
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd we own returns a new fd or -1.
        let moved = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 3) };
        if moved < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `moved` is a fresh fd owned by nobody else.
        new = unsafe { OwnedFd::from_raw_fd(moved) };
    }
    match (fstat(fd), fstat(new.as_raw_fd())) {
        (Some(a), Some(b)) if a.st_dev == b.st_dev && a.st_ino == b.st_ino => Ok(new),
        _ => Err(io::Error::other("reopened stderr is not the same file")),
    }
}

/// poll(2) with a zero timeout: can `fd` be written now?
fn writable_now(fd: RawFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return Err(io::Error::from_raw_os_error(libc::EPIPE));
    }
    Ok(p.revents & libc::POLLOUT != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis)
    }

    #[test]
    fn plain_lines_have_a_utc_timestamp_and_a_padded_level() {
        // 2026-12-05T16:40:01.123Z
        let t = at(1_796_488_801, 123);
        let line = format_line(Style::Plain, t, Level::Info, &format_args!("small: {}", 1));
        assert_eq!(line, "2026-12-05T16:40:01.123Z INFO  small: 1\n");
        let line = format_line(Style::Plain, t, Level::Error, &format_args!("x"));
        assert_eq!(line, "2026-12-05T16:40:01.123Z ERROR x\n");
    }

    #[test]
    fn timestamps_across_the_calendar() {
        let ts = |secs| {
            let mut s = String::new();
            write_timestamp(&mut s, at(secs, 7));
            s
        };
        assert_eq!(ts(0), "1970-01-01T00:00:00.007Z");
        assert_eq!(ts(951_782_400), "2000-02-29T00:00:00.007Z");
        assert_eq!(ts(1_735_689_599), "2024-12-31T23:59:59.007Z");
        assert_eq!(ts(4_107_542_400), "2100-03-01T00:00:00.007Z");
    }

    #[test]
    fn journal_lines_carry_the_syslog_priority_and_no_timestamp() {
        let t = at(1_796_488_801, 123);
        let f = |l| format_line(Style::Journal, t, l, &format_args!("m"));
        assert_eq!(f(Level::Error), "<3>m\n");
        assert_eq!(f(Level::Warn), "<4>m\n");
        assert_eq!(f(Level::Info), "<6>m\n");
        assert_eq!(f(Level::Debug), "<7>m\n");
        assert_eq!(f(Level::Trace), "<7>m\n");
    }

    #[test]
    fn control_characters_are_escaped_so_a_line_stays_one_line() {
        let evil = "user\nFAKE ERROR x\r\tend\x1b[31m\x7f\u{85}\u{2028}é→";
        let line = format_line(
            Style::Journal,
            UNIX_EPOCH,
            Level::Info,
            &format_args!("svc: {evil}"),
        );
        assert_eq!(
            line,
            "<6>svc: user\\nFAKE ERROR x\\r\\tend\\x1b[31m\\x7f\\u{85}\\u{2028}é→\n"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12346", 8, 12345));
        assert!(!journal_stream_matches("9:12345", 8, 12345));
        assert!(!journal_stream_matches("", 8, 12345));
        assert!(!journal_stream_matches("8", 8, 12345));
        assert!(!journal_stream_matches("8:x", 8, 12345));
    }

    #[test]
    fn rust_log_levels_and_module_filters() {
        let p = |s: &str| Filter::parse(Some(s));
        let (f, ign) = Filter::parse(None);
        assert_eq!(
            (f.default, f.max(), ign.len()),
            (LevelFilter::Info, LevelFilter::Info, 0)
        );
        let (f, _) = p("debug");
        assert_eq!(f.level_for("superserver::daemon"), LevelFilter::Debug);
        let (f, _) = p("WARN");
        assert_eq!(f.default, LevelFilter::Warn);
        let (f, ign) = p("superserver=debug, mio=off ,bogus=loud");
        assert_eq!(ign, vec!["bogus=loud".to_string()]);
        assert_eq!(f.level_for("superserver"), LevelFilter::Debug);
        assert_eq!(f.level_for("superserver::daemon"), LevelFilter::Debug);
        assert_eq!(f.level_for("superserverx"), LevelFilter::Info);
        assert_eq!(f.level_for("mio::poll"), LevelFilter::Off);
        assert_eq!(f.level_for("other"), LevelFilter::Info);
        assert_eq!(f.max(), LevelFilter::Debug);
        let (f, _) = p("error,superserver::daemon=trace,superserver=warn");
        assert_eq!(f.level_for("superserver::daemon"), LevelFilter::Trace);
        assert_eq!(f.level_for("superserver::spawn"), LevelFilter::Warn);
        assert_eq!(f.level_for("escargot"), LevelFilter::Error);
        let (f, _) = p("superserver");
        assert_eq!(f.level_for("superserver"), LevelFilter::Trace);
        let (f, ign) = p("info/foo.*");
        assert_eq!((f.default, ign.len()), (LevelFilter::Info, 0));
        let (_, ign) = p("what?");
        assert_eq!(ign, vec!["what?".to_string()]);
    }

    /// A sink that takes at most `room` more bytes (a pipe nobody reads), records each write.
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeState>>);

    #[derive(Default)]
    struct FakeState {
        out: Vec<u8>,
        room: usize,
        writes: Vec<usize>,
        error: Option<i32>,
    }

    impl Sink for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            assert!(buf.len() <= CHUNK, "a write of {} bytes", buf.len());
            if let Some(e) = s.error {
                return Err(io::Error::from_raw_os_error(e));
            }
            if s.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(s.room);
            s.room -= n;
            s.out.extend_from_slice(&buf[..n]);
            s.writes.push(n);
            Ok(n)
        }
    }

    impl Fake {
        fn give(&self, room: usize) {
            self.0.lock().unwrap().room += room;
        }
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().out.clone()).unwrap()
        }
    }

    fn line(i: usize) -> String {
        format!("line {i:05} {}\n", "x".repeat(40))
    }

    #[test]
    fn a_stalled_reader_fills_the_backlog_then_lines_are_dropped_counted_and_reported() {
        let fake = Fake::default();
        let mut b = Backlog::new(Box::new(fake.clone()), Style::Plain, 1024);
        // 19 lines of 52 bytes fit in 1024 bytes with the reader stalled; the rest drop.
        for i in 0..30 {
            b.push(line(i).as_bytes());
        }
        assert!(b.pending());
        assert_eq!(b.buf.len(), 19 * 52);
        assert_eq!(b.dropped, 11);
        assert_eq!(fake.text(), "");
        // The reader takes a little: the backlog shrinks but new lines still drop until it
        // has caught up completely.
        fake.give(100);
        b.push(line(30).as_bytes());
        assert_eq!(b.dropped, 12);
        // The reader catches up: the backlog, then the notice, then new lines.
        fake.give(1 << 20);
        b.drain();
        assert!(!b.pending());
        b.push(line(31).as_bytes());
        let text = fake.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 21, "{text}");
        for (i, l) in lines[..19].iter().enumerate() {
            assert_eq!(format!("{l}\n"), line(i));
        }
        assert!(
            lines[19].ends_with(" WARN  logging: 12 lines dropped (log reader too slow)"),
            "{}",
            lines[19]
        );
        assert_eq!(format!("{}\n", lines[20]), line(31));
    }

    #[test]
    fn the_notice_is_written_by_flush_alone_once_the_reader_resumes() {
        let fake = Fake::default();
        let mut b = Backlog::new(Box::new(fake.clone()), Style::Journal, 100);
        for i in 0..5 {
            b.push(line(i).as_bytes());
        }
        fake.give(1000);
        b.drain();
        assert!(!b.pending());
        assert_eq!(
            fake.text(),
            format!(
                "{}<4>logging: 4 lines dropped (log reader too slow)\n",
                line(0)
            )
        );
    }

    #[test]
    fn writes_are_whole_lines_of_at_most_pipe_buf_bytes() {
        let fake = Fake::default();
        let mut b = Backlog::new(Box::new(fake.clone()), Style::Plain, BACKLOG);
        for i in 0..500 {
            b.push(line(i).as_bytes());
        }
        let long = format!("{}\n", "y".repeat(CHUNK + 10));
        b.push(long.as_bytes());
        fake.give(usize::MAX / 2);
        b.drain();
        let s = fake.0.lock().unwrap();
        let mut at = 0;
        for &n in &s.writes {
            let chunk = &s.out[at..at + n];
            at += n;
            if chunk.len() == CHUNK && !chunk.ends_with(b"\n") {
                continue; // the first part of the long line
            }
            assert!(chunk.ends_with(b"\n"), "a write that ends mid-line");
        }
        assert_eq!(s.out.len(), 500 * 52 + long.len());
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let fake = Fake::default();
        let mut b = Backlog::new(Box::new(fake.clone()), Style::Plain, BACKLOG);
        for i in 0..10 {
            fake.give(7);
            b.push(line(i).as_bytes());
        }
        fake.give(1 << 20);
        b.drain();
        let expected: String = (0..10).map(line).collect();
        assert_eq!(fake.text(), expected);
    }

    #[test]
    fn a_broken_stderr_discards_lines_instead_of_keeping_them() {
        let fake = Fake::default();
        fake.0.lock().unwrap().error = Some(libc::EPIPE);
        let mut b = Backlog::new(Box::new(fake.clone()), Style::Plain, BACKLOG);
        b.push(line(0).as_bytes());
        assert!(!b.pending());
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are fresh fds owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn flags(fd: RawFd) -> i32 {
        // SAFETY: F_GETFL only queries.
        unsafe { libc::fcntl(fd, libc::F_GETFL) }
    }

    fn read_some(fd: &OwnedFd, n: usize) -> usize {
        let mut buf = vec![0u8; n];
        // SAFETY: `buf` has room for `n` bytes.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), n) };
        assert!(r >= 0);
        r as usize
    }

    #[test]
    fn a_pipe_reopened_through_proc_is_non_blocking_alone() {
        let (r, w) = pipe();
        let mut sink = Stderr::Reopened(reopen_nonblocking(w.as_raw_fd()).unwrap());
        let Stderr::Reopened(ref fd) = sink else {
            unreachable!()
        };
        assert!(fd.as_raw_fd() >= 3);
        assert_ne!(flags(fd.as_raw_fd()) & libc::O_NONBLOCK, 0);
        let chunk = [b'x'; CHUNK];
        let mut total = 0;
        loop {
            match sink.write(&chunk) {
                Ok(n) => total += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
            assert!(total < 16 << 20, "the pipe never filled");
        }
        assert!(total >= 4096);
        // The original description was never made non-blocking.
        assert_eq!(flags(w.as_raw_fd()) & libc::O_NONBLOCK, 0);
        assert_eq!(read_some(&r, CHUNK), CHUNK);
    }

    #[test]
    fn a_socket_cannot_be_reopened_through_proc() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(reopen_nonblocking(a.as_raw_fd()).is_err());
    }

    /// The claim the `PollFirst` fallback rests on: on a Linux pipe, `POLLOUT` means a write
    /// of `PIPE_BUF` bytes fits whole.
    #[test]
    fn pollout_on_a_pipe_means_pipe_buf_bytes_fit() {
        let (r, w) = pipe();
        let nb = reopen_nonblocking(w.as_raw_fd()).unwrap();
        let chunk = [b'x'; CHUNK];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..200 {
            // Fill the pipe with writes of random sizes.
            loop {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let len = 1 + (seed % CHUNK as u64) as usize;
                // SAFETY: `chunk` holds at least `len` bytes.
                let n = unsafe { libc::write(nb.as_raw_fd(), chunk.as_ptr().cast(), len) };
                if n < 0 {
                    break;
                }
            }
            assert!(!writable_now(w.as_raw_fd()).unwrap(), "round {round}: full");
            // Read a random amount, then check the invariant.
            let take = 1 + (seed % (3 * CHUNK as u64)) as usize;
            read_some(&r, take);
            if writable_now(w.as_raw_fd()).unwrap() {
                // SAFETY: `chunk` holds CHUNK bytes.
                let n = unsafe { libc::write(nb.as_raw_fd(), chunk.as_ptr().cast(), CHUNK) };
                assert_eq!(n, CHUNK as isize, "round {round}: POLLOUT but no room");
            }
            // Empty it for the next round.
            while read_some_nonblocking(&r) > 0 {}
        }
    }

    fn read_some_nonblocking(fd: &OwnedFd) -> usize {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
            return 0;
        }
        read_some(fd, 65536)
    }
}
