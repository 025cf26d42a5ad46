//! A vCPU's life cycle as an explicit state machine: every change the run loop makes goes
//! through [`VcpuState::on`], which refuses the ones that make no sense (a bug, reported).
//!
//! ```text
//!  Created --start--> Runnable --schedule--> Running --preempt--> Runnable
//!                        ^                      |  \--halt--> Blocked --wake--> Runnable
//!                        |                      \--pause--> Paused --resume--> Runnable
//!  (any but Stopped) --stop--> Stopped
//! ```

/// Where a vCPU is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Made with its domain; not started (vCPUs 1.. wait for VCPU_START).
    Created,
    /// Waiting for its CPU.
    Runnable,
    /// In the guest, or handling one of its exits, on its CPU.
    Running,
    /// Halted (HLT) until an interrupt or its timer.
    Blocked,
    /// Held by the operator.
    Paused,
    /// Torn down: never runs again.
    Stopped,
}

/// What happens to a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Start,
    Schedule,
    /// Its slice ended (preemption timer, yield, a kick).
    Preempt,
    Halt,
    Wake,
    Pause,
    Resume,
    Stop,
}

/// A change the life cycle does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadTransition {
    pub from: VcpuState,
    pub event: Event,
}

impl core::fmt::Display for BadTransition {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "vCPU state {:?} cannot take {:?}", self.from, self.event)
    }
}

impl VcpuState {
    /// The state after `event`.
    pub fn on(self, event: Event) -> Result<VcpuState, BadTransition> {
        use Event as E;
        use VcpuState as S;
        Ok(match (self, event) {
            (S::Stopped, _) => return Err(BadTransition { from: self, event }),
            (_, E::Stop) => S::Stopped,
            (S::Created, E::Start) => S::Runnable,
            (S::Runnable, E::Schedule) => S::Running,
            (S::Running, E::Preempt) => S::Runnable,
            (S::Running, E::Halt) => S::Blocked,
            (S::Blocked, E::Wake) => S::Runnable,
            (S::Runnable | S::Running | S::Blocked, E::Pause) => S::Paused,
            (S::Paused, E::Resume) => S::Runnable,
            _ => return Err(BadTransition { from: self, event }),
        })
    }

    /// Whether the run loop may pick it.
    pub fn runnable(self) -> bool {
        self == VcpuState::Runnable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use VcpuState as S;

    #[test]
    fn the_life_of_a_vcpu() {
        let mut s = S::Created;
        for (e, want) in [
            (E::Start, S::Runnable),
            (E::Schedule, S::Running),
            (E::Halt, S::Blocked),
            (E::Wake, S::Runnable),
            (E::Schedule, S::Running),
            (E::Preempt, S::Runnable),
            (E::Pause, S::Paused),
            (E::Resume, S::Runnable),
            (E::Schedule, S::Running),
            (E::Stop, S::Stopped),
        ] {
            s = s.on(e).unwrap();
            assert_eq!(s, want, "after {e:?}");
        }
    }

    #[test]
    fn nonsense_is_refused() {
        assert!(S::Created.on(E::Schedule).is_err(), "not started");
        assert!(
            S::Blocked.on(E::Schedule).is_err(),
            "halted vCPUs are not picked"
        );
        assert!(
            S::Runnable.on(E::Halt).is_err(),
            "only a running vCPU halts"
        );
        assert!(
            S::Paused.on(E::Wake).is_err(),
            "an interrupt does not unpause"
        );
        assert!(S::Created.on(E::Pause).is_err());
        for e in [E::Start, E::Schedule, E::Wake, E::Resume, E::Stop] {
            assert!(S::Stopped.on(e).is_err(), "{e:?} after stop");
        }
        // Stop from every live state.
        for s in [S::Created, S::Runnable, S::Running, S::Blocked, S::Paused] {
            assert_eq!(s.on(E::Stop), Ok(S::Stopped));
        }
        assert!(S::Runnable.runnable() && !S::Blocked.runnable());
    }
}
