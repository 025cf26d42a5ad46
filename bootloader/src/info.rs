//! The neutral `BootInfo` the hypervisor starts from, and its parsing from multiboot1 and
//! multiboot2 information structures.
//!
//! Parsing uses the `multiboot` and `multiboot2` crates. Everything is copied into fixed-size
//! storage here, before any allocator exists, so the loader's structures can be reused as free
//! memory afterwards (their range is still reported in [`BootInfo::info_range`]).

use heapless::{String, Vec};

/// Most memory-map entries kept; firmware maps on servers have tens, not hundreds.
pub const MAX_REGIONS: usize = 128;
/// Most boot modules kept.
pub const MAX_MODULES: usize = 16;

/// `EAX` at entry from a multiboot1 loader.
pub const MULTIBOOT1_MAGIC: u32 = 0x2BAD_B002;
/// `EAX` at entry from a multiboot2 loader.
pub const MULTIBOOT2_MAGIC: u32 = 0x36D7_6289;

/// What a range of physical memory is, as the firmware says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Free RAM.
    Usable,
    /// Reserved by firmware or a device; never touch.
    Reserved,
    /// RAM holding ACPI tables; reusable after the tables are read.
    AcpiReclaimable,
    /// ACPI non-volatile storage; never touch.
    AcpiNvs,
    /// Defective RAM.
    Defective,
}

/// One entry of the physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub start: u64,
    pub len: u64,
    pub kind: MemoryKind,
}

impl MemoryRegion {
    /// First byte past the region (saturating: firmware maps can be nonsense).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// A boot module (a domain image, an initrd) the loader placed in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    /// The module's command line; truncated to capacity if longer.
    pub cmdline: String<128>,
}

/// Which loader protocol brought us here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    Multiboot1,
    Multiboot2,
}

/// Everything the hypervisor needs to know about how it was booted.
#[derive(Clone, Debug)]
pub struct BootInfo {
    pub protocol: BootProtocol,
    pub loader_name: String<64>,
    pub command_line: String<512>,
    pub memory: Vec<MemoryRegion, MAX_REGIONS>,
    /// More regions were reported than [`MAX_REGIONS`]; the rest were dropped (never used).
    pub memory_truncated: bool,
    pub modules: Vec<Module, MAX_MODULES>,
    /// Physical address of the ACPI RSDP if the loader handed one over (multiboot2 does).
    pub rsdp: Option<u64>,
    /// Physical range `[start, end)` of the loader's information structure.
    pub info_range: (u64, u64),
    /// TSC at the first instruction of `_start`.
    pub entry_tsc: u64,
}

/// Why the boot information could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// `EAX` held neither multiboot magic: not started by a multiboot loader.
    UnknownMagic(u32),
    /// The structure is malformed; the text says which part.
    Malformed(&'static str),
    /// The loader gave no memory map, so no memory can be used safely.
    NoMemoryMap,
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::UnknownMagic(m) => write!(
                f,
                "not started by a multiboot loader (EAX={m:#x}; expected {MULTIBOOT1_MAGIC:#x} or {MULTIBOOT2_MAGIC:#x})"
            ),
            BootError::Malformed(what) => write!(f, "malformed boot information: {what}"),
            BootError::NoMemoryMap => write!(f, "the boot loader gave no memory map"),
        }
    }
}

fn push_str<const N: usize>(dst: &mut String<N>, src: &str) {
    for c in src.chars() {
        if dst.push(c).is_err() {
            break;
        }
    }
}

fn str_of<const N: usize>(src: &str) -> String<N> {
    let mut s = String::new();
    push_str(&mut s, src);
    s
}

/// Parses the structure a multiboot loader left at `addr`.
///
/// # Safety
/// `addr` must be the address the loader passed with `magic`, readable through an identity
/// mapping, and the structure (and what it points to) must be unchanged since the loader ran.
pub unsafe fn parse(magic: u32, addr: u64) -> Result<BootInfo, BootError> {
    match magic {
        // SAFETY: forwarded from this function's contract.
        MULTIBOOT2_MAGIC => unsafe { parse_multiboot2(addr as usize as *const u8) },
        // SAFETY: forwarded from this function's contract.
        MULTIBOOT1_MAGIC => unsafe { parse_multiboot1(addr) },
        other => Err(BootError::UnknownMagic(other)),
    }
}

fn kind_of_mb2(t: multiboot2::MemoryAreaType) -> MemoryKind {
    use multiboot2::MemoryAreaType as T;
    match t {
        T::Available => MemoryKind::Usable,
        T::AcpiAvailable => MemoryKind::AcpiReclaimable,
        T::ReservedHibernate => MemoryKind::AcpiNvs,
        T::Defective => MemoryKind::Defective,
        T::Reserved | T::Custom(_) => MemoryKind::Reserved,
    }
}

/// Parses a multiboot2 information structure.
///
/// # Safety
/// `ptr` must point to a multiboot2 information structure that stays valid while this runs.
pub unsafe fn parse_multiboot2(ptr: *const u8) -> Result<BootInfo, BootError> {
    // SAFETY: forwarded from this function's contract.
    let mbi = unsafe { multiboot2::BootInformation::load(ptr.cast()) }
        .map_err(|_| BootError::Malformed("multiboot2 header (size or alignment)"))?;
    let mut info = BootInfo {
        protocol: BootProtocol::Multiboot2,
        loader_name: String::new(),
        command_line: String::new(),
        memory: Vec::new(),
        memory_truncated: false,
        modules: Vec::new(),
        rsdp: None,
        info_range: (mbi.start_address() as u64, mbi.end_address() as u64),
        entry_tsc: 0,
    };
    if let Some(name) = mbi.boot_loader_name_tag().and_then(|t| t.name().ok()) {
        push_str(&mut info.loader_name, name);
    }
    if let Some(cmd) = mbi.command_line_tag().and_then(|t| t.cmdline().ok()) {
        push_str(&mut info.command_line, cmd);
    }
    let mmap = mbi.memory_map_tag().ok_or(BootError::NoMemoryMap)?;
    for area in mmap.memory_areas() {
        let region = MemoryRegion {
            start: area.start_address(),
            len: area.size(),
            kind: kind_of_mb2(area.typ().into()),
        };
        if info.memory.push(region).is_err() {
            info.memory_truncated = true;
        }
    }
    for m in mbi.module_tags() {
        let module = Module {
            start: u64::from(m.start_address()),
            end: u64::from(m.end_address()),
            cmdline: str_of(m.cmdline().unwrap_or("")),
        };
        if module.end < module.start {
            return Err(BootError::Malformed("module ends before it starts"));
        }
        if info.modules.push(module).is_err() {
            return Err(BootError::Malformed(
                "more boot modules than the hypervisor accepts (16)",
            ));
        }
    }
    // The RSDP is copied into the tag, right after the 8-byte tag header.
    if let Some(t) = mbi.rsdp_v2_tag() {
        info.rsdp = Some((t as *const _ as *const u8 as usize + 8) as u64);
    } else if let Some(t) = mbi.rsdp_v1_tag() {
        info.rsdp = Some((t as *const _ as *const u8 as usize + 8) as u64);
    }
    Ok(info)
}

/// Identity-mapped physical memory for the `multiboot` crate (it never allocates here).
struct IdentityMemory;

impl multiboot::information::MemoryManagement for IdentityMemory {
    unsafe fn paddr_to_slice(
        &self,
        addr: multiboot::information::PAddr,
        length: usize,
    ) -> Option<&'static [u8]> {
        let ptr = usize::try_from(addr).ok()? as *const u8;
        if ptr.is_null() {
            return None;
        }
        // SAFETY: physical memory is identity-mapped while boot information is parsed, and the
        // crate asks only for ranges the loader described (see `parse`'s contract).
        Some(unsafe { core::slice::from_raw_parts(ptr, length) })
    }

    unsafe fn allocate(
        &mut self,
        _length: usize,
    ) -> Option<(multiboot::information::PAddr, &mut [u8])> {
        None
    }

    unsafe fn deallocate(&mut self, _addr: multiboot::information::PAddr) {}
}

/// Parses a multiboot1 information structure.
///
/// # Safety
/// As for [`parse`]: `addr` is the loader's structure, identity-mapped and unchanged.
pub unsafe fn parse_multiboot1(addr: u64) -> Result<BootInfo, BootError> {
    use multiboot::information::{MemoryType, Multiboot};
    let mut mem = IdentityMemory;
    // SAFETY: forwarded from this function's contract.
    let mb = unsafe { Multiboot::from_ptr(addr, &mut mem) }
        .ok_or(BootError::Malformed("multiboot1 information structure"))?;
    let mut info = BootInfo {
        protocol: BootProtocol::Multiboot1,
        loader_name: str_of(mb.boot_loader_name().unwrap_or("")),
        command_line: str_of(mb.command_line().unwrap_or("")),
        memory: Vec::new(),
        memory_truncated: false,
        modules: Vec::new(),
        rsdp: None,
        // The fixed part is 116 bytes; strings and tables it points to are separate.
        info_range: (addr, addr + 116),
        entry_tsc: 0,
    };
    let regions = mb.memory_regions().ok_or(BootError::NoMemoryMap)?;
    for r in regions {
        let kind = match r.memory_type() {
            MemoryType::Available => MemoryKind::Usable,
            MemoryType::ACPI => MemoryKind::AcpiReclaimable,
            MemoryType::NVS => MemoryKind::AcpiNvs,
            MemoryType::Defect => MemoryKind::Defective,
            MemoryType::Reserved => MemoryKind::Reserved,
        };
        let region = MemoryRegion {
            start: r.base_address(),
            len: r.length(),
            kind,
        };
        if info.memory.push(region).is_err() {
            info.memory_truncated = true;
        }
    }
    if let Some(mods) = mb.modules() {
        for m in mods {
            if m.end < m.start {
                return Err(BootError::Malformed("module ends before it starts"));
            }
            let module = Module {
                start: m.start,
                end: m.end,
                cmdline: str_of(m.string.unwrap_or("")),
            };
            if info.modules.push(module).is_err() {
                return Err(BootError::Malformed(
                    "more boot modules than the hypervisor accepts (16)",
                ));
            }
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use multiboot2::{
        Builder, CommandLineTag, MaybeDynSized, MemoryArea, MemoryMapTag, ModuleTag, RsdpV2Tag,
    };

    #[test]
    fn multiboot2_structure_is_copied_out() {
        let mbi = Builder::new()
            .cmdline(CommandLineTag::new("loglevel=debug hv.test-fault=pf"))
            .mmap(MemoryMapTag::new(&[
                MemoryArea::new(0, 0x9fc00, 1),
                MemoryArea::new(0x100000, 0x7ee0000, 1),
                MemoryArea::new(0x7fe0000, 0x20000, 2),
                MemoryArea::new(0x7ff0000, 0x10000, 3),
            ]))
            .add_module(ModuleTag::new(0x200000, 0x280000, "dom0 console=hvc"))
            .rsdpv2(RsdpV2Tag::new(
                0, *b"BOCHS ", 2, 0x7fe1000, 36, 0x7fe1100, 0,
            ))
            .build();
        let ptr = mbi.as_bytes().as_ptr();
        // SAFETY: `mbi` is a complete multiboot2 structure alive for the whole call.
        let info = unsafe { parse_multiboot2(ptr) }.expect("parses");
        assert_eq!(info.protocol, BootProtocol::Multiboot2);
        assert_eq!(
            info.command_line.as_str(),
            "loglevel=debug hv.test-fault=pf"
        );
        assert_eq!(info.memory.len(), 4);
        assert_eq!(info.memory[1].kind, MemoryKind::Usable);
        assert_eq!(info.memory[1].end(), 0x7fe0000);
        assert_eq!(info.memory[2].kind, MemoryKind::Reserved);
        assert_eq!(info.memory[3].kind, MemoryKind::AcpiReclaimable);
        assert_eq!(info.modules.len(), 1);
        assert_eq!(info.modules[0].start, 0x200000);
        assert_eq!(info.modules[0].cmdline.as_str(), "dom0 console=hvc");
        let rsdp = info.rsdp.expect("rsdp tag seen") as usize;
        // The reported address points at the RSDP copy: it starts with its signature.
        // SAFETY: inside `mbi`, which is alive.
        let sig = unsafe { core::slice::from_raw_parts(rsdp as *const u8, 8) };
        assert_eq!(sig, b"RSD PTR ");
        assert_eq!(info.info_range.0, ptr as u64);
        assert!(info.info_range.1 > info.info_range.0);
    }

    #[test]
    fn missing_memory_map_is_an_error() {
        let mbi = Builder::new().cmdline(CommandLineTag::new("x")).build();
        // SAFETY: as above.
        let r = unsafe { parse_multiboot2(mbi.as_bytes().as_ptr()) };
        assert_eq!(r.unwrap_err(), BootError::NoMemoryMap);
    }

    #[test]
    fn unknown_magic_is_reported() {
        // SAFETY: the address is never read for an unknown magic.
        let r = unsafe { parse(0xdead_beef, 0) };
        let err = r.unwrap_err();
        assert_eq!(err, BootError::UnknownMagic(0xdead_beef));
        let mut text = std::string::String::new();
        core::fmt::write(&mut text, format_args!("{err}")).unwrap();
        assert!(text.contains("0xdeadbeef"), "{text}");
    }

    #[test]
    fn multiboot1_structure_is_copied_out() {
        // A hand-laid multiboot1 info block: flags, mmap, cmdline and one module.
        // The multiboot1 format holds 32-bit addresses: place the block below 4 GiB.
        // SAFETY: an anonymous private mapping, no aliasing; unmapped at the end of the test.
        let page = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        // SAFETY: the mapping above is 4096 writable bytes owned by this test.
        let mem = unsafe { core::slice::from_raw_parts_mut(page.cast::<u8>(), 4096) };
        let base = mem.as_mut_ptr() as u64;
        assert!(base + 4096 <= u64::from(u32::MAX));
        let put32 =
            |m: &mut [u8], off: usize, v: u32| m[off..off + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |m: &mut [u8], off: usize, v: u64| m[off..off + 8].copy_from_slice(&v.to_le_bytes());
        // flags: mem (0), cmdline (2), mods (3), mmap (6)
        put32(mem, 0, (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6));
        put32(mem, 4, 639);
        put32(mem, 8, 130048);
        let cmd_off = 512;
        mem[cmd_off..cmd_off + 11].copy_from_slice(b"loglevel=4\0");
        put32(mem, 16, (base + cmd_off as u64) as u32);
        let mod_off = 1024;
        put32(mem, mod_off, 0x300000);
        put32(mem, mod_off + 4, 0x310000);
        put32(mem, 20, 1);
        put32(mem, 24, (base + mod_off as u64) as u32);
        let mmap_off = 2048;
        // entries: size(4) base(8) len(8) type(4)
        put32(mem, mmap_off, 20);
        put64(mem, mmap_off + 4, 0);
        put64(mem, mmap_off + 12, 0x9f000);
        put32(mem, mmap_off + 20, 1);
        put32(mem, mmap_off + 24, 20);
        put64(mem, mmap_off + 28, 0x100000);
        put64(mem, mmap_off + 36, 0x1000000);
        put32(mem, mmap_off + 44, 1);
        put32(mem, 44, 48);
        put32(mem, 48, (base + mmap_off as u64) as u32);
        // SAFETY: `mem` holds a complete structure and is alive for the call.
        let info = unsafe { parse(MULTIBOOT1_MAGIC, base) }.expect("parses");
        assert_eq!(info.protocol, BootProtocol::Multiboot1);
        assert_eq!(info.command_line.as_str(), "loglevel=4");
        assert_eq!(info.memory.len(), 2);
        assert_eq!(info.memory[1].start, 0x100000);
        assert_eq!(info.modules.len(), 1);
        assert_eq!(info.modules[0].end, 0x310000);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(page, 4096) };
    }
}
