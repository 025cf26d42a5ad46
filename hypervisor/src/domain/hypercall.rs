//! Hypercall dispatch (numbers and status codes in `hv-abi`). Pure: the exit handler passes
//! the guest's registers and memory, and acts on the returned [`Outcome`]. Every argument is an
//! allegation: lengths are bounded and guest buffers are copied only after a range check.

use alloc::vec;
use alloc::vec::Vec;

use hv_abi::{ABI_VERSION, Status, hypercall as nr};

use super::memory::{GuestMemory, GuestPhysAddr};

/// What the hypervisor must do after a hypercall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Resume the guest with this value in RAX.
    Return(i64),
    /// Print these bytes on the domain's console, then resume with RAX = their count.
    Console(Vec<u8>),
    /// Stop the domain with this exit code.
    Exit(u64),
    /// Resume with RAX = 0 after letting others run.
    Yield,
}

/// Dispatches hypercall `number` with arguments `args` (RDI, RSI, RDX).
pub fn dispatch(number: u64, args: [u64; 3], mem: &impl GuestMemory) -> Outcome {
    match number {
        nr::VERSION => Outcome::Return(i64::from(ABI_VERSION)),
        nr::CONSOLE_WRITE => {
            let (gpa, len) = (args[0], args[1]);
            if len > nr::CONSOLE_WRITE_MAX {
                return Outcome::Return(Status::InvalidArgument as i64);
            }
            let mut buf = vec![0u8; len as usize];
            match mem.read(GuestPhysAddr(gpa), &mut buf) {
                Ok(()) => Outcome::Console(buf),
                Err(_) => Outcome::Return(Status::BadAddress as i64),
            }
        }
        nr::EXIT => Outcome::Exit(args[0]),
        nr::YIELD => Outcome::Yield,
        nr::NOP => Outcome::Return(Status::Ok as i64),
        _ => Outcome::Return(Status::UnknownCall as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::memory::VecMemory;

    #[test]
    fn calls() {
        let mut m = VecMemory(vec![0; 8192]);
        m.0[100..105].copy_from_slice(b"hello");
        assert_eq!(
            dispatch(nr::VERSION, [0; 3], &m),
            Outcome::Return(i64::from(ABI_VERSION))
        );
        assert_eq!(
            dispatch(nr::CONSOLE_WRITE, [100, 5, 0], &m),
            Outcome::Console(b"hello".to_vec())
        );
        assert_eq!(dispatch(nr::EXIT, [3, 0, 0], &m), Outcome::Exit(3));
        assert_eq!(dispatch(nr::NOP, [0; 3], &m), Outcome::Return(0));
        assert_eq!(dispatch(nr::YIELD, [0; 3], &m), Outcome::Yield);
    }

    #[test]
    fn hostile_arguments() {
        let m = VecMemory(vec![0; 8192]);
        assert_eq!(
            dispatch(0xdead, [0; 3], &m),
            Outcome::Return(Status::UnknownCall as i64)
        );
        assert_eq!(
            dispatch(u64::MAX, [u64::MAX; 3], &m),
            Outcome::Return(Status::UnknownCall as i64)
        );
        assert_eq!(
            dispatch(nr::CONSOLE_WRITE, [8190, 5, 0], &m),
            Outcome::Return(Status::BadAddress as i64)
        );
        assert_eq!(
            dispatch(nr::CONSOLE_WRITE, [u64::MAX - 1, 4, 0], &m),
            Outcome::Return(Status::BadAddress as i64)
        );
        assert_eq!(
            dispatch(nr::CONSOLE_WRITE, [0, 1 << 40, 0], &m),
            Outcome::Return(Status::InvalidArgument as i64)
        );
    }
}
