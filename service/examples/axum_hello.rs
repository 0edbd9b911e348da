//! axum's hello world, socket-activatable: sockets from systemd, systemd-socket-activate,
//! systemfd, the superserver or inetd `wait` (or bound on 127.0.0.1:3000 / `ACTIVATION_LISTEN`
//! when none were passed), every TCP and unix listener served, idle exit after
//! `ACTIVATION_IDLE_TIMEOUT` without losing a client, drain on SIGTERM.
//!
//! `cargo run -p small-services --features tokio --example axum_hello`
//!
//! Against plain axum (`#[tokio::main] async fn main` with `TcpListener::bind` and
//! `axum::serve`): 6 lines added (`use small_services`, the 4 lines of the new `main`,
//! `let options`) and 3 changed (`async fn run`, `let listeners`, `serve_http`).

use axum::{Router, routing::get};
use small_services::activate::{Options, Sockets, tokio::serve_http};

fn main() {
    // Take the sockets before the runtime starts threads (it edits the environment).
    let sockets = Sockets::from_env_or_bind(["http=tcp://127.0.0.1:3000"]).unwrap();
    run(sockets);
}

#[tokio::main]
async fn run(mut sockets: Sockets) {
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    let options = Options::from_env(&sockets);
    let listeners = sockets.take_tokio_listeners().unwrap();
    serve_http(listeners, app, options).await.unwrap();
}
