//! The plugin's fuzz targets ([`spank_berth::fuzz`]) on stable, for a bounded time: see
//! `fuzz/driver.rs`.

#[path = "../../fuzz/driver.rs"]
mod driver;

#[test]
fn the_plugin_s_parsers_survive_their_corpus_and_mutations_of_it() {
    for (name, runs) in driver::run_all(spank_berth::fuzz::TARGETS) {
        assert!(runs > 0, "{name} ran nothing");
    }
}
