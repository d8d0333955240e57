//! The launcher's fuzz targets ([`berth::fuzz`]) on stable, for a bounded time: see
//! `fuzz/driver.rs`.

#[path = "../../fuzz/driver.rs"]
mod driver;

#[test]
fn every_parser_of_outside_input_survives_its_corpus_and_mutations_of_it() {
    let targets: Vec<driver::Target> = berth::fuzz::TARGETS.to_vec();
    for (name, runs) in driver::run_all(&targets) {
        assert!(runs > 0, "{name} ran nothing");
    }
}
