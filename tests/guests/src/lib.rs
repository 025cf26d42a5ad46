//! The runtime of the test guests: entry, console output through the virtual UART (port I/O)
//! and the console hypercall, hypercall wrappers over `hv-abi`, and exit.
//!
//! A guest is a `no_std` binary whose `main` is named with [`guest_main!`]; the loader enters
//! `_start` in 64-bit mode with RDI = command line address, RSI = its length, RDX = RAM size.
#![cfg_attr(not(test), no_std)]
// Register-width casts (u64 to u32 halves for RDMSR/WRMSR) are deliberate here.
#![allow(clippy::cast_possible_truncation)]

use core::fmt::Write;

pub use hv_abi;
pub use linked_list_allocator;

/// One VMCALL: number in RAX, arguments in RDI, RSI, RDX; result in RAX.
#[cfg(target_arch = "x86_64")]
pub fn hypercall(number: u64, a: u64, b: u64, c: u64) -> i64 {
    let ret: u64;
    // SAFETY: VMCALL exits to the hypervisor, which reads only these registers and writes RAX.
    unsafe {
        core::arch::asm!("vmcall", inlateout("rax") number => ret, in("rdi") a, in("rsi") b, in("rdx") c, options(nostack));
    }
    ret as i64
}

/// Writes one byte to the UART's data port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O from a guest only exits to the hypervisor.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// Reads one byte from a port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

/// Console output through the virtual 16550.
pub struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            outb(hv_abi::ports::UART, b);
        }
        Ok(())
    }
}

/// Prints a line through the UART.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::Uart, $($arg)*);
    }};
}

/// Stops the domain with `code` through the EXIT hypercall.
pub fn exit(code: u64) -> ! {
    hypercall(hv_abi::hypercall::EXIT, code, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The command line the loader left at `ptr`.
///
/// # Safety
/// `ptr..ptr+len` must be the loader's command-line buffer (identity-mapped guest memory).
pub unsafe fn args<'a>(ptr: *const u8, len: usize) -> &'a str {
    // SAFETY: forwarded from this function's contract; the loader copied a `&str` there.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, len.min(4095)) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// Declares a guest's heap of `$bytes` (a page-aligned static, its global allocator) as a
/// module `heap` whose `init()` the guest calls first thing; on the host `init` does nothing.
#[macro_export]
macro_rules! guest_heap {
    ($bytes:expr) => {
        #[cfg(target_os = "none")]
        mod heap {
            use $crate::linked_list_allocator::LockedHeap;

            const SIZE: usize = $bytes;

            #[repr(C, align(4096))]
            struct Area([u8; SIZE]);
            static mut AREA: Area = Area([0; SIZE]);

            #[global_allocator]
            static ALLOCATOR: LockedHeap = LockedHeap::empty();

            pub fn init() {
                // SAFETY: called once, first thing; nothing else uses the area.
                unsafe { ALLOCATOR.lock().init((&raw mut AREA).cast::<u8>(), SIZE) };
            }
        }

        #[cfg(not(target_os = "none"))]
        mod heap {
            pub fn init() {}
        }
    };
}

/// Declares the guest's entry: `guest_main!(run)` with `fn run(args: &str, ram: u64)`.
#[macro_export]
macro_rules! guest_main {
    ($main:path) => {
        #[cfg(target_os = "none")]
        #[unsafe(no_mangle)]
        extern "C" fn _start(cmdline: *const u8, len: usize, ram: u64) -> ! {
            // SAFETY: the hypervisor's loader passes its command-line buffer here.
            let args = unsafe { $crate::args(cmdline, len) };
            $main(args, ram);
            $crate::exit(0)
        }

        #[cfg(target_os = "none")]
        #[panic_handler]
        fn panic(info: &core::panic::PanicInfo) -> ! {
            $crate::println!("guest panic: {}", info);
            $crate::exit(101)
        }

        #[cfg(not(target_os = "none"))]
        fn main() {
            let _ = $main;
            eprintln!("a test guest: build it for x86_64-unknown-none (cargo xtask build)");
        }
    };
}
