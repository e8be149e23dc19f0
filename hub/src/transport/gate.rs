//! Admission at accept, before a byte is read: at most `HUB_MAX_CONNECTIONS_PER_IP` open
//! connections per client address, and at most `HUB_MAX_PENDING_HANDSHAKES` connections that
//! have not finished their request head or handshake. Both are counted from accept, so
//! connections that never authenticate (idle sockets, slow heads) are bounded too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// The counters; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    /// Open connections per address. Locked for one map update per accept and per close,
    /// never across `.await`.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
    pending: AtomicUsize,
    max_pending: usize,
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The address already holds the maximum number of connections.
    PerIp,
    /// Too many connections are still in their handshake.
    Pending,
}

/// One open connection of an address; released on drop (when the connection ends).
pub struct IpSlot {
    gate: Arc<Inner>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.gate.per_ip.lock();
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// One connection still in its handshake; released on drop.
pub struct Pending {
    gate: Arc<Inner>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.gate.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    /// A gate with these caps.
    pub fn new(max_per_ip: usize, max_pending: usize) -> Self {
        Gate {
            inner: Arc::new(Inner {
                per_ip: Mutex::new(HashMap::new()),
                max_per_ip,
                pending: AtomicUsize::new(0),
                max_pending,
            }),
        }
    }

    /// Takes a slot for a new connection from `ip`, or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<(IpSlot, Pending), Refused> {
        if self.inner.pending.fetch_add(1, Ordering::AcqRel) >= self.inner.max_pending {
            self.inner.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Pending);
        }
        let pending = Pending {
            gate: self.inner.clone(),
        };
        let mut map = self.inner.per_ip.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= self.inner.max_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        drop(map);
        Ok((
            IpSlot {
                gate: self.inner.clone(),
                ip,
            },
            pending,
        ))
    }

    /// Open connections from `ip`.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.inner.per_ip.lock().get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_pending_are_released_on_drop() {
        let gate = Gate::new(2, 3);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let (a1, p1) = gate.admit(a).unwrap();
        let (_a2, p2) = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refused::PerIp));
        let (_b1, p3) = gate.admit(b).unwrap();
        // Three handshakes in progress: a fourth is refused whatever its address.
        assert_eq!(gate.admit(b).err(), Some(Refused::Pending));
        drop((p1, p2, p3));
        assert_eq!(gate.admit(a).err(), Some(Refused::PerIp));
        drop(a1);
        assert!(gate.admit(a).is_ok());
        assert_eq!(
            gate.open_from(a),
            1,
            "the refused and dropped ones are not counted"
        );
    }
}
