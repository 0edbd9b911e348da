//! The program a service runs and who runs it: resolved and opened by the superserver,
//! checked against the service's user (execute bit; for `#!` scripts every directory on the
//! path and the interpreter too) at load time, and re-opened at each spawn so that the child
//! executes, through a descriptor, the very file that was checked.
//!
//! Why a descriptor: a root superserver runs services as `nobody`, and `nobody` may not be
//! able to reach a program that lives in a private directory (a checkout in `/root`, mode
//! 0700). Opening the file as the superserver and executing it with `execveat(fd, "",
//! AT_EMPTY_PATH)` after the credentials were dropped needs only the file's execute bit for
//! the service's user, not a search permission on every directory above it. It also pins the
//! checked file: a program renamed over between the check and the exec is not the one run.
//! `#!` scripts are the exception: the kernel hands the interpreter `/dev/fd/N`, which is
//! gone after exec for a close-on-exec descriptor (and `$0` would be `/dev/fd/N` for a script
//! that reads it), so scripts are executed by path, and their path and interpreter are
//! checked as the service's user instead.

use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Who a child runs as, for permission checks and messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups (sorted, without duplicates).
    pub groups: Vec<libc::gid_t>,
}

impl Identity {
    /// The superserver's own effective identity (computed once).
    pub fn current() -> &'static Identity {
        static SELF: OnceLock<Identity> = OnceLock::new();
        SELF.get_or_init(|| {
            let uid = nix::unistd::geteuid();
            let name = nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| format!("uid {uid}"));
            let mut groups: Vec<libc::gid_t> = nix::unistd::getgroups()
                .unwrap_or_default()
                .into_iter()
                .map(|g| g.as_raw())
                .collect();
            groups.sort_unstable();
            groups.dedup();
            Identity {
                name,
                uid: uid.as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                groups,
            }
        })
    }

    /// May this identity do `want` (a mask of `R_OK`/`W_OK`/`X_OK` bits, as in access(2))
    /// on a file with this `stat`? The kernel's rule without ACLs: root may read and write
    /// anything and execute anything with an execute bit (search any directory); otherwise
    /// the owner, group or other bits, the first class that applies.
    pub fn may(&self, st: &libc::stat, want: u32) -> bool {
        let mode = st.st_mode;
        if self.uid == 0 {
            let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
            return want & (libc::X_OK as u32) == 0 || is_dir || mode & 0o111 != 0;
        }
        let bits = if st.st_uid == self.uid {
            (mode >> 6) & 7
        } else if st.st_gid == self.gid || self.groups.binary_search(&st.st_gid).is_ok() {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        bits & want == want
    }
}

/// What the child executes.
pub enum Exec {
    /// `execveat(fd, "", AT_EMPTY_PATH)`: the file the superserver opened and checked.
    Fd(OwnedFd),
    /// `execve(path)`: a `#!` script (its path and interpreter were checked).
    Path,
}

/// The identity of a file as far as a re-check is concerned: a different value means the
/// file was replaced or changed its mode or owner since it was last checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    ctime: (i64, i64),
}

impl FileId {
    fn of(st: &libc::stat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// A service's program as one user runs it. Services that run the same program as the same
/// user share one (`Arc`): a re-check after the file changed serves them all.
pub struct Program {
    path: CString,
    who: Identity,
    /// The file as last checked, and whether it is a script.
    checked: Mutex<Option<(FileId, bool)>>,
}

impl Program {
    /// Open and check `path` for `who` now. The error says which file or directory stops
    /// `who`, and why, in words.
    pub fn new(path: &Path, who: Identity) -> Result<Program, String> {
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{}: the path has a NUL byte", path.display()))?;
        let program = Program {
            path,
            who,
            checked: Mutex::new(None),
        };
        program.open()?;
        Ok(program)
    }

    pub fn path(&self) -> &CStr {
        &self.path
    }

    pub fn who(&self) -> &Identity {
        &self.who
    }

    /// Open the program for one spawn. Cheap when the file did not change since the last
    /// check (one `open(O_PATH)` and one `fstat`); otherwise the file is checked again.
    pub fn open(&self) -> Result<Exec, String> {
        let display = Path::new(std::ffi::OsStr::from_bytes(self.path.as_bytes())).display();
        let fd = open(&self.path, libc::O_PATH).map_err(|e| format!("{display}: {e}"))?;
        let st = fstat(&fd).map_err(|e| format!("{display}: {e}"))?;
        let id = FileId::of(&st);
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        let script = match *checked {
            Some((last, script)) if last == id => script,
            _ => {
                let script = self.check(&st)?;
                *checked = Some((id, script));
                script
            }
        };
        Ok(if script { Exec::Path } else { Exec::Fd(fd) })
    }

    /// Check the file whose `stat` is `st` (and, for a script, its path and interpreter).
    /// Returns whether it is a script.
    fn check(&self, st: &libc::stat) -> Result<bool, String> {
        let path = Path::new(std::ffi::OsStr::from_bytes(self.path.as_bytes()));
        let who = &self.who.name;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(format!("{}: not a regular file", path.display()));
        }
        if !self.who.may(st, libc::X_OK as u32) {
            return Err(format!(
                "{who} may not execute {} ({}); make it executable for {who} (chmod o+x, or \
                 its group), or run the service as another user",
                path.display(),
                describe(st)
            ));
        }
        let Some(interpreter) = shebang(path) else {
            return Ok(false);
        };
        // A script runs by path: the service's user must reach it and its interpreter.
        self.reachable(path)?;
        let interp = Path::new(std::ffi::OsStr::from_bytes(&interpreter));
        if !interp.is_absolute() {
            return Err(format!(
                "{}: the #! interpreter {:?} is not an absolute path",
                path.display(),
                interp.display().to_string()
            ));
        }
        self.reachable(interp)?;
        let ist = stat(interp).map_err(|e| {
            format!(
                "{}: its #! interpreter {}: {e}",
                path.display(),
                interp.display()
            )
        })?;
        if !self.who.may(&ist, libc::X_OK as u32) {
            return Err(format!(
                "{who} may not execute {}, the #! interpreter of {} ({})",
                interp.display(),
                path.display(),
                describe(&ist)
            ));
        }
        Ok(true)
    }

    /// Every directory above `path` must be searchable by the service's user.
    fn reachable(&self, path: &Path) -> Result<(), String> {
        let who = &self.who.name;
        let mut dir = PathBuf::new();
        let parent = path.parent().unwrap_or(Path::new("/"));
        for part in parent.components() {
            dir.push(part);
            let st = stat(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if !self.who.may(&st, libc::X_OK as u32) {
                return Err(format!(
                    "{who} may not search {} ({}), which leads to {}; a script runs by its \
                     path, so move it where {who} can reach it, or run the service as \
                     another user",
                    dir.display(),
                    describe(&st),
                    path.display()
                ));
            }
        }
        Ok(())
    }
}

/// "mode 0700, owner root:root"
fn describe(st: &libc::stat) -> String {
    let mut s = format!("mode {:04o}, owner ", st.st_mode & 0o7777);
    match nix::unistd::User::from_uid(st.st_uid.into()) {
        Ok(Some(u)) => s.push_str(&u.name),
        _ => {
            let _ = write!(s, "{}", st.st_uid);
        }
    }
    s.push(':');
    match nix::unistd::Group::from_gid(st.st_gid.into()) {
        Ok(Some(g)) => s.push_str(&g.name),
        _ => {
            let _ = write!(s, "{}", st.st_gid);
        }
    }
    s
}

/// The interpreter of a `#!` script, or `None` for anything else (or a file we cannot
/// read, which then is not a script we could run by fd either way).
fn shebang(path: &Path) -> Option<Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).ok()?;
    let fd = open(&cpath, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: read(2) into a local buffer of the given length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 2 || &buf[..2] != b"#!" {
        return None;
    }
    let line = &buf[2..n as usize];
    let line = line.split(|&b| b == b'\n').next().unwrap_or(line);
    let interp: Vec<u8> = line
        .iter()
        .copied()
        .skip_while(|b| *b == b' ' || *b == b'\t')
        .take_while(|b| *b != b' ' && *b != b'\t' && *b != b'\r')
        .collect();
    Some(interp)
}

fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: open(2) with a valid C string; the fd is owned by the returned value.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: fstat(2) into a zeroed stat on an open fd.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

fn stat(path: &Path) -> io::Result<libc::stat> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    // SAFETY: stat(2) with a valid C string into a zeroed stat.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(mode: u32, uid: u32, gid: u32) -> libc::stat {
        // SAFETY: a zeroed stat is a valid value of a plain C struct.
        let mut s: libc::stat = unsafe { std::mem::zeroed() };
        s.st_mode = mode;
        s.st_uid = uid;
        s.st_gid = gid;
        s
    }

    fn who(uid: u32, gid: u32, groups: &[u32]) -> Identity {
        Identity {
            name: "u".into(),
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn permission_classes_follow_the_kernel_rule() {
        let x = libc::X_OK as u32;
        let file = |m| st(libc::S_IFREG | m, 0, 0);
        let dir = |m| st(libc::S_IFDIR | m, 0, 0);
        // root: any execute bit on a file, any directory.
        assert!(who(0, 0, &[]).may(&file(0o100), x));
        assert!(!who(0, 0, &[]).may(&file(0o644), x));
        assert!(who(0, 0, &[]).may(&dir(0o700), x));
        // nobody (65534) cannot search root's private home, can run a 0755 file.
        let nobody = who(65534, 65534, &[]);
        assert!(!nobody.may(&dir(0o700), x));
        assert!(nobody.may(&file(0o755), x));
        // The owner class decides for the owner, even when "other" would allow.
        let owner = who(1000, 1000, &[]);
        assert!(!owner.may(&st(libc::S_IFREG | 0o077, 1000, 0), x));
        // Supplementary groups count.
        assert!(who(1000, 1000, &[0, 50]).may(&st(libc::S_IFREG | 0o710, 0, 50), x));
        assert!(!who(1000, 1000, &[0]).may(&st(libc::S_IFREG | 0o710, 0, 50), x));
    }

    #[test]
    fn a_script_in_a_private_directory_is_refused_with_the_directory_named() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        let script = private.join("s.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let me = Identity::current().clone();
        // As the owner it is fine, and it is a script.
        let p = Program::new(&script, me.clone()).unwrap();
        assert!(matches!(p.open().unwrap(), Exec::Path));
        // As someone else (not root) the private directory stops it.
        let stranger = Identity {
            name: "stranger".into(),
            uid: 54321,
            gid: 54321,
            groups: vec![],
        };
        let err = Program::new(&script, stranger.clone()).err().unwrap();
        assert!(err.contains("stranger may not search"), "{err}");
        assert!(err.contains(&private.display().to_string()), "{err}");
        // A binary in the same place is run through its descriptor: no search needed.
        let bin = private.join("true");
        std::fs::copy("/bin/true", &bin).unwrap();
        let p = Program::new(&bin, stranger).unwrap();
        assert!(matches!(p.open().unwrap(), Exec::Fd(_)));
    }

    #[test]
    fn a_replaced_program_is_checked_again() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("prog");
        std::fs::copy("/bin/true", &bin).unwrap();
        let p = Program::new(&bin, Identity::current().clone()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = p.open().err().unwrap();
        assert!(err.contains("may not execute"), "{err}");
    }
}
