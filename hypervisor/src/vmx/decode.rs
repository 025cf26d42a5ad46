//! Decoding the guest instruction behind an MMIO exit: the EPT violation says which address was
//! touched, not how, so the hypervisor reads the instruction at the guest's RIP and decodes it.
//!
//! Only the plain moves compilers emit for device registers are accepted (SDM Vol. 2B, MOV and
//! MOVZX): `88`/`89` (store register), `8A`/`8B` (load register), `C6 /0`/`C7 /0` (store
//! immediate), `0F B6`/`0F B7` (load with zero extension), with operand-size (`66`), segment
//! and REX prefixes. Anything else (string moves, LOCK, read-modify-write) is refused, and the
//! caller stops the domain. The bytes come from guest memory and are an allegation: lengths are
//! bounded by the 15-byte instruction limit and every index is checked.

/// The longest x86 instruction.
pub const MAX_LEN: usize = 15;

/// What the instruction does to the MMIO location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read `size` bytes into general register `reg` (0 = RAX .. 15 = R15); `high_byte` for
    /// AH/CH/DH/BH; `zero_extend` for MOVZX.
    Load {
        reg: u8,
        size: u8,
        high_byte: bool,
        zero_extend: bool,
        dest_size: u8,
    },
    /// Write `size` bytes from register `reg` (`high_byte` as above).
    StoreReg { reg: u8, size: u8, high_byte: bool },
    /// Write `size` bytes of an immediate.
    StoreImm { value: u64, size: u8 },
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub len: usize,
    pub access: Access,
}

/// Why an instruction was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Ran past the bytes given (or the 15-byte limit).
    Truncated,
    /// Not one of the accepted moves.
    Unsupported(u8),
    /// The ModRM names a register, not memory: cannot be the MMIO access.
    NotMemory,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .bytes
            .get(self.at)
            .filter(|_| self.at < MAX_LEN)
            .ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        for _ in 0..n {
            self.next()?;
        }
        Ok(())
    }

    fn imm(&mut self, n: usize) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.next()?) << (8 * i);
        }
        Ok(v)
    }
}

/// Decodes the instruction at the start of `bytes` (at most [`MAX_LEN`] are looked at).
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let mut c = Cursor { bytes, at: 0 };
    let mut opsize16 = false;
    let mut rex = 0u8;
    let mut op = c.next()?;
    loop {
        match op {
            0x66 => opsize16 = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            0x40..=0x4f => {
                rex = op;
                op = c.next()?;
                break;
            }
            _ => break,
        }
        op = c.next()?;
    }
    let rex_w = rex & 8 != 0;
    let size_v: u8 = if rex_w {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    let two_byte = op == 0x0f;
    let op2 = if two_byte { c.next()? } else { 0 };
    let (kind, size) = match (two_byte, op, op2) {
        (false, 0x88, _) => (0, 1),
        (false, 0x89, _) => (0, size_v),
        (false, 0x8a, _) => (1, 1),
        (false, 0x8b, _) => (1, size_v),
        (false, 0xc6, _) => (2, 1),
        (false, 0xc7, _) => (2, size_v),
        (true, _, 0xb6) => (3, 1),
        (true, _, 0xb7) => (3, 2),
        _ => return Err(DecodeError::Unsupported(if two_byte { op2 } else { op })),
    };
    let modrm = c.next()?;
    let (md, reg_field, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 {
        return Err(DecodeError::NotMemory);
    }
    // Addressing bytes: SIB when rm = 100, displacement by mod (RIP-relative when mod = 00 and
    // rm = 101; a SIB with base 101 and mod = 00 also has a disp32). SDM Vol. 2A §2.1.5.
    let mut disp = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = c.next()?;
        if md == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if md == 0 && rm == 5 {
        disp = 4;
    }
    c.skip(disp)?;
    let reg = reg_field | if rex & 4 != 0 { 8 } else { 0 };
    // Without REX, byte registers 4..7 are AH, CH, DH, BH.
    let high = size == 1 && rex == 0 && (4..8).contains(&reg);
    let reg_num = if high { reg - 4 } else { reg };
    let access = match kind {
        0 => Access::StoreReg {
            reg: reg_num,
            size,
            high_byte: high,
        },
        1 => Access::Load {
            reg: reg_num,
            size,
            high_byte: high,
            zero_extend: false,
            dest_size: size,
        },
        2 => {
            if reg_field != 0 {
                return Err(DecodeError::Unsupported(op));
            }
            let raw = c.imm(usize::from(size.min(4)))?;
            // A 32-bit immediate is sign-extended to 64 bits (C7 with REX.W).
            let value = if size == 8 {
                i64::from(raw as u32 as i32) as u64
            } else {
                raw
            };
            Access::StoreImm { value, size }
        }
        _ => {
            let dest_size = if rex_w {
                8
            } else if opsize16 {
                2
            } else {
                4
            };
            // MOVZX's byte source: no AH..BH form is reachable through memory (source is r/m).
            Access::Load {
                reg,
                size,
                high_byte: false,
                zero_extend: true,
                dest_size,
            }
        }
    };
    Ok(Decoded { len: c.at, access })
}

/// The register value after a load of `data` (already `size` bytes wide) into `old`.
pub fn apply_load(old: u64, access: Access, data: u64) -> u64 {
    let Access::Load {
        size,
        high_byte,
        zero_extend,
        dest_size,
        ..
    } = access
    else {
        return old;
    };
    let mask = |n: u8| {
        if n >= 8 {
            u64::MAX
        } else {
            (1u64 << (n * 8)) - 1
        }
    };
    let data = data & mask(size);
    if high_byte {
        return (old & !0xff00) | (data << 8);
    }
    let width = if zero_extend { dest_size } else { size };
    match width {
        // 32-bit destinations are zero-extended to 64 bits (SDM Vol. 1 §3.4.1.1).
        4 | 8 => data,
        w => (old & !mask(w)) | data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: &[u8]) -> Decoded {
        decode(b).unwrap_or_else(|e| panic!("{b:02x?}: {e:?}"))
    }

    #[test]
    fn loads() {
        // mov eax, [rdi]
        assert_eq!(
            d(&[0x8b, 0x07]),
            Decoded {
                len: 2,
                access: Access::Load {
                    reg: 0,
                    size: 4,
                    high_byte: false,
                    zero_extend: false,
                    dest_size: 4
                }
            }
        );
        // mov r9, [rax+0x10]  (REX.WR)
        assert_eq!(
            d(&[0x4c, 0x8b, 0x48, 0x10]).access,
            Access::Load {
                reg: 9,
                size: 8,
                high_byte: false,
                zero_extend: false,
                dest_size: 8
            }
        );
        // mov ax, [rbx+rcx*4+0x12345678]
        assert_eq!(d(&[0x66, 0x8b, 0x84, 0x8b, 0x78, 0x56, 0x34, 0x12]).len, 8);
        // mov ch, [rsi]
        assert_eq!(
            d(&[0x8a, 0x2e]).access,
            Access::Load {
                reg: 1,
                size: 1,
                high_byte: true,
                zero_extend: false,
                dest_size: 1
            }
        );
        // mov bpl, [rsi] (REX makes 5 = BPL, not CH)
        assert_eq!(
            d(&[0x40, 0x8a, 0x2e]).access,
            Access::Load {
                reg: 5,
                size: 1,
                high_byte: false,
                zero_extend: false,
                dest_size: 1
            }
        );
        // movzx eax, byte [rip+0x100]
        assert_eq!(
            d(&[0x0f, 0xb6, 0x05, 0, 1, 0, 0]),
            Decoded {
                len: 7,
                access: Access::Load {
                    reg: 0,
                    size: 1,
                    high_byte: false,
                    zero_extend: true,
                    dest_size: 4
                }
            }
        );
        // mov eax, [rbp+0] needs a disp8 (mod 01)
        assert_eq!(d(&[0x8b, 0x45, 0x00]).len, 3);
        // SIB with no base: mov eax, [rcx*8+disp32]
        assert_eq!(d(&[0x8b, 0x04, 0xcd, 1, 2, 3, 4]).len, 7);
        // segment prefix: mov eax, fs:[rax]
        assert_eq!(d(&[0x64, 0x8b, 0x00]).len, 3);
    }

    #[test]
    fn stores() {
        assert_eq!(
            d(&[0x89, 0x37]).access,
            Access::StoreReg {
                reg: 6,
                size: 4,
                high_byte: false
            }
        );
        assert_eq!(
            d(&[0x88, 0x20]).access,
            Access::StoreReg {
                reg: 0,
                size: 1,
                high_byte: true
            }
        );
        assert_eq!(
            d(&[0xc6, 0x00, 0xab]),
            Decoded {
                len: 3,
                access: Access::StoreImm {
                    value: 0xab,
                    size: 1
                }
            }
        );
        assert_eq!(
            d(&[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff]).access,
            Access::StoreImm {
                value: u64::MAX,
                size: 8
            }
        );
        assert_eq!(
            d(&[0x66, 0xc7, 0x00, 0x34, 0x12]).access,
            Access::StoreImm {
                value: 0x1234,
                size: 2
            }
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x8b]), Err(DecodeError::Truncated));
        assert_eq!(
            decode(&[0x8b, 0x84, 0x8b, 0x78]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(decode(&[0x8b, 0xc0]), Err(DecodeError::NotMemory));
        assert_eq!(decode(&[0xa5]), Err(DecodeError::Unsupported(0xa5)), "movs");
        assert_eq!(
            decode(&[0xf0, 0x01, 0x07]),
            Err(DecodeError::Unsupported(0xf0)),
            "lock add"
        );
        assert_eq!(
            decode(&[0xc7, 0x08, 0, 0, 0, 0]),
            Err(DecodeError::Unsupported(0xc7)),
            "C7 /1"
        );
        // 15 prefixes then an opcode: over the architectural limit.
        let mut long = vec![0x66u8; 15];
        long.extend_from_slice(&[0x8b, 0x00]);
        assert_eq!(decode(&long), Err(DecodeError::Truncated));
    }

    #[test]
    fn register_updates() {
        let load = |size, high, zx, dest| Access::Load {
            reg: 0,
            size,
            high_byte: high,
            zero_extend: zx,
            dest_size: dest,
        };
        let old = 0x1122_3344_5566_7788;
        assert_eq!(
            apply_load(old, load(4, false, false, 4), u64::MAX),
            0xffff_ffff
        );
        assert_eq!(
            apply_load(old, load(2, false, false, 2), u64::MAX),
            0x1122_3344_5566_ffff
        );
        assert_eq!(
            apply_load(old, load(1, false, false, 1), 0xab),
            0x1122_3344_5566_77ab
        );
        assert_eq!(
            apply_load(old, load(1, true, false, 1), 0xab),
            0x1122_3344_5566_ab88
        );
        assert_eq!(apply_load(old, load(8, false, false, 8), 7), 7);
        assert_eq!(apply_load(old, load(1, false, true, 4), 0xffff), 0xff);
        assert_eq!(
            apply_load(old, load(1, false, true, 2), 0xff),
            0x1122_3344_5566_00ff
        );
    }
}
