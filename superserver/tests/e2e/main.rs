//! End-to-end tests of the superserver: the real binaries, real sockets, real signals.

mod harness;

mod cli;
mod control;
mod first_run;
mod import;
mod inetd_host;
mod logging;
mod nowait;
mod proxy;
mod reload;
mod security;
mod sockets;
mod upgrade;
mod wait_mode;
