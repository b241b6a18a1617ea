//! The test kit: everything the end-to-end tests in `tests/` and the bench start and drive,
//! written once. `kit` builds in-process clusters; the other modules hold what tests around
//! them share.
pub mod bins;
pub mod clients;
pub mod etcd;
pub mod flood;
pub mod impair;
pub mod influx2;
pub mod influxd;
pub mod kit;
pub mod leases;
pub mod lossy;
pub mod openapi;
pub mod ops;
pub mod ports;
pub mod procs;
pub mod relay_fleet;
pub mod small_disk;
pub mod traffic;
pub mod udp;
pub mod wait;
