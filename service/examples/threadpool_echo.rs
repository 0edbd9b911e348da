//! An echo server on a fixed pool of std threads (no async runtime), socket-activatable:
//! sockets from any launcher (or bound on 127.0.0.1:7007 / `ACTIVATION_LISTEN`), TCP and unix
//! listeners together, idle exit after `ACTIVATION_IDLE_TIMEOUT` without losing a client, drain
//! on SIGTERM.
//!
//! `cargo run -p small-services --example threadpool_echo`

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, mpsc};

use small_services::activate::{Acceptor, Options, Sockets, Stream, Tracked};

const WORKERS: usize = 8;

fn main() {
    env_logger::init();
    // Before any thread starts: this edits the environment.
    let mut sockets =
        Sockets::from_env_or_bind(["echo=tcp://127.0.0.1:7007"]).unwrap_or_else(|e| {
            eprintln!("threadpool_echo: {e}");
            std::process::exit(3);
        });
    let options = Options::from_env(&sockets);
    let listeners = sockets.take_listeners().expect("stream listeners");
    let mut acceptor = Acceptor::new(listeners, options).expect("acceptor");

    // A connection counts as open from accept until its `Tracked` drops, queued ones included.
    let (tx, rx) = mpsc::channel::<Tracked<Stream>>();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..WORKERS {
        let rx = rx.clone();
        std::thread::spawn(move || {
            loop {
                let next = rx.lock().unwrap().recv();
                let Ok(conn) = next else { return };
                echo(conn);
            }
        });
    }
    while let Some(conn) = acceptor.accept() {
        tx.send(conn).expect("workers alive");
    }
    let code = acceptor.finish().exit_code();
    drop(sockets); // removes a unix socket file it bound itself (never a passed one)
    std::process::exit(code);
}

fn echo(mut conn: Tracked<Stream>) {
    let mut buf = [0; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
