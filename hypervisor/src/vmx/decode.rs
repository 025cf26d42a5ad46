//! Decoding the guest instruction behind an MMIO exit: the EPT violation says which address was
//! touched, not how, so the hypervisor reads the instruction at the guest's RIP and decodes it.
//!
//! Accepted are the forms compilers and Linux's `readl`/`writel` emit for device registers (SDM
//! Vol. 2A/2B): MOV `88`/`89` (store register), `8A`/`8B` (load register), `C6 /0`/`C7 /0`
//! (store immediate); MOVZX `0F B6`/`0F B7` and MOVSX `0F BE`/`0F BF` (loads with extension);
//! and AND, OR, TEST and CMP with a memory operand: `20`-`23`, `08`-`0B`, `84`/`85`, `38`-`3B`,
//! `80`/`81`/`83` with /1 (OR), /4 (AND), /7 (CMP), and `F6 /0`/`F7 /0` (TEST immediate); with
//! operand-size (`66`), segment and REX prefixes. Anything else (string moves, LOCK, other
//! arithmetic) is refused, and the caller stops the domain. [`alu`] computes what an AND, OR,
//! TEST or CMP does, flags included. The bytes come from guest memory and are an allegation: lengths are
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
    /// AND, OR, TEST or CMP of `size` bytes with the memory operand. The first operand is the
    /// memory one when `mem_first` (e.g. `AND [m], r`), else the register (`CMP r, [m]`);
    /// `writes` says where the result goes. RFLAGS gets [`alu`]'s flags in every case.
    Alu {
        op: AluOp,
        size: u8,
        other: Operand,
        mem_first: bool,
        writes: AluWrites,
    },
}

/// The read-modify-write and compare operations accepted on MMIO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluOp {
    And,
    Or,
    Test,
    Cmp,
}

/// The non-memory operand of an [`Access::Alu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// General register `reg` (`high_byte` for AH..BH).
    Reg { reg: u8, high_byte: bool },
    /// An immediate, already sign-extended to the operand size.
    Imm(u64),
}

/// Where an [`Access::Alu`]'s result goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluWrites {
    /// Back to the MMIO location (AND/OR with memory as destination).
    Memory,
    /// Into the register operand (AND/OR with a register destination).
    Register,
    /// Nowhere: only the flags (TEST, CMP).
    Flags,
}

/// The arithmetic flags in RFLAGS: CF, PF, AF, ZF, SF, OF.
pub const ARITH_FLAGS: u64 = (1 << 0) | (1 << 2) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 11);

fn mask_bytes(n: u8) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (n * 8)) - 1
    }
}

/// `a op b` on `size` bytes: the result (for AND/OR; for TEST/CMP the value that set the
/// flags) and the arithmetic flags as RFLAGS bits (SDM Vol. 2: AND/OR/TEST clear CF and OF,
/// leave AF undefined (0 here); CMP sets them as SUB does).
pub fn alu(op: AluOp, size: u8, a: u64, b: u64) -> (u64, u64) {
    let m = mask_bytes(size);
    let (a, b) = (a & m, b & m);
    let sign = 1u64 << (u32::from(size) * 8 - 1);
    let (r, cf, of, af) = match op {
        AluOp::And | AluOp::Test => (a & b, false, false, false),
        AluOp::Or => (a | b, false, false, false),
        AluOp::Cmp => {
            let r = a.wrapping_sub(b) & m;
            (
                r,
                a < b,
                (a ^ b) & (a ^ r) & sign != 0,
                (a ^ b ^ r) & 0x10 != 0,
            )
        }
    };
    let pf = (r as u8).count_ones().is_multiple_of(2);
    let flags = u64::from(cf)
        | u64::from(pf) << 2
        | u64::from(af) << 4
        | u64::from(r == 0) << 6
        | u64::from(r & sign != 0) << 7
        | u64::from(of) << 11;
    (r, flags)
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
    // Kinds: 0 store register, 1 load, 2 store immediate, 3 MOVZX, 4 MOVSX, 5 ALU with a
    // register operand (memory first), 6 ALU with a register operand (register first),
    // 7 ALU with an immediate (op from ModRM.reg).
    let alu_of = |o: u8| match o & !3 {
        0x08 => Some(AluOp::Or),
        0x20 => Some(AluOp::And),
        0x38 => Some(AluOp::Cmp),
        _ => None,
    };
    let (kind, size, alu_op) = match (two_byte, op, op2) {
        (false, 0x88, _) => (0, 1, None),
        (false, 0x89, _) => (0, size_v, None),
        (false, 0x8a, _) => (1, 1, None),
        (false, 0x8b, _) => (1, size_v, None),
        (false, 0xc6, _) => (2, 1, None),
        (false, 0xc7, _) => (2, size_v, None),
        (true, _, 0xb6) => (3, 1, None),
        (true, _, 0xb7) => (3, 2, None),
        (true, _, 0xbe) => (4, 1, None),
        (true, _, 0xbf) => (4, 2, None),
        (false, 0x84, _) => (5, 1, Some(AluOp::Test)),
        (false, 0x85, _) => (5, size_v, Some(AluOp::Test)),
        (false, 0x08 | 0x20 | 0x38, _) => (5, 1, alu_of(op)),
        (false, 0x09 | 0x21 | 0x39, _) => (5, size_v, alu_of(op)),
        (false, 0x0a | 0x22 | 0x3a, _) => (6, 1, alu_of(op)),
        (false, 0x0b | 0x23 | 0x3b, _) => (6, size_v, alu_of(op)),
        (false, 0x80 | 0xf6, _) => (7, 1, None),
        (false, 0x81 | 0x83 | 0xf7, _) => (7, size_v, None),
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
    let dest_size = if rex_w {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    // An immediate of `n` bytes, sign-extended to the operand size.
    let sext = |raw: u64, n: u8| {
        let bits = u32::from(n) * 8;
        let v = ((raw << (64 - bits)) as i64 >> (64 - bits)) as u64;
        v & mask_bytes(size)
    };
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
        // MOVZX/MOVSX: the byte source is r/m (memory), never AH..BH.
        3 | 4 => Access::Load {
            reg,
            size,
            high_byte: false,
            zero_extend: kind == 3,
            dest_size,
        },
        5 | 6 => {
            let op = alu_op.ok_or(DecodeError::Unsupported(op))?;
            let writes = match op {
                AluOp::Test | AluOp::Cmp => AluWrites::Flags,
                _ if kind == 5 => AluWrites::Memory,
                _ => AluWrites::Register,
            };
            Access::Alu {
                op,
                size,
                other: Operand::Reg {
                    reg: reg_num,
                    high_byte: high,
                },
                mem_first: kind == 5,
                writes,
            }
        }
        _ => {
            let alu = match (op, reg_field) {
                (0xf6 | 0xf7, 0) => AluOp::Test,
                (0x80 | 0x81 | 0x83, 1) => AluOp::Or,
                (0x80 | 0x81 | 0x83, 4) => AluOp::And,
                (0x80 | 0x81 | 0x83, 7) => AluOp::Cmp,
                _ => return Err(DecodeError::Unsupported(op)),
            };
            let n = if op == 0x83 { 1 } else { size.min(4) };
            let raw = c.imm(usize::from(n))?;
            Access::Alu {
                op: alu,
                size,
                other: Operand::Imm(sext(raw, n)),
                mem_first: true,
                writes: if matches!(alu, AluOp::And | AluOp::Or) {
                    AluWrites::Memory
                } else {
                    AluWrites::Flags
                },
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
    let mut data = data & mask(size);
    if high_byte {
        return (old & !0xff00) | (data << 8);
    }
    let extends = dest_size > size;
    if extends && !zero_extend {
        // MOVSX: sign-extend from `size` to `dest_size` bytes.
        let bits = u32::from(size) * 8;
        data = (((data << (64 - bits)) as i64 >> (64 - bits)) as u64) & mask(dest_size);
    }
    let width = if extends { dest_size } else { size };
    match width {
        // 32-bit destinations are zero-extended to 64 bits (SDM Vol. 1 §3.4.1.1).
        4 | 8 => data,
        w => (old & !mask(w)) | data,
    }
}

/// One fuzz input: decodes `data` as MMIO-faulting instruction bytes and checks what every
/// caller relies on (no panic; an accepted instruction fits in the bytes and in 15; operand
/// sizes are 1, 2, 4 or 8; the ALU and register updates stay in range). The cargo-fuzz target
/// `hypervisor/fuzz` and the replay test call it; a violated check panics.
pub fn fuzz_one(data: &[u8]) {
    let (values, code) = data.split_at(data.len().min(16));
    let word = |i: usize| {
        let mut w = [0u8; 8];
        for (j, b) in w.iter_mut().enumerate() {
            *b = values.get(i * 8 + j).copied().unwrap_or(0);
        }
        u64::from_le_bytes(w)
    };
    let Ok(d) = decode(code) else { return };
    assert!(
        d.len >= 2 && d.len <= code.len().min(MAX_LEN),
        "{code:02x?} -> {d:?}"
    );
    let size = match d.access {
        Access::Load {
            size, dest_size, ..
        } => {
            assert!(dest_size >= size);
            size
        }
        Access::StoreReg { size, .. } | Access::StoreImm { size, .. } => size,
        Access::Alu { op, size, .. } => {
            let (r, flags) = alu(op, size, word(0), word(1));
            assert_eq!(r & !mask_bytes(size), 0);
            assert_eq!(flags & !ARITH_FLAGS, 0);
            size
        }
    };
    assert!(matches!(size, 1 | 2 | 4 | 8), "{d:?}");
    let _ = apply_load(word(0), d.access, word(1));
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
    fn movsx_and_sign_extension() {
        // movsx eax, byte [rdi] (0f be 07)
        let a = d(&[0x0f, 0xbe, 0x07]).access;
        assert_eq!(
            apply_load(u64::MAX, a, 0x80),
            0xffff_ff80,
            "32-bit dest zero-extends to 64"
        );
        // movsx rax, word [rdi] (48 0f bf 07)
        let a = d(&[0x48, 0x0f, 0xbf, 0x07]).access;
        assert_eq!(apply_load(0, a, 0x8001), 0xffff_ffff_ffff_8001);
        assert_eq!(apply_load(0, a, 0x7001), 0x7001);
        // movsx ax, byte [rdi] (66 0f be 07): upper 48 bits kept.
        let a = d(&[0x66, 0x0f, 0xbe, 0x07]).access;
        assert_eq!(
            apply_load(0x1234_5678_9abc_def0, a, 0xff),
            0x1234_5678_9abc_ffff
        );
    }

    #[test]
    fn alu_forms() {
        let alu = |b: &[u8]| match d(b).access {
            Access::Alu {
                op,
                size,
                other,
                mem_first,
                writes,
            } => (op, size, other, mem_first, writes),
            other => panic!("{b:02x?}: {other:?}"),
        };
        let r = |reg| Operand::Reg {
            reg,
            high_byte: false,
        };
        // and [rdi], eax ; or [rdi], ecx ; test [rdi], edx ; cmp [rdi], ebx
        assert_eq!(
            alu(&[0x21, 0x07]),
            (AluOp::And, 4, r(0), true, AluWrites::Memory)
        );
        assert_eq!(
            alu(&[0x09, 0x0f]),
            (AluOp::Or, 4, r(1), true, AluWrites::Memory)
        );
        assert_eq!(
            alu(&[0x85, 0x17]),
            (AluOp::Test, 4, r(2), true, AluWrites::Flags)
        );
        assert_eq!(
            alu(&[0x39, 0x1f]),
            (AluOp::Cmp, 4, r(3), true, AluWrites::Flags)
        );
        // and eax, [rdi] (23): register destination; cmp eax, [rdi] (3b): register first.
        assert_eq!(
            alu(&[0x23, 0x07]),
            (AluOp::And, 4, r(0), false, AluWrites::Register)
        );
        assert_eq!(
            alu(&[0x3b, 0x07]),
            (AluOp::Cmp, 4, r(0), false, AluWrites::Flags)
        );
        // orl $0x80, 0x10(%rdi) (83 4f 10 80): imm8 sign-extended to 32 bits.
        assert_eq!(
            alu(&[0x83, 0x4f, 0x10, 0x80]),
            (
                AluOp::Or,
                4,
                Operand::Imm(0xffff_ff80),
                true,
                AluWrites::Memory
            )
        );
        // andl $0xfffffffe, (%rdi) (81 27 imm32) and testb $1, (%rdi) (f6 07 01)
        assert_eq!(
            alu(&[0x81, 0x27, 0xfe, 0xff, 0xff, 0xff]),
            (
                AluOp::And,
                4,
                Operand::Imm(0xffff_fffe),
                true,
                AluWrites::Memory
            )
        );
        assert_eq!(
            alu(&[0xf6, 0x07, 0x01]),
            (AluOp::Test, 1, Operand::Imm(1), true, AluWrites::Flags)
        );
        assert_eq!(d(&[0xf6, 0x07, 0x01]).len, 3);
        // cmpw $0x1234, (%rdi) (66 81 3f 34 12): a 16-bit immediate.
        assert_eq!(
            alu(&[0x66, 0x81, 0x3f, 0x34, 0x12]),
            (AluOp::Cmp, 2, Operand::Imm(0x1234), true, AluWrites::Flags)
        );
        // Other arithmetic is refused: add [rdi], eax (01), 83 /0 (add imm), f7 /2 (not).
        assert_eq!(decode(&[0x01, 0x07]), Err(DecodeError::Unsupported(0x01)));
        assert_eq!(
            decode(&[0x83, 0x07, 1]),
            Err(DecodeError::Unsupported(0x83))
        );
        assert_eq!(decode(&[0xf7, 0x17]), Err(DecodeError::Unsupported(0xf7)));
    }

    #[test]
    fn alu_flags() {
        const CF: u64 = 1;
        const PF: u64 = 4;
        const AF: u64 = 0x10;
        const ZF: u64 = 0x40;
        const SF: u64 = 0x80;
        const OF: u64 = 0x800;
        assert_eq!(alu(AluOp::And, 4, 0xf0, 0x0f), (0, ZF | PF));
        assert_eq!(alu(AluOp::Or, 1, 0x80, 0x01), (0x81, SF | PF));
        assert_eq!(
            alu(AluOp::Test, 4, 0x8000_0000, 0x8000_0001),
            (0x8000_0000, SF | PF)
        );
        // cmp 1, 2: borrow, negative, AF from bit 3.
        assert_eq!(alu(AluOp::Cmp, 4, 1, 2), (0xffff_ffff, CF | SF | PF | AF));
        assert_eq!(alu(AluOp::Cmp, 4, 5, 5), (0, ZF | PF));
        // cmp 0x80, 1 on bytes: -128 - 1 overflows.
        assert_eq!(alu(AluOp::Cmp, 1, 0x80, 1).1 & (OF | CF | SF), OF);
    }

    #[test]
    fn no_input_panics_and_lengths_stay_in_bounds() {
        // A deterministic stream of byte strings (xorshift), mostly around the accepted
        // opcodes: decode never panics, and an accepted instruction fits in the bytes given
        // and in 15.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let starts = [
            0x66u8, 0x48, 0x41, 0x0f, 0x88, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0x80, 0x81, 0x83, 0xf6,
            0xf7, 0x21, 0x23, 0x39, 0x3b, 0x85, 0x09, 0x0b,
        ];
        let mut accepted = 0;
        for _ in 0..200_000 {
            let r = next();
            let n = (r % 16) as usize;
            let mut b = [0u8; 16];
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = (next() >> (i % 8)) as u8;
            }
            b[0] = starts[(r >> 8) as usize % starts.len()];
            if let Ok(dec) = decode(&b[..n]) {
                accepted += 1;
                assert!(
                    dec.len <= n && dec.len <= MAX_LEN,
                    "{:02x?} -> {dec:?}",
                    &b[..n]
                );
                if let Access::Alu { op, size, .. } = dec.access {
                    assert!(matches!(size, 1 | 2 | 4 | 8));
                    let _ = alu(op, size, next(), next());
                }
                let _ = apply_load(next(), dec.access, next());
            }
        }
        assert!(
            accepted > 10_000,
            "the generator reaches the accepted forms ({accepted})"
        );
    }

    #[test]
    fn fuzz_seed_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/mmio_decode");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("the seed corpus is in the repository") {
            let data = std::fs::read(e.expect("readable").path()).expect("readable");
            fuzz_one(&data);
            // Every prefix and every single-byte change of a seed, too.
            for k in 0..data.len() {
                fuzz_one(&data[..k]);
                let mut m = data.clone();
                m[k] ^= 0xff;
                fuzz_one(&m);
            }
            n += 1;
        }
        assert!(n >= 5, "seeds in {}", dir.display());
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
