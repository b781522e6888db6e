//! The public port, owned by the master in supervise mode and lent to every balancer.
//!
//! The master binds `[balancer] listen` once, before any child starts (a port in use stops it
//! at once, naming the key and the address), and passes the listening socket to each balancer
//! it spawns as descriptor 3, by systemd's socket-activation convention (`LISTEN_FDS=1`,
//! `LISTEN_FDNAMES=public`, `LISTEN_PID`; the balancer side is [`sc_common::listen_fds`]).
//! Several balancers accept on the same socket; a balancer that dies or is restarted does not
//! close it (the master holds it), so connection attempts meanwhile wait in the listen queue
//! instead of being refused. The master never accepts on it.
//!
//! `LISTEN_PID` must be the balancer's pid, known only after the fork: systemd sets it between
//! fork and exec, which `std::process::Command` cannot do (its environment is fixed before the
//! fork). So a balancer is started through `/bin/sh -c 'LISTEN_PID=$$ exec ...'`: the shell's
//! `exec` keeps its pid. The descriptor itself is mapped to 3 in the child only (its
//! FD_CLOEXEC cleared there) by the `command-fds` crate, so no other child inherits it.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};

use command_fds::{CommandFdExt, FdMapping};
use sc_common::listen_fds::{FIRST_FD, PUBLIC};
use sc_common::{Error, net};
use tokio::process::Command;

/// The public listener's queue, as the balancer's own: a burst of reconnecting clients (or a
/// balancer restarting) waits there.
const BACKLOG: u32 = 4096;

/// The shell line that starts a balancer with `LISTEN_PID` set to its own pid: `$0` is the
/// program, `$@` its arguments.
const WITH_LISTEN_PID: &str = "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"";

/// The variables of the convention, which no other child may inherit from the master's own
/// environment (a master started by systemd socket activation, say).
pub(crate) const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// The public listener, held while the cluster runs.
#[derive(Debug)]
pub(crate) struct PublicListener {
    /// `None` once [`PublicListener::close`] gave it up. std Mutex: a clone under the lock,
    /// never held across await.
    listener: Mutex<Option<TcpListener>>,
    addr: SocketAddr,
}

impl PublicListener {
    /// Binds `[balancer] listen`; the error names the key and the address.
    pub(crate) async fn bind(addr: SocketAddr) -> Result<Self, Error> {
        let listener = net::bind_public(addr, BACKLOG, "[balancer] listen")?.into_std()?;
        let addr = listener.local_addr()?;
        Ok(Self { listener: Mutex::new(Some(listener)), addr })
    }

    /// The bound address, with the port the kernel picked for port 0.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The master lets go of the socket (the cluster is stopping): it closes once the
    /// balancers, which stop accepting first, are gone, and new clients are refused instead of
    /// waiting in a queue nobody reads.
    pub(crate) fn close(&self) {
        self.listener.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    /// A command for `program args` that receives the listener as descriptor 3 with the
    /// variables of the convention; `None` once closed.
    pub(crate) fn command(
        &self,
        program: &std::path::Path,
        args: &[OsString],
    ) -> Result<Option<Command>, std::io::Error> {
        let copy: OwnedFd = match &*self.listener.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(listener) => listener.try_clone()?.into(),
            None => return Ok(None),
        };
        let mut command = Command::new("/bin/sh");
        command.arg("-c").arg(WITH_LISTEN_PID).arg(program).args(args);
        command.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", PUBLIC);
        let child_fd = i32::try_from(FIRST_FD).unwrap_or(3);
        command
            .fd_mappings(vec![FdMapping { parent_fd: copy, child_fd }])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Some(command))
    }
}
