//! VMCS access behind a trait: the real current VMCS (`vmx::hw::ActiveVmcs`) implements it on
//! bare metal, [`FakeVmcs`] in host tests, so the exit dispatcher runs in both.

use crate::vmx::vmcs::{ExitInfo, Field, VmxError};

/// Reads and writes of the current VMCS's guest-state, control and exit-information fields.
pub trait VmcsAccess {
    fn get(&mut self, f: Field) -> u64;
    fn set(&mut self, f: Field, value: u64) -> Result<(), VmxError>;
    fn info(&mut self, f: ExitInfo) -> u64;
}

/// A VMCS in memory, for host tests: fields read as 0 until set; every write is recorded.
#[cfg(test)]
#[derive(Default, Debug)]
pub struct FakeVmcs {
    pub fields: alloc::collections::BTreeMap<u32, u64>,
    pub exit_info: alloc::collections::BTreeMap<u32, u64>,
    pub writes: alloc::vec::Vec<(u32, u64)>,
    pub reads: u32,
}

#[cfg(test)]
impl FakeVmcs {
    /// Sets a field without recording it as a write (the state before the exit).
    pub fn with(mut self, f: Field, value: u64) -> Self {
        self.fields.insert(f.encoding(), value);
        self
    }

    pub fn with_info(mut self, f: ExitInfo, value: u64) -> Self {
        self.exit_info.insert(f.encoding(), value);
        self
    }

    pub fn field(&self, f: Field) -> u64 {
        self.fields.get(&f.encoding()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
impl VmcsAccess for FakeVmcs {
    fn get(&mut self, f: Field) -> u64 {
        self.reads += 1;
        self.field(f)
    }

    fn set(&mut self, f: Field, value: u64) -> Result<(), VmxError> {
        if f.width() < 64 && value >> f.width() != 0 {
            return Err(VmxError::TooWide {
                field: f.encoding(),
                value,
            });
        }
        self.writes.push((f.encoding(), value));
        self.fields.insert(f.encoding(), value);
        Ok(())
    }

    fn info(&mut self, f: ExitInfo) -> u64 {
        self.reads += 1;
        self.exit_info.get(&f.encoding()).copied().unwrap_or(0)
    }
}
