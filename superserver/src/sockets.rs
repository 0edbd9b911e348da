//! Listening sockets: binding them with socket2, adopting the ones inherited from systemd or
//! systemfd, and the pool that lets a reload keep every socket whose address did not change.

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};
use superserver_config::{Listen, ListenAddr, UnixSocketOptions};

/// A socket the superserver holds for its whole life (or until a reload removes its address).
pub struct Bound {
    /// The address this socket is bound to (as configured).
    pub addr: ListenAddr,
    /// The socket.
    pub socket: Socket,
    /// The device and inode of the Unix socket file (at `addr`'s path) this process created
    /// and must remove when it closes the socket: only that file is ever removed. `None` for
    /// IP sockets and for inherited Unix sockets (whose file belongs to the launcher).
    /// (An inode number is never 0: the niche keeps this at 16 bytes.)
    owned: Option<(u64, std::num::NonZeroU64)>,
    /// The blocking mode as this process knows it: what it last set, or blocking for a socket
    /// it created (`None`: inherited and never set).
    nonblocking: Option<bool>,
}

impl Bound {
    /// The raw fd, for polling and handing over.
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// The Unix socket file this process created (path, device and inode), if any.
    pub fn owned(&self) -> Option<(&Path, (u64, u64))> {
        match (&self.addr, self.owned) {
            (ListenAddr::Unix(path), Some((dev, ino))) => Some((path, (dev, ino.get()))),
            _ => None,
        }
    }

    /// The blocking mode this process last set, if any.
    pub fn nonblocking_state(&self) -> Option<bool> {
        self.nonblocking
    }

    /// A socket carried over an in-place upgrade (see `upgrade.rs`), with what the old image
    /// knew of it: the device and inode of the socket file at `addr` it created, if any.
    pub fn restore(
        addr: ListenAddr,
        fd: OwnedFd,
        owned: Option<(u64, u64)>,
        nonblocking: Option<bool>,
    ) -> Bound {
        Bound {
            owned: owned
                .filter(|_| matches!(addr, ListenAddr::Unix(_)))
                .and_then(file_key),
            addr,
            socket: Socket::from(fd),
            nonblocking,
        }
    }

    /// Whether this process made the socket non-blocking (a nowait listener).
    pub fn is_nonblocking(&self) -> bool {
        self.nonblocking == Some(true)
    }

    /// Make the socket (non-)blocking, unless we already did. `O_NONBLOCK` belongs to the open
    /// socket and so is shared with a service that holds it: a running wait-mode service
    /// that made its listeners non-blocking must never see them turned blocking under it
    /// (its next `accept` on an empty queue would hang), so the mode is set once per use.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        if self.nonblocking != Some(on) {
            let mut flag = libc::c_int::from(on);
            // SAFETY: ioctl(2) FIONBIO on our open socket with a pointer to an int: one system
            // call (setting O_NONBLOCK through fcntl takes two).
            if unsafe { libc::ioctl(self.fd(), libc::FIONBIO, &mut flag) } != 0 {
                return Err(io::Error::last_os_error());
            }
            self.nonblocking = Some(on);
        }
        Ok(())
    }
}

impl Drop for Bound {
    /// Closing a socket we bound to a path removes the file, if it still is the file we
    /// created (another process may have replaced it meanwhile).
    fn drop(&mut self) {
        if let Some((path, id)) = self.owned()
            && file_id(path).ok() == Some(id)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The name a socket we bound gets in systemd's file-descriptor store: `@` and its address
/// with `|` for `:` (fd names may not hold a colon). `None` when the address has characters an
/// fd name may not hold.
pub fn store_name(addr: &ListenAddr) -> Option<String> {
    let text = addr.to_string().replace(':', "|");
    let ok = text.len() < 255 && text.bytes().all(|b| (0x21..0x7f).contains(&b));
    ok.then(|| format!("@{text}"))
}

/// The address a store name says, if it is one of ours.
fn from_store_name(name: &str) -> Option<ListenAddr> {
    let text = name.strip_prefix('@')?.replace('|', ":");
    superserver_config::parse_listen_addr(&text).ok()
}

/// A device and inode as [`Bound`] keeps them (`None` for inode 0, which no file has).
fn file_key((dev, ino): (u64, u64)) -> Option<(u64, std::num::NonZeroU64)> {
    std::num::NonZeroU64::new(ino).map(|ino| (dev, ino))
}

/// Device and inode of `path` itself (never following a symlink), for a socket file.
fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::symlink_metadata(path)?;
    if !m.file_type().is_socket() {
        return Err(io::Error::other("not a socket"));
    }
    Ok((m.dev(), m.ino()))
}

/// A failure to bind one address.
#[derive(Debug)]
pub struct BindError {
    pub addr: ListenAddr,
    pub source: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot listen on {}: {}", self.addr, self.source)
    }
}

/// Bind and listen on `addr`: close-on-exec (socket2 creates sockets with `SOCK_CLOEXEC`),
/// `IPV6_V6ONLY` for IPv6 (so that IPv4 and IPv6 are separate sockets), `SO_REUSEADDR` on
/// TCP (a restart must not wait for TIME_WAIT) but never on UDP, where it would let any local
/// user bind the same port and take our datagrams.
///
/// A Unix socket file left by a dead process is replaced, but only if it is a socket and
/// nobody accepts connections on it (a `connect` probe): a live one, another superserver's
/// say, is an error. The mode and owner are applied to the socket we created and nothing
/// else: see [`bind_unix`].
pub fn bind(addr: &ListenAddr, backlog: u32, unix: &UnixSocketOptions) -> Result<Bound, BindError> {
    let fail = |source: io::Error| BindError {
        addr: addr.clone(),
        source,
    };
    match addr {
        ListenAddr::Tcp(_) | ListenAddr::Udp(_) => bind_with(addr, backlog, false),
        ListenAddr::Unix(path) => {
            let backlog = backlog.min(i32::MAX as u32) as i32;
            let (socket, id) = bind_unix(path, unix).map_err(fail)?;
            let bound = Bound {
                addr: addr.clone(),
                socket,
                owned: file_key(id),
                // Created here, blocking: nothing else has it yet.
                nonblocking: Some(false),
            };
            bound.socket.listen(backlog).map_err(fail)?;
            Ok(bound)
        }
    }
}

/// Bind an IP address; with `share`, beside a socket of ours that already covers it (see
/// [`Pool::bind`]), `SO_REUSEPORT` being cleared again once the socket listens.
fn bind_with(addr: &ListenAddr, backlog: u32, share: bool) -> Result<Bound, BindError> {
    let fail = |source: io::Error| BindError {
        addr: addr.clone(),
        source,
    };
    let backlog = backlog.min(i32::MAX as u32) as i32;
    let (ListenAddr::Tcp(sa) | ListenAddr::Udp(sa)) = addr else {
        return Err(fail(io::Error::other("not an IP address")));
    };
    let ty = if matches!(addr, ListenAddr::Tcp(_)) {
        Type::STREAM
    } else {
        Type::DGRAM
    };
    let socket = Socket::new(Domain::for_address(*sa), ty, None).map_err(fail)?;
    if ty == Type::STREAM {
        socket.set_reuse_address(true).map_err(fail)?;
    }
    if share {
        socket.set_reuse_port(true).map_err(fail)?;
    }
    if sa.is_ipv6() {
        socket.set_only_v6(true).map_err(fail)?;
    }
    socket.bind(&SockAddr::from(*sa)).map_err(fail)?;
    if ty == Type::STREAM {
        socket.listen(backlog).map_err(fail)?;
    }
    if share {
        socket.set_reuse_port(false).map_err(fail)?;
    }
    Ok(Bound {
        addr: addr.clone(),
        socket,
        owned: None,
        // Created here, blocking: nothing else has it yet.
        nonblocking: Some(false),
    })
}

/// Bind a Unix stream socket at `path` with the configured mode and owner.
///
/// The directory may be writable by someone less privileged than us, who could rename a
/// symlink over the fresh socket between `bind` and a `chmod(path)`, and have root change the
/// mode of any file. So nothing is ever done to `path` by name after the bind: the socket is
/// created in a private directory (mode 0700, ours, created next to `path` and used through
/// its descriptor), given its mode (by the umask in force during `bind`) and owner there,
/// and renamed into place. A rename replaces the directory entry and follows nothing.
/// Returns the socket and the device and inode of its file.
fn bind_unix(path: &Path, opts: &UnixSocketOptions) -> io::Result<(Socket, (u64, u64))> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    let plain = opts.mode.is_none() && opts.uid.is_none() && opts.gid.is_none();
    if plain {
        // The common case first, in one system call: nothing at the path. Anything there (a
        // stale socket, a live one, a file, a symlink) makes the bind fail, and is looked at.
        match socket.bind(&SockAddr::unix(path)?) {
            Ok(()) => return Ok((socket, file_id(path)?)),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
            Err(e) => return Err(e),
        }
    }
    let stale = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if someone_listens(path) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process accepts connections on this socket (a second \
                     superserver?); stop it or choose another path",
                ));
            }
            true
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to remove it",
            ));
        }
        Err(_) => false,
    };
    if plain {
        // Nothing to apply after the bind: bind in place, replacing a stale socket (a file
        // that appeared since the check makes the bind fail: nothing is removed unseen).
        if stale {
            let _ = std::fs::remove_file(path);
        }
        socket.bind(&SockAddr::unix(path)?)?;
        return Ok((socket, file_id(path)?));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let parent_fd = open_dir(parent)?;
    let private = PrivateDir::create(&parent_fd, parent)?;
    // Bind through the private directory's descriptor, so that a rename of the directory by
    // someone else cannot redirect the bind: the magic link names exactly our directory.
    let inside = PathBuf::from(format!("/proc/self/fd/{}/s", private.fd.as_raw_fd()));
    let mask = opts.mode.map(|m| !m & 0o777);
    // SAFETY: umask(2) only changes the process's file creation mask, and it is restored
    // right after the bind. The only other threads (a reload's reader and the one that frees
    // the old table, see reload.rs) create no files.
    let old_mask = mask.map(|m| unsafe { libc::umask(m as libc::mode_t) });
    let bound = socket.bind(&SockAddr::unix(&inside)?);
    if let Some(old) = old_mask {
        // SAFETY: as above.
        unsafe { libc::umask(old) };
    }
    bound?;
    let c_s = c"s";
    if opts.uid.is_some() || opts.gid.is_some() {
        // SAFETY: fchownat(2) on a name inside our private directory, never following.
        let r = unsafe {
            libc::fchownat(
                private.fd.as_raw_fd(),
                c_s.as_ptr(),
                opts.uid.unwrap_or(u32::MAX),
                opts.gid.unwrap_or(u32::MAX),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let id = {
        // SAFETY: fstatat(2) into a zeroed stat, not following a symlink.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::fstatat(
                private.fd.as_raw_fd(),
                c_s.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        (st.st_dev, st.st_ino)
    };
    let c_name = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    // SAFETY: renameat(2) between two directory descriptors we hold.
    let r = unsafe {
        libc::renameat(
            private.fd.as_raw_fd(),
            c_s.as_ptr(),
            parent_fd.as_raw_fd(),
            c_name.as_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((socket, id))
}

/// A directory of our own (mode 0700) inside another, removed when dropped.
struct PrivateDir {
    fd: OwnedFd,
    parent: RawFd,
    name: CString,
}

impl PrivateDir {
    fn create(parent: &OwnedFd, parent_path: &Path) -> io::Result<PrivateDir> {
        for attempt in 0..16u32 {
            let name = CString::new(format!(
                ".superserver-{}-{}",
                std::process::id(),
                nonce(attempt)
            ))
            .expect("no NUL");
            // SAFETY: mkdirat(2) with a directory fd we hold and a C string.
            if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) } != 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::AlreadyExists {
                    continue;
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create a private directory in {}: {e}",
                        parent_path.display()
                    ),
                ));
            }
            // SAFETY: openat(2); O_NOFOLLOW refuses a symlink swapped in after mkdirat.
            let fd = unsafe {
                libc::openat(
                    parent.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a descriptor we just opened and nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let dir = PrivateDir {
                fd,
                parent: parent.as_raw_fd(),
                name,
            };
            // Someone may have replaced our directory between mkdirat and openat: it must be
            // ours and private.
            let m = std::fs::File::from(dir.fd.try_clone()?).metadata()?;
            if m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o7777 != 0o700 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the private directory made in {} was replaced; refusing to bind",
                        parent_path.display()
                    ),
                ));
            }
            return Ok(dir);
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "cannot find a free name for a private directory",
        ))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // SAFETY: unlinkat(2) of what may be left inside our directory, then of the
        // directory itself by name (it is empty, or the removal fails harmlessly).
        unsafe {
            libc::unlinkat(self.fd.as_raw_fd(), c"s".as_ptr(), 0);
            libc::unlinkat(self.parent, self.name.as_ptr(), libc::AT_REMOVEDIR);
        }
    }
}

/// A name that another process cannot guess in advance.
fn nonce(attempt: u32) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(attempt) << 48) ^ (std::ptr::addr_of!(attempt) as u64)
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    // SAFETY: open(2) with a C string; the descriptor is owned by the returned value.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_RDONLY,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
    }
    // SAFETY: a descriptor we just opened and nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Does a process accept connections on the Unix socket at `path`? A non-blocking connect
/// answers at once: refused means nobody does (a stale file); accepted, or a full backlog,
/// means somebody does.
fn someone_listens(path: &Path) -> bool {
    let Ok(probe) = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None) else {
        return false;
    };
    let Ok(addr) = SockAddr::unix(path) else {
        return false;
    };
    match probe.connect(&addr) {
        Ok(()) => true,
        Err(e) => matches!(
            e.raw_os_error(),
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS)
        ),
    }
}

/// Apply a service's current `backlog` and Unix socket mode/owner to a socket it keeps
/// across a reload. The file is reached by a descriptor opened without following a symlink
/// and checked to be the socket we bound (device and inode).
pub fn reapply(bound: &Bound, backlog: u32, unix: &UnixSocketOptions) -> Result<(), BindError> {
    let fail = |source: io::Error| BindError {
        addr: bound.addr.clone(),
        source,
    };
    if bound.addr.is_stream() {
        // listen(2) on a listening socket only changes its backlog.
        bound
            .socket
            .listen(backlog.min(i32::MAX as u32) as i32)
            .map_err(fail)?;
    }
    let Some((path, id)) = bound.owned() else {
        return Ok(());
    };
    if unix.mode.is_none() && unix.uid.is_none() && unix.gid.is_none() {
        return Ok(());
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| fail(io::Error::new(io::ErrorKind::InvalidInput, "NUL byte")))?;
    // SAFETY: open(2) with O_PATH|O_NOFOLLOW: a symlink is opened as itself, never followed.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just opened and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fstat(2) into a zeroed stat on an open descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK || (st.st_dev, st.st_ino) != id {
        return Err(fail(io::Error::other(
            "the file is no longer the socket we bound; not changing it",
        )));
    }
    if let Some(mode) = unix.mode {
        // chmod through the descriptor's magic link reaches exactly that inode.
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        std::fs::set_permissions(&link, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    }
    if unix.uid.is_some() || unix.gid.is_some() {
        // SAFETY: fchownat(2) with AT_EMPTY_PATH acts on the O_PATH descriptor itself.
        let r = unsafe {
            libc::fchownat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                unix.uid.unwrap_or(u32::MAX),
                unix.gid.unwrap_or(u32::MAX),
                libc::AT_EMPTY_PATH,
            )
        };
        if r != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The address an inherited socket is bound to, read with `getsockname` and `SO_TYPE`.
fn address_of(socket: &Socket) -> io::Result<Option<ListenAddr>> {
    let local = socket.local_addr()?;
    let ty = socket.r#type()?;
    if let Some(sa) = local.as_socket() {
        return Ok(match ty {
            Type::STREAM => Some(ListenAddr::Tcp(sa)),
            Type::DGRAM => Some(ListenAddr::Udp(sa)),
            _ => None,
        });
    }
    if let Some(path) = local.as_pathname()
        && ty == Type::STREAM
    {
        return Ok(Some(ListenAddr::Unix(path.into())));
    }
    Ok(None)
}

/// Sockets available for (re)use, keyed by address: the previous configuration's sockets during
/// a reload, or the sockets inherited at start-up.
#[derive(Default)]
pub struct Pool {
    sockets: HashMap<ListenAddr, Bound>,
    /// Inherited sockets whose address did not match by itself, with their `LISTEN_FDNAMES`
    /// name, kept for matching by name.
    by_name: Vec<(String, Bound)>,
    /// Sockets no service wants any more, kept open until the addresses replacing them are
    /// bound (see [`Pool::bind`]) and what they queued was accepted.
    retiring: Vec<Bound>,
}

impl Pool {
    /// True when it holds no socket for reuse by address.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Put a socket back for possible reuse.
    pub fn put(&mut self, bound: Bound) {
        self.sockets.insert(bound.addr.clone(), bound);
    }

    /// Take the socket for `listen`, if the pool holds one for its address (or, for inherited
    /// sockets, one whose distinct fd name is `listen.name` and whose type matches).
    pub fn take(&mut self, listen: &Listen) -> Option<Bound> {
        if let Some(b) = self.sockets.remove(&listen.addr) {
            return Some(b);
        }
        let same_kind =
            |a: &ListenAddr| std::mem::discriminant(a) == std::mem::discriminant(&listen.addr);
        let pos = self
            .by_name
            .iter()
            .position(|(name, b)| *name == listen.name && same_kind(&b.addr))?;
        let (_, mut b) = self.by_name.remove(pos);
        log::warn!(
            "inherited fd named {:?} is bound to {} but the config says {}; using it by name",
            listen.name,
            b.addr,
            listen.addr
        );
        b.addr = listen.addr.clone();
        Some(b)
    }

    /// Take out the sockets whose address `keep` says no, to close them.
    pub fn retire_unwanted(&mut self, keep: impl Fn(&ListenAddr) -> bool) {
        let gone: Vec<ListenAddr> = self.sockets.keys().filter(|a| !keep(a)).cloned().collect();
        let gone = gone.iter().filter_map(|a| self.sockets.remove(a));
        self.retiring.extend(gone);
    }

    /// The retiring sockets, to accept what they queued and close them.
    pub fn take_retiring(&mut self) -> Vec<Bound> {
        std::mem::take(&mut self.retiring)
    }

    /// Bind `addr` beside the retiring sockets. An address that a retiring socket still
    /// covers (a reload narrowing `0.0.0.0:P` to `127.0.0.1:P`) cannot be bound while that
    /// socket listens, and closing it first would refuse the clients that arrive in between
    /// and reset those it queued. So the two share the port for a moment: `SO_REUSEPORT` on
    /// both (only a socket of the same user can join), the new, more specific socket takes
    /// every new connection, and the flag is cleared on the new socket once it listens.
    pub fn bind(
        &mut self,
        addr: &ListenAddr,
        backlog: u32,
        unix: &UnixSocketOptions,
    ) -> Result<Bound, BindError> {
        let first = bind(addr, backlog, unix);
        let Err(e) = &first else { return first };
        let (ListenAddr::Tcp(sa) | ListenAddr::Udp(sa)) = addr else {
            return first;
        };
        if e.source.raw_os_error() != Some(libc::EADDRINUSE) {
            return first;
        }
        let covering: Vec<&Bound> = self
            .retiring
            .iter()
            .filter(|b| match (&b.addr, addr) {
                (ListenAddr::Tcp(o), ListenAddr::Tcp(_))
                | (ListenAddr::Udp(o), ListenAddr::Udp(_)) => {
                    o.port() == sa.port()
                        && o.is_ipv4() == sa.is_ipv4()
                        && (o.ip() == sa.ip()
                            || o.ip().is_unspecified()
                            || sa.ip().is_unspecified())
                }
                _ => false,
            })
            .collect();
        if covering.is_empty() {
            return first;
        }
        for b in &covering {
            let _ = b.socket.set_reuse_port(true);
        }
        bind_with(addr, backlog, true)
    }

    /// What is left over (sockets nobody took), emptying the pool.
    pub fn drain(&mut self) -> Vec<Bound> {
        let mut v: Vec<Bound> = self.sockets.drain().map(|(_, b)| b).collect();
        v.extend(self.by_name.drain(..).map(|(_, b)| b));
        v.append(&mut self.retiring);
        v
    }

    /// Adopt the sockets this process inherited (`LISTEN_FDS`), keyed by the address each is
    /// bound to. Names from `LISTEN_FDNAMES` are used only where they are distinct: systemd
    /// gives every socket of one `.socket` unit the same name, so names alone cannot tell them
    /// apart; an inherited fd is matched by name only when its address matches nothing in
    /// `wanted` and no other inherited fd has that name.
    pub fn adopt(
        &mut self,
        inherited: Vec<(String, RawFd, OwnedFd)>,
        wanted: &[Listen],
    ) -> Result<(), String> {
        let mut unmatched = Vec::new();
        for (name, number, fd) in inherited {
            let socket = Socket::from(fd);
            let bound_to = address_of(&socket);
            // One of ours, back from systemd's store: its name says its address (a Unix
            // socket bound through a private directory reports another path).
            let addr = match (from_store_name(&name), &bound_to) {
                (Some(said), Ok(Some(real)))
                    if std::mem::discriminant(&said) == std::mem::discriminant(real) =>
                {
                    Ok(Some(said))
                }
                _ => bound_to,
            };
            let addr = addr
                .map_err(|e| format!("inherited fd {number} ({name:?}): {e}"))?
                .ok_or_else(|| {
                    format!(
                        "inherited fd {number} ({name:?}) is not a TCP, UDP or Unix stream socket"
                    )
                })?;
            if matches!(addr, ListenAddr::Tcp(_) | ListenAddr::Unix(_))
                && !socket.is_listener().unwrap_or(false)
            {
                return Err(format!(
                    "inherited fd {number} ({name:?}) on {addr} is a stream socket that is not listening"
                ));
            }
            log::info!("adopted inherited fd {number} ({name:?}) bound to {addr}");
            let bound = Bound {
                addr: addr.clone(),
                socket,
                owned: None,
                nonblocking: None,
            };
            if wanted.iter().any(|l| l.addr == addr) {
                self.sockets.insert(addr, bound);
            } else {
                unmatched.push((name, number, bound));
            }
        }
        for (name, number, bound) in unmatched {
            let distinct = self.by_name.iter().all(|(n, _)| *n != name)
                && wanted.iter().filter(|l| l.name == name).count() == 1;
            if !distinct {
                return Err(format!(
                    "inherited fd {number} ({name:?}) does not match a configured address: {}",
                    describe_unmatched(&bound.addr, wanted)
                ));
            }
            self.by_name.push((name, bound));
        }
        Ok(())
    }
}

/// Why an inherited socket fits nothing: the wrong type for a configured address, or an
/// address no service listens on.
pub fn describe_unmatched(addr: &ListenAddr, wanted: &[Listen]) -> String {
    let same_place = wanted.iter().find(|l| match (&l.addr, addr) {
        (ListenAddr::Tcp(a), ListenAddr::Udp(b)) | (ListenAddr::Udp(a), ListenAddr::Tcp(b)) => {
            a == b
        }
        _ => false,
    });
    match same_place {
        Some(l) => format!("{addr} has the wrong type (the config says {})", l.addr),
        None => format!("{addr}, which no service listens on"),
    }
}
