//! A gate the recording fakes' calls wait at: a test holds a sync or a read in the middle while it makes
//! something else happen.

use std::sync::{Arc, Mutex};

use super::Abandon;
use super::stoppable_read::READ_POLL;

/// A gate a fake's calls wait at while it is closed; open at first. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    pub fn close(&self) {
        *self.0.0.lock().unwrap() = true;
    }

    pub fn open(&self) {
        *self.0.0.lock().unwrap() = false;
        self.0.1.notify_all();
    }

    pub(crate) fn pass(&self) {
        let (closed, opened) = &*self.0;
        let mut closed = closed.lock().unwrap();
        while *closed {
            closed = opened.wait(closed).unwrap();
        }
    }

    /// Waits while closed, as [`Gate::pass`], but gives up once `abandon` says so: false then.
    pub(crate) fn pass_unless(&self, abandon: Abandon<'_>) -> bool {
        let (closed, opened) = &*self.0;
        let mut closed = closed.lock().unwrap();
        while *closed {
            if abandon() {
                return false;
            }
            closed = opened.wait_timeout(closed, READ_POLL).unwrap().0;
        }
        true
    }
}
