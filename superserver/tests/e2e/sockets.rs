//! More socket kinds: UDP in wait mode, Unix stream sockets in both modes, IPv6 next to IPv4.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use crate::harness::*;

#[test]
fn udp_echo_daytime_and_time_through_a_wait_mode_service() {
    let (e, e_addr) = udp_socket("127.0.0.1");
    let (d, d_addr) = udp_socket("127.0.0.1");
    let (t, t_addr) = udp_socket("127.0.0.1");
    let config = format!(
        "[service.small]\nexec = [\"{{SMALL}}\", \"--idle-timeout=5s\"]\n\
         listen = {{ echo = \"udp://{e_addr}\", daytime = \"udp://{d_addr}\", time = \"udp://{t_addr}\" }}\n"
    );
    let _server = Server::start(&config, vec![e, d, t]);
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 2048];
    c.send_to(b"datagram", e_addr).unwrap();
    let (n, from) = c.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"datagram"[..], e_addr));
    c.send_to(b"", d_addr).unwrap();
    let (n, _) = c.recv_from(&mut buf).unwrap();
    assert!(std::str::from_utf8(&buf[..n]).unwrap().ends_with("\r\n"));
    c.send_to(b"", t_addr).unwrap();
    let (n, _) = c.recv_from(&mut buf).unwrap();
    assert_eq!(n, 4);
    let t1900 = u32::from_be_bytes(buf[..4].try_into().unwrap()) as i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 2_208_988_800;
    assert!((t1900 - now).abs() <= 2, "RFC 868 time {t1900} vs {now}");
}

fn unix_echo(path: &std::path::Path, line: &str) -> String {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    (&s).write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut out = String::new();
    BufReader::new(&s).read_line(&mut out).unwrap();
    out.trim_end().to_string()
}

#[test]
fn unix_sockets_in_both_modes_with_mode_stale_file_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let wait_path = dir.path().join("wait.sock");
    let nowait_path = dir.path().join("nowait.sock");
    // A stale socket file from an earlier run is replaced.
    drop(UnixListener::bind(&wait_path).unwrap());
    assert!(wait_path.exists());
    let config = format!(
        "[service.w]\nexec = [\"{{SMALL}}\", \"--idle-timeout=5s\"]\nlisten = {{ echo = \"unix:{}\" }}\nsocket_mode = \"0660\"\nsocket_user = \"nobody\"\n\
         [service.n]\nmode = \"nowait\"\nexec = [\"{{SMALL}}\", \"--inetd\", \"echo\"]\nlisten = \"unix:{}\"\n",
        wait_path.display(),
        nowait_path.display()
    );
    let mut server = Server::start(&config, vec![]);
    let meta = std::fs::metadata(&wait_path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        nobody.uid.as_raw(),
        "socket_user"
    );
    assert_eq!(unix_echo(&wait_path, "wait over unix"), "wait over unix");
    assert_eq!(
        unix_echo(&nowait_path, "nowait over unix"),
        "nowait over unix"
    );
    server.wait_log_all(&["n: unix pid", "exited 0"]);
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit().code(), Some(0));
    assert!(
        !wait_path.exists() && !nowait_path.exists(),
        "socket files removed on shutdown"
    );
}

#[test]
fn a_path_that_is_not_a_socket_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, "data").unwrap();
    let config = format!(
        "[service.w]\nexec = [\"{{SMALL}}\"]\nlisten = {{ echo = \"unix:{}\" }}\n",
        path.display()
    );
    let mut server = Server::start_with(&config, vec![], &[]);
    assert_eq!(
        server.wait_exit().code(),
        Some(4),
        "cannot bind: exit code 4"
    );
    server.wait_log("not a socket");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
}

#[test]
fn ipv6_listens_next_to_ipv4_on_the_same_port() {
    let (v4, v4_addr) = tcp_listener("127.0.0.1");
    let v6_addr: SocketAddr = format!("[::1]:{}", v4_addr.port()).parse().unwrap();
    let config = format!(
        "[service.both]\nmode = \"nowait\"\nexec = [\"{{SMALL}}\", \"--inetd\", \"echo\"]\nlisten = [\"{v4_addr}\", \"{v6_addr}\"]\n"
    );
    // The IPv4 socket is handed over, the IPv6 one is bound by the superserver (IPV6_V6ONLY).
    let server = Server::start(&config, vec![v4]);
    assert_eq!(echo(v4_addr, "four").unwrap(), "four");
    assert_eq!(echo(v6_addr, "six").unwrap(), "six");
    server.wait_log_all(&["both: [::1]:", "exited 0"]);
}
