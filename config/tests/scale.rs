//! Validation is linear in the size of the file: a config of 20,000 services (half wait with a
//! unix socket and a UDP port, half nowait on a TCP port; 2.6 MB) validates well within a bound
//! that quadratic code (rescanning for positions, pairwise clash checks) would blow.
//!
//! Measured (debug build): the quadratic code took 2.3 s for 10,000 services and 10.2 s for
//! 20,000; the linear code takes 0.37 s and 0.74 s. At 10,000 services the old code stayed
//! under a generous bound, so the test uses 20,000.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use superserver_config::*;

const SERVICES: usize = 20_000;
/// Debug build, shared CPUs: linear code takes under a second, the quadratic code took 10 s.
const BOUND: Duration = Duration::from_secs(5);

/// The text of a config with `n` services whose sockets live in `dir`.
fn big_config(n: usize, dir: &Path) -> String {
    let mut text = String::from("[superserver]\nshutdown_grace = \"5s\"\n\n");
    for i in 0..n {
        if i % 2 == 0 {
            writeln!(
                text,
                "[service.w{i}]\nexec = [\"prog\", \"--n={i}\"]\n\
                 listen = {{ main = \"unix:{}/w{i}.sock\", dgram = \"udp://127.0.0.1:{}\" }}\n\
                 rate = \"10/s\"\n",
                dir.display(),
                10_000 + i
            )
            .unwrap();
        } else {
            writeln!(
                text,
                "[service.n{i}]\nmode = \"nowait\"\nexec = [\"prog\"]\n\
                 listen = \"127.0.0.1:{}\"\nmax_instances = 8\nallow = [\"127.0.0.0/8\"]\n",
                10_000 + i
            )
            .unwrap();
        }
    }
    text
}

#[test]
fn ten_thousand_services_validate_in_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("prog");
    std::fs::write(&exe, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    // SCALE_SERVICES=N measures another size (the bound is only checked at the default).
    let n: usize = std::env::var("SCALE_SERVICES").map_or(SERVICES, |v| v.parse().unwrap());
    let text = big_config(n, dir.path());
    let opts = LoadOptions {
        exe_dir: Some(dir.path().to_path_buf()),
        running_as_root: false,
        ..Default::default()
    };

    let start = Instant::now();
    let config = parse_str(&text, Path::new("big.toml"), &opts).unwrap_or_else(|e| panic!("{e}"));
    let took = start.elapsed();
    eprintln!(
        "{n} services ({} KB) validated in {took:?}",
        text.len() / 1024
    );

    assert_eq!(config.services.len(), n);
    if n == SERVICES {
        assert!(took < BOUND, "validating {n} services took {took:?}");
    }
}

#[test]
fn a_service_with_more_than_4096_sockets_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (0..4097)
        .map(|i| format!("\"unix:{}/s{i}.sock\"", dir.path().display()))
        .collect();
    let text = format!(
        "[service.many]\nmode = \"nowait\"\nexec = [\"/bin/cat\"]\nlisten = [{}]\n",
        addrs.join(", ")
    );
    let opts = LoadOptions::default();
    let err = parse_str(&text, Path::new("many.toml"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("many.toml:4:") && err.contains("service.many.listen"),
        "{err}"
    );
    assert!(
        err.contains("4097 sockets; a service may have at most 4096"),
        "{err}"
    );
}
