//! The client side of the control socket: `superserver status`, `reload` and `stop` send one
//! request line and print the answer, as a table or as the JSON the superserver wrote.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::cli::{ControlArgs, DrainArgs, StatusArgs, StopArgs, UpgradeArgs};
use crate::control::{PROTOCOL, default_path};

/// No superserver answers on the control socket.
const UNREACHABLE: u8 = 5;
/// The superserver answered with a refusal or an error.
const REFUSED: u8 = 1;
/// A reload was rejected: the running configuration stays.
const REJECTED: u8 = 3;

fn path(args: &ControlArgs) -> Result<PathBuf, u8> {
    args.control.clone().or_else(default_path).ok_or_else(|| {
        eprintln!("error: no control socket path: XDG_RUNTIME_DIR is not set; give --control PATH");
        UNREACHABLE
    })
}

/// Send `request` and read the one JSON answer.
fn ask(args: &ControlArgs, request: &str) -> Result<Value, u8> {
    let path = path(args)?;
    let unreachable = |e: std::io::Error| {
        eprintln!(
            "error: no superserver answers on {}: {e} (is it running, with a control socket? \
             see [superserver] control)",
            path.display()
        );
        UNREACHABLE
    };
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            eprintln!(
                "error: permission denied: {} is for root and the superserver's own user (and \
                 the members of its control_group, if it has one)",
                path.display()
            );
            return REFUSED;
        }
        unreachable(e)
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(unreachable)?;
    stream
        .write_all(format!("{PROTOCOL} {request}\n").as_bytes())
        .map_err(unreachable)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(unreachable)?;
    let answer: Value = serde_json::from_str(&line).map_err(|e| {
        eprintln!("error: a bad answer from {}: {e}", path.display());
        UNREACHABLE
    })?;
    if answer["ok"] != Value::Bool(true) && answer["applied"].is_null() {
        eprintln!(
            "error: {}",
            answer["error"]
                .as_str()
                .unwrap_or("the superserver refused")
        );
        return Err(REFUSED);
    }
    Ok(answer)
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    if out.write_all(text.as_bytes()).is_err() {
        std::process::exit(0);
    }
}

pub fn status(args: StatusArgs) -> Result<(), u8> {
    let request = std::iter::once("status")
        .chain(args.services.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    let answer = ask(&args.control, &request)?;
    if args.json {
        print(&format!("{answer}\n"));
        return Ok(());
    }
    print(&table(&answer, !args.services.is_empty()));
    Ok(())
}

/// The status as an aligned table; with `detail`, each service's sockets below it.
fn table(answer: &Value, detail: bool) -> String {
    let empty = Vec::new();
    let services = answer["services"].as_array().unwrap_or(&empty);
    let mut rows = vec![
        [
            "SERVICE",
            "MODE",
            "STATE",
            "LIVE",
            "ACCEPTED",
            "SPAWNED",
            "FAILED",
            "REFUSED",
            "LAST EXIT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for s in services {
        let c = &s["counters"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let accepted = if s["mode"] == "wait" {
            n(&c["activations"])
        } else {
            n(&c["accepted"])
        };
        let refused = n(&c["refused"]["deny"])
            + n(&c["refused"]["per_source"])
            + n(&c["refused"]["overflow"])
            + n(&c["refused"]["proxy"]);
        let failed =
            n(&c["spawn_failures"]) + n(&c["exits"]["failed"]) + n(&c["exits"]["signaled"]);
        let last = match &s["last_exit"] {
            Value::Null => "-".to_string(),
            e => {
                let how = match (e["code"].as_i64(), e["signal"].as_i64()) {
                    (Some(code), _) => format!("exited {code}"),
                    (_, Some(sig)) => format!("signal {sig}"),
                    _ => "?".into(),
                };
                format!("{how}, {}s ago", e["ago_s"].as_f64().unwrap_or(0.0).round())
            }
        };
        rows.push(vec![
            s["name"].as_str().unwrap_or("?").to_string(),
            s["mode"].as_str().unwrap_or("?").to_string(),
            if s["drained"] == true || answer["drained_all"] == true {
                format!("{} (drained)", s["state"].as_str().unwrap_or("?"))
            } else {
                s["state"].as_str().unwrap_or("?").to_string()
            },
            format!("{}/{}", n(&s["live"]), n(&s["cap"])),
            accepted.to_string(),
            n(&c["spawned"]).to_string(),
            failed.to_string(),
            refused.to_string(),
            last,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (k, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if detail && k > 0 {
            let s = &services[k - 1];
            out.push_str(&format!("    {}\n", s["why"].as_str().unwrap_or("")));
            for l in s["listeners"].as_array().unwrap_or(&empty) {
                let queue = match l["queue"].as_u64() {
                    Some(q) => format!(", {q} queued"),
                    None => String::new(),
                };
                let bound = if l["bound"] == Value::Bool(true) {
                    ""
                } else {
                    " (not bound)"
                };
                out.push_str(&format!(
                    "    {} ({}){bound}{queue}\n",
                    l["address"].as_str().unwrap_or("?"),
                    l["name"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    out
}

pub fn reload(args: ControlArgs) -> Result<(), u8> {
    let answer = ask(&args, "reload")?;
    if answer["applied"] == Value::Bool(true) {
        let list = |k: &str| {
            let names: Vec<&str> = answer[k]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if names.is_empty() {
                "0".to_string()
            } else {
                format!("{} ({})", names.len(), names.join(", "))
            }
        };
        print(&format!(
            "reloaded: {} kept, {} added, {} changed, {} removed\n",
            list("kept"),
            list("added"),
            list("changed"),
            list("removed")
        ));
        Ok(())
    } else {
        for e in answer["errors"].as_array().into_iter().flatten() {
            eprintln!("{}", e.as_str().unwrap_or("?"));
        }
        eprintln!("reload rejected; the running configuration stays");
        Err(REJECTED)
    }
}

/// `superserver drain|undrain [SERVICE…]`: what HAProxy's agent-check answers.
pub fn drain(args: DrainArgs, on: bool) -> Result<(), u8> {
    let verb = if on { "drain" } else { "undrain" };
    let mut request = verb.to_string();
    for s in &args.services {
        request.push(' ');
        request.push_str(s);
    }
    let answer = ask(&args.control, &request)?;
    let drained: Vec<&str> = answer["drained"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let agent = match answer["agent"].as_str() {
        Some(a) => format!("the agent on {a} answers drain for them"),
        None => "no agent is configured ([superserver] agent), so no balancer is told".into(),
    };
    if drained.is_empty() {
        print("draining: none\n");
    } else {
        print(&format!("draining: {} ({agent})\n", drained.join(", ")));
    }
    Ok(())
}

pub fn stop(args: StopArgs) -> Result<(), u8> {
    let request = match &args.grace {
        Some(g) => format!("stop {g}"),
        None => "stop".to_string(),
    };
    let answer = ask(&args.control, &request)?;
    print(&format!(
        "stopping: SIGTERM to {} child(ren), grace {}s\n",
        answer["children"].as_u64().unwrap_or(0),
        answer["grace_s"].as_f64().unwrap_or(0.0)
    ));
    Ok(())
}

pub fn upgrade(args: UpgradeArgs) -> Result<(), u8> {
    let before = ask(&args.control, "status")?;
    let (pid, upgrades) = (
        before["pid"].clone(),
        before["upgrades"].as_u64().unwrap_or(0),
    );
    let request = match &args.binary {
        Some(b) => format!("upgrade {}", b.display()),
        None => "upgrade".to_string(),
    };
    ask(&args.control, &request)?;
    // The pre-flight takes up to 2 s, the exec a moment; then the new image answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let Ok(now) = quiet_status(&args.control) else {
            continue; // between the images
        };
        if now["upgrades"].as_u64().unwrap_or(0) > upgrades {
            print(&format!(
                "upgraded in place: pid {} (unchanged: {}), upgrade #{}\n",
                now["pid"],
                now["pid"] == pid,
                now["upgrades"]
            ));
            return Ok(());
        }
        if let Some(e) = now["last_upgrade_error"].as_str() {
            eprintln!("error: {e}");
            eprintln!("not upgraded; the running binary keeps serving");
            return Err(REFUSED);
        }
    }
    eprintln!("error: no answer from the upgraded superserver within 10 s");
    Err(UNREACHABLE)
}

/// `status` without printing anything on failure (the socket may be between two images).
fn quiet_status(args: &ControlArgs) -> std::io::Result<Value> {
    let path = path(args).map_err(|_| std::io::Error::other("no path"))?;
    let mut stream = UnixStream::connect(&path)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("{PROTOCOL} status\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
