//! Loopback-only load generator for `bench/run`.
//!
//! Modes (one JSON line per run on stdout):
//! - `connect-echo`: C clients, each N sequential connect / send a line / read the echo / close
//!   (`--proto daytime`: connect / read the reply until the server closes / close).
//! - `hold`: keep K idle connections open for T seconds, echo-probe each once, report served/alive.
//! - `first-byte`: one connection to a (cold) socket, time from connect() to the first reply byte.
//! - `wait-port`: poll-connect a port until it accepts (bounded), for readiness checks.
//!
//! Every run is bounded in count and time (connect and I/O timeouts, a wall-clock cap), and the
//! target must be a literal loopback address: no name is ever resolved.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Loopback-only load generator (one JSON line per run)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args, Clone)]
struct Common {
    /// Target, a literal loopback socket address (127.0.0.0/8 or [::1]); names are refused.
    #[arg(long)]
    addr: String,
    /// Connect timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    connect_timeout_ms: u64,
    /// Read/write timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    io_timeout_ms: u64,
    /// Free-form label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
    /// Bytes per line sent (including the trailing newline).
    #[arg(long, default_value_t = 32)]
    line_bytes: usize,
    /// What one probe is: `echo` sends the line and reads it back; `daytime` sends nothing and
    /// reads the reply until the server closes (1..=512 bytes, a digit in it, ending in a newline).
    #[arg(long, value_enum, default_value_t = Proto::Echo)]
    proto: Proto,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Proto {
    Echo,
    Daytime,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Echo => "echo",
            Proto::Daytime => "daytime",
        }
    }
}

#[derive(Subcommand)]
enum Mode {
    /// C concurrent clients, each doing N sequential connect/send/read echo/close cycles.
    ConnectEcho {
        #[command(flatten)]
        common: Common,
        /// Concurrent clients.
        #[arg(short = 'c', long, default_value_t = 1)]
        concurrency: usize,
        /// Cycles per client.
        #[arg(short = 'n', long, default_value_t = 100)]
        per_client: usize,
        /// Wall-clock cap in seconds: clients start no new cycle after it.
        #[arg(long, default_value_t = 60.0)]
        max_seconds: f64,
    },
    /// Open K connections, echo-probe each once, keep them idle T seconds, report served/alive.
    Hold {
        #[command(flatten)]
        common: Common,
        /// Connections to hold.
        #[arg(short = 'k', long, default_value_t = 100)]
        count: usize,
        /// Seconds to hold them after all are open.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Threads opening connections in parallel.
        #[arg(long, default_value_t = 8)]
        open_threads: usize,
        /// File created once every connection is open and probed (for outside measurements).
        #[arg(long)]
        ready_file: Option<String>,
    },
    /// Time from connect() to the first reply byte of one connection (then `warm` more).
    FirstByte {
        #[command(flatten)]
        common: Common,
        /// Further sequential single connections whose median is reported as warm.
        #[arg(long, default_value_t = 0)]
        warm: usize,
    },
    /// Poll-connect until the port accepts or the timeout passes.
    WaitPort {
        #[command(flatten)]
        common: Common,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 10000)]
        timeout_ms: u64,
        /// Pause between attempts in milliseconds.
        #[arg(long, default_value_t = 2)]
        interval_ms: u64,
    },
}

const ERR_KINDS: [&str; 7] = [
    "refused", "reset", "timeout", "eof", "short", "mismatch", "other",
];

#[derive(Debug, Clone, Copy)]
enum Fail {
    Refused,
    Reset,
    Timeout,
    Eof,
    Short,
    Mismatch,
    Other,
}

impl Fail {
    fn idx(self) -> usize {
        self as usize
    }
    fn from_io(e: &io::Error) -> Fail {
        match e.kind() {
            ErrorKind::ConnectionRefused => Fail::Refused,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                Fail::Reset
            }
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Fail::Timeout,
            ErrorKind::UnexpectedEof => Fail::Eof,
            _ => Fail::Other,
        }
    }
}

type Errs = [u64; 7];

fn errs_json(e: &Errs) -> String {
    let parts: Vec<String> = ERR_KINDS
        .iter()
        .zip(e.iter())
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn parse_loopback(addr: &str) -> Result<SocketAddr, String> {
    let sa: SocketAddr = addr.parse().map_err(|_| {
        format!("--addr {addr:?}: not a literal IP:port (names are never resolved)")
    })?;
    let lo = match sa.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    if !lo {
        return Err(format!("--addr {addr}: refusing a non-loopback target"));
    }
    Ok(sa)
}

fn make_line(n: usize) -> Vec<u8> {
    let n = n.max(1);
    let mut v: Vec<u8> = (0..n - 1).map(|i| b'a' + (i % 26) as u8).collect();
    v.push(b'\n');
    v
}

struct Ctx {
    sa: SocketAddr,
    cto: Duration,
    ito: Duration,
    line: Vec<u8>,
    proto: Proto,
}

impl Ctx {
    fn new(c: &Common) -> Result<Ctx, String> {
        Ok(Ctx {
            sa: parse_loopback(&c.addr)?,
            cto: Duration::from_millis(c.connect_timeout_ms.max(1)),
            ito: Duration::from_millis(c.io_timeout_ms.max(1)),
            line: make_line(c.line_bytes),
            proto: c.proto,
        })
    }

    /// Connects with the connect timeout and sets the read timeout. No write timeout and no
    /// TCP_NODELAY: the only write is one short line into an empty send buffer, which cannot
    /// block or be delayed by Nagle, and every syscall saved here is CPU left to measure with
    /// (at C=32 the client's CPU is often the bottleneck on loopback).
    fn connect(&self) -> Result<TcpStream, Fail> {
        let s = TcpStream::connect_timeout(&self.sa, self.cto).map_err(|e| Fail::from_io(&e))?;
        s.set_read_timeout(Some(self.ito))
            .map_err(|e| Fail::from_io(&e))?;
        Ok(s)
    }

    /// Sends the line and reads its echo back (daytime: reads the reply until EOF). Returns the
    /// time of the first reply byte.
    fn probe(&self, s: &mut TcpStream) -> Result<Instant, Fail> {
        if self.proto == Proto::Daytime {
            return self.probe_daytime(s);
        }
        s.write_all(&self.line).map_err(|e| Fail::from_io(&e))?;
        let mut buf = vec![0u8; self.line.len()];
        let mut got = 0;
        let mut first = None;
        while got < buf.len() {
            match s.read(&mut buf[got..]) {
                Ok(0) => return Err(if got == 0 { Fail::Eof } else { Fail::Short }),
                Ok(n) => {
                    if first.is_none() {
                        first = Some(Instant::now());
                    }
                    got += n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let f = Fail::from_io(&e);
                    return Err(if got > 0 && matches!(f, Fail::Timeout) {
                        Fail::Short
                    } else {
                        f
                    });
                }
            }
        }
        if buf != self.line {
            return Err(Fail::Mismatch);
        }
        Ok(first.unwrap_or_else(Instant::now))
    }

    /// RFC 867: the server writes one line of text and closes. Anything up to 512 bytes ending in
    /// a newline with a digit in it is accepted (xinetd, openbsd-inetd and small-services all
    /// format the date differently).
    fn probe_daytime(&self, s: &mut TcpStream) -> Result<Instant, Fail> {
        let mut buf = [0u8; 513];
        let mut got = 0;
        let mut first = None;
        loop {
            match s.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    if first.is_none() {
                        first = Some(Instant::now());
                    }
                    got += n;
                    if got == buf.len() {
                        return Err(Fail::Mismatch);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let f = Fail::from_io(&e);
                    return Err(if got > 0 && matches!(f, Fail::Timeout) {
                        Fail::Short
                    } else {
                        f
                    });
                }
            }
        }
        let reply = &buf[..got];
        if got == 0 {
            return Err(Fail::Eof);
        }
        if reply.last() != Some(&b'\n') || !reply.iter().any(u8::is_ascii_digit) {
            return Err(Fail::Mismatch);
        }
        Ok(first.unwrap_or_else(Instant::now))
    }

    /// One full cycle: connect, probe, close. Returns (latency, first byte after connect start).
    fn cycle(&self) -> Result<(Duration, Duration), Fail> {
        let t0 = Instant::now();
        let mut s = self.connect()?;
        let first = self.probe(&mut s)?;
        drop(s);
        Ok((t0.elapsed(), first - t0))
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn connect_echo(c: &Common, conc: usize, n: usize, max_s: f64) -> Result<String, String> {
    let ctx = Arc::new(Ctx::new(c)?);
    let conc = conc.clamp(1, 4096);
    let n = n.clamp(1, 10_000_000);
    let max = Duration::from_secs_f64(max_s.clamp(0.1, 3600.0));
    let barrier = Arc::new(Barrier::new(conc + 1));
    let mut hs = Vec::new();
    for _ in 0..conc {
        let ctx = ctx.clone();
        let b = barrier.clone();
        hs.push(
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut lat = Vec::with_capacity(n);
                    let mut errs: Errs = [0; 7];
                    b.wait();
                    let start = Instant::now();
                    for _ in 0..n {
                        if start.elapsed() > max {
                            break;
                        }
                        match ctx.cycle() {
                            Ok((d, _)) => lat.push(d.as_micros() as u64),
                            Err(f) => errs[f.idx()] += 1,
                        }
                    }
                    (lat, errs)
                })
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    barrier.wait();
    let t0 = Instant::now();
    let mut lat = Vec::new();
    let mut errs: Errs = [0; 7];
    for h in hs {
        let (l, e) = h.join().map_err(|_| "client thread panicked".to_string())?;
        lat.extend(l);
        for i in 0..7 {
            errs[i] += e[i];
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let ok = lat.len() as u64;
    let nerr: u64 = errs.iter().sum();
    let cps = if wall > 0.0 { ok as f64 / wall } else { 0.0 };
    Ok(format!(
        "{{\"mode\":\"connect-echo\",\"proto\":\"{}\",\"label\":{},\"addr\":\"{}\",\"concurrency\":{},\"per_client\":{},\"attempted\":{},\"ok\":{},\"errors\":{},\"error_total\":{},\"wall_s\":{:.4},\"conn_per_s\":{:.1},\"lat_ms\":{{\"p50\":{:.3},\"p90\":{:.3},\"p99\":{:.3},\"max\":{:.3}}}}}",
        ctx.proto.name(),
        json_str(&c.label),
        ctx.sa,
        conc,
        n,
        ok + nerr,
        ok,
        errs_json(&errs),
        nerr,
        wall,
        cps,
        pct(&lat, 50.0),
        pct(&lat, 90.0),
        pct(&lat, 99.0),
        pct(&lat, 100.0),
    ))
}

fn hold(
    c: &Common,
    k: usize,
    secs: f64,
    threads: usize,
    ready: Option<&str>,
) -> Result<String, String> {
    let ctx = Arc::new(Ctx::new(c)?);
    let k = k.clamp(1, 200_000);
    let threads = threads.clamp(1, 256).min(k);
    let hold_for = Duration::from_secs_f64(secs.clamp(0.0, 600.0));
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for t in 0..threads {
        let ctx = ctx.clone();
        let share = k / threads + usize::from(t < k % threads);
        hs.push(thread::spawn(move || {
            let mut held = Vec::with_capacity(share);
            let mut errs: Errs = [0; 7];
            let mut served = 0u64;
            for _ in 0..share {
                match ctx.connect() {
                    Ok(mut s) => match ctx.probe(&mut s) {
                        Ok(_) => {
                            served += 1;
                            held.push(s);
                        }
                        Err(f) => {
                            errs[f.idx()] += 1;
                            held.push(s);
                        }
                    },
                    Err(f) => errs[f.idx()] += 1,
                }
            }
            (held, errs, served)
        }));
    }
    let mut held = Vec::with_capacity(k);
    let mut errs: Errs = [0; 7];
    let mut served = 0;
    for h in hs {
        let (s, e, n) = h.join().map_err(|_| "opener thread panicked".to_string())?;
        held.extend(s);
        served += n;
        for i in 0..7 {
            errs[i] += e[i];
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    if let Some(p) = ready {
        std::fs::write(p, format!("{}\n", held.len())).map_err(|e| format!("{p}: {e}"))?;
    }
    thread::sleep(hold_for);
    // Alive = still open: a non-blocking peek would block (no EOF, no error).
    let mut alive = 0u64;
    let mut buf = [0u8; 1];
    for s in &held {
        if s.set_nonblocking(true).is_err() {
            continue;
        }
        match s.peek(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => alive += 1,
            Ok(n) if n > 0 => alive += 1,
            _ => {}
        }
    }
    let opened = held.len();
    drop(held);
    Ok(format!(
        "{{\"mode\":\"hold\",\"label\":{},\"addr\":\"{}\",\"count\":{},\"opened\":{},\"served\":{},\"alive\":{},\"errors\":{},\"open_s\":{:.3},\"held_s\":{:.1}}}",
        json_str(&c.label),
        ctx.sa,
        k,
        opened,
        served,
        alive,
        errs_json(&errs),
        open_s,
        hold_for.as_secs_f64()
    ))
}

fn first_byte(c: &Common, warm: usize) -> Result<String, String> {
    let ctx = Ctx::new(c)?;
    let cold = ctx.cycle();
    let warm = warm.min(100_000);
    let mut w = Vec::with_capacity(warm);
    let mut errs: Errs = [0; 7];
    if let Err(f) = cold {
        errs[f.idx()] += 1;
    }
    for _ in 0..warm {
        match ctx.cycle() {
            Ok((_, fb)) => w.push(fb.as_micros() as u64),
            Err(f) => errs[f.idx()] += 1,
        }
    }
    w.sort_unstable();
    let (cold_ok, cold_fb, cold_total) = match cold {
        Ok((d, fb)) => (true, fb.as_secs_f64() * 1e3, d.as_secs_f64() * 1e3),
        Err(_) => (false, -1.0, -1.0),
    };
    Ok(format!(
        "{{\"mode\":\"first-byte\",\"proto\":\"{}\",\"label\":{},\"addr\":\"{}\",\"cold_ok\":{},\"cold_first_byte_ms\":{:.3},\"cold_total_ms\":{:.3},\"warm\":{},\"warm_ok\":{},\"warm_first_byte_p50_ms\":{:.3},\"errors\":{}}}",
        ctx.proto.name(),
        json_str(&c.label),
        ctx.sa,
        cold_ok,
        cold_fb,
        cold_total,
        warm,
        w.len(),
        pct(&w, 50.0),
        errs_json(&errs)
    ))
}

fn wait_port(c: &Common, timeout_ms: u64, interval_ms: u64) -> Result<(String, bool), String> {
    let sa = parse_loopback(&c.addr)?;
    let cto = Duration::from_millis(c.connect_timeout_ms.clamp(1, 10_000));
    let limit = Duration::from_millis(timeout_ms.min(600_000));
    let t0 = Instant::now();
    let mut tries = 0u64;
    let ok = loop {
        tries += 1;
        if let Ok(s) = TcpStream::connect_timeout(&sa, cto) {
            drop(s);
            break true;
        }
        if t0.elapsed() >= limit {
            break false;
        }
        thread::sleep(Duration::from_millis(interval_ms.min(1000)));
    };
    Ok((
        format!(
            "{{\"mode\":\"wait-port\",\"label\":{},\"addr\":\"{}\",\"ok\":{},\"elapsed_ms\":{:.3},\"tries\":{}}}",
            json_str(&c.label),
            sa,
            ok,
            t0.elapsed().as_secs_f64() * 1e3,
            tries
        ),
        ok,
    ))
}

fn main() {
    let cli = Cli::parse();
    let res = match &cli.mode {
        Mode::ConnectEcho {
            common,
            concurrency,
            per_client,
            max_seconds,
        } => connect_echo(common, *concurrency, *per_client, *max_seconds).map(|s| (s, true)),
        Mode::Hold {
            common,
            count,
            seconds,
            open_threads,
            ready_file,
        } => hold(
            common,
            *count,
            *seconds,
            *open_threads,
            ready_file.as_deref(),
        )
        .map(|s| (s, true)),
        Mode::FirstByte { common, warm } => first_byte(common, *warm).map(|s| (s, true)),
        Mode::WaitPort {
            common,
            timeout_ms,
            interval_ms,
        } => wait_port(common, *timeout_ms, *interval_ms),
    };
    match res {
        Ok((line, ok)) => {
            println!("{line}");
            std::process::exit(if ok { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    }
}
