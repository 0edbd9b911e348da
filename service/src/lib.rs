//! Make any server socket-activatable (take sockets from systemd/systemfd/inetd or bind them, accept until idle, drain on SIGTERM), and serve the classic small services with it.
//!
//! * [`activate`]: the library for your own server: sockets by name from any launcher (or
//!   bound), a race-free idle exit and drain, std threads or (feature `tokio`) tokio, hyper, axum.
//! * [`activation`]: take and check sockets passed through `LISTEN_FDS` (the superserver reuses it).
//! * [`bind`]: bind `NAME=ADDRESS` specs ourselves when nothing was passed.
//! * [`server`]: the single-threaded event loop: accept, time out, idle exit, drain.
//! * [`protocols`]: what echo, discard, chargen, daytime, time and qotd answer.
//! * [`app`]: what the binary does, from parsed flags to an exit code.
//! * [`cli`]: flags, environment variables and exit codes of the binary.
//! * [`proxy`]: the PROXY protocol (v1, v2) a load balancer puts before a client's bytes.
//! * [`notify`]: `sd_notify` READY/STOPPING.

pub mod activate;
pub mod activation;
pub mod app;
pub mod bind;
pub mod cli;
pub mod notify;
pub mod protocols;
pub mod proxy;
pub mod server;
