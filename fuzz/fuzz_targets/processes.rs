//! Random steps of several simulated processes sharing one daemon's stable
//! tree, unstable tree and pool (`samepage_core::machine`): writes, scans,
//! processes killed and started again, the daemon killed and started again.
//! After every step every page holds what its process wrote, the shared
//! tree's counts equal the pages linked to each node and mapping each slot,
//! and no pool page is left without a node. Run: `cargo +nightly fuzz run
//! processes` in `fuzz/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use samepage_core::machine::{tunables, Machine, Step};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mut t = tunables(u32::from(data[0] % 5) + 2, data[0] & 0x80 != 0);
    t.pages_to_scan = u32::from(data[1] % 40) + 1;
    let mut m = Machine::new(3, &t);
    m.space.map_budget = (data[1] & 0x80 != 0).then_some(u64::from(data[1] & 0x7f) * 3);
    for chunk in data[2..].chunks_exact(4).take(200) {
        m.apply(&Step::from_bytes(chunk.try_into().expect("4 bytes")));
        m.check(false);
    }
});
