//! Random operation sequences on the simulated page space, checked against
//! the reference model after every step (content, pool pages, the sharing
//! limit, the scanner's invariants) and, at the end, counters against an
//! independent recount. Run: `cargo +nightly fuzz run ops` in `fuzz/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use samepage_core::model::{Model, Op};
use samepage_core::{Run, Tunables};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let t = Tunables {
        run: Run::Merge,
        pages_to_scan: (data[0] % 40 + 1) as u32,
        sleep_millisecs: 0,
        max_page_sharing: (data[1] % 5 + 2) as u32,
        use_zero_pages: data[0] & 0x80 != 0,
        stable_node_chains_prune_millisecs: 50,
        ..Tunables::default()
    };
    let mut m = Model::new(t, 3, 24);
    for chunk in data[2..].chunks_exact(6).take(300) {
        m.apply(&Op::from_bytes(chunk.try_into().expect("6 bytes")));
        m.check();
    }
    m.check_quiesced();
});
