//! The bodies of the fuzz targets for what guests and operators hand the hypervisor (issue 16):
//! the guest page walk, the ELF loader, the hypercall dispatcher, the boot modules' domain
//! lines, the serial console (line editor and command parser) and guests' port and MMIO
//! accesses to their devices, what dom0 writes into its block ring, and the frames guests
//! send into the virtual switch. Each takes arbitrary bytes, runs the parser on them and checks what its callers rely
//! on; a violated check panics, which is what the fuzzer looks for. `hypervisor/fuzz` wraps
//! each in a cargo-fuzz target of the same name (`cargo xtask fuzz TARGET SECONDS`), and the
//! tests below replay each target's seed corpus (`fuzz/corpus/TARGET`) plus mutations and
//! pseudo-random inputs, so `cargo xtask test` runs them all without cargo-fuzz. Host only.
//! The MMIO decoder's body is `vmx::decode::fuzz_one`.

use alloc::vec;

use crate::domain::config::{DomainConfig, MAX_MEM_MIB, MAX_VCPUS};
use crate::domain::hypercall::{Caller, Outcome, dispatch};
use crate::domain::loader;
use crate::domain::memory::{GuestAddr, GuestMemory, VecGuestMemory, translate};
use crate::domain::vtimer::{MAX_PERIOD_US, MIN_PERIOD_US};

/// A fuzz target's body: arbitrary bytes in, a panic when a check fails.
pub type Body = fn(&[u8]);

/// The fuzz targets: (name, body). The names are the cargo-fuzz binaries and corpus folders.
pub const TARGETS: &[(&str, Body)] = &[
    ("page_walk", page_walk),
    ("elf_loader", elf_loader),
    ("hypercall", hypercall),
    ("domain_line", domain_line),
    ("console", console),
    ("guest_io", guest_io),
    ("block_ring", block_ring),
    ("switch", switch),
    ("pc_devices", pc_devices),
];

fn word(data: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    for (j, b) in w.iter_mut().enumerate() {
        *b = data.get(i * 8 + j).copied().unwrap_or(0);
    }
    u64::from_le_bytes(w)
}

/// Guest page walk: CR3 and the address (16 bytes), then the guest's RAM from address 0 (the
/// page tables the guest built). A translation keeps the address's offset within its page.
pub fn page_walk(data: &[u8]) {
    let (cr3, gva) = (word(data, 0), word(data, 1));
    let ram = data.get(16..).unwrap_or(&[]);
    let mem = VecGuestMemory::new(0, ram.len().max(4096).next_multiple_of(4096));
    mem.write(GuestAddr(0), ram).expect("the image fits");
    if let Some(gpa) = translate(&mem, cr3, gva) {
        assert_eq!(gpa & 0xfff, gva & 0xfff, "{cr3:#x} {gva:#x} -> {gpa:#x}");
        assert!(gpa < 1 << 52, "beyond MAXPHYADDR: {gpa:#x}");
    }
}

/// RAM of the loader's test domain (the smallest a domain may have).
const LOADER_RAM: u64 = 2 << 20;

/// ELF loader: the image is the input. An accepted plan keeps every segment within
/// `[1 MiB, RAM)`, inside the file, apart from the others, with the entry in an executable
/// one; a load then leaves each segment's bytes in guest memory as in the file, zeros after.
pub fn elf_loader(data: &[u8]) {
    let Ok(plan) = loader::plan(data, LOADER_RAM) else {
        return;
    };
    for (i, s) in plan.segments.iter().enumerate() {
        assert!(
            s.gpa >= loader::KERNEL_MIN && s.gpa + s.mem_size <= LOADER_RAM,
            "{s:?}"
        );
        assert!(s.file_size <= s.mem_size && s.file_offset + s.file_size <= data.len() as u64);
        for t in &plan.segments[i + 1..] {
            assert!(
                s.gpa + s.mem_size <= t.gpa || t.gpa + t.mem_size <= s.gpa,
                "{s:?} {t:?}"
            );
        }
    }
    assert!(
        plan.segments
            .iter()
            .any(|s| s.executable && (s.gpa..s.gpa + s.mem_size).contains(&plan.entry))
    );
    let mem = VecGuestMemory::new(0, LOADER_RAM as usize);
    let boot = loader::load(data, &mem, "console=hvc0").expect("a checked plan loads");
    assert_eq!(boot.rip, plan.entry);
    assert_eq!(
        (boot.rdx, boot.rsi),
        (LOADER_RAM, "console=hvc0".len() as u64)
    );
    for s in &plan.segments {
        let mut got = vec![0u8; s.mem_size as usize];
        mem.read(GuestAddr(s.gpa), &mut got).expect("in RAM");
        let file = &data[s.file_offset as usize..(s.file_offset + s.file_size) as usize];
        assert_eq!(&got[..file.len()], file, "segment at {:#x}", s.gpa);
        assert!(
            got[file.len()..].iter().all(|&b| b == 0),
            "bss at {:#x}",
            s.gpa
        );
    }
}

/// Hypercall dispatch: the number and three arguments (32 bytes), the caller's vCPU count and
/// started set (9 bytes), then 16 KiB of guest RAM at most. Whatever the arguments, an
/// outcome is within what the exit handler may act on unchecked.
pub fn hypercall(data: &[u8]) {
    let (number, args) = (word(data, 0), [word(data, 1), word(data, 2), word(data, 3)]);
    let started = word(data, 4) | 1;
    let vcpus = u32::from(data.get(40).copied().unwrap_or(1) % 65);
    let ram = data.get(41..).unwrap_or(&[]);
    let ram = &ram[..ram.len().min(16 << 10)];
    let mem = VecGuestMemory::new(0, 16 << 10);
    mem.write(GuestAddr(0), ram).expect("fits");
    let privileged = data.get(40).copied().unwrap_or(0) & 0x80 != 0;
    let caller = Caller {
        vcpus,
        started,
        privileged,
    };
    match dispatch(number, args, &mem, caller) {
        Outcome::Console(bytes) => {
            assert!(bytes.len() as u64 <= hv_abi::hypercall::CONSOLE_WRITE_MAX);
            assert_eq!(bytes.len() as u64, args[1]);
            let mut want = vec![0u8; bytes.len()];
            mem.read(GuestAddr(args[0]), &mut want)
                .expect("it was read");
            assert_eq!(bytes, want);
        }
        Outcome::StartVcpu { index, .. } => {
            assert!(index != 0 && index < vcpus && index < 64);
            assert_eq!(started & (1 << index), 0, "vCPU {index} started twice");
        }
        Outcome::SetTimer { vector, period_us } => {
            assert!(vector >= 32);
            assert!(period_us == 0 || (MIN_PERIOD_US..=MAX_PERIOD_US).contains(&period_us));
        }
        Outcome::Dom0(call) => {
            assert!(
                privileged,
                "dom0's call {call:?} for an unprivileged caller"
            );
            use crate::domain::hypercall::Dom0Call;
            match call {
                Dom0Call::DiskOffer { name, sectors, .. } => {
                    assert!(crate::domain::hypercall::valid_volume_name(&name));
                    assert!(sectors > 0 && name.len() as u64 <= hv_abi::ioring::NAME_MAX);
                }
                Dom0Call::Uplink { network } => {
                    assert!(crate::domain::config::valid_network_name(&network));
                }
                // What the uplink's handlers take on trust: a frame length they can buffer
                // and a receive buffer that holds any frame.
                Dom0Call::NetSend { len, .. } => {
                    assert!((14..=hv_abi::hypercall::NET_FRAME_MAX).contains(&len));
                }
                Dom0Call::NetRecv { cap, .. } => {
                    assert!(cap >= hv_abi::hypercall::NET_FRAME_MAX);
                }
                _ => {}
            }
        }
        Outcome::Return(_) | Outcome::Exit(_) | Outcome::Yield | Outcome::VcpuOff => {}
    }
}

/// A boot module's domain line (`name=… mem=… -- guest line`), as text (invalid UTF-8 is
/// refused before parsing, as the boot code does). An accepted line is within every bound,
/// and the guest's part is a piece of the line.
pub fn domain_line(data: &[u8]) {
    let Ok(text) = core::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = DomainConfig::parse(text) else {
        return;
    };
    assert!(c.mem_mib >= 2 && c.mem_mib <= MAX_MEM_MIB && c.mem_mib % 2 == 0);
    assert!((1..=MAX_VCPUS).contains(&c.vcpus));
    assert!(!(c.cpu.is_some() && c.sched.pin.is_some()));
    assert!(text.contains(c.guest_cmdline));
    assert!(
        c.name == "guest" || text.contains(c.name),
        "name {:?}",
        c.name
    );
    if let Some(p) = c.sched.pin {
        assert_ne!(p, 0, "an empty CPU set");
    }
    if let Some(w) = c.sched.weight {
        assert!((1..=65535).contains(&w));
    }
}

/// The serial console: bytes typed at it (escape sequences, history keys, control
/// characters, anything) go through the line editor, and every line it completes is parsed as
/// a command. A completed line holds no line ends; whatever the parser says can be printed.
pub fn console(data: &[u8]) {
    let mut editor = crate::shell::LineEditor::new();
    let mut echo = alloc::vec::Vec::new();
    for &b in data {
        if let Some(line) = editor.feed(b, &mut echo) {
            assert!(!line.contains('\r') && !line.contains('\n'), "{line:?}");
            assert!(line.len() <= crate::shell::MAX_LINE, "{} bytes", line.len());
            match crate::shell::parse(&line) {
                Ok(_) => {}
                Err(e) => {
                    let _ = alloc::format!("{e}");
                }
            }
        }
        echo.clear();
    }
    assert!(editor.history().all(|h| !h.contains('\n')));
}

/// A guest's port and MMIO accesses to its devices (the 16550 UART, the test exit port, the
/// MMIO hole): 16 bytes per access (kind, size, port or address, value). A read gives exactly
/// `size` bytes; an unclaimed port or MMIO-hole address reads all ones; only the UART
/// produces console bytes and only the exit port an exit.
pub fn guest_io(data: &[u8]) {
    use crate::io::{DomainIo, IoEvent, ports::PortAction};
    let mut io = DomainIo::standard();
    let mem = VecGuestMemory::new(0, 4096);
    let uart = hv_abi::ports::UART;
    for op in data.chunks_exact(16) {
        let size = [1u8, 2, 4, 8][usize::from(op[1] & 3)];
        let value = u64::from_le_bytes(op[8..16].try_into().expect("8 bytes"));
        let mask = if size == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * size)) - 1
        };
        if op[0] & 1 == 0 {
            // Ports: near the UART and the exit port mostly, anywhere sometimes.
            let size = size.min(4);
            let port = match op[0] >> 1 & 3 {
                0 => uart.wrapping_add(u16::from(op[2] & 7)),
                1 => hv_abi::ports::TEST_EXIT.wrapping_add(u16::from(op[2] & 1)),
                _ => u16::from_le_bytes([op[2], op[3]]),
            };
            let input = op[0] & 0x10 != 0;
            match io.ports.access(port, size, input, value as u32) {
                PortAction::Read(v) => {
                    assert_eq!(
                        u64::from(v) & !mask,
                        0,
                        "port {port:#x}: {v:#x} in {size} bytes"
                    );
                    let claimed =
                        (uart..uart + 8).contains(&port) || port == hv_abi::ports::TEST_EXIT;
                    if !claimed && u32::from(port) + u32::from(size) <= u32::from(uart) {
                        assert_eq!(u64::from(v), mask.min(u64::from(u32::MAX)));
                    }
                }
                PortAction::Wrote(IoEvent::Console(_)) => {
                    assert!(
                        (uart..uart + 8).contains(&port),
                        "console byte from {port:#x}"
                    );
                }
                PortAction::Wrote(IoEvent::Exit(_)) => {
                    assert_eq!(port, hv_abi::ports::TEST_EXIT);
                }
                PortAction::Wrote(IoEvent::None) => {}
                PortAction::Wrote(IoEvent::PowerOff | IoEvent::Reset | IoEvent::Panicked) => {
                    panic!("port {port:#x}: only a PC domain powers off or resets")
                }
            }
        } else {
            let gpa = 0xc000_0000u64
                + (u64::from(u32::from_le_bytes(op[4..8].try_into().expect("4"))) & 0x3fff_ffff);
            if op[0] & 0x10 != 0 {
                let v = io.mmio.read(gpa, size).expect("inside the hole");
                assert_eq!(v, mask, "an empty hole reads all ones");
            } else {
                io.mmio
                    .write(&mem, gpa, size, value)
                    .expect("inside the hole");
            }
        }
    }
}

/// A PC domain's devices as a hostile Linux guest reaches them: the input is a script of
/// 16-byte operations on the ports (COM1, the RTC, the ACPI sleep and reset registers, the
/// panic notifier, the keyboard controller, anywhere), the IOAPIC's registers and a local
/// APIC's registers and MSRs, with the operator typing and time moving on. Whatever the guest
/// does: no panic; a read fits its size; only COM1's data register sends console bytes, only
/// S5 with SLP_EN powers off, only the reset register's value or the 0x64 pulse resets, only
/// the pvpanic port reports a panic; the RTC's time registers read as BCD; an IOAPIC delivery
/// names one of its 24 pins; a local APIC only offers vectors 16..=255.
pub fn pc_devices(data: &[u8]) {
    use crate::io::IoEvent;
    use crate::io::pc::{COM1, PcDevices, PcPort};
    use hv_platform::acpi;
    let mut pc = PcDevices::new(2);
    let mut lapic = hv_platform::lapic::LocalApic::new(0, 4);
    let mut now = 0u64;
    let mut rtc_index = 0u8;
    let check_delivery = |d: Option<hv_platform::ioapic::Delivery>| {
        if let Some(d) = d {
            assert!(d.pin < acpi::IOAPIC_PINS, "delivery from pin {}", d.pin);
        }
    };
    for op in data.chunks_exact(16) {
        let value = u32::from_le_bytes(op[4..8].try_into().expect("4 bytes"));
        let wide = u64::from_le_bytes(op[8..16].try_into().expect("8 bytes"));
        now = now.wrapping_add(u64::from(op[3]) << 8);
        match op[0] % 6 {
            0 | 1 => {
                let port = match op[1] % 8 {
                    0 => COM1 + u16::from(op[2] & 7),
                    1 => hv_platform::rtc::INDEX_PORT + u16::from(op[2] & 1),
                    2 => acpi::SLEEP_CONTROL_PORT + u16::from(op[2] % 3),
                    3 => acpi::PVPANIC_PORT,
                    4 => 0x64,
                    _ => u16::from_le_bytes([op[2], op[1]]),
                };
                let size = [1u8, 2, 4][usize::from(op[0] >> 4) % 3];
                let input = op[0] & 8 != 0;
                if port == hv_platform::rtc::INDEX_PORT && !input {
                    rtc_index = value as u8 & 0x7f;
                }
                let Some((answer, d)) = pc.port(port, size, input, value, wide) else {
                    continue;
                };
                check_delivery(d);
                match answer {
                    PcPort::Read(v) => {
                        let mask = [0xff, 0xffff, u32::MAX][usize::from(op[0] >> 4) % 3];
                        assert_eq!(v & !mask, 0, "port {port:#x}: {v:#x} in {size} bytes");
                        let time_reg = matches!(rtc_index, 0 | 2 | 4 | 7 | 8 | 9 | 0x32);
                        if port == hv_platform::rtc::DATA_PORT && time_reg {
                            let (hi, lo) = (v >> 4 & 0xf, v & 0xf);
                            assert!(hi <= 9 && lo <= 9, "RTC register {rtc_index:#x}: {v:#x}");
                        }
                    }
                    PcPort::Wrote(IoEvent::Console(_)) => assert_eq!(port, COM1, "console"),
                    PcPort::Wrote(IoEvent::PowerOff) => {
                        assert_eq!(port, acpi::SLEEP_CONTROL_PORT);
                        assert_eq!(value & (1 << 5), 1 << 5, "SLP_EN");
                        assert_eq!((value >> 2) & 7, u32::from(acpi::S5_SLP_TYP));
                    }
                    PcPort::Wrote(IoEvent::Reset) => assert!(
                        port == acpi::RESET_PORT && value as u8 == acpi::RESET_VALUE
                            || port == 0x64 && value as u8 == 0xfe,
                        "reset from {port:#x} {value:#x}"
                    ),
                    PcPort::Wrote(IoEvent::Panicked) => assert_eq!(port, acpi::PVPANIC_PORT),
                    PcPort::Wrote(IoEvent::None) => {}
                    PcPort::Wrote(other) => panic!("port {port:#x}: {other:?}"),
                }
            }
            2 => {
                // IOAPIC: its select/window registers, any line moving.
                if op[1] & 1 == 0 {
                    check_delivery(pc.ioapic.write(u32::from(op[2] & 0x1f), value));
                } else {
                    let _ = pc.ioapic.read(u32::from(op[2] & 0x1f));
                }
                check_delivery(pc.ioapic.set_line(u32::from(op[1] >> 1), op[2] & 0x80 != 0));
                check_delivery(pc.ioapic.eoi(op[3]));
            }
            3 => {
                let offset = u32::from(u16::from_le_bytes([op[1], op[2]])) & 0xff0;
                if op[3] & 1 == 0 {
                    let _ = lapic.write(offset, value, now);
                } else {
                    let _ = lapic.read(offset, now);
                }
            }
            4 => {
                let msr = 0x800 + u32::from(op[1]);
                if op[2] & 1 == 0 {
                    let _ = lapic.write_msr(msr, wide, now);
                } else {
                    let _ = lapic.read_msr(msr, now);
                }
                if op[2] & 2 != 0 {
                    let _ = lapic.set_apic_base(wide);
                }
                if op[2] & 4 != 0 {
                    lapic.set_tsc_deadline(wide, now);
                }
            }
            _ => {
                // The operator types; the vCPU takes the input; time passes on the LAPIC.
                let n = usize::from(op[1] & 15).min(op.len() - 2);
                pc.queue_input(&op[2..2 + n]);
                check_delivery(pc.take_input());
                lapic.poll(now);
                if op[2] & 1 != 0 {
                    lapic.accept(op[3], op[2] & 2 != 0);
                }
            }
        }
        if let Some(v) = lapic.pending() {
            assert!(v >= 16, "LAPIC offers vector {v}");
            lapic.ack(v);
        }
    }
}

/// dom0's block ring, as the hypervisor reads it: the input is a script of operations. Each
/// byte pair picks one: submit a request (op and size from the input), let "dom0" write bytes
/// of the input anywhere in the ring page or the data area (a hostile dom0), answer a request
/// honestly, or reap. Whatever dom0 writes, every finished request is one that was submitted
/// and not finished before, a read's data is exactly its length (or empty after an error), at
/// most `SLOTS` are in flight, and `fail_all` finishes exactly the rest.
pub fn block_ring(data: &[u8]) {
    use crate::io::ioring::RingHost;
    use hv_abi::ioring::{self, Request, Response, field, op};

    const RING: u64 = 0;
    const DATA: u64 = 4096;
    let mem = VecGuestMemory::new(0, 4096 + ioring::DATA_BYTES as usize);
    let Ok(mut host) = RingHost::<u64>::setup(&mem, RING, DATA) else {
        panic!("setup of a well-formed registration failed");
    };
    let mut next_route = 0u64;
    // Routes in flight, with the bytes a read of each must return.
    let mut open: alloc::collections::BTreeMap<u64, Option<u32>> = Default::default();
    let check = |done: alloc::vec::Vec<crate::io::ioring::Done<u64>>,
                 open: &mut alloc::collections::BTreeMap<u64, Option<u32>>| {
        for d in done {
            let want = open
                .remove(&d.route)
                .unwrap_or_else(|| panic!("route {} finished twice or never submitted", d.route));
            assert!(d.status <= 2);
            match (want, d.status) {
                (Some(len), 0) => assert_eq!(d.data.len(), len as usize),
                _ => assert!(d.data.is_empty(), "data with a failed request or a write"),
            }
        }
    };
    let mut i = 0;
    while i + 1 < data.len() {
        let (what, arg) = (data[i], data[i + 1]);
        i += 2;
        match what % 4 {
            0 => {
                let sectors = u32::from(arg % 9) * 32;
                let (opc, want, bytes) = match arg % 3 {
                    0 => (op::READ, Some(sectors * 512), alloc::vec::Vec::new()),
                    1 => (op::WRITE, None, vec![arg; sectors as usize * 512]),
                    _ => (op::FLUSH, None, alloc::vec::Vec::new()),
                };
                let r = Request {
                    op: opc,
                    disk: 1,
                    sector: u64::from(arg),
                    sectors,
                    ..Request::default()
                };
                if host.submit(&mem, r, &bytes, next_route).is_ok() {
                    open.insert(next_route, want);
                }
                next_route += 1;
            }
            1 => {
                // dom0 writes up to 16 bytes of the input at an offset it picks.
                let Some(&o) = data.get(i) else { break };
                let n = usize::from(arg % 17).min(data.len() - i - 1);
                let at = if o & 1 == 0 {
                    RING + u64::from(o) * 16
                } else {
                    DATA + u64::from(o) * 4096 + u64::from(arg)
                };
                let _ = mem.write(GuestAddr(at), &data[i + 1..i + 1 + n]);
                i += 1 + n;
            }
            2 => {
                // An honest dom0: answer every request it has not taken.
                let prod = mem.read_u32(GuestAddr(RING + field::REQ_PROD)).unwrap_or(0);
                let mut cons = mem.read_u32(GuestAddr(RING + field::REQ_CONS)).unwrap_or(0);
                let mut rsp = mem.read_u32(GuestAddr(RING + field::RSP_PROD)).unwrap_or(0);
                let mut n = 0;
                while cons != prod && n < ioring::SLOTS {
                    let mut b = [0u8; ioring::REQ_BYTES];
                    let _ = mem.read(GuestAddr(RING + ioring::req_offset(cons)), &mut b);
                    let q = Request::from_bytes(&b);
                    let len = if q.op == op::READ { q.sectors * 512 } else { 0 };
                    let a = Response {
                        tag: q.tag,
                        status: u32::from(arg % 3),
                        len,
                    };
                    let _ = mem.write(GuestAddr(RING + ioring::rsp_offset(rsp)), &a.to_bytes());
                    cons = cons.wrapping_add(1);
                    rsp = rsp.wrapping_add(1);
                    n += 1;
                }
                let _ = mem.write_u32(GuestAddr(RING + field::REQ_CONS), cons);
                let _ = mem.write_u32(GuestAddr(RING + field::RSP_PROD), rsp);
            }
            _ => check(host.reap(&mem), &mut open),
        }
        assert!(host.in_flight() <= ioring::SLOTS as usize);
        assert_eq!(host.in_flight(), open.len());
    }
    check(host.fail_all(), &mut open);
    assert!(
        open.is_empty(),
        "fail_all left {} requests unfinished",
        open.len()
    );
}

/// The virtual switch, fed frames guests write (any bytes, any length) from four guest ports
/// on two VLANs (each bound to its MAC) and a trunk: whatever the frames, nothing is
/// delivered to the port it came from or to a port that does not carry its VLAN, an access
/// port gets no frame tagged with a VLAN id from a guest, a guest port's accepted frames carry
/// its own source MAC,
/// queues stay within their bounds, and every frame offered is counted once.
pub fn switch(data: &[u8]) {
    use hv_vswitch::{
        MacAddr, PortConfig, SendResult, Switch, SwitchConfig, TPID_8021Q, VlanId, VlanSet,
    };
    let cfg = SwitchConfig {
        queue_frames: 8,
        queue_bytes: 8 * 1518,
        ..SwitchConfig::default()
    };
    let Ok(mut sw) = Switch::new(cfg) else {
        panic!("a valid configuration was refused");
    };
    let vlan = |v| VlanId::new(v).expect("valid VLAN");
    let mac = |i: u8| MacAddr([2, 0, 0, 0, 0, i + 1]);
    let mut ports = alloc::vec::Vec::new();
    for i in 0..4u8 {
        let c = PortConfig::access(vlan(10 + u16::from(i % 2))).with_mac(mac(i));
        ports.push((sw.add_port(c).expect("room for five ports"), Some(i)));
    }
    let mut allowed = VlanSet::empty();
    allowed.insert(vlan(10));
    allowed.insert(vlan(11));
    let trunk = sw
        .add_port(PortConfig::trunk(allowed, Some(vlan(10))))
        .expect("room");
    ports.push((trunk, None));
    let mut now = 0u64;
    let mut offered = [0u64; 5];
    let mut i = 0;
    while i + 2 < data.len() {
        let (who, len_byte) = (usize::from(data[i]) % 5, data[i + 1]);
        i += 2;
        let len = usize::from(len_byte) * 8 % 1600;
        let mut frame = alloc::vec![0u8; len];
        for (k, b) in frame.iter_mut().enumerate() {
            *b = data.get(i + k).copied().unwrap_or(k as u8);
        }
        i += len.min(data.len() - i);
        // Mostly well-formed: a destination among the guests (or broadcast), the sender's
        // own source (unless the input says forge), maybe a tag.
        if frame.len() >= 14 && len_byte & 1 == 0 {
            let dst = if len_byte & 2 == 0 {
                [0xff; 6]
            } else {
                mac(len_byte % 4).0
            };
            frame[..6].copy_from_slice(&dst);
            if let (Some(me), false) = (ports[who].1, len_byte & 4 != 0) {
                frame[6..12].copy_from_slice(&mac(me).0);
            }
            if len_byte & 8 != 0 && frame.len() >= 18 {
                frame[12..14].copy_from_slice(&TPID_8021Q.to_be_bytes());
            }
        }
        now += 1_000_000;
        offered[who] += 1;
        if let SendResult::Accepted { .. } = sw.send(ports[who].0, &frame, now)
            && let Some(me) = ports[who].1
        {
            assert_eq!(&frame[6..12], &mac(me).0, "a forged source was accepted");
        }
        // Drain every port and check what it gets.
        for (to, (port, guest)) in ports.iter().enumerate() {
            while let Some(f) = sw.recv(*port) {
                assert_ne!(f.source(), *port, "delivered back to its ingress port");
                let b = f.bytes();
                assert!(b.len() >= 14);
                // A tag with a VLAN id (a priority tag, VID 0, names no VLAN: it may pass).
                let tagged = b[12..14] == TPID_8021Q.to_be_bytes()
                    && b.len() >= 16
                    && u16::from_be_bytes([b[14], b[15]]) & 0xfff != 0;
                if let Some(g) = guest {
                    // Access ports refuse tagged frames, so what one sent never arrives
                    // tagged; a double-tagged frame from the trunk keeps its inner tag
                    // (same VLAN traffic, as on a hardware switch).
                    assert!(
                        !tagged || f.source() == trunk,
                        "a tagged frame from a guest reached access port {to}"
                    );
                    assert_eq!(f.vlan(), vlan(10 + u16::from(g % 2)), "crossed VLANs");
                }
            }
        }
        for (port, _) in &ports {
            if let Some(q) = sw.queue_depth(*port) {
                assert!(q.frames <= 8);
            }
        }
    }
    for (k, (port, _)) in ports.iter().enumerate() {
        let s = sw.port_stats(*port).expect("the port exists");
        let counted = s.rx_frames + s.spoofed + s.malformed + s.vlan_denied;
        assert_eq!(
            counted, offered[k],
            "port {k}: every offered frame counted once"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::path::Path;

    /// Replays `name`'s seeds, prefixes and one-byte changes of each (at up to 512 places,
    /// evenly spread), then pseudo-random inputs of mixed lengths.
    fn replay(name: &str, body: Body) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(name);
        let mut seeds = 0;
        for e in std::fs::read_dir(&dir).expect("the seed corpus is in the repository") {
            let data = std::fs::read(e.expect("readable").path()).expect("readable");
            body(&data);
            for k in (0..data.len()).step_by((data.len() / 512).max(1)) {
                body(&data[..k]);
                let mut m = data.clone();
                m[k] ^= 0xff;
                body(&m);
                m[k] = m[k].wrapping_add(0x81);
                body(&m);
            }
            seeds += 1;
        }
        assert!(seeds >= 3, "{seeds} seeds in {}", dir.display());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let len = (next() % 600) as usize;
            let data: alloc::vec::Vec<u8> = (0..len).map(|_| next() as u8).collect();
            body(&data);
        }
    }

    #[test]
    fn page_walk_corpus_replays() {
        replay("page_walk", page_walk);
    }

    #[test]
    fn elf_loader_corpus_replays() {
        replay("elf_loader", elf_loader);
    }

    #[test]
    fn hypercall_corpus_replays() {
        replay("hypercall", hypercall);
    }

    #[test]
    fn domain_line_corpus_replays() {
        replay("domain_line", domain_line);
    }

    #[test]
    fn console_corpus_replays() {
        replay("console", console);
    }

    #[test]
    fn guest_io_corpus_replays() {
        replay("guest_io", guest_io);
    }

    #[test]
    fn switch_corpus_replays() {
        replay("switch", switch);
    }

    #[test]
    fn pc_devices_corpus_replays() {
        replay("pc_devices", pc_devices);
    }

    #[test]
    fn block_ring_corpus_replays() {
        replay("block_ring", block_ring);
    }

    #[test]
    fn every_target_has_a_cargo_fuzz_binary() {
        let manifest =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
                .expect("fuzz/Cargo.toml");
        for (name, _) in TARGETS {
            assert!(
                manifest.contains(&alloc::format!("name = \"{name}\"")),
                "{name} has no [[bin]] in fuzz/Cargo.toml"
            );
        }
    }
}
