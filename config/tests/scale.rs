//! Validation is linear in the size of the file: a config of 10,000 services (half wait with a
//! unix socket and a UDP port, half nowait on a TCP port) validates well within a bound that
//! quadratic code (rescanning for positions, pairwise clash checks) would blow.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use superserver_config::*;

const SERVICES: usize = 10_000;
/// Debug build, shared CPUs. Linear code takes well under a second here; the quadratic code
/// this replaced took tens of seconds.
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
