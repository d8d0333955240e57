//! spank_berth.so
