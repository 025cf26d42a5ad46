//! A local APIC per vCPU: the xAPIC register page, its x2APIC MSR view, the timer (one-shot,
//! periodic, TSC-deadline) and interrupt priority (IRR, ISR, TPR/PPR), as the Intel SDM
//! Vol. 3A ch. 11 describes them.
//!
//! Time is the TSC, passed in; the timer counts one tick every `tsc_per_tick` TSC ticks before
//! its divider (the rate CPUID 0x15 reports as the crystal clock). What is left out: the
//! thermal, performance and CMCI interrupts never fire; NMI, SMI and INIT/SIPI IPIs are
//! reported to the caller like any IPI; there is no EOI-broadcast suppression.

// Registers are 8, 32 and 64 bits wide: the truncating casts pick fields out of them.
#![allow(
    clippy::cast_possible_truncation,
    // `Err(())` is the guest's #GP: there is nothing more to say.
    clippy::result_unit_err
)]

/// How an interrupt is delivered (ICR and redirection-entry bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
}

impl DeliveryMode {
    pub fn from_bits(b: u32) -> DeliveryMode {
        match b & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            _ => DeliveryMode::ExtInt,
        }
    }
}

/// Which local APICs an interrupt goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The APIC with this id (0xff in xAPIC, 0xffff_ffff in x2APIC: all).
    Physical(u32),
    /// Those whose logical id matches (flat or cluster model, as each APIC's DFR says).
    Logical(u32),
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// An inter-processor interrupt the guest sent by writing the ICR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    pub vector: u8,
    pub mode: DeliveryMode,
    pub dest: Destination,
    pub trigger_level: bool,
}

/// What a register write asks of the rest of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    Ipi(Ipi),
    /// The end of a level-triggered interrupt: the IOAPIC clears its remote IRR.
    Eoi(u8),
}

const APIC_BASE_ADDR: u64 = 0xfee0_0000;
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_EN: u64 = 1 << 11;

/// Timer modes (LVT timer bits 18:17).
const MODE_PERIODIC: u32 = 1;
const MODE_DEADLINE: u32 = 2;
const LVT_MASK: u32 = 1 << 16;

#[derive(Clone, Debug)]
pub struct LocalApic {
    id: u32,
    base: u64,
    tsc_per_tick: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    icr_high: u32,
    icr_low: u32,
    /// LVT: timer, thermal, perf, LINT0, LINT1, error, CMCI.
    lvt: [u32; 7],
    initial: u32,
    divide: u32,
    /// TSC when the current count was loaded (one-shot/periodic) and when it fires.
    start: u64,
    fire: Option<u64>,
    deadline: u64,
}

fn bit(regs: &[u32; 8], v: u8) -> bool {
    regs[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}
fn set(regs: &mut [u32; 8], v: u8) {
    regs[usize::from(v >> 5)] |= 1 << (v & 31);
}
fn clear(regs: &mut [u32; 8], v: u8) {
    regs[usize::from(v >> 5)] &= !(1 << (v & 31));
}
fn highest(regs: &[u32; 8]) -> Option<u8> {
    (0..8usize).rev().find(|&i| regs[i] != 0).map(|i| {
        let b = 31 - regs[i].leading_zeros();
        ((i as u32) * 32 + b) as u8
    })
}

impl LocalApic {
    /// The APIC of vCPU `id` (the bootstrap processor when 0), enabled in xAPIC mode.
    pub fn new(id: u32, tsc_per_tick: u64) -> LocalApic {
        LocalApic {
            id,
            base: APIC_BASE_ADDR | BASE_EN | if id == 0 { BASE_BSP } else { 0 },
            tsc_per_tick: tsc_per_tick.max(1),
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            icr_high: 0,
            icr_low: 0,
            lvt: [LVT_MASK; 7],
            initial: 0,
            divide: 0,
            start: 0,
            fire: None,
            deadline: 0,
        }
    }

    fn x2apic(&self) -> bool {
        self.base & BASE_EXTD != 0
    }

    fn software_enabled(&self) -> bool {
        self.svr & (1 << 8) != 0 && self.base & BASE_EN != 0
    }

    /// The divider: 2^(n+1) for the encodings 0..6, 1 for 7 (bits 0, 1 and 3 of TDCR).
    fn divider(&self) -> u64 {
        let n = (self.divide & 3) | ((self.divide >> 1) & 4);
        if n == 7 { 1 } else { 2 << n }
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[0] >> 17) & 3
    }

    fn period(&self) -> u64 {
        u64::from(self.initial)
            .saturating_mul(self.divider())
            .saturating_mul(self.tsc_per_tick)
    }

    fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// The interrupt the timer raises, if its LVT entry is unmasked.
    fn timer_fires(&mut self) {
        if self.lvt[0] & LVT_MASK == 0 && self.software_enabled() {
            let v = (self.lvt[0] & 0xff) as u8;
            if v >= 16 {
                set(&mut self.irr, v);
                clear(&mut self.tmr, v);
            }
        }
    }

    /// Runs the timer up to `now`.
    pub fn poll(&mut self, now: u64) {
        if self.timer_mode() == MODE_DEADLINE {
            if self.deadline != 0 && now >= self.deadline {
                self.deadline = 0;
                self.timer_fires();
            }
            return;
        }
        let Some(at) = self.fire else { return };
        if now < at {
            return;
        }
        self.timer_fires();
        let p = self.period();
        if self.timer_mode() == MODE_PERIODIC && p > 0 {
            // Missed periods collapse into this one interrupt.
            let behind = (now - at) / p;
            let next = at.saturating_add(p.saturating_mul(behind + 1));
            self.start = next.saturating_sub(p);
            self.fire = Some(next);
        } else {
            self.fire = None;
        }
    }

    /// TSC at which the timer next fires.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.lvt[0] & LVT_MASK != 0 {
            return None;
        }
        if self.timer_mode() == MODE_DEADLINE {
            (self.deadline != 0).then_some(self.deadline)
        } else {
            self.fire
        }
    }

    fn current_count(&self, now: u64) -> u32 {
        match self.fire {
            Some(at) if self.timer_mode() != MODE_DEADLINE && at > now => {
                let per = self.divider().saturating_mul(self.tsc_per_tick).max(1);
                ((at - now).div_ceil(per)).min(u64::from(u32::MAX)) as u32
            }
            _ => 0,
        }
    }

    /// An interrupt arrives.
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 || !self.software_enabled() {
            if vector < 16 {
                self.esr |= 1 << 6; // receive illegal vector
            }
            return;
        }
        set(&mut self.irr, vector);
        if level {
            set(&mut self.tmr, vector);
        } else {
            clear(&mut self.tmr, vector);
        }
    }

    /// The vector to inject now.
    pub fn pending(&self) -> Option<u8> {
        let v = highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// `vector` was injected.
    pub fn ack(&mut self, vector: u8) {
        clear(&mut self.irr, vector);
        set(&mut self.isr, vector);
    }

    fn eoi(&mut self) -> Effect {
        let Some(v) = highest(&self.isr) else {
            return Effect::None;
        };
        clear(&mut self.isr, v);
        if bit(&self.tmr, v) {
            clear(&mut self.tmr, v);
            Effect::Eoi(v)
        } else {
            Effect::None
        }
    }

    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }

    /// Whether this APIC is among `dest`'s targets (`sender_is_self`: whether it sent it).
    pub fn matches(&self, dest: &Destination, sender_is_self: bool) -> bool {
        match *dest {
            Destination::SelfOnly => sender_is_self,
            Destination::AllIncludingSelf => true,
            Destination::AllExcludingSelf => !sender_is_self,
            Destination::Physical(id) => {
                let all = if self.x2apic() { u32::MAX } else { 0xff };
                id == all || id == self.id
            }
            Destination::Logical(mda) => {
                if self.x2apic() {
                    // Cluster in bits 31:16, member bit in 15:0.
                    mda == u32::MAX || (mda >> 16 == self.ldr >> 16 && mda & self.ldr & 0xffff != 0)
                } else {
                    let mda = mda & 0xff;
                    let ldr = self.ldr >> 24;
                    if mda == 0xff {
                        true
                    } else if self.dfr >> 28 == 0xf {
                        mda & ldr != 0
                    } else {
                        mda >> 4 == ldr >> 4 && mda & ldr & 0xf != 0
                    }
                }
            }
        }
    }

    fn ipi(&self, low: u32, dest: u32) -> Effect {
        let vector = (low & 0xff) as u8;
        let mode = DeliveryMode::from_bits(low >> 8);
        let dest = match (low >> 18) & 3 {
            1 => Destination::SelfOnly,
            2 => Destination::AllIncludingSelf,
            3 => Destination::AllExcludingSelf,
            _ if low & (1 << 11) != 0 => Destination::Logical(dest),
            _ => Destination::Physical(dest),
        };
        Effect::Ipi(Ipi {
            vector,
            mode,
            dest,
            trigger_level: low & (1 << 15) != 0,
        })
    }

    /// A register read at `offset` in the xAPIC page.
    pub fn read(&mut self, offset: u32, now: u64) -> u32 {
        if offset & 0xf != 0 || offset >= 0x400 {
            return 0;
        }
        self.reg(offset >> 4, now).unwrap_or(0)
    }

    /// Register `n` (offset / 16).
    fn reg(&self, n: u32, now: u64) -> Option<u32> {
        Some(match n {
            0x2 => {
                if self.x2apic() {
                    self.id
                } else {
                    self.id << 24
                }
            }
            0x3 => 0x0006_0014, // version 0x14, 7 LVT entries
            0x8 => self.tpr,
            0xa => self.ppr(),
            0xd => self.ldr,
            0xe if !self.x2apic() => self.dfr,
            0xf => self.svr,
            0x10..=0x17 => self.isr[(n - 0x10) as usize],
            0x18..=0x1f => self.tmr[(n - 0x18) as usize],
            0x20..=0x27 => self.irr[(n - 0x20) as usize],
            0x28 => self.esr,
            0x2f => self.lvt[6],
            0x30 => self.icr_low,
            0x31 if !self.x2apic() => self.icr_high,
            0x32..=0x37 => self.lvt[(n - 0x32) as usize],
            0x38 => self.initial,
            0x39 => self.current_count(now),
            0x3e => self.divide,
            _ => return None,
        })
    }

    /// A register write at `offset` in the xAPIC page.
    pub fn write(&mut self, offset: u32, value: u32, now: u64) -> Effect {
        if offset & 0xf != 0 || offset >= 0x400 || self.x2apic() {
            return Effect::None;
        }
        match offset >> 4 {
            0x2 => {
                self.id = value >> 24;
                Effect::None
            }
            0xe => {
                self.dfr = value | 0x0fff_ffff;
                Effect::None
            }
            0xd => {
                self.ldr = value & 0xff00_0000;
                Effect::None
            }
            0x30 => {
                self.icr_low = value & !(1 << 12);
                self.ipi(value, self.icr_high >> 24)
            }
            0x31 => {
                self.icr_high = value & 0xff00_0000;
                Effect::None
            }
            n => self.write_common(n, value, now),
        }
    }

    /// Writes both views share.
    fn write_common(&mut self, n: u32, value: u32, now: u64) -> Effect {
        match n {
            0x8 => self.tpr = value & 0xff,
            0xb => return self.eoi(),
            0xf => {
                self.svr = value & 0x1ff;
                if value & (1 << 8) == 0 {
                    for l in &mut self.lvt {
                        *l |= LVT_MASK;
                    }
                }
            }
            0x28 => self.esr = 0,
            0x2f | 0x32..=0x37 => {
                let i = if n == 0x2f { 6 } else { (n - 0x32) as usize };
                let mut v = value & 0x0007_17ff;
                if !self.software_enabled() {
                    v |= LVT_MASK;
                }
                if i == 0 {
                    let old_mode = self.timer_mode();
                    self.lvt[0] = v & 0x0007_00ff;
                    if self.timer_mode() != old_mode {
                        // A mode change disarms the timer (SDM §11.5.4.1).
                        self.fire = None;
                        self.deadline = 0;
                    }
                } else {
                    self.lvt[i] = v;
                }
            }
            0x38 => {
                self.initial = value;
                if self.timer_mode() != MODE_DEADLINE {
                    self.start = now;
                    self.fire = (value != 0).then(|| now.saturating_add(self.period()));
                }
            }
            0x3e => self.divide = value & 0xb,
            _ => {}
        }
        Effect::None
    }

    /// A read of x2APIC MSR `msr` (0x800..=0x8ff); `Err` is #GP.
    pub fn read_msr(&mut self, msr: u32, now: u64) -> Result<u64, ()> {
        if !self.x2apic() || !(0x800..=0x8ff).contains(&msr) {
            return Err(());
        }
        let n = msr - 0x800;
        if n == 0x30 {
            return Ok(u64::from(self.icr_high) << 32 | u64::from(self.icr_low));
        }
        if n == 0x39 && self.timer_mode() == MODE_DEADLINE {
            return Ok(0);
        }
        self.reg(n, now).map(u64::from).ok_or(())
    }

    /// A write of x2APIC MSR `msr`; `Err` is #GP.
    pub fn write_msr(&mut self, msr: u32, value: u64, now: u64) -> Result<Effect, ()> {
        if !self.x2apic() || !(0x800..=0x8ff).contains(&msr) {
            return Err(());
        }
        let n = msr - 0x800;
        let low = value as u32;
        match n {
            0x8 | 0xf | 0x28 | 0x2f | 0x32..=0x38 | 0x3e if value >> 32 == 0 => {
                Ok(self.write_common(n, low, now))
            }
            0xb if value == 0 => Ok(self.eoi()),
            0x30 => {
                self.icr_low = low & !(1 << 12);
                self.icr_high = (value >> 32) as u32;
                Ok(self.ipi(low, self.icr_high))
            }
            // SELF IPI.
            0x3f if value >> 8 == 0 => Ok(Effect::Ipi(Ipi {
                vector: low as u8,
                mode: DeliveryMode::Fixed,
                dest: Destination::SelfOnly,
                trigger_level: false,
            })),
            _ => Err(()),
        }
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.base
    }

    /// A write of IA32_APIC_BASE: the base stays at 0xfee00000; going from x2APIC straight to
    /// xAPIC, or enabling x2APIC while disabled, is refused (SDM §11.12.5).
    pub fn set_apic_base(&mut self, v: u64) -> Result<(), ()> {
        let reserved = !(0xf_ffff_f000 | BASE_BSP | BASE_EXTD | BASE_EN);
        let (en, extd) = (v & BASE_EN != 0, v & BASE_EXTD != 0);
        if v & reserved != 0 || (extd && !en) {
            return Err(());
        }
        if self.x2apic() && en && !extd {
            return Err(());
        }
        if v & 0xf_ffff_f000 != APIC_BASE_ADDR {
            return Err(()); // relocation is not offered
        }
        let entering_x2 = extd && !self.x2apic();
        self.base = (v & !BASE_BSP) | (self.base & BASE_BSP);
        if !en {
            // Disabled: back to the reset state of the registers.
            *self = LocalApic {
                base: self.base,
                ..LocalApic::new(self.id, self.tsc_per_tick)
            };
        } else if entering_x2 {
            self.ldr = ((self.id >> 4) << 16) | (1 << (self.id & 15));
        }
        Ok(())
    }

    /// IA32_TSC_DEADLINE.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == MODE_DEADLINE {
            self.deadline
        } else {
            0
        }
    }

    /// A write of IA32_TSC_DEADLINE: armed only in TSC-deadline mode; 0 disarms.
    pub fn set_tsc_deadline(&mut self, v: u64, now: u64) {
        if self.timer_mode() != MODE_DEADLINE {
            return;
        }
        self.deadline = v;
        self.poll(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> LocalApic {
        let mut l = LocalApic::new(0, 1);
        l.write(0xf0, 0x1ff, 0);
        l
    }

    #[test]
    fn reset_values_and_ids() {
        let mut l = LocalApic::new(3, 1);
        assert_eq!(l.read(0x20, 0), 3 << 24);
        assert_eq!(l.read(0x30, 0) & 0xff, 0x14);
        assert_eq!(l.read(0xf0, 0), 0xff);
        assert_eq!(l.read(0x320, 0), LVT_MASK);
        assert_eq!(l.apic_base(), 0xfee0_0800, "not the BSP");
        assert_eq!(LocalApic::new(0, 1).apic_base(), 0xfee0_0900);
        assert_eq!(l.read(0x21, 0), 0, "unaligned");
        assert_eq!(l.read(0x5000, 0), 0);
    }

    #[test]
    fn priority_eoi_and_level() {
        let mut l = enabled();
        l.accept(0x31, false);
        l.accept(0x51, true);
        assert_eq!(l.pending(), Some(0x51));
        l.ack(0x51);
        assert_eq!(l.pending(), None, "0x31 is below the in-service class");
        assert_eq!(
            l.write(0xb0, 0, 0),
            Effect::Eoi(0x51),
            "level: the IOAPIC hears it"
        );
        assert_eq!(l.pending(), Some(0x31));
        l.write(0x80, 0x40, 0);
        assert_eq!(l.pending(), None, "TPR masks class 3");
        l.write(0x80, 0, 0);
        l.ack(0x31);
        assert_eq!(l.write(0xb0, 0, 0), Effect::None);
        assert_eq!(l.write(0xb0, 0, 0), Effect::None, "nothing in service");
        l.accept(3, false);
        assert_eq!(l.pending(), None, "illegal vector");
        assert_ne!(l.read(0x280, 0), 0);
    }

    #[test]
    fn disabled_apic_takes_nothing() {
        let mut l = LocalApic::new(0, 1);
        l.accept(0x40, false);
        assert_eq!(l.pending(), None);
    }

    #[test]
    fn one_shot_periodic_and_deadline() {
        let mut l = enabled();
        l.write(0x3e0, 0xb, 0); // divide by 1
        l.write(0x320, 0x20, 0); // one-shot, vector 0x20
        l.write(0x380, 100, 1000);
        assert_eq!(l.next_deadline(), Some(1100));
        assert_eq!(l.read(0x390, 1050), 50);
        l.poll(1099);
        assert_eq!(l.pending(), None);
        l.poll(1100);
        assert_eq!(l.pending(), Some(0x20));
        assert_eq!(l.next_deadline(), None);
        l.ack(0x20);
        l.write(0xb0, 0, 0);
        // Periodic with divide by 2: period 200; missed periods collapse.
        l.write(0x3e0, 0, 0);
        l.write(0x320, 0x20 | (1 << 17), 0);
        l.write(0x380, 100, 0);
        l.poll(1000);
        assert_eq!(l.next_deadline(), Some(1200));
        assert_eq!(l.pending(), Some(0x20));
        // TSC deadline.
        l.write(0x320, 0x30 | (2 << 17), 0);
        assert_eq!(l.next_deadline(), None, "mode change disarms");
        l.set_tsc_deadline(5000, 1000);
        assert_eq!(l.next_deadline(), Some(5000));
        assert_eq!(l.tsc_deadline(), 5000);
        l.poll(5000);
        assert!(l.irr[1] & 1 << 16 != 0, "vector 0x30 raised");
        assert_eq!(l.next_deadline(), None);
        // Masked: never a deadline.
        l.write(0x320, 0x30 | (2 << 17) | LVT_MASK, 0);
        l.set_tsc_deadline(9000, 6000);
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn ipis_from_the_icr() {
        let mut l = enabled();
        l.write(0x310, 2 << 24, 0);
        let e = l.write(0x300, 0x4041, 0);
        assert_eq!(
            e,
            Effect::Ipi(Ipi {
                vector: 0x41,
                mode: DeliveryMode::Fixed,
                dest: Destination::Physical(2),
                trigger_level: false
            })
        );
        let Effect::Ipi(i) = l.write(0x300, 0xc4500, 0) else {
            panic!()
        };
        assert_eq!(
            (i.mode, i.dest),
            (DeliveryMode::Init, Destination::AllExcludingSelf)
        );
        let Effect::Ipi(i) = l.write(0x300, 0x0000_0608, 0) else {
            panic!()
        };
        assert_eq!(i.mode, DeliveryMode::StartUp);
        // Logical flat: LDR bit 1 of vCPU 0.
        l.write(0xd0, 0x0200_0000, 0);
        assert!(l.matches(&Destination::Logical(0x02), false));
        assert!(!l.matches(&Destination::Logical(0x04), false));
        assert!(l.matches(&Destination::Physical(0xff), false));
        assert!(l.matches(&Destination::Physical(0), false));
        assert!(!l.matches(&Destination::Physical(1), false));
        assert!(l.matches(&Destination::SelfOnly, true));
        assert!(!l.matches(&Destination::AllExcludingSelf, true));
        // Cluster model.
        l.write(0xe0, 0x0fff_ffff, 0);
        l.write(0xd0, 0x1100_0000, 0);
        assert!(l.matches(&Destination::Logical(0x13), false));
        assert!(!l.matches(&Destination::Logical(0x21), false));
    }

    #[test]
    fn x2apic_mode() {
        let mut l = LocalApic::new(5, 1);
        assert_eq!(l.read_msr(0x802, 0), Err(()), "xAPIC mode: no MSRs");
        assert_eq!(l.set_apic_base(0xfee0_0400), Err(()), "EXTD without EN");
        l.set_apic_base(0xfee0_0c00).unwrap();
        assert_eq!(l.read_msr(0x802, 0), Ok(5));
        assert_eq!(l.read_msr(0x80d, 0), Ok(1 << 5));
        assert_eq!(
            l.set_apic_base(0xfee0_0800),
            Err(()),
            "x2APIC straight to xAPIC"
        );
        l.write_msr(0x80f, 0x1ff, 0).unwrap();
        assert_eq!(l.write_msr(0x80b, 1, 0), Err(()), "EOI of non-zero");
        assert_eq!(l.write_msr(0x80b, 0, 0), Ok(Effect::None));
        let Ok(Effect::Ipi(i)) = l.write_msr(0x830, (7u64 << 32) | 0x40, 0) else {
            panic!()
        };
        assert_eq!(i.dest, Destination::Physical(7));
        assert_eq!(l.write_msr(0x802, 1, 0), Err(()), "id is read-only");
        assert_eq!(l.read_msr(0x8ff, 0), Err(()));
        assert!(matches!(l.write_msr(0x83f, 0x33, 0), Ok(Effect::Ipi(_))));
        // Disable: back to reset, then xAPIC again.
        l.set_apic_base(0xfee0_0000).unwrap();
        l.set_apic_base(0xfee0_0800).unwrap();
        assert_eq!(l.read(0xf0, 0), 0xff);
        assert_eq!(l.set_apic_base(0x1234_0800), Err(()), "no relocation");
    }

    #[test]
    fn hostile_writes_never_panic() {
        let mut l = enabled();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x as u32) & 0xfff;
            l.write(off & !0xf, (x >> 32) as u32, i);
            l.read(off, i);
            let _ = l.write_msr(0x800 + (x as u32 & 0xff), x, i);
            let _ = l.set_apic_base(x);
            l.set_tsc_deadline(x >> 3, i);
            l.accept((x >> 40) as u8, x & 1 != 0);
            l.poll(i.wrapping_mul(x));
            if let Some(v) = l.pending() {
                l.ack(v);
            }
            let _ = l.next_deadline();
        }
    }
}
