//! The classic small services (RFC 862-868): what each one answers, independent of sockets.

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// One of the small services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// RFC 862: sends back what it receives.
    Echo,
    /// RFC 863: throws away what it receives.
    Discard,
    /// RFC 864: sends a rotating pattern of 72-character lines (TCP: while the client reads).
    Chargen,
    /// RFC 867: the date and time as text, in UTC.
    Daytime,
    /// RFC 868: 32-bit big-endian seconds since 1900-01-01 00:00 UTC.
    Time,
    /// RFC 865: a short quote (< 512 bytes).
    Qotd,
}

impl Protocol {
    /// Every protocol, in RFC order of the service names.
    pub const ALL: [Protocol; 6] = [
        Protocol::Echo,
        Protocol::Discard,
        Protocol::Chargen,
        Protocol::Daytime,
        Protocol::Time,
        Protocol::Qotd,
    ];

    /// Its name, as used for fd names and `--protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Echo => "echo",
            Protocol::Discard => "discard",
            Protocol::Chargen => "chargen",
            Protocol::Daytime => "daytime",
            Protocol::Time => "time",
            Protocol::Qotd => "qotd",
        }
    }

    /// The protocol an fd name stands for: `echo`, or `echo.socket` (systemd's default name
    /// is the socket unit's name). `None` for any other name.
    pub fn from_fd_name(name: &str) -> Option<Protocol> {
        let base = name.strip_suffix(".socket").unwrap_or(name);
        Protocol::ALL.into_iter().find(|p| p.name() == base)
    }

    /// The protocol a port number stands for: its RFC port (7 echo, 9 discard, 13 daytime,
    /// 17 qotd, 19 chargen, 37 time) or the same plus 7000, the unprivileged ports this project
    /// uses. Used only for sockets that carry no protocol name (systemfd names none).
    pub fn from_port(port: u16) -> Option<Protocol> {
        let rfc = if port > 7000 { port - 7000 } else { port };
        Some(match rfc {
            7 => Protocol::Echo,
            9 => Protocol::Discard,
            13 => Protocol::Daytime,
            17 => Protocol::Qotd,
            19 => Protocol::Chargen,
            37 => Protocol::Time,
            _ => return None,
        })
    }

    /// Whether a stream connection gets a fixed reply and is closed (daytime, time, qotd).
    pub fn is_one_shot(self) -> bool {
        matches!(self, Protocol::Daytime | Protocol::Time | Protocol::Qotd)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Seconds between 1900-01-01 and 1970-01-01 (RFC 868).
pub const SECONDS_1900_TO_1970: u64 = 2_208_988_800;

/// The RFC 868 answer for `now`: seconds since 1900 modulo 2^32 (it wraps in 2036, as the RFC
/// format does), big-endian.
pub fn time_reply(now: SystemTime) -> [u8; 4] {
    let unix = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (((unix + SECONDS_1900_TO_1970) & 0xffff_ffff) as u32).to_be_bytes()
}

const WEEKDAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// The RFC 867 answer for `now`, always in UTC so no time zone database is needed:
/// `Sunday, November 22, 2026 00:38:33-UTC\r\n` (the format the RFC suggests, with `-UTC`).
pub fn daytime_reply(now: SystemTime) -> String {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {} {}, {} {:02}:{:02}:{:02}-UTC\r\n",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        day,
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Characters per chargen line, without CR LF (RFC 864).
pub const CHARGEN_LINE: usize = 72;
/// Bytes per chargen line including CR LF.
const CHARGEN_STRIDE: u64 = CHARGEN_LINE as u64 + 2;
/// The printable ASCII characters the pattern rotates through (`' '..='~'`).
const CHARGEN_CHARS: u64 = 95;
/// The pattern repeats after this many bytes.
pub const CHARGEN_PERIOD: u64 = CHARGEN_CHARS * CHARGEN_STRIDE;

/// Fills `buf` with the chargen stream starting at byte `offset` of it; the stream depends only
/// on the offset, so a connection needs to remember just one number.
pub fn chargen_fill(offset: u64, buf: &mut [u8]) {
    let mut pos = offset % CHARGEN_PERIOD;
    for b in buf.iter_mut() {
        let line = pos / CHARGEN_STRIDE;
        let col = pos % CHARGEN_STRIDE;
        *b = match col {
            c if c < CHARGEN_LINE as u64 => b' ' + ((line + c) % CHARGEN_CHARS) as u8,
            c if c == CHARGEN_LINE as u64 => b'\r',
            _ => b'\n',
        };
        pos = (pos + 1) % CHARGEN_PERIOD;
    }
}

/// Lines sent per UDP chargen datagram (RFC 864 allows 0-512 bytes; 6 lines are 444).
pub const CHARGEN_UDP_LINES: u64 = 6;

/// Longest quote RFC 865 allows, exclusive.
pub const QOTD_MAX: usize = 512;

/// The built-in quotes.
pub const BUILTIN_QUOTES: [&str; 5] = [
    "Do one thing and do it well.\r\n",
    "Simplicity is prerequisite for reliability. - Edsger W. Dijkstra\r\n",
    "Programs must be written for people to read, and only incidentally for machines to execute. - Abelson & Sussman\r\n",
    "The network is reliable. (Fallacy number one.)\r\n",
    "Make it work, make it right, make it fast. - Kent Beck\r\n",
];

/// The quotes qotd picks from, in turn.
#[derive(Debug, Clone)]
pub struct Quotes {
    quotes: Vec<Vec<u8>>,
}

impl Default for Quotes {
    fn default() -> Self {
        Quotes {
            quotes: BUILTIN_QUOTES
                .iter()
                .map(|q| q.as_bytes().to_vec())
                .collect(),
        }
    }
}

/// Why a quote file cannot be used.
#[derive(Debug)]
pub enum QuoteFileError {
    Read(std::io::Error),
    Empty,
    TooLong { quote: usize, bytes: usize },
}

impl fmt::Display for QuoteFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuoteFileError::Read(e) => write!(f, "cannot read: {e}"),
            QuoteFileError::Empty => f.write_str("holds no quote"),
            QuoteFileError::TooLong { quote, bytes } => write!(
                f,
                "quote {quote} is {bytes} bytes with CR LF line ends; RFC 865 wants fewer than {QOTD_MAX}"
            ),
        }
    }
}

impl std::error::Error for QuoteFileError {}

impl Quotes {
    /// Reads quotes separated by blank lines. Line ends become CR LF; each quote must stay
    /// under 512 bytes.
    pub fn from_file(path: &Path) -> Result<Quotes, QuoteFileError> {
        let text = std::fs::read_to_string(path).map_err(QuoteFileError::Read)?;
        Quotes::parse(&text)
    }

    /// Parses quotes separated by blank lines (see [`Quotes::from_file`]).
    pub fn parse(text: &str) -> Result<Quotes, QuoteFileError> {
        let mut quotes = Vec::new();
        let mut current = String::new();
        for line in text.lines().chain(std::iter::once("")) {
            let line = line.trim_end();
            if line.is_empty() {
                if !current.is_empty() {
                    if current.len() >= QOTD_MAX {
                        return Err(QuoteFileError::TooLong {
                            quote: quotes.len() + 1,
                            bytes: current.len(),
                        });
                    }
                    quotes.push(std::mem::take(&mut current).into_bytes());
                }
            } else {
                current.push_str(line);
                current.push_str("\r\n");
            }
        }
        if quotes.is_empty() {
            return Err(QuoteFileError::Empty);
        }
        Ok(Quotes { quotes })
    }

    /// The `n`-th quote, cycling.
    pub fn pick(&self, n: u64) -> &[u8] {
        &self.quotes[(n % self.quotes.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn daytime_format() {
        // 2026-11-22 00:38:33 UTC
        let t = UNIX_EPOCH + Duration::from_secs(1_795_307_913);
        assert_eq!(
            daytime_reply(t),
            "Sunday, November 22, 2026 00:38:33-UTC\r\n"
        );
        assert_eq!(
            daytime_reply(UNIX_EPOCH),
            "Thursday, January 1, 1970 00:00:00-UTC\r\n"
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(
            daytime_reply(leap),
            "Tuesday, February 29, 2000 00:00:00-UTC\r\n"
        );
    }

    #[test]
    fn time_is_seconds_since_1900() {
        assert_eq!(u32::from_be_bytes(time_reply(UNIX_EPOCH)), 2_208_988_800);
    }

    #[test]
    fn chargen_lines() {
        let mut buf = vec![0; 2 * CHARGEN_STRIDE as usize];
        chargen_fill(0, &mut buf);
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0], (32u8..104).map(char::from).collect::<String>());
        assert_eq!(lines[1], (33u8..105).map(char::from).collect::<String>());
        let mut a = vec![0; 500];
        chargen_fill(1000, &mut a);
        let mut b = vec![0; 1500];
        chargen_fill(0, &mut b);
        assert_eq!(a, b[1000..]);
        let mut c = vec![0; 10];
        chargen_fill(CHARGEN_PERIOD, &mut c);
        assert_eq!(c, b[..10]);
    }

    #[test]
    fn fd_names() {
        assert_eq!(Protocol::from_fd_name("echo"), Some(Protocol::Echo));
        assert_eq!(Protocol::from_fd_name("qotd.socket"), Some(Protocol::Qotd));
        assert_eq!(Protocol::from_fd_name("connection"), None);
    }

    #[test]
    fn quote_file() {
        let q = Quotes::parse("one\nline\n\n\ntwo\n").unwrap();
        assert_eq!(q.pick(0), b"one\r\nline\r\n");
        assert_eq!(q.pick(1), b"two\r\n");
        assert!(matches!(Quotes::parse("\n\n"), Err(QuoteFileError::Empty)));
        assert!(matches!(
            Quotes::parse(&"x".repeat(600)),
            Err(QuoteFileError::TooLong { .. })
        ));
        for q in BUILTIN_QUOTES {
            assert!(q.len() < QOTD_MAX);
        }
    }
}
