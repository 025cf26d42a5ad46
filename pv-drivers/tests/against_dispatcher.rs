//! The hypercall wrappers against the hypervisor's own exit dispatcher: each call goes through
//! `hypervisor::vcpu::dispatch::handle` as a VMCALL exit would, on a fake VMCS and plain guest
//! memory, so these tests fail if the wrappers and the hypervisor disagree on the ABI.

use core::arch::x86_64::CpuidResult;

use hv_abi::Status;
use hypervisor::domain::hypercall::Dom0Call;
use hypervisor::domain::memory::{GuestAddr, GuestMemory, VecGuestMemory};
use hypervisor::io::DomainIo;
use hypervisor::vcpu::dispatch::{Action, Dom0Reply, Platform, VcpuCore, handle};
use hypervisor::vcpu::exit::Exit;
use hypervisor::vmx::exit::ExitReason;
use hypervisor::vmx::vmcs::{FakeVmcs, FixedBits, GuestRegs, fields as f};
use pv_drivers::hypercall::{HypercallError, Hypercalls, Hypervisor};

#[derive(Default)]
struct Host {
    lines: Vec<String>,
    /// dom0: may make dom0's calls, which are recorded here.
    privileged: bool,
    dom0_calls: Vec<Dom0Call>,
}

impl Platform for Host {
    fn cpuid(&self, leaf: u32, _subleaf: u32) -> CpuidResult {
        CpuidResult {
            eax: leaf,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }
    }
    fn rdtsc(&self) -> u64 {
        0
    }
    fn fixed_bits(&self) -> FixedBits {
        FixedBits {
            cr0_fixed0: 0,
            cr0_fixed1: u64::MAX,
            cr4_fixed0: 0,
            cr4_fixed1: u64::MAX,
        }
    }
    fn xcr0_supported(&self) -> u64 {
        3
    }
    fn spec_msrs(&self) -> hypervisor::vmx::policy::SpecMsrs {
        hypervisor::vmx::policy::SpecMsrs::default()
    }
    fn spec_barrier(&mut self, _: hypervisor::vmx::policy::SpecMsr) {}
    fn load_xcr0(&mut self, _value: u64) {}
    fn console_window(&self) -> u64 {
        0
    }
    fn console_line(&mut self, line: &str) {
        self.lines.push(line.to_string());
    }
    fn vcpus(&self) -> u32 {
        1
    }
    fn vcpus_started(&self) -> u64 {
        1
    }
    fn start_vcpu(&mut self, _index: u32, _rip: u64, _rsp: u64) -> bool {
        false
    }
    fn tsc_khz(&self) -> u64 {
        1000
    }
    fn with_io<R>(&mut self, f: impl FnOnce(&mut DomainIo) -> R) -> R {
        f(&mut DomainIo::standard())
    }
    fn privileged(&self) -> bool {
        self.privileged
    }
    fn dom0_call(&mut self, call: Dom0Call) -> Dom0Reply {
        let reply = match call {
            Dom0Call::DiskOffer { .. } => Dom0Reply::Return(1),
            Dom0Call::Wait { .. } => Dom0Reply::Wait,
            _ => Dom0Reply::Return(0),
        };
        self.dom0_calls.push(call);
        reply
    }
}

/// A guest whose VMCALLs are VM exits handled by the real dispatcher.
struct Guest {
    vcpu: VcpuCore,
    vmcs: FakeVmcs,
    mem: VecGuestMemory,
    host: Host,
    last: Option<Action>,
}

impl Guest {
    fn new() -> Guest {
        Guest {
            vcpu: VcpuCore::new(0, GuestRegs::default(), 1),
            vmcs: FakeVmcs::default().with(f::GUEST_RIP, 0x10_0000),
            mem: VecGuestMemory::new(0, 1 << 20),
            host: Host::default(),
            last: None,
        }
    }
}

impl Hypervisor for Guest {
    fn call(&mut self, nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
        self.vcpu.regs.rax = nr;
        self.vcpu.regs.rdi = a0;
        self.vcpu.regs.rsi = a1;
        self.vcpu.regs.rdx = a2;
        let exit = Exit {
            reason: ExitReason::Vmcall,
            raw: 18,
            qualification: 0,
            gpa: 0,
            len: 3,
        };
        let action = handle(
            &exit,
            &mut self.vcpu,
            &mut self.vmcs,
            &self.mem,
            &mut self.host,
        )
        .expect("a hypercall never stops the domain with an error");
        self.last = Some(action);
        i64::from_ne_bytes(self.vcpu.regs.rax.to_ne_bytes())
    }
}

#[test]
fn dom0_calls_need_the_right_and_reach_the_backend_decoded() {
    let mut h = Hypercalls::new(Guest::new());
    let denied = Err(HypercallError::Status(Status::PermissionDenied));
    assert_eq!(h.io_ring_setup(0x1000, 0x2000), denied);
    assert_eq!(h.io_ready(), denied);
    assert_eq!(h.io_kick(), denied);
    assert_eq!(h.io_wait(), denied);
    assert_eq!(h.io_wait_bounded(1000), denied);
    let denied_value = Err(HypercallError::Status(Status::PermissionDenied));
    assert_eq!(h.net_uplink(0x4000, 3), denied_value);
    assert_eq!(h.net_send(1, 0x4000, 60), denied);
    assert_eq!(h.net_recv(1, 0x4000, 2048), denied_value);
    assert_eq!(
        h.disk_offer(0x4000, 9, 64, false),
        Err(HypercallError::Status(Status::PermissionDenied))
    );

    let mut g = Guest::new();
    g.host.privileged = true;
    g.mem.write(GuestAddr(0x4000), b"pool/data").unwrap();
    let mut h = Hypercalls::new(g);
    assert_eq!(h.io_ring_setup(0x1000, 0x2000), Ok(()));
    assert_eq!(h.disk_offer(0x4000, 9, 64, true), Ok(1));
    assert_eq!(h.io_wait(), Ok(()));
    assert_eq!(h.io_wait_bounded(250), Ok(()));
    assert_eq!(h.net_uplink(0x4000, 4), Ok(0), "'pool' is a network name");
    assert_eq!(
        h.net_uplink(0x4000, 9),
        Err(HypercallError::Status(Status::InvalidArgument)),
        "'pool/data' is not"
    );
    assert_eq!(h.net_send(1, 0x4000, 60), Ok(()));
    assert_eq!(
        h.net_send(1, 0x4000, 2000),
        Err(HypercallError::Status(Status::InvalidArgument)),
        "longer than a tagged frame"
    );
    assert_eq!(h.net_recv(1, 0x4000, 1518), Ok(0));
    assert_eq!(
        h.disk_offer(0x4000, 4, 64, false),
        Err(HypercallError::Status(Status::InvalidArgument)),
        "'pool' is not pool/volume"
    );
}

#[test]
fn version_nop_and_yield() {
    let mut h = Hypercalls::new(Guest::new());
    assert!(h.compatible());
    assert_eq!(h.version(), Ok(hv_abi::ABI_VERSION));
    assert_eq!(h.nop(), Ok(()));
    assert_eq!(h.yield_now(), Ok(()));
}

#[test]
fn console_write_reaches_the_domain_console_and_bad_buffers_are_refused() {
    let g = Guest::new();
    g.mem
        .write(GuestAddr(0x4000), b"from pv-drivers\n")
        .unwrap();
    let mut h = Hypercalls::new(g);
    assert_eq!(h.console_write_phys(0x4000, 16), Ok(16));
    assert_eq!(
        h.console_write_phys((1 << 20) - 8, 16),
        Err(HypercallError::Status(Status::BadAddress))
    );
    assert_eq!(
        h.console_write_phys(0x4000, hv_abi::hypercall::CONSOLE_WRITE_MAX + 1),
        Err(HypercallError::Status(Status::InvalidArgument))
    );
}

#[test]
fn exit_ends_the_domain_with_the_code() {
    let mut g = Guest::new();
    // The wrapper sees no return value; the dispatcher's action is what the run loop acts on.
    Hypercalls::new(&mut g).exit(9);
    assert_eq!(g.last, Some(Action::Exit(9)));
}

impl Hypervisor for &mut Guest {
    fn call(&mut self, nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
        (**self).call(nr, a0, a1, a2)
    }
}
