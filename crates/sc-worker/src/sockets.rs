//! The worker's open sockets by id, for server code: look one up, count them, or go over all of
//! them (the stock server's `clients` and `clientsCount`).
//!
//! A socket is listed from its accepted handshake until it closes (after its `disconnected`
//! hook is scheduled, it is gone from here). Only this worker's sockets: the cluster-wide view
//! of who is where is presence, through the brokers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::handle::Socket;

/// The open sockets of this worker; cheap to clone.
#[derive(Clone, Default)]
pub struct Sockets(Arc<Mutex<HashMap<Box<str>, Socket>>>);

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets").field("open", &self.len()).finish()
    }
}

impl Sockets {
    /// The open socket with this id, if it is on this worker.
    pub fn get(&self, id: &str) -> Option<Socket> {
        self.lock().get(id).cloned()
    }

    /// How many sockets are open (handshake done) on this worker.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no socket is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every open socket, as of now (a copy: sockets that open or close meanwhile do not
    /// change it).
    pub fn all(&self) -> Vec<Socket> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn insert(&self, socket: &Socket) {
        self.lock().insert(socket.id().into(), socket.clone());
    }

    pub(crate) fn remove(&self, socket: &Socket) {
        self.lock().remove(socket.id());
    }

    /// std Mutex: held for one map operation, never across await.
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Socket>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
