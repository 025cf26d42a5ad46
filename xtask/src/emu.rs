//! Emulators: QEMU (TCG, no VT-x here) and Bochs (`tigerlake`, VT-x with EPT, emulated).
//!
//! Either one gets its COM1 on a TCP socket on 127.0.0.1 that xtask connects to, so the same
//! code drives the console for `run` (bridged to the terminal) and for scenarios (judged).
//! Every emulator is a child process killed by its pid when its [`Running`] is dropped.

use std::io::{IsTerminal, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::build::{self, ImageOptions};
use crate::{deps, root};

/// The shell's prompt, which marks "ready for the next line".
pub const PROMPT: &str = "hv> ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    Qemu,
    Bochs,
}

impl Emulator {
    pub fn name(self) -> &'static str {
        match self {
            Emulator::Qemu => "qemu",
            Emulator::Bochs => "bochs",
        }
    }
}

/// How the hypervisor is loaded.
#[derive(Clone, Debug)]
pub enum Boot {
    /// A GRUB ISO (the real path: multiboot2).
    Iso(PathBuf),
    /// QEMU `-kernel` (multiboot1) with a command line: the fast path for QEMU scenarios.
    Kernel { elf: PathBuf, append: String },
}

/// One machine to start.
#[derive(Clone, Debug)]
pub struct Machine {
    pub emulator: Emulator,
    pub cpus: u32,
    pub mem_mib: u32,
    pub boot: Boot,
    /// Where the emulator's own log and config go.
    pub work_dir: PathBuf,
    /// Bochs: `clock: sync=none` (instruction-driven time, repeatable) instead of `realtime`.
    pub deterministic: bool,
    /// QEMU: boot by UEFI firmware (OVMF) instead of the BIOS.
    pub uefi: bool,
    /// QEMU: run on KVM with the host's CPU model (`-accel kvm -cpu host`), which offers VMX
    /// to the hypervisor where the host allows nested virtualization.
    pub kvm: bool,
    /// Hard disks on the PIIX IDE controller, each at its own position (ISO boot only).
    pub disks: Vec<Disk>,
    /// An e1000 NIC (dom0's physical NIC) on a user-mode network of this machine only.
    pub nic: Option<Nic>,
    /// A second serial port (COM2, 0x2f8, dom0's), written to `com2{tag}.log`.
    pub com2: bool,
    /// Inserted into the names of the emulator's files in `work_dir` (`bochsrc{tag}`,
    /// `bochs{tag}.log`, `emulator{tag}.out`), so that later boots of one scenario keep the
    /// earlier boots' files: "" for the first boot, ".2" for the second, ...
    pub tag: String,
}

/// The machine's NIC: an Intel 82540EM (e1000) on the PCI bus, on a user-mode (slirp)
/// network restricted to this machine: no route out; the network's host, 10.0.2.2, answers
/// ARP and ICMP echo (it is the network's gateway and DNS at 10.0.2.3); guests are
/// 10.0.2.15 and up. Bochs logs every frame on the wire to `slirp{tag}.log` (its
/// "packetmover" log); QEMU (the `--kvm` reruns) gets `-nic user,restrict=on,model=e1000`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// The NIC's own address (`xx:xx:xx:xx:xx:xx`).
    pub mac: String,
}

/// The NIC's MAC unless a scenario names another: QEMU's default prefix, 52:54:00.
pub const NIC_MAC: &str = "52:54:00:12:34:56";

impl Machine {
    /// The emulator's file `STEM{tag}EXT` in the work folder, e.g. `bochs.2.log`.
    pub fn file(&self, stem: &str, ext: &str) -> PathBuf {
        self.work_dir.join(format!("{stem}{}{ext}", self.tag))
    }
}

/// Where a hard disk sits on the i440FX/PIIX3 machine's two ATA channels. The boot CD-ROM is
/// ata0-master; disks take the other three positions, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtaPosition {
    /// 0: the primary channel (ports 0x1f0-0x1f7, control 0x3f6, IRQ 14); 1: the secondary
    /// (0x170-0x177, 0x376, IRQ 15).
    pub channel: u8,
    pub slave: bool,
}

/// The positions disks take, in the order they are listed: ata0-slave, ata1-master, ata1-slave.
pub const DISK_POSITIONS: [AtaPosition; 3] = [
    AtaPosition {
        channel: 0,
        slave: true,
    },
    AtaPosition {
        channel: 1,
        slave: false,
    },
    AtaPosition {
        channel: 1,
        slave: true,
    },
];

impl AtaPosition {
    /// Bochs' name: `ata0-slave`, `ata1-master`, ...
    pub fn bochs_name(self) -> String {
        format!(
            "ata{}-{}",
            self.channel,
            if self.slave { "slave" } else { "master" }
        )
    }

    /// QEMU's `-drive if=ide,index=N`: channel * 2 + unit.
    pub fn qemu_index(self) -> u8 {
        self.channel * 2 + u8::from(self.slave)
    }

    /// The channel's command block base (data register; status/command at +7), its control
    /// block base as Bochs' `ioaddr2` gives it (alternate status/device control at +6) and
    /// its IRQ: the legacy ISA compatibility mode the PIIX3 starts in.
    pub fn ports(self) -> (u16, u16, u8) {
        if self.channel == 0 {
            (0x1f0, 0x3f0, 14)
        } else {
            (0x170, 0x370, 15)
        }
    }
}

/// Heads and sectors per track of every disk image; cylinders follow from the size.
pub const DISK_HEADS: u64 = 16;
pub const DISK_SPT: u64 = 63;
/// Bytes per cylinder (16 heads x 63 sectors x 512 bytes): image sizes are a multiple of it,
/// so that the CHS geometry Bochs wants covers the whole file.
pub const CYLINDER_BYTES: u64 = DISK_HEADS * DISK_SPT * 512;
/// The most cylinders an ATA disk's CHS geometry has (16383 x 16 x 63: 8,422 MB).
pub const MAX_CYLINDERS: u64 = 16383;

/// The cylinders of a disk of at least `mib` MiB: its image is `cylinders * CYLINDER_BYTES`
/// bytes, the smallest such size not below `mib` MiB.
pub fn disk_cylinders(mib: u64) -> u64 {
    (mib << 20).div_ceil(CYLINDER_BYTES)
}

/// A raw (flat) disk image attached to the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub position: AtaPosition,
    /// Its size in cylinders of [`CYLINDER_BYTES`] (the file is exactly that long).
    pub cylinders: u64,
}

impl Disk {
    /// Bochs' lock file beside the image (`IMAGE.lock`), which a killed Bochs leaves behind
    /// and which makes the next Bochs refuse the image ("image locked").
    pub fn bochs_lock(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    }
}

/// Creates (or truncates to) a fresh sparse raw image of `cylinders` cylinders.
pub fn create_disk_image(path: &std::path::Path, cylinders: u64) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(cylinders * CYLINDER_BYTES)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The `bochsrc` lines of both ATA channels (Bochs' defaults, said outright): the PIIX3 IDE
/// function's two channels at their legacy ports and IRQs.
fn bochs_channel_lines() -> String {
    let mut out = String::new();
    for p in [DISK_POSITIONS[0], DISK_POSITIONS[1]] {
        let (cmd, ctl, irq) = p.ports();
        out += &format!(
            "ata{}: enabled=1, ioaddr1={cmd:#x}, ioaddr2={ctl:#x}, irq={irq}\n",
            p.channel
        );
    }
    out
}

/// The `bochsrc` lines of the disks, one per disk at its position.
fn bochs_disk_lines(disks: &[Disk]) -> String {
    let mut out = String::new();
    for d in disks {
        out += &format!(
            "{}: type=disk, path={}, mode=flat, cylinders={}, heads={DISK_HEADS}, spt={DISK_SPT}\n",
            d.position.bochs_name(),
            d.path.display(),
            d.cylinders
        );
    }
    out
}

/// QEMU's arguments for the boot CD-ROM and the disks. Without disks, `-cdrom` as always;
/// with disks the CD-ROM moves to ide0-master (`-cdrom` is index 2, ide1-master) so that
/// every disk sits where it does in Bochs, and `-nodefaults` keeps QEMU from putting its
/// empty default CD-ROM at ide1-master when no disk is there (serial, monitor and network
/// are given outright; the VGA card and floppy controller go, which nothing here uses).
fn qemu_iso_args(iso: &std::path::Path, disks: &[Disk]) -> Vec<String> {
    if disks.is_empty() {
        return vec![
            "-cdrom".into(),
            iso.display().to_string(),
            "-boot".into(),
            "d".into(),
        ];
    }
    let mut a = vec![
        "-nodefaults".into(),
        "-drive".into(),
        format!(
            "file={},if=ide,index=0,media=cdrom,readonly=on",
            iso.display()
        ),
    ];
    for d in disks {
        a.push("-drive".into());
        a.push(format!(
            "file={},if=ide,index={},media=disk,format=raw",
            d.path.display(),
            d.position.qemu_index()
        ));
    }
    a.push("-boot".into());
    a.push("d".into());
    a
}

/// A started emulator and its serial connection.
pub struct Running {
    child: Child,
    pub serial: TcpStream,
    pub started: Instant,
}

impl Running {
    /// Ends the emulator (by its pid) and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the emulator process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free TCP port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn bochsrc(m: &Machine, iso: &std::path::Path, port: u16) -> String {
    // With disks, Bochs' own messages (INFO and ERROR too) go to its log: what it made of
    // each disk at start-up, and what its ATA model says about the driver's commands.
    let (info, error) = if m.disks.is_empty() {
        ("ignore", "ignore")
    } else {
        ("report", "report")
    };
    format!(
        "megs: {mem}\n\
         cpu: model=tigerlake, count={cpus}, quantum=32, reset_on_triple_fault=1\n\
         romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
         vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
         pci: enabled=1, chipset=i440fx\n\
         {channels}\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         {disks}\
         boot: cdrom\n\
         clock: sync={sync}, time0=1\n\
         display_library: sdl2\n\
         com1: enabled=1, mode=socket-server, dev=127.0.0.1:{port}\n\
         {extra}\
         port_e9_hack: enabled=1\n\
         log: {log}\n\
         debug: action=ignore\n\
         info: action={info}\n\
         error: action={error}\n\
         panic: action=fatal\n",
        mem = m.mem_mib,
        cpus = m.cpus,
        iso = iso.display(),
        channels = bochs_channel_lines(),
        disks = bochs_disk_lines(&m.disks),
        sync = if m.deterministic { "none" } else { "realtime" },
        port = port,
        extra = bochs_nic_and_com2(m),
        log = m.file("bochs", ".log").display(),
    )
}

/// The `bochsrc` lines of the NIC and COM2, when the machine has them.
fn bochs_nic_and_com2(m: &Machine) -> String {
    let mut out = String::new();
    if let Some(nic) = &m.nic {
        out.push_str(&format!(
            "e1000: enabled=1, mac={}, ethmod=slirp, script={}\n",
            nic.mac,
            m.file("slirp", ".conf").display()
        ));
    }
    if m.com2 {
        out.push_str(&format!(
            "com2: enabled=1, mode=file, dev={}\n",
            m.file("com2", ".log").display()
        ));
    }
    out
}

/// Bochs' slirp configuration: restricted (no route out of this machine) and every frame
/// logged.
fn slirp_conf(m: &Machine) -> String {
    format!(
        "# slirp config\nrestricted = 1\npktlog = {}\n",
        m.file("slirp", ".log").display()
    )
}

/// Starts the machine and connects to its serial port.
pub fn start(m: &Machine) -> Result<Running, String> {
    std::fs::create_dir_all(&m.work_dir).map_err(|e| e.to_string())?;
    if !m.disks.is_empty() && !matches!(m.boot, Boot::Iso(_)) {
        return Err("disks need an ISO boot (they sit beside its CD-ROM)".into());
    }
    if !m.disks.is_empty() && m.uefi {
        return Err("disks need the BIOS machine (i440FX with PIIX3 IDE), not UEFI's q35".into());
    }
    for d in &m.disks {
        // A killed Bochs leaves its lock; this work folder is ours alone.
        let _ = std::fs::remove_file(d.bochs_lock());
    }
    let port = free_port()?;
    let stdout = std::fs::File::create(m.file("emulator", ".out")).map_err(|e| e.to_string())?;
    let stderr = stdout.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = match m.emulator {
        Emulator::Qemu => {
            deps::ensure(&[deps::QEMU])?;
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-m", &m.mem_mib.to_string(), "-smp", &m.cpus.to_string()]);
            c.args(["-display", "none", "-monitor", "none"]);
            match &m.nic {
                Some(nic) => c.args([
                    "-nic",
                    &format!("user,model=e1000,restrict=on,mac={}", nic.mac),
                ]),
                None => c.args(["-nic", "none"]),
            };
            if m.kvm {
                c.args(["-accel", "kvm", "-cpu", "host"]);
            }
            c.args([
                "-serial",
                &format!("tcp:127.0.0.1:{port},server=on,wait=on"),
            ]);
            if m.com2 {
                c.arg("-serial")
                    .arg(format!("file:{}", m.file("com2", ".log").display()));
            }
            if m.uefi {
                deps::ensure(&[deps::UEFI])?;
                // OVMF's variable store is written by the firmware: each run gets its own copy.
                let vars = m.work_dir.join("OVMF_VARS.fd");
                std::fs::copy(deps::OVMF_VARS, &vars)
                    .map_err(|e| format!("copy {} -> {}: {e}", deps::OVMF_VARS, vars.display()))?;
                c.args(["-machine", "q35"])
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        deps::OVMF_CODE
                    ))
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=1,file={}",
                        vars.display()
                    ));
            }
            match &m.boot {
                Boot::Iso(iso) => {
                    c.args(qemu_iso_args(iso, &m.disks));
                }
                Boot::Kernel { elf, append } => {
                    c.arg("-kernel").arg(elf).arg("-append").arg(append);
                }
            }
            c
        }
        Emulator::Bochs => {
            deps::ensure(&[deps::BOCHS])?;
            let Boot::Iso(iso) = &m.boot else {
                return Err("Bochs boots only ISOs".into());
            };
            let rc = m.file("bochsrc", "");
            std::fs::write(&rc, bochsrc(m, iso, port)).map_err(|e| e.to_string())?;
            if m.nic.is_some() {
                let conf = m.file("slirp", ".conf");
                std::fs::write(&conf, slirp_conf(m)).map_err(|e| e.to_string())?;
            }
            if m.com2 {
                // Bochs appends; each boot's file starts empty.
                std::fs::write(m.file("com2", ".log"), b"").map_err(|e| e.to_string())?;
            }
            let cont = m.work_dir.join("debugger.rc");
            std::fs::write(&cont, "c\n").map_err(|e| e.to_string())?;
            let mut c = Command::new("bochs-bin");
            c.arg("-q")
                .arg("-f")
                .arg(&rc)
                .arg("-rc")
                .arg(&cont)
                .env("SDL_VIDEODRIVER", "dummy");
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", m.emulator.name()))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_nodelay(true).ok();
            return Ok(Running {
                child,
                serial: s,
                started,
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(m.file("emulator", ".out")).unwrap_or_default();
            return Err(format!(
                "{} exited before its serial port opened ({status}):\n{log}",
                m.emulator.name()
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{}: serial port never opened", m.emulator.name()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the machine offers for running guests under real VT-x: QEMU with KVM, nested.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmProbe {
    /// `/dev/kvm` exists and opens read-write.
    pub dev_kvm: bool,
    /// The host CPU has `vmx` in /proc/cpuinfo.
    pub cpu_vmx: bool,
    /// `kvm_intel`'s `nested` parameter is on (None: the parameter is not there).
    pub nested: Option<bool>,
}

impl KvmProbe {
    /// Looks at this machine.
    pub fn here() -> Self {
        let dev_kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpu_vmx = std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| cpu_has_vmx(&t))
            .unwrap_or(false);
        let nested = std::fs::read_to_string("/sys/module/kvm_intel/parameters/nested")
            .ok()
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"));
        KvmProbe {
            dev_kvm,
            cpu_vmx,
            nested,
        }
    }

    /// Why QEMU with KVM cannot run guests of the hypervisor here, or None when it can.
    pub fn missing(&self) -> Option<&'static str> {
        if !self.dev_kvm {
            Some("/dev/kvm is missing or not usable by this user")
        } else if !self.cpu_vmx {
            Some(
                "this CPU does not offer VMX (no 'vmx' in /proc/cpuinfo), so KVM cannot pass VT-x on",
            )
        } else if self.nested != Some(true) {
            Some("KVM's nested virtualization is off (kvm_intel nested=N)")
        } else {
            None
        }
    }
}

/// Whether /proc/cpuinfo text lists the `vmx` flag.
pub fn cpu_has_vmx(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx"))
}

/// The machine `cargo xtask run` was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// The one that can run guests.
    Auto,
    Qemu,
    Bochs,
    Kvm,
}

/// The chosen machine: emulator, KVM or not, and the one line saying why.
#[derive(Debug, PartialEq, Eq)]
pub struct Choice {
    pub emulator: Emulator,
    pub kvm: bool,
    pub why: String,
}

/// Picks the machine: QEMU with KVM where it offers VT-x to guests, else Bochs (emulated VT-x);
/// `--qemu`/`--bochs` force one, `--kvm` fails with the reason when KVM cannot run guests.
pub fn choose(want: Want, probe: KvmProbe) -> Result<Choice, String> {
    let kvm = Choice {
        emulator: Emulator::Qemu,
        kvm: true,
        why: "QEMU with KVM: this CPU offers VT-x to guests (nested), so guests run at full speed"
            .into(),
    };
    match want {
        Want::Qemu => Ok(Choice {
            emulator: Emulator::Qemu,
            kvm: false,
            why: "QEMU (TCG), as asked: there is no VT-x in it, so the hypervisor starts no guests"
                .into(),
        }),
        Want::Bochs => Ok(Choice {
            emulator: Emulator::Bochs,
            kvm: false,
            why: "Bochs (tigerlake, emulated VT-x with EPT), as asked".into(),
        }),
        Want::Kvm => match probe.missing() {
            None => Ok(kvm),
            Some(why) => Err(format!("--kvm: cannot run QEMU with KVM here: {why}")),
        },
        Want::Auto => match probe.missing() {
            None => Ok(kvm),
            Some(why) => Ok(Choice {
                emulator: Emulator::Bochs,
                kvm: false,
                why: format!(
                    "Bochs (tigerlake, emulated VT-x with EPT), because KVM cannot run guests here: {why}"
                ),
            }),
        },
    }
}

/// The domains `cargo xtask run` boots when no `--guest` or `--module` is given: dom0 (its
/// pool on the run disks, the machine's NIC bridged to network `lan`), a guest with a disk
/// and a NIC that writes and checks patterns on a mirrored volume, one that says hello and
/// exits, one that stays running, and one that pings the host beyond dom0's NIC.
pub const DEFAULT_GUESTS: &[&str] = &[
    "dom0:name=dom0 role=dom0 mem=64 -- volume=data:64:mirror uplink=lan",
    "blkcheck:name=disk-demo disk=pool/data nic=lan -- mode=both seed=1",
    "hello:name=hello -- from cargo xtask run",
    "ticker:name=ticker mem=8 -- stay",
    "netcheck:name=net-demo mem=16 nic=lan -- role=echo ip=10.0.2.15 gw=10.0.2.2 count=4",
];

/// The disks `cargo xtask run` gives the machine (dom0 makes its pool on them on first use
/// and reopens it on later runs), in `target/run/disks`.
pub const RUN_DISKS: &[(&str, u64)] = &[("d0", 256), ("d1", 256)];

/// The run disks, created when missing (kept otherwise: the pool on them persists).
fn run_disks() -> Result<Vec<Disk>, String> {
    let dir = root().join("target").join("run").join("disks");
    let mut out = Vec::new();
    for (i, &(name, mib)) in RUN_DISKS.iter().enumerate() {
        let path = dir.join(format!("{name}.img"));
        let cylinders = disk_cylinders(mib);
        let right_size = std::fs::metadata(&path)
            .map(|m| m.len() == cylinders * CYLINDER_BYTES)
            .unwrap_or(false);
        if !right_size {
            create_disk_image(&path, cylinders)?;
        }
        let disk = Disk {
            path,
            position: DISK_POSITIONS[i],
            cylinders,
        };
        // A killed Bochs leaves a lock file that makes the next one refuse the image.
        let _ = std::fs::remove_file(disk.bochs_lock());
        out.push(disk);
    }
    Ok(out)
}

/// `cargo xtask run ...`.
pub fn run_command(args: &[String]) -> Result<(), String> {
    let mut want = Want::Auto;
    let mut cpus = 2;
    let mut mem = 256;
    let mut image_args = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--bochs" => want = Want::Bochs,
            "--qemu" => want = Want::Qemu,
            "--kvm" => want = Want::Kvm,
            "--smp" => {
                cpus = value("--smp")?
                    .parse()
                    .map_err(|_| "--smp takes a CPU count (1..64)")?
            }
            "--mem" => {
                mem = value("--mem")?
                    .parse()
                    .map_err(|_| "--mem takes MiB, e.g. 256")?
            }
            "--append" | "--module" | "--guest" => {
                image_args.push(a.clone());
                image_args.push(value(a)?);
            }
            other => {
                return Err(format!(
                    "run: unknown option '{other}' (see cargo xtask help)"
                ));
            }
        }
    }
    if !(1..=64).contains(&cpus) {
        return Err(format!("--smp {cpus}: must be 1..64"));
    }
    if !(64..=65536).contains(&mem) {
        return Err(format!("--mem {mem}: must be 64..65536 MiB"));
    }
    let choice = choose(want, KvmProbe::here())?;
    if !image_args.iter().any(|a| a == "--module" || a == "--guest") {
        for g in DEFAULT_GUESTS {
            image_args.push("--guest".into());
            image_args.push((*g).into());
        }
    }
    let mut options = ImageOptions::parse(&image_args)?;
    if options.append.is_empty() {
        options.append = "loglevel=info".into();
    }
    let iso = build::image(&options)?;
    let m = Machine {
        emulator: choice.emulator,
        cpus,
        mem_mib: mem,
        boot: Boot::Iso(iso),
        work_dir: root().join("target").join("run"),
        deterministic: false,
        uefi: false,
        kvm: choice.kvm,
        disks: run_disks()?,
        nic: Some(Nic {
            mac: NIC_MAC.into(),
        }),
        com2: true,
        tag: String::new(),
    };
    eprintln!("xtask: machine: {}", choice.why);
    eprintln!(
        "xtask: disks {} (dom0's pool; delete them to start afresh)",
        m.disks
            .iter()
            .map(|d| d.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "xtask: booting with {cpus} CPU(s), {mem} MiB and {} domain(s){}",
        options.modules.len(),
        if std::io::stdin().is_terminal() {
            "; Ctrl-] quits"
        } else {
            ""
        }
    );
    let mut running = start(&m)?;
    if std::io::stdin().is_terminal() {
        interactive(&mut running)
    } else {
        scripted(&mut running)
    }
}

/// Terminal in raw mode, bytes both ways, until Ctrl-] or the emulator exits.
fn interactive(r: &mut Running) -> Result<(), String> {
    let saved = Command::new("stty")
        .arg("-g")
        .stdin(Stdio::inherit())
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let _ = Command::new("stty")
        .args(["raw", "-echo"])
        .stdin(Stdio::inherit())
        .status();
    let mut to_vm = r.serial.try_clone().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut b = [0u8; 64];
        while let Ok(n) = stdin.read(&mut b) {
            if n == 0 || b[..n].contains(&0x1d) {
                let _ = to_vm.shutdown(std::net::Shutdown::Both);
                break;
            }
            if to_vm.write_all(&b[..n]).is_err() {
                break;
            }
        }
    });
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match r.serial.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
        }
    }
    let restore = String::from_utf8_lossy(&saved).trim().to_string();
    let _ = Command::new("stty")
        .arg(if restore.is_empty() { "sane" } else { &restore })
        .stdin(Stdio::inherit())
        .status();
    r.stop();
    eprintln!("\r\nxtask: emulator stopped");
    Ok(())
}

/// stdin is a pipe or file: each line is sent when the prompt appears; after the last line's
/// answer (the next prompt) the run ends.
fn scripted(r: &mut Running) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::stdin().read_to_string(&mut text);
        for line in text.lines() {
            let _ = tx.send(Some(line.to_string()));
        }
        let _ = tx.send(None);
    });
    r.serial
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut out = std::io::stdout();
    let mut seen = String::new();
    let mut prompts = 0usize;
    let mut sent = 0usize;
    let mut pending: std::collections::VecDeque<String> = Default::default();
    let mut eof = false;
    let mut last_output = Instant::now();
    let mut buf = [0u8; 4096];
    // Everything seen, for `@until REGEX` lines (held until the output matches; as in
    // scenario input, they consume no prompt).
    let mut all = String::new();
    loop {
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Some(l) => pending.push_back(l),
                None => eof = true,
            }
        }
        match r.serial.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                all.push_str(&String::from_utf8_lossy(&buf[..n]));
                last_output = Instant::now();
                // Count prompts without rescanning: keep only a tail that may hold a partial one.
                prompts += seen.matches(PROMPT).count();
                if let Some(i) = seen.rfind(PROMPT) {
                    seen.drain(..i + PROMPT.len());
                }
                let keep = seen.len().saturating_sub(PROMPT.len());
                seen.drain(..keep);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("serial connection: {e}")),
        }
        let mut held = false;
        if let Some(re) = pending.front().and_then(|l| l.strip_prefix("@until ")) {
            let re = regex::Regex::new(re).map_err(|e| format!("@until {re}: {e}"))?;
            if re.is_match(&all) {
                pending.pop_front();
            } else {
                held = true;
            }
        }
        if !held && prompts > sent {
            if let Some(line) = pending.pop_front() {
                r.serial
                    .write_all(format!("{line}\r").as_bytes())
                    .map_err(|e| e.to_string())?;
                sent += 1;
            } else if eof {
                break;
            }
        }
        if r.exited() {
            break;
        }
        if last_output.elapsed() > Duration::from_secs(300) {
            r.stop();
            return Err("no console output for 300 s; stopped the emulator".into());
        }
    }
    r.stop();
    println!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const KVM_OK: KvmProbe = KvmProbe {
        dev_kvm: true,
        cpu_vmx: true,
        nested: Some(true),
    };

    #[test]
    fn auto_takes_kvm_only_when_it_can_run_guests() {
        let c = choose(Want::Auto, KVM_OK).unwrap();
        assert_eq!((c.emulator, c.kvm), (Emulator::Qemu, true));
        // This machine's kind: /dev/kvm but no vmx flag.
        let here = KvmProbe {
            dev_kvm: true,
            cpu_vmx: false,
            nested: None,
        };
        let c = choose(Want::Auto, here).unwrap();
        assert_eq!((c.emulator, c.kvm), (Emulator::Bochs, false));
        assert!(c.why.contains("no 'vmx'"), "{}", c.why);
        let no_nested = KvmProbe {
            nested: Some(false),
            ..KVM_OK
        };
        assert_eq!(
            choose(Want::Auto, no_nested).unwrap().emulator,
            Emulator::Bochs
        );
        let no_dev = KvmProbe {
            dev_kvm: false,
            ..KVM_OK
        };
        assert!(choose(Want::Auto, no_dev).unwrap().why.contains("/dev/kvm"));
    }

    #[test]
    fn forced_choices() {
        let none = KvmProbe::default();
        assert!(!choose(Want::Qemu, KVM_OK).unwrap().kvm);
        assert_eq!(
            choose(Want::Bochs, KVM_OK).unwrap().emulator,
            Emulator::Bochs
        );
        let e = choose(Want::Kvm, none).unwrap_err();
        assert!(e.contains("--kvm") && e.contains("/dev/kvm"), "{e}");
        assert!(choose(Want::Kvm, KVM_OK).unwrap().kvm);
    }

    fn machine(disks: Vec<Disk>, tag: &str) -> Machine {
        Machine {
            emulator: Emulator::Bochs,
            cpus: 2,
            mem_mib: 256,
            boot: Boot::Iso(PathBuf::from("/t/x.iso")),
            work_dir: PathBuf::from("/w"),
            deterministic: true,
            uefi: false,
            kvm: false,
            disks,
            nic: None,
            com2: false,
            tag: tag.into(),
        }
    }

    fn disk(name: &str, position: usize, cylinders: u64) -> Disk {
        Disk {
            path: PathBuf::from(format!("/w/disks/{name}.img")),
            position: DISK_POSITIONS[position],
            cylinders,
        }
    }

    #[test]
    fn disk_geometry_covers_the_whole_image() {
        // 64 MiB: 130.03 cylinders of 516,096 bytes, so 131 (64.48 MiB).
        assert_eq!(CYLINDER_BYTES, 516_096);
        let c = disk_cylinders(64);
        assert_eq!(c, 131);
        assert!(c * CYLINDER_BYTES >= 64 << 20 && (c - 1) * CYLINDER_BYTES < 64 << 20);
        assert_eq!(disk_cylinders(1), 3);
        // Exactly whole cylinders stay as they are: 63 MiB = 128 cylinders.
        assert_eq!(disk_cylinders(63), 128);
        assert_eq!(128 * CYLINDER_BYTES, 63 << 20);
        // The largest scenario disk still has an ATA CHS geometry; one MiB more does not.
        assert_eq!(disk_cylinders(8063), 16382);
        assert!(disk_cylinders(8064) > MAX_CYLINDERS);
        // Whole 4 KiB blocks (the volume manager's), whatever the size.
        assert_eq!(CYLINDER_BYTES % 4096, 0);
    }

    #[test]
    fn ata_positions_names_indexes_and_ports() {
        let p: Vec<(String, u8, (u16, u16, u8))> = DISK_POSITIONS
            .iter()
            .map(|p| (p.bochs_name(), p.qemu_index(), p.ports()))
            .collect();
        assert_eq!(
            p,
            [
                ("ata0-slave".into(), 1, (0x1f0, 0x3f0, 14)),
                ("ata1-master".into(), 2, (0x170, 0x370, 15)),
                ("ata1-slave".into(), 3, (0x170, 0x370, 15)),
            ]
        );
        assert_eq!(
            disk("d0", 0, 3).bochs_lock(),
            PathBuf::from("/w/disks/d0.img.lock")
        );
    }

    #[test]
    fn bochsrc_attaches_disks_at_their_positions() {
        // d1 (ata1-master) detached: d2 keeps ata1-slave.
        let m = machine(vec![disk("d0", 0, 131), disk("d2", 2, 3)], ".2");
        let rc = bochsrc(&m, Path::new("/t/x.iso"), 4321);
        for line in [
            "pci: enabled=1, chipset=i440fx\n",
            "ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14\n",
            "ata1: enabled=1, ioaddr1=0x170, ioaddr2=0x370, irq=15\n",
            "ata0-master: type=cdrom, path=/t/x.iso, status=inserted\n\
             ata0-slave: type=disk, path=/w/disks/d0.img, mode=flat, cylinders=131, heads=16, spt=63\n\
             ata1-slave: type=disk, path=/w/disks/d2.img, mode=flat, cylinders=3, heads=16, spt=63\n\
             boot: cdrom\n",
            "log: /w/bochs.2.log\n",
            "info: action=report\nerror: action=report\npanic: action=fatal\n",
        ] {
            assert!(rc.contains(line), "no {line:?} in\n{rc}");
        }
        assert!(!rc.contains("ata1-master"), "{rc}");
        // Without disks: the same machine, Bochs' messages below panics not logged.
        let rc = bochsrc(&machine(vec![], ""), Path::new("/t/x.iso"), 4321);
        assert!(!rc.contains("type=disk"), "{rc}");
        assert!(rc.contains("pci: enabled=1, chipset=i440fx\n"), "{rc}");
        assert!(rc.contains("log: /w/bochs.log\n"), "{rc}");
        assert!(
            rc.contains("info: action=ignore\nerror: action=ignore\n"),
            "{rc}"
        );
        assert_eq!(
            m.file("emulator", ".out"),
            PathBuf::from("/w/emulator.2.out")
        );
    }

    #[test]
    fn qemu_puts_the_cdrom_first_when_there_are_disks() {
        let iso = Path::new("/t/x.iso");
        assert_eq!(
            qemu_iso_args(iso, &[]),
            ["-cdrom", "/t/x.iso", "-boot", "d"]
        );
        assert_eq!(
            qemu_iso_args(iso, &[disk("d0", 0, 3), disk("d2", 2, 3)]),
            [
                "-nodefaults",
                "-drive",
                "file=/t/x.iso,if=ide,index=0,media=cdrom,readonly=on",
                "-drive",
                "file=/w/disks/d0.img,if=ide,index=1,media=disk,format=raw",
                "-drive",
                "file=/w/disks/d2.img,if=ide,index=3,media=disk,format=raw",
                "-boot",
                "d",
            ]
        );
    }

    #[test]
    fn disk_images_are_fresh_sparse_files() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("xtask-disk-test-{}", std::process::id()));
        let path = dir.join("disks").join("d0.img");
        create_disk_image(&path, 3).unwrap();
        std::fs::write(&path, b"old data").unwrap();
        create_disk_image(&path, 131).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 131 * CYLINDER_BYTES);
        assert!(
            meta.blocks() * 512 < meta.len() / 2,
            "not sparse: {} blocks",
            meta.blocks()
        );
        let mut head = [0xffu8; 8];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        assert_eq!(head, [0; 8]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vmx_flag_in_cpuinfo() {
        assert!(cpu_has_vmx("processor : 0\nflags : fpu vme vmx sse\n"));
        assert!(!cpu_has_vmx("flags : fpu vme svm sse\nvmx flags : ept\n"));
    }
}
