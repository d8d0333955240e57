//! SIF (Singularity Image Format) files: berth's on-node image format.
//!
//! A SIF is one file holding the image's squashfs root file system (the PrimSys partition,
//! mounted with `squashfuse -o offset=N`) and berth's `ImageConfig`. berth reads SIFs written
//! by Apptainer and writes SIFs Apptainer can read. A bare squashfs file is accepted as an
//! image too (with an empty config).
//!
//! - `format`: constants and the header/descriptor encodings.
//! - `reader`: `Sif` and `open_image`, with every offset checked against the file.
//! - `writer`: `write_image`, `create_from_dir`, `create_with`.
//! - `inspect`: the report `berth sif inspect` prints.

pub mod format;
mod inspect;
mod reader;
mod writer;

pub use inspect::inspect;
pub use reader::{open_image, ImageSource, Sif, Verified};
pub use writer::{
    create_from_dir, create_with, write_image, Built, MKSQUASHFS_COMPRESSION, PARTITION_OFFSET,
};

/// The name of the JSON.Generic object holding berth's `ImageConfig`. A generic JSON object
/// is a type Apptainer lists and otherwise leaves alone, so our files stay valid for its tools.
pub const CONFIG_NAME: &str = "berth-image-config.json";
