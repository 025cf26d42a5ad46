//! The Linux x86 boot protocol (the kernel's `Documentation/arch/x86/boot.rst` and
//! `zero-page.rst`): the setup header of a bzImage, checked, and the "zero page"
//! (`struct boot_params`) a loader hands the kernel's 64-bit entry in `RSI`.
//!
//! Only the 64-bit entry is supported: the image must say `XLF_KERNEL_64` (protocol 2.12 or
//! later), and the loader enters it at the protected-mode kernel's address plus 0x200, in long
//! mode, with the ranges it uses identity-mapped. The image is an allegation like any guest
//! input: every field used is checked against the file's size and the domain's RAM.

use alloc::vec::Vec;

/// Size of the zero page.
pub const ZERO_PAGE_LEN: usize = 4096;
/// Offset of the 64-bit entry point in the protected-mode kernel.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Most e820 entries the zero page holds.
pub const E820_MAX: usize = 128;

/// Where a PC starts after a reset, in real mode (F000:FFF0), and where Linux jumps to reboot
/// "through the BIOS". That is its choice on a hardware-reduced ACPI machine without EFI
/// (`efi_reboot_required()` picks BOOT_EFI, which then falls through to BOOT_BIOS), so the
/// guest's ACPI reset register alone is never written. The domain has no firmware; this is all
/// of it: [`RESET_STUB`] sits here, in the reserved BIOS area (`pc_memory_map`).
pub const RESET_VECTOR: u64 = 0xf_fff0;

/// The reset vector's code (16-bit real mode): `mov al, RESET_VALUE; mov dx, RESET_PORT;
/// out dx, al; hlt; jmp $-1`. The write resets the domain; the loop is never reached.
pub const RESET_STUB: [u8; 9] = [
    0xb0,
    crate::acpi::RESET_VALUE,
    0xba,
    crate::acpi::RESET_PORT.to_le_bytes()[0],
    crate::acpi::RESET_PORT.to_le_bytes()[1],
    0xee,
    0xf4,
    0xeb,
    0xfd,
];

/// Offsets in the zero page (`struct boot_params`) and its setup header.
mod off {
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_TABLE: usize = 0x2d0;
}

/// `xloadflags` bit 0: the kernel has the 64-bit entry at 0x200.
const XLF_KERNEL_64: u16 = 1;
/// `loadflags` bit 0: the protected-mode kernel is loaded at 1 MiB or above.
const LOADED_HIGH: u8 = 1;

/// Why an image is not a bzImage this loader can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// No "HdrS" signature at 0x202, or the file is shorter than its setup code says.
    NotBzImage(&'static str),
    /// Boot protocol older than 2.12 (no `xloadflags`), or no 64-bit entry.
    NoEntry64 { version: u16 },
    /// The kernel does not fit in the domain's RAM at its preferred address.
    TooBig { needs: u64, ram: u64 },
    /// The initrd does not fit between the kernel and the top of usable memory.
    InitrdTooBig { len: u64, room: u64 },
    /// The command line is longer than the kernel accepts.
    CommandLineTooLong { len: usize, max: usize },
    /// More memory ranges than the zero page holds.
    TooManyRanges,
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BootError::NotBzImage(why) => write!(f, "not a Linux bzImage ({why})"),
            BootError::NoEntry64 { version } => write!(
                f,
                "the kernel (boot protocol {}.{:02}) has no 64-bit entry (needs 2.12 or later with XLF_KERNEL_64)",
                version >> 8,
                version & 0xff
            ),
            BootError::TooBig { needs, ram } => write!(
                f,
                "the kernel needs {} MiB of RAM to unpack at its address; the domain has {} MiB",
                needs.div_ceil(1 << 20),
                ram >> 20
            ),
            BootError::InitrdTooBig { len, room } => write!(
                f,
                "the initrd ({} KiB) does not fit above the kernel ({} KiB free below the initrd limit)",
                len.div_ceil(1024),
                room / 1024
            ),
            BootError::CommandLineTooLong { len, max } => {
                write!(
                    f,
                    "command line of {len} bytes; the kernel takes at most {max}"
                )
            }
            BootError::TooManyRanges => write!(f, "more than {E820_MAX} memory ranges"),
        }
    }
}

/// What the setup header of a bzImage says, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BzImage<'a> {
    /// The protected-mode kernel (what is loaded at [`BzImage::load_addr`]).
    pub kernel: &'a [u8],
    /// The setup header as in the file (0x1f1 up to its end), copied into the zero page.
    pub header: &'a [u8],
    pub version: u16,
    /// Where the kernel is loaded: its preferred address (it is relocatable from there).
    pub load_addr: u64,
    /// Memory the kernel needs from `load_addr` while it unpacks itself.
    pub init_size: u64,
    /// The highest address the initrd may end at (inclusive limit, as the header says).
    pub initrd_addr_max: u64,
    /// Longest command line, without its NUL.
    pub cmdline_max: usize,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32
}

/// Whether `image` starts like a bzImage (its setup header signature); cheap, for choosing a
/// loader.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() > off::HEADER + 4 && &image[off::HEADER..off::HEADER + 4] == b"HdrS"
}

/// Reads and checks the setup header of `image`.
pub fn parse(image: &[u8]) -> Result<BzImage<'_>, BootError> {
    if !is_bzimage(image) || image.len() < 0x268 {
        return Err(BootError::NotBzImage("no HdrS signature at 0x202"));
    }
    let version = u16_at(image, off::VERSION);
    if version < 0x020c || u16_at(image, off::XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(BootError::NoEntry64 { version });
    }
    let sects = match image[off::SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let setup_len = (sects + 1) * 512;
    if image.len() <= setup_len {
        return Err(BootError::NotBzImage("the file ends inside its setup code"));
    }
    // The header runs from 0x1f1 to the end of the jump at 0x200 plus its offset.
    let header_end = (off::HEADER + usize::from(image[off::JUMP + 1])).min(0x280);
    let align = u64::from(u32_at(image, off::KERNEL_ALIGNMENT)).max(0x1000);
    let pref = u64_at(image, off::PREF_ADDRESS);
    // A preferred address below 1 MiB or misaligned is not one to trust: use 16 MiB, the
    // default LOAD_PHYSICAL_ADDR of x86_64 kernels.
    let load_addr = if pref >= 0x10_0000 && pref.is_multiple_of(align) && pref < 1 << 32 {
        pref
    } else {
        0x100_0000
    };
    let kernel = &image[setup_len..];
    let init_size = u64::from(u32_at(image, off::INIT_SIZE)).max(kernel.len() as u64);
    Ok(BzImage {
        kernel,
        header: &image[off::SETUP_SECTS..header_end],
        version,
        load_addr,
        init_size,
        initrd_addr_max: u64::from(u32_at(image, off::INITRD_ADDR_MAX)),
        cmdline_max: if version >= 0x0206 {
            u32_at(image, off::CMDLINE_SIZE) as usize
        } else {
            255
        },
    })
}

/// Kinds of e820 ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
}

/// One range of the e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// Where a loader put things, for [`zero_page`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub cmdline_gpa: u64,
    pub cmdline_len: usize,
    /// The initrd's address and length.
    pub initrd: Option<(u64, u64)>,
    /// The ACPI RSDP (0: none).
    pub rsdp: u64,
}

/// Where the initrd goes: as high as it can below both the top of RAM and the kernel's limit,
/// page-aligned, and above the memory the kernel unpacks into.
pub fn place_initrd(img: &BzImage, ram_top: u64, len: u64) -> Result<u64, BootError> {
    let limit = ram_top.min(img.initrd_addr_max.saturating_add(1));
    let floor = img
        .load_addr
        .saturating_add(img.init_size)
        .next_multiple_of(0x1000);
    let room = limit.saturating_sub(floor);
    if len > room {
        return Err(BootError::InitrdTooBig { len, room });
    }
    Ok((limit - len) & !0xfff)
}

/// Checks that the kernel fits in `ram` bytes at its load address.
pub fn check_fits(img: &BzImage, ram: u64) -> Result<(), BootError> {
    let needs = img.load_addr.saturating_add(img.init_size);
    if needs > ram {
        return Err(BootError::TooBig { needs, ram });
    }
    Ok(())
}

/// The zero page for `img`: its own setup header, the loader's fields, the memory map.
pub fn zero_page(img: &BzImage, at: &Placement, e820: &[E820]) -> Result<Vec<u8>, BootError> {
    if at.cmdline_len > img.cmdline_max {
        return Err(BootError::CommandLineTooLong {
            len: at.cmdline_len,
            max: img.cmdline_max,
        });
    }
    if e820.len() > E820_MAX {
        return Err(BootError::TooManyRanges);
    }
    let mut z = alloc::vec![0u8; ZERO_PAGE_LEN];
    z[off::SETUP_SECTS..off::SETUP_SECTS + img.header.len()].copy_from_slice(img.header);
    let put32 = |z: &mut [u8], o: usize, v: u32| z[o..o + 4].copy_from_slice(&v.to_le_bytes());
    // "Undefined" loader (0xff): this hypervisor has no boot-loader id of its own.
    z[off::TYPE_OF_LOADER] = 0xff;
    z[off::LOADFLAGS] |= LOADED_HIGH;
    // 64-bit values split into the field and its `ext_` high half.
    let put64 = |z: &mut [u8], lo: usize, hi: usize, v: u64| {
        let [a, b, c, d, e, f, g, h] = v.to_le_bytes();
        z[lo..lo + 4].copy_from_slice(&[a, b, c, d]);
        z[hi..hi + 4].copy_from_slice(&[e, f, g, h]);
    };
    put64(
        &mut z,
        off::CMD_LINE_PTR,
        off::EXT_CMD_LINE_PTR,
        at.cmdline_gpa,
    );
    if let Some((addr, len)) = at.initrd {
        put64(&mut z, off::RAMDISK_IMAGE, off::EXT_RAMDISK_IMAGE, addr);
        put64(&mut z, off::RAMDISK_SIZE, off::EXT_RAMDISK_SIZE, len);
    }
    z[off::ACPI_RSDP_ADDR..off::ACPI_RSDP_ADDR + 8].copy_from_slice(&at.rsdp.to_le_bytes());
    // At most E820_MAX (128), checked above.
    z[off::E820_ENTRIES] = u8::try_from(e820.len()).unwrap_or(u8::MAX);
    for (i, r) in e820.iter().enumerate() {
        let o = off::E820_TABLE + i * 20;
        z[o..o + 8].copy_from_slice(&r.addr.to_le_bytes());
        z[o + 8..o + 16].copy_from_slice(&r.size.to_le_bytes());
        put32(&mut z, o + 16, r.kind as u32);
    }
    Ok(z)
}

/// The memory map of a domain with `ram` bytes: conventional memory below 640 KiB, the BIOS
/// area (where the ACPI tables are) reserved up to 1 MiB, the rest RAM.
pub fn pc_memory_map(ram: u64, acpi: (u64, u64)) -> Vec<E820> {
    let mut m = alloc::vec![E820 {
        addr: 0,
        size: 0x9_f000,
        kind: E820Kind::Ram,
    }];
    let (acpi_at, acpi_len) = acpi;
    if acpi_len > 0 && acpi_at >= 0x9_f000 && acpi_at + acpi_len <= 0x10_0000 {
        if acpi_at > 0x9_f000 {
            m.push(E820 {
                addr: 0x9_f000,
                size: acpi_at - 0x9_f000,
                kind: E820Kind::Reserved,
            });
        }
        m.push(E820 {
            addr: acpi_at,
            size: acpi_len,
            kind: E820Kind::Acpi,
        });
        if acpi_at + acpi_len < 0x10_0000 {
            m.push(E820 {
                addr: acpi_at + acpi_len,
                size: 0x10_0000 - (acpi_at + acpi_len),
                kind: E820Kind::Reserved,
            });
        }
    } else {
        m.push(E820 {
            addr: 0x9_f000,
            size: 0x10_0000 - 0x9_f000,
            kind: E820Kind::Reserved,
        });
    }
    if ram > 0x10_0000 {
        m.push(E820 {
            addr: 0x10_0000,
            size: ram - 0x10_0000,
            kind: E820Kind::Ram,
        });
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// A bzImage-shaped file: `sects` setup sectors, the given header fields, `kernel` after.
    fn image(sects: u8, version: u16, xload: u16, pref: u64, init: u32, kernel: usize) -> Vec<u8> {
        let setup = (usize::from(sects.max(4)) + 1) * 512;
        let mut b = alloc::vec![0u8; setup + kernel];
        b[off::SETUP_SECTS] = sects;
        b[off::JUMP] = 0xeb;
        b[off::JUMP + 1] = 0x66; // header ends at 0x268
        b[off::HEADER..off::HEADER + 4].copy_from_slice(b"HdrS");
        b[off::VERSION..off::VERSION + 2].copy_from_slice(&version.to_le_bytes());
        b[off::LOADFLAGS] = 1;
        b[off::INITRD_ADDR_MAX..off::INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[off::KERNEL_ALIGNMENT..off::KERNEL_ALIGNMENT + 4]
            .copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[off::XLOADFLAGS..off::XLOADFLAGS + 2].copy_from_slice(&xload.to_le_bytes());
        b[off::CMDLINE_SIZE..off::CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        b[off::PREF_ADDRESS..off::PREF_ADDRESS + 8].copy_from_slice(&pref.to_le_bytes());
        b[off::INIT_SIZE..off::INIT_SIZE + 4].copy_from_slice(&init.to_le_bytes());
        for (i, x) in b[setup..].iter_mut().enumerate() {
            *x = i.to_le_bytes()[0];
        }
        b
    }

    #[test]
    fn a_debian_like_header_parses() {
        // As Debian 12's 6.1 cloud kernel: 39 setup sectors, protocol 2.15, xloadflags 0x7f,
        // preferred address 16 MiB, init_size 0x3377000.
        let b = image(39, 0x020f, 0x7f, 0x100_0000, 0x337_7000, 5000);
        let k = parse(&b).unwrap();
        assert_eq!(k.kernel.len(), 5000);
        assert_eq!(
            k.kernel[1], 1,
            "the protected-mode kernel starts after 40 sectors"
        );
        assert_eq!(k.load_addr, 0x100_0000);
        assert_eq!(k.init_size, 0x337_7000);
        assert_eq!(k.cmdline_max, 2047);
        assert_eq!(k.header.len(), 0x268 - 0x1f1);
        assert!(check_fits(&k, 64 << 20).is_err());
        assert!(check_fits(&k, 256 << 20).is_ok());
        let e = check_fits(&k, 32 << 20).unwrap_err().to_string();
        assert!(e.contains("68 MiB") && e.contains("32 MiB"), "{e}");
    }

    #[test]
    fn what_is_not_a_64_bit_bzimage_is_refused() {
        assert_eq!(
            parse(b"\x7fELF and more bytes than that, many more, many many more"),
            Err(BootError::NotBzImage("no HdrS signature at 0x202"))
        );
        let old = image(4, 0x020a, 0, 0, 0, 100);
        assert_eq!(parse(&old), Err(BootError::NoEntry64 { version: 0x020a }));
        let no64 = image(4, 0x020f, 0x2, 0x100_0000, 0, 100);
        assert!(matches!(parse(&no64), Err(BootError::NoEntry64 { .. })));
        let mut cut = image(39, 0x020f, 0x7f, 0x100_0000, 0, 10);
        cut.truncate(40 * 512);
        assert!(matches!(parse(&cut), Err(BootError::NotBzImage(_))));
        // A preferred address that is not one is replaced by 16 MiB.
        let odd = image(4, 0x020f, 1, 0x1234, 0, 10);
        assert_eq!(parse(&odd).unwrap().load_addr, 0x100_0000);
    }

    #[test]
    fn the_zero_page_carries_header_loader_fields_and_map() {
        let b = image(39, 0x020f, 0x7f, 0x100_0000, 0x337_7000, 64);
        let k = parse(&b).unwrap();
        let ram = 256u64 << 20;
        let initrd = place_initrd(&k, ram, 3 << 20).unwrap();
        assert_eq!(initrd, ram - (3 << 20));
        let map = pc_memory_map(ram, (0xe_0000, 0x2_0000));
        let z = zero_page(
            &k,
            &Placement {
                cmdline_gpa: 0x2_0000,
                cmdline_len: 12,
                initrd: Some((initrd, 3 << 20)),
                rsdp: 0xe_0000,
            },
            &map,
        )
        .unwrap();
        assert_eq!(&z[0x202..0x206], b"HdrS");
        assert_eq!(z[off::TYPE_OF_LOADER], 0xff);
        assert_eq!(u32_at(&z, off::CMD_LINE_PTR), 0x2_0000);
        assert_eq!(u64::from(u32_at(&z, off::RAMDISK_IMAGE)), initrd);
        assert_eq!(u32_at(&z, off::RAMDISK_SIZE), 3 << 20);
        assert_eq!(u64_at(&z, off::ACPI_RSDP_ADDR), 0xe_0000);
        assert_eq!(usize::from(z[off::E820_ENTRIES]), map.len());
        assert_eq!(map.len(), 4);
        let last = off::E820_TABLE + 3 * 20;
        assert_eq!(u64_at(&z, last), 0x10_0000);
        assert_eq!(u64_at(&z, last + 8), ram - 0x10_0000);
        assert_eq!(u32_at(&z, last + 16), 1);
        assert_eq!(u32_at(&z, off::E820_TABLE + 2 * 20 + 16), 3, "ACPI tables");
        // Too long a command line.
        let long = Placement {
            cmdline_gpa: 0x2_0000,
            cmdline_len: 3000,
            initrd: None,
            rsdp: 0,
        };
        assert!(matches!(
            zero_page(&k, &long, &map),
            Err(BootError::CommandLineTooLong {
                len: 3000,
                max: 2047
            })
        ));
    }

    #[test]
    fn the_initrd_goes_high_and_never_over_the_kernel() {
        let b = image(39, 0x020f, 0x7f, 0x100_0000, 0x337_7000, 64);
        let k = parse(&b).unwrap();
        // 128 MiB: room from 0x437_7000 up.
        let ram = 128u64 << 20;
        assert!(place_initrd(&k, ram, 60 << 20).is_ok());
        let e = place_initrd(&k, ram, 80 << 20).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
        // The kernel's own limit wins over RAM above it.
        let mut k2 = k;
        k2.initrd_addr_max = 0x0fff_ffff;
        assert_eq!(place_initrd(&k2, 1 << 30, 1 << 20).unwrap(), 0x0ff0_0000);
        // Unaligned lengths round the start down to a page.
        assert_eq!(place_initrd(&k, ram, 100).unwrap(), ram - 0x1000);
    }

    #[test]
    fn memory_maps() {
        let m = pc_memory_map(16 << 20, (0, 0));
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].kind, E820Kind::Reserved);
        assert_eq!(m[2].addr, 0x10_0000);
        let m = pc_memory_map(1 << 20, (0xf_0000, 0x1_0000));
        assert_eq!(m.len(), 3, "no RAM above 1 MiB: {m:?}");
        assert_eq!(m[2].kind, E820Kind::Acpi);
    }

    #[test]
    fn the_reset_vector_lies_in_reserved_memory_and_writes_the_reset_register() {
        // The largest tables the ACPI builder allows still leave the reset vector reserved.
        let max = crate::acpi::ACPI_MAX as u64;
        for acpi in [
            (0, 0),
            (crate::acpi::ACPI_BASE, 0x1000),
            (crate::acpi::ACPI_BASE, max),
        ] {
            let m = pc_memory_map(256 << 20, acpi);
            let holder = m
                .iter()
                .find(|e| e.addr <= RESET_VECTOR && RESET_VECTOR + 16 <= e.addr + e.size)
                .unwrap_or_else(|| panic!("{acpi:?}: {m:?}"));
            assert_eq!(holder.kind, E820Kind::Reserved, "{acpi:?}");
        }
        // mov al, imm8; mov dx, imm16; out dx, al; hlt; jmp back to the hlt.
        let s = RESET_STUB;
        assert_eq!((s[0], s[1]), (0xb0, crate::acpi::RESET_VALUE));
        assert_eq!(
            (s[2], u16::from_le_bytes([s[3], s[4]])),
            (0xba, crate::acpi::RESET_PORT)
        );
        assert_eq!(&s[5..], &[0xee, 0xf4, 0xeb, 0xfd]);
        assert!(RESET_VECTOR + s.len() as u64 <= 0x10_0000);
    }
}
