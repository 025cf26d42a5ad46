//! Hypercall dispatch (numbers and status codes in `hv-abi`). Pure: the exit handler passes
//! the guest's registers and memory, and acts on the returned [`Outcome`]. Every argument is an
//! allegation: lengths are bounded and guest buffers are copied only after a range check.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use hv_abi::{ABI_VERSION, Status, hypercall as nr};

use super::memory::{GuestAddr, GuestMemory};

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
    /// Start vCPU `index` at `rip` with `rsp` (already checked against the domain's vCPUs and
    /// that it has not started), then resume with RAX = 0.
    StartVcpu { index: u32, rip: u64, rsp: u64 },
    /// Stop the calling vCPU only.
    VcpuOff,
    /// Arm (or, with a period of 0, stop) the calling vCPU's timer; values already checked.
    SetTimer { vector: u8, period_us: u64 },
    /// One of dom0's calls (the caller is privileged; arguments decoded and checked here,
    /// addresses checked against dom0's RAM by the backend).
    Dom0(Dom0Call),
}

/// dom0's calls (`hv_abi::hypercall::IO_RING_SETUP` and after).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dom0Call {
    RingSetup {
        ring: u64,
        data: u64,
    },
    /// A volume offered to guests: its name (`pool/volume`), size and whether read-only.
    DiskOffer {
        name: String,
        sectors: u64,
        read_only: bool,
    },
    Ready,
    Kick,
    /// IO_WAIT, bounded to `timeout_us` (0: unbounded).
    Wait {
        timeout_us: u64,
    },
    /// An uplink for the network named.
    Uplink {
        network: String,
    },
    /// A frame from the physical NIC: uplink `handle`, `len` bytes at `gpa`.
    NetSend {
        handle: u64,
        gpa: u64,
        len: u64,
    },
    /// The next frame for uplink `handle`, into `cap` bytes at `gpa`.
    NetRecv {
        handle: u64,
        gpa: u64,
        cap: u64,
    },
    DmaMap {
        gpa: u64,
        len: u64,
    },
}

/// Whether `name` is an acceptable volume name: `pool/volume`, each part 1+ characters of
/// `[A-Za-z0-9._-]`.
pub fn valid_volume_name(name: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    match name.split_once('/') {
        Some((pool, vol)) => part(pool) && part(vol),
        None => false,
    }
}

/// Who is calling: the domain's vCPU count and which vCPUs have started.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub vcpus: u32,
    /// Bit i set when vCPU i has been started (vCPU 0 always has).
    pub started: u64,
    /// dom0: may make dom0's calls.
    pub privileged: bool,
}

/// Dispatches hypercall `number` with arguments `args` (RDI, RSI, RDX). Inlined into the exit
/// handler: the trivial calls are the hypercall round trip `bench vmcall` measures.
#[inline]
pub fn dispatch(number: u64, args: [u64; 3], mem: &impl GuestMemory, caller: Caller) -> Outcome {
    match number {
        nr::VERSION => Outcome::Return(i64::from(ABI_VERSION)),
        nr::CONSOLE_WRITE => {
            let (gpa, len) = (args[0], args[1]);
            if len > nr::CONSOLE_WRITE_MAX {
                return Outcome::Return(Status::InvalidArgument as i64);
            }
            let mut buf = vec![0u8; len as usize];
            match mem.read(GuestAddr(gpa), &mut buf) {
                Ok(()) => Outcome::Console(buf),
                Err(_) => Outcome::Return(Status::BadAddress as i64),
            }
        }
        nr::EXIT => Outcome::Exit(args[0]),
        nr::YIELD => Outcome::Yield,
        nr::NOP => Outcome::Return(Status::Ok as i64),
        nr::VCPU_START => {
            let index = args[0];
            if index == 0 || index >= u64::from(caller.vcpus) || index >= 64 {
                return Outcome::Return(Status::InvalidArgument as i64);
            }
            if caller.started & (1 << index) != 0 {
                return Outcome::Return(Status::InvalidArgument as i64);
            }
            Outcome::StartVcpu {
                index: index as u32,
                rip: args[1],
                rsp: args[2],
            }
        }
        nr::VCPU_OFF => Outcome::VcpuOff,
        nr::SET_TIMER => {
            let (vector, period_us) = (args[0], args[1]);
            let period_ok = period_us == 0
                || (super::vtimer::MIN_PERIOD_US..=super::vtimer::MAX_PERIOD_US)
                    .contains(&period_us);
            if !(32..=255).contains(&vector) || !period_ok {
                return Outcome::Return(Status::InvalidArgument as i64);
            }
            Outcome::SetTimer {
                vector: vector as u8,
                period_us,
            }
        }
        nr::IO_RING_SETUP..=nr::NET_RECV if !caller.privileged => {
            Outcome::Return(Status::PermissionDenied as i64)
        }
        nr::IO_RING_SETUP => Outcome::Dom0(Dom0Call::RingSetup {
            ring: args[0],
            data: args[1],
        }),
        nr::DISK_OFFER => disk_offer(args, mem),
        nr::IO_READY => Outcome::Dom0(Dom0Call::Ready),
        nr::IO_KICK => Outcome::Dom0(Dom0Call::Kick),
        nr::IO_WAIT => Outcome::Dom0(Dom0Call::Wait {
            timeout_us: args[0],
        }),
        nr::DMA_MAP if args[1] == 0 || args[0].checked_add(args[1]).is_none() => {
            Outcome::Return(Status::InvalidArgument as i64)
        }
        nr::DMA_MAP => Outcome::Dom0(Dom0Call::DmaMap {
            gpa: args[0],
            len: args[1],
        }),
        nr::NET_UPLINK => uplink(args, mem),
        nr::NET_SEND if !(14..=nr::NET_FRAME_MAX).contains(&args[2]) => {
            Outcome::Return(Status::InvalidArgument as i64)
        }
        nr::NET_SEND => Outcome::Dom0(Dom0Call::NetSend {
            handle: args[0],
            gpa: args[1],
            len: args[2],
        }),
        nr::NET_RECV if args[2] < nr::NET_FRAME_MAX => {
            Outcome::Return(Status::InvalidArgument as i64)
        }
        nr::NET_RECV => Outcome::Dom0(Dom0Call::NetRecv {
            handle: args[0],
            gpa: args[1],
            cap: args[2],
        }),
        _ => Outcome::Return(Status::UnknownCall as i64),
    }
}

#[cold]
fn uplink(args: [u64; 3], mem: &impl GuestMemory) -> Outcome {
    let (gpa, len) = (args[0], args[1]);
    if len == 0 || len > super::config::NETWORK_NAME_MAX as u64 {
        return Outcome::Return(Status::InvalidArgument as i64);
    }
    let mut buf = vec![0u8; len as usize];
    if mem.read(GuestAddr(gpa), &mut buf).is_err() {
        return Outcome::Return(Status::BadAddress as i64);
    }
    match String::from_utf8(buf) {
        Ok(network) if super::config::valid_network_name(&network) => {
            Outcome::Dom0(Dom0Call::Uplink { network })
        }
        _ => Outcome::Return(Status::InvalidArgument as i64),
    }
}

#[cold]
fn disk_offer(args: [u64; 3], mem: &impl GuestMemory) -> Outcome {
    let (gpa, len, size) = (args[0], args[1], args[2]);
    let sectors = size & !hv_abi::ioring::OFFER_RO;
    if len == 0 || len > hv_abi::ioring::NAME_MAX || sectors == 0 {
        return Outcome::Return(Status::InvalidArgument as i64);
    }
    let mut buf = vec![0u8; len as usize];
    if mem.read(GuestAddr(gpa), &mut buf).is_err() {
        return Outcome::Return(Status::BadAddress as i64);
    }
    match String::from_utf8(buf) {
        Ok(name) if valid_volume_name(&name) => Outcome::Dom0(Dom0Call::DiskOffer {
            name,
            sectors,
            read_only: size & hv_abi::ioring::OFFER_RO != 0,
        }),
        _ => Outcome::Return(Status::InvalidArgument as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::memory::VecGuestMemory;

    const ONE: Caller = Caller {
        vcpus: 1,
        started: 1,
        privileged: false,
    };
    const DOM0: Caller = Caller {
        privileged: true,
        ..ONE
    };

    #[test]
    fn dom0_calls_need_the_right() {
        let m = VecGuestMemory::new(0, 8192);
        m.write(GuestAddr(64), b"pool/data").unwrap();
        for n in [
            nr::IO_RING_SETUP,
            nr::DISK_OFFER,
            nr::IO_READY,
            nr::IO_KICK,
            nr::IO_WAIT,
            nr::NET_UPLINK,
            nr::NET_SEND,
            nr::NET_RECV,
            nr::DMA_MAP,
        ] {
            assert_eq!(
                dispatch(n, [64, 9, 100], &m, ONE),
                Outcome::Return(Status::PermissionDenied as i64),
                "call {n}"
            );
        }
        assert_eq!(
            dispatch(nr::IO_RING_SETUP, [0x1000, 0x2000, 0], &m, DOM0),
            Outcome::Dom0(Dom0Call::RingSetup {
                ring: 0x1000,
                data: 0x2000
            })
        );
        assert_eq!(
            dispatch(nr::DISK_OFFER, [64, 9, 100 | (1 << 63)], &m, DOM0),
            Outcome::Dom0(Dom0Call::DiskOffer {
                name: String::from("pool/data"),
                sectors: 100,
                read_only: true
            })
        );
        assert_eq!(
            dispatch(nr::IO_WAIT, [0; 3], &m, DOM0),
            Outcome::Dom0(Dom0Call::Wait { timeout_us: 0 })
        );
    }

    #[test]
    fn uplink_calls_are_checked() {
        let m = VecGuestMemory::new(0, 8192);
        m.write(GuestAddr(64), b"lan").unwrap();
        m.write(GuestAddr(128), b"LAN!").unwrap();
        let bad = Outcome::Return(Status::InvalidArgument as i64);
        assert_eq!(
            dispatch(nr::NET_UPLINK, [64, 3, 0], &m, DOM0),
            Outcome::Dom0(Dom0Call::Uplink {
                network: String::from("lan")
            })
        );
        // Not a network name, empty, too long, outside dom0's memory.
        assert_eq!(dispatch(nr::NET_UPLINK, [128, 4, 0], &m, DOM0), bad);
        assert_eq!(dispatch(nr::NET_UPLINK, [64, 0, 0], &m, DOM0), bad);
        assert_eq!(dispatch(nr::NET_UPLINK, [64, 33, 0], &m, DOM0), bad);
        assert_eq!(
            dispatch(nr::NET_UPLINK, [8190, 3, 0], &m, DOM0),
            Outcome::Return(Status::BadAddress as i64)
        );
        // Frames: 14..=1518 bytes out; a receive buffer must hold the largest.
        assert_eq!(
            dispatch(nr::NET_SEND, [1, 0x100, 60], &m, DOM0),
            Outcome::Dom0(Dom0Call::NetSend {
                handle: 1,
                gpa: 0x100,
                len: 60
            })
        );
        for len in [0, 13, 1519, u64::MAX] {
            assert_eq!(dispatch(nr::NET_SEND, [1, 0x100, len], &m, DOM0), bad);
        }
        assert_eq!(dispatch(nr::NET_RECV, [1, 0x100, 1517], &m, DOM0), bad);
        assert_eq!(
            dispatch(nr::NET_RECV, [1, 0x100, 2048], &m, DOM0),
            Outcome::Dom0(Dom0Call::NetRecv {
                handle: 1,
                gpa: 0x100,
                cap: 2048
            })
        );
        assert_eq!(
            dispatch(nr::IO_WAIT, [500, 0, 0], &m, DOM0),
            Outcome::Dom0(Dom0Call::Wait { timeout_us: 500 })
        );
    }

    #[test]
    fn disk_offers_are_checked() {
        let m = VecGuestMemory::new(0, 8192);
        m.write(GuestAddr(64), b"pool/da ta").unwrap();
        m.write(GuestAddr(128), b"nopool").unwrap();
        m.write(GuestAddr(256), &[0xff, 0xfe, b'/', b'a']).unwrap();
        let bad = Outcome::Return(Status::InvalidArgument as i64);
        assert_eq!(dispatch(nr::DISK_OFFER, [64, 10, 8], &m, DOM0), bad);
        assert_eq!(dispatch(nr::DISK_OFFER, [128, 6, 8], &m, DOM0), bad);
        assert_eq!(dispatch(nr::DISK_OFFER, [256, 4, 8], &m, DOM0), bad);
        assert_eq!(dispatch(nr::DISK_OFFER, [64, 0, 8], &m, DOM0), bad);
        assert_eq!(dispatch(nr::DISK_OFFER, [64, 65, 8], &m, DOM0), bad);
        assert_eq!(
            dispatch(nr::DISK_OFFER, [64, 4, 0], &m, DOM0),
            bad,
            "no sectors"
        );
        assert_eq!(
            dispatch(nr::DISK_OFFER, [8190, 9, 8], &m, DOM0),
            Outcome::Return(Status::BadAddress as i64)
        );
        assert!(valid_volume_name("p-1/v_2.img"));
        assert!(!valid_volume_name("p/"));
        assert!(!valid_volume_name("/v"));
        assert!(!valid_volume_name("p/v/w"));
    }

    #[test]
    fn calls() {
        let m = VecGuestMemory::new(0, 8192);
        m.write(GuestAddr(100), b"hello").unwrap();
        assert_eq!(
            dispatch(nr::VERSION, [0; 3], &m, ONE),
            Outcome::Return(i64::from(ABI_VERSION))
        );
        assert_eq!(
            dispatch(nr::CONSOLE_WRITE, [100, 5, 0], &m, ONE),
            Outcome::Console(b"hello".to_vec())
        );
        assert_eq!(dispatch(nr::EXIT, [3, 0, 0], &m, ONE), Outcome::Exit(3));
        assert_eq!(dispatch(nr::NOP, [0; 3], &m, ONE), Outcome::Return(0));
        assert_eq!(dispatch(nr::YIELD, [0; 3], &m, ONE), Outcome::Yield);
    }

    #[test]
    fn vcpu_start_is_checked() {
        let m = VecGuestMemory::new(0, 4096);
        let c = Caller {
            vcpus: 4,
            started: 0b0011,
            privileged: false,
        };
        assert_eq!(
            dispatch(nr::VCPU_START, [2, 0x10_0000, 0x7_0000], &m, c),
            Outcome::StartVcpu {
                index: 2,
                rip: 0x10_0000,
                rsp: 0x7_0000
            }
        );
        for bad in [0u64, 1, 4, 64, u64::MAX] {
            assert_eq!(
                dispatch(nr::VCPU_START, [bad, 0, 0], &m, c),
                Outcome::Return(Status::InvalidArgument as i64),
                "index {bad}"
            );
        }
        assert_eq!(dispatch(nr::VCPU_OFF, [0; 3], &m, c), Outcome::VcpuOff);
    }

    #[test]
    fn set_timer_is_checked() {
        let m = VecGuestMemory::new(0, 4096);
        assert_eq!(
            dispatch(nr::SET_TIMER, [0x30, 1000, 0], &m, ONE),
            Outcome::SetTimer {
                vector: 0x30,
                period_us: 1000
            }
        );
        assert_eq!(
            dispatch(nr::SET_TIMER, [0x30, 0, 0], &m, ONE),
            Outcome::SetTimer {
                vector: 0x30,
                period_us: 0
            }
        );
        for (v, p) in [
            (14u64, 1000u64),
            (256, 1000),
            (0x30, 1),
            (0x30, u64::MAX),
            (u64::MAX, 1000),
        ] {
            assert_eq!(
                dispatch(nr::SET_TIMER, [v, p, 0], &m, ONE),
                Outcome::Return(Status::InvalidArgument as i64),
                "vector {v} period {p}"
            );
        }
    }

    #[test]
    fn hostile_arguments() {
        let m = VecGuestMemory::new(0, 8192);
        assert_eq!(
            dispatch(0xdead, [0; 3], &m, ONE),
            Outcome::Return(Status::UnknownCall as i64)
        );
        assert_eq!(
            dispatch(u64::MAX, [u64::MAX; 3], &m, ONE),
            Outcome::Return(Status::UnknownCall as i64)
        );
        assert_eq!(
            dispatch(nr::CONSOLE_WRITE, [8190, 5, 0], &m, ONE),
            Outcome::Return(Status::BadAddress as i64)
        );
        assert_eq!(
            dispatch(nr::CONSOLE_WRITE, [u64::MAX - 1, 4, 0], &m, ONE),
            Outcome::Return(Status::BadAddress as i64)
        );
        assert_eq!(
            dispatch(nr::CONSOLE_WRITE, [0, 1 << 40, 0], &m, ONE),
            Outcome::Return(Status::InvalidArgument as i64)
        );
    }
}
