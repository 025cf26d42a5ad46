//! Loads an ELF64 guest kernel (a boot module) into a domain's RAM and computes the state it
//! starts in: 64-bit mode, paging on with an identity map of the first GiB that the loader
//! builds, a flat GDT, the command line in memory (`RDI` = its address, `RSI` = its length,
//! `RDX` = RAM size).
//!
//! Guest-physical layout (below 1 MiB, reserved for the loader):
//! `0x1000` GDT, `0x2000` command line (at most 4 KiB), `0x3000` PML4, `0x4000` PDPT,
//! `0x5000`..`0x9000` four PDs (the first 4 GiB), stack below `0x80000`. The kernel's segments must lie at or above 1 MiB.
//! The ELF file is an allegation too: every offset and size is checked before use.

use alloc::vec::Vec;

use elf::ElfBytes;
use elf::abi::{EM_X86_64, ET_EXEC, PT_LOAD};
use elf::endian::LittleEndian;

use super::memory::{GuestAddr, GuestMemory, MemError};

pub const GDT_GPA: u64 = 0x1000;
pub const CMDLINE_GPA: u64 = 0x2000;
pub const CMDLINE_MAX: usize = 4095;
pub const PML4_GPA: u64 = 0x3000;
pub const STACK_TOP: u64 = 0x8_0000;
/// Lowest address a kernel segment may use.
pub const KERNEL_MIN: u64 = 0x10_0000;

/// The flat GDT: null, 64-bit code (0x08), data (0x10).
pub const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Why a guest image cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    NotElf(&'static str),
    /// Not an x86_64 executable.
    WrongKind,
    /// A segment lies outside `[1 MiB, RAM)` or its sizes are inconsistent.
    BadSegment {
        vaddr: u64,
        why: &'static str,
    },
    NoSegments,
    /// The entry point is not inside a loaded segment.
    BadEntry(u64),
    CommandLineTooLong,
    Memory(MemError),
    /// A Linux bzImage this loader cannot start.
    Linux(hv_platform::bootparams::BootError),
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LoadError::NotElf(why) => write!(f, "not an ELF64 file ({why})"),
            LoadError::WrongKind => f.write_str("not an x86_64 executable (ET_EXEC, EM_X86_64)"),
            LoadError::BadSegment { vaddr, why } => write!(f, "segment at {vaddr:#x}: {why}"),
            LoadError::NoSegments => f.write_str("no loadable segments"),
            LoadError::BadEntry(e) => {
                write!(f, "entry point {e:#x} is outside the loaded segments")
            }
            LoadError::CommandLineTooLong => {
                write!(f, "command line longer than {CMDLINE_MAX} bytes")
            }
            LoadError::Memory(e) => write!(f, "{e}"),
            LoadError::Linux(e) => write!(f, "{e}"),
        }
    }
}

impl From<MemError> for LoadError {
    fn from(b: MemError) -> Self {
        LoadError::Memory(b)
    }
}

/// One segment to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub file_offset: u64,
    pub file_size: u64,
    pub gpa: u64,
    pub mem_size: u64,
    pub executable: bool,
}

/// The checked result of reading the ELF headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

/// Reads and checks the headers of `image` for a guest with `ram` bytes.
pub fn plan(image: &[u8], ram: u64) -> Result<Plan, LoadError> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(image)
        .map_err(|_| LoadError::NotElf("bad header"))?;
    if file.ehdr.class != elf::file::Class::ELF64 {
        return Err(LoadError::NotElf("not 64-bit"));
    }
    if file.ehdr.e_type != ET_EXEC || file.ehdr.e_machine != EM_X86_64 {
        return Err(LoadError::WrongKind);
    }
    let phdrs = file.segments().ok_or(LoadError::NoSegments)?;
    let mut segments = Vec::new();
    for ph in phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
    {
        let bad = |why| LoadError::BadSegment {
            vaddr: ph.p_vaddr,
            why,
        };
        if ph.p_filesz > ph.p_memsz {
            return Err(bad("file size larger than memory size"));
        }
        let file_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .ok_or(bad("file range overflows"))?;
        if file_end > image.len() as u64 {
            return Err(bad("file range beyond the end of the image"));
        }
        let gpa = ph.p_paddr;
        let end = gpa
            .checked_add(ph.p_memsz)
            .ok_or(bad("memory range overflows"))?;
        if gpa < KERNEL_MIN {
            return Err(bad("below 1 MiB (reserved for the loader)"));
        }
        if end > ram {
            return Err(bad("beyond the domain's RAM"));
        }
        if ph.p_vaddr != ph.p_paddr {
            return Err(bad(
                "virtual and physical addresses differ (identity-mapped kernels only)",
            ));
        }
        segments.push(Segment {
            file_offset: ph.p_offset,
            file_size: ph.p_filesz,
            gpa,
            mem_size: ph.p_memsz,
            executable: ph.p_flags & elf::abi::PF_X != 0,
        });
    }
    if segments.is_empty() {
        return Err(LoadError::NoSegments);
    }
    for (i, a) in segments.iter().enumerate() {
        for b in &segments[i + 1..] {
            if a.gpa < b.gpa + b.mem_size && b.gpa < a.gpa + a.mem_size {
                return Err(LoadError::BadSegment {
                    vaddr: b.gpa,
                    why: "overlaps another segment",
                });
            }
        }
    }
    let entry = file.ehdr.e_entry;
    if !segments
        .iter()
        .any(|s| s.executable && entry >= s.gpa && entry < s.gpa + s.mem_size)
    {
        return Err(LoadError::BadEntry(entry));
    }
    Ok(Plan { entry, segments })
}

/// Where the guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootState {
    pub rip: u64,
    pub rsp: u64,
    pub cr3: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    /// Code and data selectors in the GDT (the Linux boot protocol wants 0x10 and 0x18).
    pub cs: u16,
    pub ds: u16,
}

#[cfg(target_os = "none")]
impl BootState {
    /// The vCPU entry state the VMCS is filled from.
    pub fn entry(&self) -> crate::vmx::setup::GuestEntry {
        crate::vmx::setup::GuestEntry {
            rip: self.rip,
            rsp: self.rsp,
            cr3: self.cr3,
            gdt_base: self.gdt_base,
            gdt_limit: self.gdt_limit,
            cs: self.cs,
            ds: self.ds,
        }
    }
}

/// Copies the image into `mem` and builds the loader structures.
pub fn load(image: &[u8], mem: &impl GuestMemory, cmdline: &str) -> Result<BootState, LoadError> {
    let plan = plan(image, mem.end())?;
    if cmdline.len() > CMDLINE_MAX {
        return Err(LoadError::CommandLineTooLong);
    }
    for s in &plan.segments {
        let data = &image[s.file_offset as usize..(s.file_offset + s.file_size) as usize];
        mem.write(GuestAddr(s.gpa), data)?;
        mem.zero(GuestAddr(s.gpa + s.file_size), s.mem_size - s.file_size)?;
    }
    let mut gdt = [0u8; 24];
    for (i, d) in GDT.iter().enumerate() {
        gdt[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    mem.write(GuestAddr(GDT_GPA), &gdt)?;
    mem.zero(GuestAddr(CMDLINE_GPA), 4096)?;
    mem.write(GuestAddr(CMDLINE_GPA), cmdline.as_bytes())?;
    identity_map(mem)?;
    Ok(BootState {
        rip: plan.entry,
        rsp: STACK_TOP - 8,
        cr3: PML4_GPA,
        gdt_base: GDT_GPA,
        gdt_limit: (GDT.len() * 8 - 1) as u16,
        rdi: CMDLINE_GPA,
        rsi: cmdline.len() as u64,
        rdx: mem.end(),
        cs: 0x08,
        ds: 0x10,
    })
}

/// The page tables every domain starts with (at [`PML4_GPA`]).
fn identity_map(mem: &impl GuestMemory) -> Result<(), LoadError> {
    // PML4[0] -> PDPT, PDPT[0..4] -> four PDs: 2 MiB identity pages over the first 4 GiB,
    // RAM or not: the guest's page tables do not protect anything, the EPT does (an access past
    // RAM reaches the hypervisor as an EPT violation, not the guest as a page fault).
    let (pdpt, pd) = (PML4_GPA + 0x1000, PML4_GPA + 0x2000);
    mem.zero(GuestAddr(PML4_GPA), 6 * 4096)?;
    mem.write(GuestAddr(PML4_GPA), &(pdpt | 3).to_le_bytes())?;
    for g in 0..4u64 {
        mem.write(
            GuestAddr(pdpt + g * 8),
            &((pd + g * 0x1000) | 3).to_le_bytes(),
        )?;
        let mut entries = [0u8; 4096];
        for (i, e) in entries.chunks_exact_mut(8).enumerate() {
            let page = (g << 30) | ((i as u64) << 21);
            e.copy_from_slice(&(page | 0x83).to_le_bytes());
        }
        mem.write(GuestAddr(pd + g * 0x1000), &entries)?;
    }
    Ok(())
}

/// The zero page of a Linux kernel (after the loader's page tables).
pub const ZERO_PAGE_GPA: u64 = 0x9000;
/// The GDT the Linux boot protocol asks for: flat code at 0x10, flat data at 0x18.
pub const LINUX_GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Loads a Linux bzImage by the 64-bit boot protocol: the protected-mode kernel at its
/// preferred address, the initrd as high as it may go, the ACPI tables (`acpi`: the bytes and
/// where they go), the command line and the zero page; the vCPU starts at the 64-bit entry in
/// long mode with the first 4 GiB identity-mapped, `RSI` pointing at the zero page.
pub fn load_linux(
    image: &[u8],
    initrd: Option<&[u8]>,
    acpi: (u64, &[u8], u64),
    mem: &impl GuestMemory,
    cmdline: &str,
) -> Result<BootState, LoadError> {
    use hv_platform::bootparams as bp;
    let linux = |e: bp::BootError| LoadError::Linux(e);
    let k = bp::parse(image).map_err(linux)?;
    let ram = mem.end();
    bp::check_fits(&k, ram).map_err(linux)?;
    if cmdline.len() > CMDLINE_MAX.min(k.cmdline_max) {
        return Err(LoadError::CommandLineTooLong);
    }
    mem.write(GuestAddr(k.load_addr), k.kernel)?;
    let initrd_at = match initrd {
        Some(data) => {
            let at = bp::place_initrd(&k, ram, data.len() as u64).map_err(linux)?;
            mem.write(GuestAddr(at), data)?;
            Some((at, data.len() as u64))
        }
        None => None,
    };
    let (acpi_at, tables, rsdp) = acpi;
    mem.write(GuestAddr(acpi_at), tables)?;
    mem.write(GuestAddr(bp::RESET_VECTOR), &bp::RESET_STUB)?;
    let mut gdt = [0u8; 32];
    for (i, d) in LINUX_GDT.iter().enumerate() {
        gdt[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    mem.write(GuestAddr(GDT_GPA), &gdt)?;
    mem.zero(GuestAddr(CMDLINE_GPA), 4096)?;
    mem.write(GuestAddr(CMDLINE_GPA), cmdline.as_bytes())?;
    identity_map(mem)?;
    let map = bp::pc_memory_map(ram, (acpi_at, tables.len().next_multiple_of(4096) as u64));
    let zero = bp::zero_page(
        &k,
        &bp::Placement {
            cmdline_gpa: CMDLINE_GPA,
            cmdline_len: cmdline.len(),
            initrd: initrd_at,
            rsdp,
        },
        &map,
    )
    .map_err(linux)?;
    mem.write(GuestAddr(ZERO_PAGE_GPA), &zero)?;
    Ok(BootState {
        rip: k.load_addr + bp::ENTRY_64_OFFSET,
        rsp: STACK_TOP - 8,
        cr3: PML4_GPA,
        gdt_base: GDT_GPA,
        gdt_limit: (LINUX_GDT.len() * 8 - 1) as u16,
        rdi: 0,
        rsi: ZERO_PAGE_GPA,
        rdx: 0,
        cs: 0x10,
        ds: 0x18,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::memory::VecGuestMemory;

    /// A minimal ELF64 executable: one PT_LOAD segment with `code` at `addr`.
    pub(crate) fn tiny_elf(addr: u64, code: &[u8], memsz: u64, entry: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x78];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R X
        f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
        f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn loads_segments_zeroes_bss_and_builds_page_tables() {
        let code = [0xf4u8, 0xeb, 0xfd];
        let image = tiny_elf(0x10_0000, &code, 0x2000, 0x10_0000);
        let mem = VecGuestMemory::new(0, 4 << 20);
        mem.write(GuestAddr(0), &vec![0xaa; 4 << 20]).unwrap();
        let st = load(&image, &mem, "hello world").unwrap();
        let bytes = mem.to_vec();
        assert_eq!(st.rip, 0x10_0000);
        assert_eq!(&bytes[0x10_0000..0x10_0003], &code);
        assert!(
            bytes[0x10_0003..0x10_2000].iter().all(|&b| b == 0),
            "bss zeroed"
        );
        assert_eq!(&bytes[0x2000..0x200b], b"hello world");
        assert_eq!((st.rdi, st.rsi, st.rdx), (CMDLINE_GPA, 11, 4 << 20));
        let pd = 0x5000;
        assert_eq!(
            u64::from_le_bytes(bytes[pd + 8..pd + 16].try_into().unwrap()),
            (1 << 21) | 0x83
        );
        let last = pd + 3 * 4096 + 511 * 8;
        assert_eq!(
            u64::from_le_bytes(bytes[last..last + 8].try_into().unwrap()),
            (3 << 30) | (511 << 21) | 0x83,
            "the whole first 4 GiB"
        );
        // The guest's page walk agrees.
        let gpa = crate::domain::memory::translate(&mem, st.cr3, 0xfec0_0010);
        assert_eq!(gpa, Some(0xfec0_0010));
        assert_eq!(st.cr3, PML4_GPA);
        assert_eq!(st.rsp % 16, 8, "as after a call");
    }

    #[test]
    fn hostile_images_are_refused() {
        let ram = 4 << 20;
        assert!(matches!(
            plan(b"not an elf", ram),
            Err(LoadError::NotElf(_))
        ));
        // Below 1 MiB.
        let low = tiny_elf(0x8000, &[0xf4], 0x10, 0x8000);
        assert!(matches!(
            plan(&low, ram),
            Err(LoadError::BadSegment {
                why: "below 1 MiB (reserved for the loader)",
                ..
            })
        ));
        // Past RAM.
        let big = tiny_elf(0x10_0000, &[0xf4], 8 << 20, 0x10_0000);
        assert!(matches!(
            plan(&big, ram),
            Err(LoadError::BadSegment {
                why: "beyond the domain's RAM",
                ..
            })
        ));
        // Entry outside.
        let e = tiny_elf(0x10_0000, &[0xf4], 0x10, 0x20_0000);
        assert_eq!(plan(&e, ram), Err(LoadError::BadEntry(0x20_0000)));
        // File size claims more bytes than the file has.
        let mut trunc = tiny_elf(0x10_0000, &[0xf4; 16], 0x10, 0x10_0000);
        trunc.truncate(0x78 + 4);
        assert!(matches!(
            plan(&trunc, ram),
            Err(LoadError::BadSegment { .. })
        ));
        // Overflowing addresses.
        let wrap = tiny_elf(u64::MAX - 4, &[0xf4], 0x10, u64::MAX - 4);
        assert!(matches!(
            plan(&wrap, ram),
            Err(LoadError::BadSegment { .. })
        ));
        let long = "x".repeat(CMDLINE_MAX + 1);
        let ok = tiny_elf(0x10_0000, &[0xf4], 0x10, 0x10_0000);
        let mem = VecGuestMemory::new(0, ram as usize);
        assert_eq!(load(&ok, &mem, &long), Err(LoadError::CommandLineTooLong));
    }
}
