//! `spinner`: never yields. The preemption timer must keep it from holding its CPU.
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::println;

test_guests::guest_main!(run);

fn run(_args: &str, _ram: u64) {
    println!("spinner: spinning forever");
    let mut n = 0u64;
    loop {
        n = core::hint::black_box(n.wrapping_add(1));
    }
}
